"""What every stage prepares before its trainer exists: the checked datasets and the adapted model.

Data: the records of --data_path / --eval_data_path, laid out by the family as the stage's sample kind,
checked by preflight. Model: loaded in the training dtype (4-bit LLM with --q_lora), the parts not tuned
frozen here (the one place: --tune_vision, --tune_llm), LoRA added (lora.py).
"""

import logging
import os

import torch

import data.sources
import lora
import preflight
from data.errors import DataError
from data.packing import PackedDataset
from dataset import log_sample
from evaluation.during_training import ScoredEvaluation, unscorable_problems
from usage import UsageError

logger = logging.getLogger(__name__)


def dataset_settings(data_args, training_args, path):
    """The keywords of ``family.make_dataset`` for the data file ``path`` (what training lays records out with)."""
    return dict(
        max_length=training_args.model_max_length,
        image_root=data_args.image_folder or os.path.dirname(os.path.abspath(path)),
        data_path=path,
        max_slice_nums=training_args.max_slice_nums,
        max_num_frames=data_args.max_num_frames,
        stack_frames=data_args.stack_frames,
    )


def build_datasets(family, data_args, training_args, processing, config, sample_kind="sft"):
    """The train and eval datasets of the command line, laid out for the model of ``config``.

    A data file that cannot be read comes back as its DataError in place of a dataset: preflight
    reports it in its table, like a record's problem.
    """

    def make(path):
        try:
            records = data.sources.load(path, data_args.data_columns)
        except DataError as e:
            return e
        return family.make_dataset(records, processing, config, sample_kind=sample_kind,
                                   **dataset_settings(data_args, training_args, path))

    if data_args.data_path is None:
        raise UsageError("--data_path is required")
    train_dataset = make(data_args.data_path)
    eval_dataset = make(data_args.eval_data_path) if data_args.eval_data_path else None
    return train_dataset, eval_dataset


def prepare_data(family, data_args, training_args, processing, config, sample_kind="sft", record_checks=()):
    """Build the datasets and check every record (preflight): a preflight.Checked, the ``{"train", "eval"}``
    datasets as training sees them and their samples' lengths. ``record_checks``: the stage's own
    (preflight.check_all), beside --eval_generate's."""
    train_dataset, eval_dataset = build_datasets(family, data_args, training_args, processing, config, sample_kind)
    checked = preflight.run(
        {"train": train_dataset, "eval": eval_dataset},
        training_args.output_dir,
        skip_bad=data_args.skip_bad_samples,
        preflight_only=data_args.preflight_only,
        is_main=training_args.process_index == 0,
        workers=data_args.preflight_workers,
        cache=data_args.preflight_cache,
        record_checks=[*scorable_check(training_args), *record_checks],
    )
    if training_args.should_log and not data_args.preflight_only:
        log_sample(checked.datasets["train"], family.tokenizer(processing))
    return checked


def scorable_check(training_args):
    """Preflight's record checks for --eval_generate (the references of the eval records it answers): one, or none."""
    if not training_args.eval_generate:
        return []

    def check(datasets, bad):
        if "eval" not in datasets:
            return []
        return unscorable_problems(datasets["eval"], bad["eval"], count=training_args.eval_generate,
                                   metric_names=training_args.eval_metrics)

    return [check]


def scored_evaluation(family, processing, config, checked, data_args, training_args):
    """--eval_generate's ScoredEvaluation of the eval set as preflight left it (``checked``), or None."""
    if not training_args.eval_generate:
        return None
    return ScoredEvaluation(
        family, processing, config, checked.datasets["eval"],
        dataset_settings(data_args, training_args, data_args.eval_data_path),
        count=training_args.eval_generate, metric_names=training_args.eval_metrics,
        max_new_tokens=training_args.eval_max_new_tokens, output_dir=training_args.output_dir,
        batch_size=training_args.per_device_eval_batch_size,
    )


def pack(dataset, lengths, training_args):
    """The training rows of --packing: ``dataset``'s samples (of preflight's ``lengths``), whole, side by side
    up to model_max_length. Evaluation stays unpacked: its loss then compares with runs without --packing
    sample for sample."""
    packed = PackedDataset(dataset, lengths, training_args.model_max_length)
    # The rows are the Trainer's examples: it counts steps from them (and logs the count).
    logger.info(
        "Packing: %d samples into %d rows of at most %d tokens (%.1f%% of the rows' tokens real)",
        len(dataset), len(packed), training_args.model_max_length, 100 * packed.fill(),
    )
    return packed


def compute_dtype(training_args):
    """The dtype the model loads and trains in: --fp16, --bf16, else float32."""
    if training_args.fp16:
        return torch.float16
    if training_args.bf16:
        return torch.bfloat16
    return torch.float32


def load_model(family, path, training_args, lora_args, config):
    """The model at ``path`` in the training dtype; with --q_lora its LLM in 4 bit, on this rank's device."""
    dtype = compute_dtype(training_args)
    device_map = None
    if lora_args.q_lora:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device_map = {"": local_rank if torch.cuda.is_available() else "cpu"}
    return family.load_model(
        path,
        config,
        dtype=dtype,
        cache_dir=training_args.cache_dir,
        device_map=device_map,
        quantization_config=lora.quantization_config(lora_args, dtype, family.unquantized_modules),
    )


def count_parameters(model):
    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def adapt_model(family, model, training_args, lora_args):
    """Freeze the parts that are not tuned and add LoRA if asked: the model the Trainer trains."""
    frozen = ([] if training_args.tune_vision else family.vision(model)) + (
        [] if training_args.tune_llm else family.language_model(model)
    )
    for part in frozen:
        part.requires_grad_(False)
    if training_args.use_lora:
        model = lora.apply_lora(model, family, training_args, lora_args)
    total, trainable = count_parameters(model)
    logger.info("Parameters: %s total, %s trainable (%.2f%%)", f"{total:,}", f"{trainable:,}", 100 * trainable / total)
    return model
