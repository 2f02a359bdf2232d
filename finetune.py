"""Fine-tune a MiniCPM-V model (2.0, Llama3-V 2.5, 2.6, o-2.6, 4.x) on JSON conversations.

Launch through the scripts, which hold the reference flags:
    bash finetune_lora.sh     # LoRA, DeepSpeed ZeRO-2
    bash finetune_ds.sh       # full fine-tune, DeepSpeed ZeRO-3
or directly: ``torchrun --nproc_per_node N finetune.py --model_name_or_path ... --data_path ...``.

This file parses and wires; each stage lives in the module of its concern: arguments.py (the
command line and its checks), distributed.py (start-up and engine checks), loading.py (model,
config, tokenizer), dataset.py (records to tensors), preflight.py (the data check), lora.py
(LoRA/QLoRA), trainer.py (CPMTrainer).
"""

import logging
import os
import sys

import torch
import transformers

import distributed
import loading
import lora
import preflight
import resilience
from arguments import check_paths, compute_dtype, parse_args
from dataset import DataCollator, DataError, PreferenceCollator, data_settings, load_records, log_sample, make_dataset
from dpo import PreferenceTrainer, unsupported_reason
from trainer import CPMTrainer
from usage import EXIT_USAGE, UsageError

logger = logging.getLogger(__name__)


def build_datasets(data_args, training_args, tokenizer, config):
    """The train and eval datasets of the command line, laid out for the model of ``config``.

    A data file that cannot be read comes back as its DataError in place of a dataset: preflight
    reports it in its table, like a record's problem.
    """
    settings = data_settings(config, training_args.max_slice_nums)

    def make(path):
        try:
            records = load_records(path)
        except DataError as e:
            return e
        return make_dataset(
            records,
            tokenizer,
            settings,
            llm_type=training_args.llm_type,
            max_length=training_args.model_max_length,
            image_root=data_args.image_folder or os.path.dirname(os.path.abspath(path)),
            data_path=path,
            preference=training_args.stage == "dpo",
        )

    if data_args.data_path is None:
        raise UsageError("--data_path is required")
    train_dataset = make(data_args.data_path)
    eval_dataset = make(data_args.eval_data_path) if data_args.eval_data_path else None
    return train_dataset, eval_dataset


def prepare_data(data_args, training_args, tokenizer, config):
    """Build the datasets and check every record (preflight): ``{"train", "eval"}`` as training sees them."""
    train_dataset, eval_dataset = build_datasets(data_args, training_args, tokenizer, config)
    checked = preflight.run(
        {"train": train_dataset, "eval": eval_dataset},
        training_args.output_dir,
        skip_bad=data_args.skip_bad_samples,
        preflight_only=data_args.preflight_only,
        is_main=training_args.process_index == 0,
    )
    if training_args.should_log and not data_args.preflight_only:
        log_sample(checked["train"], tokenizer)
    return checked


def load_model(path, training_args, lora_args, config):
    """The model at ``path`` in the training dtype; with --q_lora its LLM in 4 bit, on this rank's device."""
    dtype = compute_dtype(training_args)
    device_map = None
    if lora_args.q_lora:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device_map = {"": local_rank if torch.cuda.is_available() else "cpu"}
    return loading.load_model(
        path,
        config,
        dtype=dtype,
        cache_dir=training_args.cache_dir,
        device_map=device_map,
        quantization_config=lora.quantization_config(lora_args, dtype),
    )


def count_parameters(model):
    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def adapt_model(model, training_args, lora_args):
    """Freeze the parts that are not tuned and add LoRA if asked: the model the Trainer trains."""
    if not training_args.tune_vision:
        model.vpm.requires_grad_(False)
    if not training_args.tune_llm:
        model.llm.requires_grad_(False)
    if training_args.use_lora:
        model = lora.apply_lora(model, training_args, lora_args)
    total, trainable = count_parameters(model)
    logger.info("Parameters: %s total, %s trainable (%.2f%%)", f"{total:,}", f"{trainable:,}", 100 * trainable / total)
    return model


def load_reference(model_args, training_args, lora_args, config):
    """The DPO reference model: --dpo_ref_model, else a copy of the starting weights (None with
    LoRA: the policy with its adapters off is the reference)."""
    if training_args.dpo_ref_model:
        path = training_args.dpo_ref_model
        config = loading.load_config(path, training_args.cache_dir)
    elif training_args.use_lora:
        return None
    else:
        path = model_args.model_name_or_path
    logger.info("DPO reference model: %s (frozen)", path)
    return load_model(path, training_args, lora_args, config)


def train(model_args, data_args, training_args, lora_args):
    """Train as the parsed arguments say and save the result; the trainer, or None with --preflight_only."""
    resume_from = check_paths(model_args, training_args)
    distributed.start(training_args)
    # Before the model exists: LoRA's initial weights are drawn when the adapter is added, and
    # the Trainer seeds only later, when it is created.
    transformers.set_seed(training_args.seed)
    config = loading.load_config(model_args.model_name_or_path, training_args.cache_dir)
    if training_args.stage == "dpo" and unsupported_reason(config):
        raise UsageError(f"--stage dpo: {unsupported_reason(config)}")
    tokenizer = loading.load_tokenizer(model_args.model_name_or_path, training_args.cache_dir)
    datasets = prepare_data(data_args, training_args, tokenizer, config)
    if data_args.preflight_only:
        return None
    model = adapt_model(
        load_model(model_args.model_name_or_path, training_args, lora_args, config), training_args, lora_args
    )
    common = dict(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["eval"],
        processing_class=tokenizer,
        model_source=loading.model_source_dir(model_args.model_name_or_path, training_args.cache_dir),
        callbacks=[resilience.PreemptionCallback()],
    )
    if training_args.stage == "dpo":
        trainer = PreferenceTrainer(
            **common,
            data_collator=PreferenceCollator(training_args.model_max_length),
            beta=training_args.dpo_beta,
            loss_type=training_args.dpo_loss_type,
            ref_model=load_reference(model_args, training_args, lora_args, config),
        )
    else:
        trainer = CPMTrainer(**common, data_collator=DataCollator(training_args.model_max_length))
    distributed.check_engine(trainer, training_args)
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    return trainer


def main(argv=None):
    """The command line: parse ``argv`` (default: sys.argv), set up this process's logging, train.

    A mistake on the command line prints one message (which flag, what, how to fix) and exits 2.
    """
    try:
        model_args, data_args, training_args, lora_args = parse_args(argv)
        logging.basicConfig(
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            level=training_args.get_process_log_level(),
            force=True,
        )
        transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
        trainer = train(model_args, data_args, training_args, lora_args)
    except UsageError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except resilience.Preempted:
        distributed.finish()  # every rank stopped after the same step
        raise
    distributed.finish()
    return trainer


if __name__ == "__main__":
    main()
