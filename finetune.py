"""Fine-tune a MiniCPM-V model (2.0, Llama3-V 2.5, 2.6, o-2.6, 4.x, and the native 4.6, 4.7, OCR) on JSON conversations.

Launch through the scripts, which hold the reference flags:
    bash finetune_lora.sh     # LoRA, DeepSpeed ZeRO-2
    bash finetune_ds.sh       # full fine-tune, DeepSpeed ZeRO-3
or directly: ``torchrun --nproc_per_node N finetune.py --model_name_or_path ... --data_path ...``.

This file parses, finds the family and runs the stage; each concern lives in its module:
arguments.py (the command line and its checks), families/ (the kind of checkpoint, chosen once from
its config: parts, capabilities, loading, data, forward), stages/ (sft, dpo: what each needs and
refuses, its data and trainer; setup -> train -> cleanup), distributed.py (start-up and engine
checks), run_folder.py (the output folder), preflight.py (the data check), trainer.py (CPMTrainer).
"""

import sys

import startup

if __name__ == "__main__":  # before transformers is imported: see startup.py
    startup.keep_bitsandbytes_out(sys.argv[1:])

import logging  # noqa: E402

import transformers  # noqa: E402

import distributed  # noqa: E402
import families  # noqa: E402
import preflight  # noqa: E402
import resilience  # noqa: E402
import run_folder  # noqa: E402
import stages  # noqa: E402
from arguments import check_paths, parse_args  # noqa: E402
from data.errors import DataError  # noqa: E402
from usage import EXIT_USAGE, UsageError  # noqa: E402

logger = logging.getLogger(__name__)


def train(model_args, data_args, training_args, lora_args):
    """Train as the parsed arguments say and save the result; the trainer, or None with --preflight_only."""
    resume_from = check_paths(model_args, training_args, lora_args)
    distributed.start(training_args)
    with run_folder.claim(model_args, data_args, training_args, lora_args, resume_from) as earlier_checkpoints:
        return train_in_folder(model_args, data_args, training_args, lora_args, resume_from, earlier_checkpoints)


def train_in_folder(model_args, data_args, training_args, lora_args, resume_from, earlier_checkpoints):
    """train(), once the output folder is the run's (run_folder.claim): the family of the checkpoint,
    then the stage's run. ``earlier_checkpoints``: those an earlier run left there, which checkpoint
    rotation keeps."""
    config = families.load_config(model_args.model_name_or_path, training_args.cache_dir)
    try:
        family = families.family_for(config, training_args.llm_type)
    except ValueError as e:  # --llm_type contradicting the checkpoint
        raise UsageError(str(e)) from e
    logger.info("Checkpoint %s: family %s, llm_type %s", model_args.model_name_or_path, family.name, family.llm_type)
    stage = stages.get(training_args.stage)
    return stage.run(family, config, model_args, data_args, training_args, lora_args, resume_from, earlier_checkpoints)


def set_up_logging(training_args):
    """transformers' own logging follows --log_level, as its example scripts do (passive, the default:
    its own level, warning; the model configs it logs at info stay out of the log). This project's lines
    (checkpoint, preflight, parameters, LoRA modules) are logged at info on the main process unless
    --log_level names a level, so a run's log starts with them; other processes follow --log_level_replica.
    """
    level = training_args.get_process_log_level()
    ours = logging.INFO if training_args.log_level == "passive" and training_args.should_log else level
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=ours, force=True)
    transformers.utils.logging.set_verbosity(level)


def main(argv=None):
    """The command line: parse ``argv`` (default: sys.argv), set up this process's logging, train.

    A mistake on the command line prints one message (which flag, what, how to fix) and exits 2.
    """
    try:
        model_args, data_args, training_args, lora_args = parse_args(argv)
        set_up_logging(training_args)
        trainer = train(model_args, data_args, training_args, lora_args)
    except (UsageError, families.TransformersTooOld) as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except run_folder.Refused as e:
        if e.report:
            print(f"finetune.py: error: {e}", file=sys.stderr)
        distributed.finish()  # every rank got the verdict together
        raise
    except (resilience.Preempted, resilience.NonFiniteLoss, resilience.RecordFailed, preflight.PreflightFailed):
        # Stops that every rank reaches together (after an all-reduce or the shared preflight
        # verdict): the group can be torn down as after a finished run.
        distributed.finish()
        raise
    except DataError as e:
        # A record that fails outside the training steps (evaluation): this process names it.
        logger.error("Stopping: %s", e)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C before training started or after it ended (during it, PreemptionCallback saves a
        # checkpoint at the current step instead): nothing of this run to keep.
        logger.warning("Interrupted (Ctrl-C) outside the training steps; nothing was saved by this stop")
        sys.exit(resilience.EXIT_INTERRUPTED)
    distributed.finish()
    return trainer


if __name__ == "__main__":
    main()
