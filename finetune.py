"""Fine-tune a MiniCPM-V model (2.0, Llama3-V 2.5, 2.6, o-2.6, 4.x) on JSON conversations.

Launch through the scripts, which hold the reference flags:
    bash finetune_lora.sh     # LoRA, DeepSpeed ZeRO-2
    bash finetune_ds.sh       # full fine-tune, DeepSpeed ZeRO-3
or directly: ``torchrun --nproc_per_node N finetune.py --model_name_or_path ... --data_path ...``.
"""

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers.integrations import is_deepspeed_zero3_enabled

import distributed
import loading
import lora
import preflight
import resilience
from dataset import LLM_TYPES, DataCollator, data_settings, load_records, log_sample, make_dataset
from trainer import CPMTrainer

logger = logging.getLogger(__name__)



@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="openbmb/MiniCPM-V-2", metadata={"help": "Hub id or local folder of the model to fine-tune."}
    )


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "Training data: a .json list or a .jsonl of records."})
    eval_data_path: str = field(default=None, metadata={"help": "Evaluation data, same format (optional)."})
    image_folder: str = field(
        default=None,
        metadata={"help": "Folder that relative image paths resolve against (default: the data file's folder)."},
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "Train without the records preflight reports as unusable, instead of stopping."},
    )
    preflight_only: bool = field(
        default=False,
        metadata={"help": "Only check the data (no weights load): report problems, exit 1 if there are any."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str = field(default=None, metadata={"help": "Where downloaded models are cached."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer name (see transformers OptimizerNames)."})
    model_max_length: int = field(
        default=2048, metadata={"help": "Maximum sequence length; samples are right-padded and truncated to it."}
    )
    tune_vision: bool = field(default=True, metadata={"help": "Train the vision encoder (vpm)."})
    tune_llm: bool = field(default=True, metadata={"help": "Train the language model (llm) in full."})
    llm_type: str = field(default="minicpm", metadata={"help": f"Chat template: one of {', '.join(LLM_TYPES)}."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM instead of its weights."})
    max_slice_nums: int = field(default=9, metadata={"help": "Most slices a high-resolution image is cut into."})
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch samples of similar length together (less padding), using the lengths "
                  "preflight measured; the same as --train_sampling_strategy group_by_length."},
    )
    log_level: str = field(default="info", metadata={"help": "Log level of the main process."})
    # Our batches are dicts the model reads whole; the Trainer must not prune their keys.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the model reads every key."})
    label_names: list[str] = field(default_factory=lambda: ["labels"], metadata={"help": "Batch keys with labels."})
    # transformers 5.x calls gradient checkpointing "activation checkpointing" (the old names
    # stay as aliases); non-reentrant checkpointing works with frozen inputs and LoRA.
    activation_checkpointing_kwargs: dict = field(
        default_factory=lambda: {"use_reentrant": False},
        metadata={"help": "Keyword arguments for gradient (activation) checkpointing."},
    )

    def __post_init__(self):
        if self.llm_type not in LLM_TYPES:
            raise ValueError(f"--llm_type {self.llm_type!r} is not one of {', '.join(LLM_TYPES)}")
        if self.use_lora and self.tune_llm:
            raise ValueError(
                "cannot tune the LLM and apply LoRA at once: pass --tune_llm false together with --use_lora true"
            )
        if self.model_max_length < 1:
            raise ValueError("--model_max_length must be positive")
        if self.max_slice_nums < 1:
            raise ValueError("--max_slice_nums must be at least 1")
        if self.group_by_length:
            # transformers 5 replaced its own --group_by_length by this sampler option.
            if self.train_sampling_strategy not in ("random", "group_by_length"):
                raise ValueError(
                    f"--group_by_length true contradicts --train_sampling_strategy {self.train_sampling_strategy}"
                )
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: str = field(
        default=lora.DEFAULT_LORA_TARGETS, metadata={"help": "Regex (full match) of the module names that get LoRA."}
    )
    lora_weight_path: str = field(default="", metadata={"help": "An existing adapter folder to start training from."})
    lora_bias: str = field(default="none", metadata={"help": "Which biases train: none, all or lora_only."})
    q_lora: bool = field(default=False, metadata={"help": "QLoRA: load the LLM in 4 bit (nf4, double quant)."})
    lora_modules_to_save: str = field(
        default="",
        metadata={"help": "Comma-separated modules trained in full and saved with the adapter "
                  "(default: embed_tokens,resampler, plus vpm with --tune_vision)."},
    )
    lora_layer_replication: str = field(
        default=None,
        metadata={"help": "peft layer_replication (start:end ranges); MiniCPM-V's nested LLM cannot take it, "
                  "so any value is rejected."},
    )
    lora_layers_to_transform: list[int] = field(
        default=None, metadata={"help": "Only these LLM layer indices get LoRA (space-separated)."}
    )
    lora_layers_pattern: str = field(
        default=None, metadata={"help": "Name of the layers container for --lora_layers_to_transform (e.g. layers)."}
    )

    def __post_init__(self):
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"--lora_bias must be none, all or lora_only, not {self.lora_bias!r}")
        if self.lora_layers_pattern and not self.lora_layers_to_transform:
            raise ValueError("--lora_layers_pattern only applies together with --lora_layers_to_transform")
        if self.lora_layer_replication:
            raise ValueError(
                "--lora_layer_replication: peft replicates decoder layers only where they sit at "
                "model.model...layers; MiniCPM-V keeps its LLM at model.llm, so its layers cannot be replicated"
            )

    def modules_to_save(self, tune_vision):
        if self.lora_modules_to_save.strip():
            return [name.strip() for name in self.lora_modules_to_save.split(",") if name.strip()]
        return ["embed_tokens", "resampler"] + (["vpm"] if tune_vision else [])


def parse_args(argv=None):
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(
        args=distributed.adapt_deepspeed_argv(argv)
    )
    validate(training_args, lora_args)
    return model_args, data_args, training_args, lora_args


def validate(training_args, lora_args):
    """Refuse combinations that would silently train something other than what was asked."""
    if not training_args.use_lora:
        given = [f"--{f.name}" for f in dataclasses.fields(lora_args) if getattr(lora_args, f.name) != f.default]
        if given:
            raise ValueError(f"{', '.join(given)} given without --use_lora true, where LoRA settings do nothing")
    elif training_args.tune_vision and "vpm" not in lora_args.modules_to_save(tune_vision=True):
        raise ValueError(
            "--tune_vision true, but --lora_modules_to_save leaves out vpm, so the vision tower would stay "
            "frozen: add vpm to the list or pass --tune_vision false"
        )
    if lora_args.q_lora and (is_deepspeed_zero3_enabled() or training_args.fsdp):
        raise ValueError(
            "--q_lora does not work with FSDP or DeepSpeed ZeRO-3: 4-bit weights cannot be partitioned; "
            "use ZeRO-2 (ds_config_zero2.json) or no DeepSpeed"
        )


def compute_dtype(training_args):
    if training_args.fp16:
        return torch.float16
    if training_args.bf16:
        return torch.bfloat16
    return torch.float32


def build_datasets(data_args, training_args, tokenizer, config):
    """The train and eval datasets of the command line, laid out for the model of ``config``."""
    settings = data_settings(config, training_args.max_slice_nums)

    def make(path):
        return make_dataset(
            load_records(path),
            tokenizer,
            settings,
            llm_type=training_args.llm_type,
            max_length=training_args.model_max_length,
            image_root=data_args.image_folder or os.path.dirname(os.path.abspath(path)),
            data_path=path,
        )

    if data_args.data_path is None:
        raise ValueError("--data_path is required")
    train_dataset = make(data_args.data_path)
    eval_dataset = make(data_args.eval_data_path) if data_args.eval_data_path else None
    return train_dataset, eval_dataset


def count_parameters(model):
    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def train(argv=None):
    model_args, data_args, training_args, lora_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=training_args.get_process_log_level(),
        force=True,
    )
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    distributed.start(training_args)
    # Before the model exists: LoRA's initial weights are drawn when the adapter is added, and
    # the Trainer seeds only later, when it is created.
    transformers.set_seed(training_args.seed)

    dtype = compute_dtype(training_args)
    config = loading.load_config(model_args.model_name_or_path, training_args.cache_dir)
    tokenizer = loading.load_tokenizer(model_args.model_name_or_path, training_args.cache_dir)
    train_dataset, eval_dataset = build_datasets(data_args, training_args, tokenizer, config)
    checked = preflight.run(
        {"train": train_dataset, "eval": eval_dataset},
        training_args.output_dir,
        skip_bad=data_args.skip_bad_samples,
        preflight_only=data_args.preflight_only,
        is_main=training_args.process_index == 0,
    )
    if data_args.preflight_only:
        return None
    train_dataset, eval_dataset = checked["train"], checked["eval"]
    if training_args.should_log:
        log_sample(train_dataset, tokenizer)

    device_map = None
    if lora_args.q_lora:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device_map = {"": local_rank if torch.cuda.is_available() else "cpu"}
    model = loading.load_model(
        model_args.model_name_or_path,
        config,
        dtype=dtype,
        cache_dir=training_args.cache_dir,
        device_map=device_map,
        quantization_config=lora.quantization_config(lora_args, dtype),
    )
    if not training_args.tune_vision:
        model.vpm.requires_grad_(False)
    if not training_args.tune_llm:
        model.llm.requires_grad_(False)
    if training_args.use_lora:
        model = lora.apply_lora(model, training_args, lora_args)
    total, trainable = count_parameters(model)
    logger.info("Parameters: %s total, %s trainable (%.2f%%)", f"{total:,}", f"{trainable:,}", 100 * trainable / total)

    trainer = CPMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollator(training_args.model_max_length),
        processing_class=tokenizer,
        model_source=loading.model_source_dir(model_args.model_name_or_path, training_args.cache_dir),
        callbacks=[resilience.PreemptionCallback()],
    )
    distributed.check_engine(trainer, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    train()
