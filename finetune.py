"""Fine-tune a MiniCPM-V model (2.0, Llama3-V 2.5, 2.6, o-2.6, 4.x) on JSON conversations.

Launch through the scripts, which hold the reference flags:
    bash finetune_lora.sh     # LoRA, DeepSpeed ZeRO-2
    bash finetune_ds.sh       # full fine-tune, DeepSpeed ZeRO-3
or directly: ``torchrun --nproc_per_node N finetune.py --model_name_or_path ... --data_path ...``.
"""

import atexit
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import transformers
from peft import (
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peft.utils import load_peft_weights
from torchvision import transforms
from transformers.integrations import is_deepspeed_zero3_enabled

import loading
import preflight
import resilience
from dataset import DataCollator, DataError, SupervisedDataset, load_records
from trainer import CPMTrainer, model_source_dir

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A mistake on the command line: ``main`` prints the message alone and exits 2, no traceback."""


EXIT_USAGE = 2  # argparse's status for a bad command line
LLM_TYPES = ("minicpm", "llama3", "qwen")
DEFAULT_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"


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
            raise UsageError(f"--llm_type {self.llm_type!r} is not one of {', '.join(LLM_TYPES)}")
        if self.use_lora and self.tune_llm:
            raise UsageError(
                "cannot tune the LLM and apply LoRA at once: pass --tune_llm false together with --use_lora true"
            )
        if self.model_max_length < 1:
            raise UsageError("--model_max_length must be positive")
        if self.max_slice_nums < 1:
            raise UsageError("--max_slice_nums must be at least 1")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} is {getattr(self, name)}; it must be at least 1")
        if self.group_by_length:
            # transformers 5 replaced its own --group_by_length by this sampler option.
            if self.train_sampling_strategy not in ("random", "group_by_length"):
                raise UsageError(
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
        default=DEFAULT_LORA_TARGETS, metadata={"help": "Regex (full match) of the module names that get LoRA."}
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
        if self.lora_r < 1:
            raise UsageError(f"--lora_r is {self.lora_r}; the LoRA rank must be at least 1 (e.g. 8, 16, 64)")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout is {self.lora_dropout}; a dropout probability is in [0, 1), e.g. 0.05")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise UsageError(f"--lora_bias must be none, all or lora_only, not {self.lora_bias!r}")
        if self.lora_layers_pattern and not self.lora_layers_to_transform:
            raise UsageError("--lora_layers_pattern only applies together with --lora_layers_to_transform")
        if self.lora_layer_replication:
            raise UsageError(
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
    return parser.parse_args_into_dataclasses(args=adapt_deepspeed_argv(argv))


def last_flag_value(argv, flag):
    """The value of the last ``--flag value`` / ``--flag=value`` in argv (argparse's winner), and its index."""
    found = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            found = (i + 1, argv[i + 1])
        elif arg.startswith(flag + "="):
            found = (i, arg.split("=", 1)[1])
    return found


def adapt_deepspeed_argv(argv):
    """Reconcile a DeepSpeed JSON config with the command line, without editing the file.

    - An explicit ``--lr_scheduler_type`` wins over the config's ``scheduler`` section: with
      one, transformers would run DeepSpeed's WarmupLR and silently ignore the flag (the
      reference launchers ask for cosine and got a constant rate). Likewise ``--optim`` over
      its ``optimizer`` section.
    - Without CUDA, DeepSpeed's fused CPU Adam would be compiled with g++ on first use
      (minutes); torch's AdamW (``torch_adam``) does the same job.
    The adapted copy goes to a private temporary folder, removed at exit, and the argument
    points to it.
    """
    found = last_flag_value(argv, "--deepspeed")
    if found is None or not found[1].endswith(".json"):
        return argv
    index, path = found
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise UsageError(f"--deepspeed {path}: cannot read the file ({e.strerror or e})") from e
    except ValueError as e:
        raise UsageError(f"--deepspeed {path}: not a valid JSON DeepSpeed config: {e}") from e
    changes = []
    scheduler = last_flag_value(argv, "--lr_scheduler_type")
    if scheduler is not None and "scheduler" in config:
        changes.append(f"its {config.pop('scheduler').get('type', '')} scheduler replaced by --lr_scheduler_type {scheduler[1]}")
    optim = last_flag_value(argv, "--optim")
    if optim is not None and "optimizer" in config:
        changes.append(f"its {config.pop('optimizer').get('type', '')} optimizer replaced by --optim {optim[1]}")
    optimizer = config.get("optimizer")
    if not torch.cuda.is_available() and optimizer and not optimizer.get("params", {}).get("torch_adam"):
        optimizer.setdefault("params", {})["torch_adam"] = True
        changes.append("torch's AdamW, as there is no CUDA")
    if not changes:
        return argv
    # A private folder per process (mode 0700: another user on the machine can neither read it
    # nor collide with it), removed when the process exits.
    folder = tempfile.mkdtemp(prefix="finetune_ds_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    adapted = os.path.join(folder, os.path.basename(path))
    with open(adapted, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    argv = list(argv)
    argv[index] = adapted if argv[index] == path else f"--deepspeed={adapted}"
    logger.warning("DeepSpeed config %s used as %s: %s", path, adapted, "; ".join(changes))
    return argv


def compute_dtype(training_args):
    if training_args.fp16:
        return torch.float16
    if training_args.bf16:
        return torch.bfloat16
    return torch.float32


def check_launch(training_args, lora_args):
    """Refuse combinations that would silently train something other than what was asked."""
    if not training_args.use_lora:
        given = [f"--{f.name}" for f in dataclasses.fields(lora_args) if getattr(lora_args, f.name) != f.default]
        if given:
            raise UsageError(f"{', '.join(given)} given without --use_lora true, where LoRA settings do nothing")
    elif training_args.tune_vision and "vpm" not in lora_args.modules_to_save(tune_vision=True):
        raise UsageError(
            "--tune_vision true, but --lora_modules_to_save leaves out vpm, so the vision tower would stay "
            "frozen: add vpm to the list or pass --tune_vision false"
        )
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if lora_args.q_lora and (is_deepspeed_zero3_enabled() or training_args.fsdp):
        raise UsageError(
            "--q_lora does not work with FSDP or DeepSpeed ZeRO-3: 4-bit weights cannot be partitioned; "
            "use ZeRO-2 (ds_config_zero2.json) or no DeepSpeed"
        )
    if world_size > 1 and training_args.world_size != world_size:
        hint = " On a machine without GPUs add --use_cpu True (the launchers do)." if not torch.cuda.is_available() else ""
        raise UsageError(
            f"WORLD_SIZE={world_size} processes were launched, but the Trainer runs {training_args.world_size} "
            f"process(es): each rank would train alone.{hint}"
        )


def looks_local(name_or_path):
    """Whether a --model_name_or_path is meant as a folder rather than a hub id ("org/name")."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def check_paths(model_args, training_args):
    """Paths the run needs, checked before anything loads; returns the checkpoint to resume from."""
    model = model_args.model_name_or_path
    if looks_local(model) and not os.path.isdir(os.path.expanduser(model)):
        raise UsageError(
            f"--model_name_or_path {model}: no such folder; pass the folder that holds the model's config.json, "
            "or a hub id such as openbmb/MiniCPM-V-2_6"
        )
    try:
        return resilience.resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    except ValueError as e:
        raise UsageError(str(e)) from e


def init_cpu_deepspeed():
    """Start DeepSpeed's process group on a machine without CUDA.

    ZeRO-3 partitions weights while from_pretrained loads them, so the group must exist
    before the model loads. DeepSpeed would also compile its shared-memory all-reduce with g++
    on first use (minutes, and only a speed-up): plain gloo collectives are used instead.
    """
    import deepspeed
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="gloo")


def check_engine(trainer, training_args):
    """Fail unless the engine the user asked for is the one the Trainer runs; log which it is."""
    if training_args.deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(
            "--deepspeed was given but the Trainer is not running DeepSpeed (is ACCELERATE_USE_CPU set?); "
            "refusing to train with another engine"
        )
    if trainer.is_deepspeed_enabled:
        engine = f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    elif training_args.world_size > 1:
        engine = "DDP"
    else:
        engine = "a single process"
    logger.info("Training with %s on %d process(es), device %s", engine, training_args.world_size, training_args.device)


def data_settings(config, max_slice_nums):
    """What dataset.py needs from the model config: slicing, placeholder size, image layout.

    ``max_slice_nums`` applies to the data only: the model config is left as it is, so a saved
    model keeps the slicing its processor (preprocessor_config.json) and its own ``chat()`` agree
    on, and inference may use more slices than training did.
    """
    slice_config = getattr(config, "slice_config", None)
    if slice_config is not None:
        slicing = {**slice_config.to_dict(), "max_slice_nums": max_slice_nums}
    elif getattr(config, "slice_mode", True):
        slicing = {**config.to_dict(), "max_slice_nums": max_slice_nums}
    else:
        slicing = None
    return dict(
        slice_config=slicing,
        query_num=config.query_num,
        patch_size=getattr(config, "patch_size", 14),
        batch_vision=getattr(config, "batch_vision_input", False),
        use_image_id=getattr(config, "use_image_id", False),
    )


# The vision tower's input normalisation: to tensor, then mean = std = 0.5 per channel.
IMAGE_TRANSFORM = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))]
)


def make_dataset(records, tokenizer, settings, *, llm_type, max_length, image_root, data_path=None):
    """A SupervisedDataset laid out as training lays it out (also used by infer.py)."""
    return SupervisedDataset(
        records,
        tokenizer,
        transform=IMAGE_TRANSFORM,
        llm_type=llm_type,
        max_length=max_length,
        image_root=image_root,
        data_path=data_path,
        **settings,
    )


def build_datasets(data_args, training_args, tokenizer, settings):
    """The train and eval datasets; a file that cannot be read comes back as its DataError, for preflight."""

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
        )

    if data_args.data_path is None:
        raise UsageError("--data_path is required")
    train_dataset = make(data_args.data_path)
    eval_dataset = make(data_args.eval_data_path) if data_args.eval_data_path else None
    return train_dataset, eval_dataset


def quantization_config(lora_args, dtype):
    if not lora_args.q_lora:
        return None
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # Only the LLM is quantized: the vision tower, resampler and output head stay in `dtype`.
        llm_int8_skip_modules=["vpm", "resampler", "lm_head"],
    )


def apply_lora(model, training_args, lora_args):
    model.llm.requires_grad_(False)
    target_modules = lora_args.lora_target_modules
    if lora_args.lora_layers_to_transform is not None:
        # peft selects layers only for module-name suffixes, not for a regex, and suffixes such as
        # self_attn.q_proj would catch the vision tower's layers too: select the modules here.
        layer_index = re.compile(rf".*\.{re.escape(lora_args.lora_layers_pattern or 'layers')}\.(\d+)\.")
        target_modules = [
            name
            for name, _ in model.named_modules()
            if re.fullmatch(lora_args.lora_target_modules, name)
            and (match := layer_index.match(name))
            and int(match.group(1)) in lora_args.lora_layers_to_transform
        ]
        if not target_modules:
            raise UsageError(
                f"--lora_target_modules {lora_args.lora_target_modules!r} matches no module in layers "
                f"{lora_args.lora_layers_to_transform}"
            )
    elif not any(re.fullmatch(target_modules, name) for name, _ in model.named_modules()):
        example = next(name for name, module in model.llm.named_modules() if isinstance(module, torch.nn.Linear))
        raise UsageError(
            f"--lora_target_modules {target_modules!r} matches no module of the model (the regex must match a "
            f"whole module name, e.g. llm.{example}); the default is {DEFAULT_LORA_TARGETS!r}"
        )
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        target_modules=target_modules,
        lora_dropout=lora_args.lora_dropout,
        bias=lora_args.lora_bias,
        modules_to_save=lora_args.modules_to_save(training_args.tune_vision),
    )
    if not hasattr(model, "get_input_embeddings"):
        # peft and gradient checkpointing reach the token embeddings through this method.
        model.get_input_embeddings = model.llm.get_input_embeddings
    if lora_args.q_lora:
        import bitsandbytes as bnb

        quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
        if not getattr(model, "is_loaded_in_4bit", False) or not quantized:
            raise RuntimeError("--q_lora was given but the model did not load in 4 bit")
        logger.info("QLoRA: %d linear layers in 4 bit (nf4), e.g. %s", len(quantized), quantized[0])
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    model = get_peft_model(model, config)
    if lora_args.lora_weight_path:
        load_adapter_weights(model, lora_args.lora_weight_path)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def load_adapter_weights(model, path):
    """Start from an existing adapter: its tensors must be exactly the ones this LoRA layout trains."""
    weights = load_peft_weights(path)
    expected = get_peft_model_state_dict(model)
    mismatched = sorted(set(weights) ^ set(expected)) + sorted(
        key for key in set(weights) & set(expected) if weights[key].shape != expected[key].shape
    )
    if mismatched:
        raise UsageError(
            f"--lora_weight_path {path}: {len(mismatched)} tensors do not fit this LoRA layout, "
            f"e.g. {mismatched[:3]}; pass the LoRA arguments the adapter was trained with"
        )
    set_peft_model_state_dict(model, weights)
    logger.info("Loaded %d adapter tensors from %s", len(weights), path)


def count_parameters(model):
    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def log_sample(dataset, tokenizer):
    sample = dataset[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    logger.info("First training sample, as the model reads it:\n%s", tokenizer.decode(ids))
    learned = [label for label in labels if label != -100]
    logger.info("...and the tokens it learns to predict (%d):\n%s", len(learned), tokenizer.decode(learned))


def train(argv=None):
    model_args, data_args, training_args, lora_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=training_args.get_process_log_level(),
        force=True,
    )
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    check_launch(training_args, lora_args)
    resume_from = check_paths(model_args, training_args)
    if training_args.deepspeed and not torch.cuda.is_available():
        init_cpu_deepspeed()
    # Before the model exists: LoRA's initial weights are drawn when the adapter is added, and
    # the Trainer seeds only later, when it is created.
    transformers.set_seed(training_args.seed)

    dtype = compute_dtype(training_args)
    config = loading.load_config(model_args.model_name_or_path, training_args.cache_dir)
    tokenizer = loading.load_tokenizer(model_args.model_name_or_path, training_args.cache_dir)
    settings = data_settings(config, training_args.max_slice_nums)
    train_dataset, eval_dataset = build_datasets(data_args, training_args, tokenizer, settings)
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
        quantization_config=quantization_config(lora_args, dtype),
    )
    if not training_args.tune_vision:
        model.vpm.requires_grad_(False)
    if not training_args.tune_llm:
        model.llm.requires_grad_(False)
    if training_args.use_lora:
        model = apply_lora(model, training_args, lora_args)
    total, trainable = count_parameters(model)
    logger.info("Parameters: %s total, %s trainable (%.2f%%)", f"{total:,}", f"{trainable:,}", 100 * trainable / total)

    trainer = CPMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollator(training_args.model_max_length),
        processing_class=tokenizer,
        model_source=model_source_dir(model_args.model_name_or_path, training_args.cache_dir),
        callbacks=[resilience.PreemptionCallback()],
    )
    check_engine(trainer, training_args)
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    return trainer


def main(argv=None):
    """The command line: a mistake in it prints one message (which flag, what, how to fix) and exits 2."""
    try:
        return train(argv)
    except UsageError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
