"""Fine-tune a MiniCPM-V model (2.0, Llama3-V 2.5, 2.6, o-2.6, 4.x, and the native 4.6, 4.7, OCR) on JSON conversations.

Launch through the scripts, which hold the reference flags:
    bash finetune_lora.sh     # LoRA, DeepSpeed ZeRO-2
    bash finetune_ds.sh       # full fine-tune, DeepSpeed ZeRO-3
or directly: ``torchrun --nproc_per_node N finetune.py --model_name_or_path ... --data_path ...``.

This file parses and wires; each stage lives in the module of its concern: arguments.py (the
command line and its checks), distributed.py (start-up and engine checks), backends.py (the kind
of checkpoint, remote-code or native, chosen once from its config: loading, data, forward),
loading.py (remote-code loading), dataset.py / native_data.py (records to tensors), preflight.py
(the data check), lora.py (LoRA/QLoRA), trainer.py (CPMTrainer).
"""

import sys

import startup

if __name__ == "__main__":  # before transformers is imported: see startup.py
    startup.keep_bitsandbytes_out(sys.argv[1:])

import logging  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import backends  # noqa: E402
import data_source  # noqa: E402
import distributed  # noqa: E402
import loading  # noqa: E402
import lora  # noqa: E402
import preflight  # noqa: E402
import resilience  # noqa: E402
import run_folder  # noqa: E402
from arguments import check_paths, compute_dtype, parse_args  # noqa: E402
from dataset import DataError, PackedDataset, PreferenceCollator, log_sample  # noqa: E402
from dpo import PreferenceTrainer, unsupported_reason  # noqa: E402
from trainer import CPMTrainer, StopAtEvalLoss  # noqa: E402
from usage import EXIT_USAGE, UsageError  # noqa: E402

logger = logging.getLogger(__name__)


def build_datasets(backend, data_args, training_args, processing, config):
    """The train and eval datasets of the command line, laid out for the model of ``config``.

    A data file that cannot be read comes back as its DataError in place of a dataset: preflight
    reports it in its table, like a record's problem.
    """

    def make(path):
        try:
            records = data_source.load(path, data_args.data_columns)
        except DataError as e:
            return e
        return backend.make_dataset(
            records,
            processing,
            config,
            max_length=training_args.model_max_length,
            image_root=data_args.image_folder or os.path.dirname(os.path.abspath(path)),
            data_path=path,
            max_slice_nums=training_args.max_slice_nums,
            max_num_frames=data_args.max_num_frames,
            stack_frames=data_args.stack_frames,
            preference=training_args.stage == "dpo",
        )

    if data_args.data_path is None:
        raise UsageError("--data_path is required")
    train_dataset = make(data_args.data_path)
    eval_dataset = make(data_args.eval_data_path) if data_args.eval_data_path else None
    return train_dataset, eval_dataset


def prepare_data(backend, data_args, training_args, processing, config):
    """Build the datasets and check every record (preflight): ``{"train", "eval"}`` as training sees them."""
    train_dataset, eval_dataset = build_datasets(backend, data_args, training_args, processing, config)
    checked = preflight.run(
        {"train": train_dataset, "eval": eval_dataset},
        training_args.output_dir,
        skip_bad=data_args.skip_bad_samples,
        preflight_only=data_args.preflight_only,
        is_main=training_args.process_index == 0,
        workers=data_args.preflight_workers,
        cache=data_args.preflight_cache,
    )
    if training_args.should_log and not data_args.preflight_only:
        log_sample(checked["train"], backend.tokenizer(processing))
    return checked


def pack(dataset, training_args):
    """The training rows of --packing: ``dataset``'s samples, whole, side by side up to model_max_length.
    Evaluation stays unpacked: its loss then compares with runs without --packing sample for sample."""
    packed = PackedDataset(dataset, training_args.model_max_length)
    # The rows are the Trainer's examples: it counts steps from them (and logs the count).
    logger.info(
        "Packing: %d samples into %d rows of at most %d tokens (%.1f%% of the rows' tokens real)",
        len(dataset), len(packed), training_args.model_max_length, 100 * packed.fill(),
    )
    return packed


def load_model(backend, path, training_args, lora_args, config):
    """The model at ``path`` in the training dtype; with --q_lora its LLM in 4 bit, on this rank's device."""
    dtype = compute_dtype(training_args)
    device_map = None
    if lora_args.q_lora:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device_map = {"": local_rank if torch.cuda.is_available() else "cpu"}
    return backend.load_model(
        path,
        config,
        dtype=dtype,
        cache_dir=training_args.cache_dir,
        device_map=device_map,
        quantization_config=lora.quantization_config(lora_args, dtype, backend.unquantized_modules),
    )


def count_parameters(model):
    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def adapt_model(backend, model, training_args, lora_args):
    """Freeze the parts that are not tuned and add LoRA if asked: the model the Trainer trains."""
    frozen = ([] if training_args.tune_vision else backend.vision(model)) + (
        [] if training_args.tune_llm else backend.language_model(model)
    )
    for part in frozen:
        part.requires_grad_(False)
    if training_args.use_lora:
        model = lora.apply_lora(model, training_args, lora_args)
    total, trainable = count_parameters(model)
    logger.info("Parameters: %s total, %s trainable (%.2f%%)", f"{total:,}", f"{trainable:,}", 100 * trainable / total)
    return model


def load_reference(backend, model_args, training_args, lora_args, config):
    """The DPO reference model (of ``backend``: DPO trains remote-code checkpoints only):
    --dpo_ref_model, else a copy of the starting weights (None with LoRA: the policy with its
    adapters off is the reference)."""
    if training_args.dpo_ref_model:
        path = training_args.dpo_ref_model
        config = loading.load_config(path, training_args.cache_dir)
    elif training_args.use_lora:
        return None
    else:
        path = model_args.model_name_or_path
    logger.info("DPO reference model: %s (frozen)", path)
    return load_model(backend, path, training_args, lora_args, config)


def train(model_args, data_args, training_args, lora_args):
    """Train as the parsed arguments say and save the result; the trainer, or None with --preflight_only."""
    resume_from = check_paths(model_args, training_args, lora_args)
    distributed.start(training_args)
    with run_folder.claim(model_args, data_args, training_args, lora_args, resume_from) as earlier_checkpoints:
        return train_in_folder(model_args, data_args, training_args, lora_args, resume_from, earlier_checkpoints)


def train_in_folder(model_args, data_args, training_args, lora_args, resume_from, earlier_checkpoints):
    """train(), once the output folder is the run's (run_folder.claim); ``earlier_checkpoints``: those
    an earlier run left there, which checkpoint rotation keeps."""
    # Before the model exists: LoRA's initial weights are drawn when the adapter is added, and
    # the Trainer seeds only later, when it is created.
    transformers.set_seed(training_args.seed)
    config = loading.load_config(model_args.model_name_or_path, training_args.cache_dir)
    # The one place the kind of checkpoint is decided; --llm_type must agree with its config.
    try:
        backend = backends.backend_for(config, training_args.llm_type)
    except ValueError as e:  # --llm_type contradicting the checkpoint
        raise UsageError(str(e)) from e
    logger.info("Checkpoint %s: %s, llm_type %s", model_args.model_name_or_path, type(backend).__name__, backend.llm_type)
    if training_args.stage == "dpo" and unsupported_reason(config):
        raise UsageError(f"--stage dpo: {unsupported_reason(config)}")
    if training_args.packing and backend.packing_problem:
        raise UsageError(backend.packing_problem)
    if not backend.takes_video and (data_args.max_num_frames is not None or data_args.stack_frames is not None):
        raise UsageError(
            "--max_num_frames and --stack_frames apply to video, which only the native models "
            f"(model_type {', '.join(backends.NATIVE_MODEL_TYPES)}) take"
        )
    if training_args.use_lora:
        lora.modules_to_save(backend, training_args, lora_args)  # refuses a list that leaves the tuned vision out
    processing = backend.load_processing(model_args.model_name_or_path, training_args.cache_dir)
    datasets = prepare_data(backend, data_args, training_args, processing, config)
    if data_args.preflight_only:
        return None
    train_dataset = pack(datasets["train"], training_args) if training_args.packing else datasets["train"]
    model = load_model(backend, model_args.model_name_or_path, training_args, lora_args, config)
    problem = training_args.packing and backends.packing_attention_problem(backend.loss_module(model))
    if problem:
        raise UsageError(problem)
    model = adapt_model(backend, model, training_args, lora_args)
    common = dict(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=datasets["eval"],
        processing_class=processing,
        model_source=loading.model_source_dir(model_args.model_name_or_path, training_args.cache_dir),
        callbacks=[resilience.PreemptionCallback()]
        + ([StopAtEvalLoss(training_args.stop_at_eval_loss)] if training_args.stop_at_eval_loss is not None else []),
        earlier_checkpoints=earlier_checkpoints,
    )
    if training_args.stage == "dpo":
        trainer = PreferenceTrainer(
            **common,
            data_collator=PreferenceCollator(training_args.model_max_length),
            beta=training_args.dpo_beta,
            loss_type=training_args.dpo_loss_type,
            ref_model=load_reference(backend, model_args, training_args, lora_args, config),
        )
    else:
        trainer = CPMTrainer(**common, data_collator=backend.collator(processing, training_args.model_max_length))
    distributed.check_engine(trainer, training_args)
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    return trainer


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
    except (UsageError, loading.TransformersTooOld) as e:
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
