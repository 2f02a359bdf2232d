"""The command line of finetune.py: four argument dataclasses, their checks, and the parser.

Every check that needs only the arguments runs here, at parse time: in a dataclass's
``__post_init__`` when it reads one dataclass, in ``validate`` when it reads several;
``check_paths`` then checks the folders they name, before anything loads. A mistake raises
``UsageError``: one message, exit status 2, no traceback.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import transformers
from transformers.integrations import is_deepspeed_zero3_enabled

import distributed
import families
import lora
import resilience
import stages
from data.sources.columns import check_columns
from evaluation.metrics import get_metrics, load_user_metrics
from usage import UsageError


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="openbmb/MiniCPM-V-2", metadata={"help": "Hub id or local folder of the model to fine-tune."}
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None,
        metadata={"help": "Training data: a .json list, a .jsonl / .ndjson of records, or a table: a .parquet or "
                  ".arrow file, a folder of .parquet files or a datasets save_to_disk folder (see --data_columns)."},
    )
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
    data_columns: str = field(
        default=None,
        metadata={"help": "How a table's columns (or a JSON record's keys) become records: rlaif-v (image, question, "
                  "chosen, rejected), sharegpt or llava (conversations of from/value), or KEY=COLUMN pairs "
                  "separated by commas (default: they already have our names). See data/sources/columns.py."},
    )
    preflight_workers: int = field(
        default=None,
        metadata={"help": "Worker processes each rank checks its share of the records with, in preflight (default: "
                  "the node's cores divided among its ranks, at most one per preflight.MIN_RECORDS_PER_WORKER records of "
                  "the rank's share; 1: in the rank's own process)."},
    )
    preflight_cache: bool = field(
        default=True,
        metadata={"help": "Reuse the preflight results an earlier run kept in --output_dir when the data files "
                  "(size, time, content hash) and the settings that decide them are the same (a restart, a resume)."},
    )
    max_num_frames: int = field(
        default=None,
        metadata={"help": "Video (native models): the most frames sampled from a clip (default: the checkpoint's "
                  "video processor's max_num_frames)."},
    )
    stack_frames: int = field(
        default=None,
        metadata={"help": "Video (native models): frames per second of video, stacked into each sampled second "
                  "(1: one frame a second; default: the video processor's stack_frames)."},
    )

    def __post_init__(self):
        for name in ("max_num_frames", "stack_frames", "preflight_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1")
        problem = check_columns(self.data_columns)
        if problem:
            raise UsageError(problem)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str = field(default=None, metadata={"help": "Where downloaded models are cached."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer name (see transformers OptimizerNames)."})
    model_max_length: int = field(
        default=2048, metadata={"help": "Maximum sequence length; samples are right-padded and truncated to it."}
    )
    tune_vision: bool = field(
        default=True, metadata={"help": "Train the vision tower (vpm; native models: vision_tower with its vit_merger)."}
    )
    tune_llm: bool = field(
        default=True, metadata={"help": "Train the language model (llm; native models: language_model and lm_head) in full."}
    )
    llm_type: str = field(
        default=None,
        metadata={"help": f"Chat layout: one of {', '.join(families.llm_types())}; default and only accepted value: what "
                  "the checkpoint's config says (see the README's list of models)."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM instead of its weights."})
    max_slice_nums: int = field(default=9, metadata={"help": "Most slices a high-resolution image is cut into."})
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch samples of similar length together (less padding), using the lengths "
                  "preflight measured; the same as --train_sampling_strategy group_by_length."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Fill each training row up to model_max_length with whole samples, each attending only "
                  "to itself (less padding; evaluation stays unpacked). Not for MiniCPM-V 2.0, the native "
                  "models (4.6, 4.7, OCR) or --stage dpo: see the README."},
    )
    stop_at_eval_loss: float = field(
        default=None,
        metadata={"help": "End training at the first evaluation (--eval_strategy steps) whose loss is below this; "
                  "--max_steps stays the cap. Needs --eval_data_path."},
    )
    stage: str = field(
        default="sft",
        metadata={"help": "Training stage: " + "; ".join(f"{name} ({stage.help})" for name, stage in stages.STAGES.items())
                  + "."},
    )
    eval_generate: int = field(
        default=0,
        metadata={"help": "At each evaluation, answer the first N eval records' first question (laid out as in "
                  "training and infer.py), score the answers with --eval_metrics, log the means as eval_<metric> "
                  "beside eval_loss and write them to OUTPUT_DIR/eval_answers/step-K.jsonl (0: off)."},
    )
    eval_metrics: str = field(
        default="em,f1",
        metadata={"help": "Comma-separated metrics that score --eval_generate's answers against each record's first "
                  "assistant message (the built-in ones: evaluation/metrics.py; more with --eval_metrics_file)."},
    )
    eval_metrics_file: str = field(
        default=None,
        metadata={"help": "A Python file of your own metrics, each a function (answer, reference) -> [0, 1] under "
                  "@metric('name') (from evaluation import metric); name them in --eval_metrics."},
    )
    eval_max_new_tokens: int = field(
        default=64, metadata={"help": "--eval_generate: the most tokens generated for an answer."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an --output_dir that already holds a model or an earlier run's results (files "
                  "of the same name are replaced; the earlier checkpoints are never rotated away). Never allowed "
                  "for the folder of the model being trained."},
    )
    ignore_data_change: bool = field(
        default=False,
        metadata={"help": "Resume even though the training data or a setting that fixes the batch order (packing, "
                  "model_max_length, sampler, seed, world size, batch sizes) differs from the resumed run's."},
    )
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
        if self.llm_type is not None and self.llm_type not in families.llm_types():
            raise UsageError(f"--llm_type {self.llm_type!r} is not one of {', '.join(families.llm_types())}")
        if self.use_lora and self.tune_llm:
            raise UsageError(
                "cannot tune the LLM and apply LoRA at once: pass --tune_llm false together with --use_lora true"
            )
        self._check_eval_generate()
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
        self._checkpointing_by_this_transformers_name()
        super().__post_init__()

    def _check_eval_generate(self):
        """--eval_generate's flags: a count of at least 0, known metrics (after the user's file registers
        its own), and no metric flag without --eval_generate (it would do nothing)."""
        if self.eval_generate < 0:
            raise UsageError(f"--eval_generate is {self.eval_generate}; give the number of eval records to answer "
                             "(0: none)")
        if self.eval_generate == 0:
            given = [flag for flag, value, default in (("--eval_metrics", self.eval_metrics, "em,f1"),
                                                        ("--eval_metrics_file", self.eval_metrics_file, None),
                                                        ("--eval_max_new_tokens", self.eval_max_new_tokens, 64))
                     if value != default]
            if given:
                raise UsageError(f"{', '.join(given)} given without --eval_generate N, where they do nothing")
            return
        if self.eval_max_new_tokens < 1:
            raise UsageError(f"--eval_max_new_tokens is {self.eval_max_new_tokens}; it must be at least 1")
        added = load_user_metrics(self.eval_metrics_file) if self.eval_metrics_file else []
        named = get_metrics(self.eval_metrics)
        if added and not set(added) & set(named):
            raise UsageError(f"--eval_metrics_file {self.eval_metrics_file} registers {', '.join(added)}, which "
                             f"--eval_metrics {self.eval_metrics} does not name: add them, e.g. --eval_metrics "
                             f"{','.join([*named, *added])}")

    def _checkpointing_by_this_transformers_name(self):
        """--gradient_checkpointing (the launchers' flag) and activation_checkpointing_kwargs mean the same
        on every transformers we support. 5.2x renamed gradient checkpointing "activation checkpointing"
        and warns (FutureWarning) when only the old name is set; 5.3 knows the old names only, and reads
        its checkpointing kwargs from gradient_checkpointing_kwargs (None: reentrant checkpointing)."""
        if "activation_checkpointing" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}:
            if self.activation_checkpointing is None and self.gradient_checkpointing is not None:
                self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        elif self.gradient_checkpointing_kwargs is None:
            self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: str = field(
        default=None,
        metadata={"help": "Regex (full match) of the module names that get LoRA (default: the attention projections "
                  "of the language model; see families/)."},
    )
    lora_weight_path: str = field(default="", metadata={"help": "An existing adapter folder to start training from."})
    lora_bias: str = field(default="none", metadata={"help": "Which biases train: none, all or lora_only."})
    q_lora: bool = field(default=False, metadata={"help": "QLoRA: load the LLM in 4 bit (nf4, double quant)."})
    lora_modules_to_save: str = field(
        default="",
        metadata={"help": "Comma-separated modules trained in full and saved with the adapter "
                  "(default: embed_tokens,resampler, plus vpm with --tune_vision; native models: "
                  "embed_tokens,model.merger, plus vision_tower)."},
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

    def modules_to_save(self):
        """The names given with --lora_modules_to_save (empty: none given, the family's default applies)."""
        return [name.strip() for name in self.lora_modules_to_save.split(",") if name.strip()]


def validate(training_args, lora_args):
    """Refuse combinations that would silently train something other than what was asked."""
    stages.check_arguments(training_args)  # --stage, its flags (set by parse_args), what it refuses
    if not training_args.use_lora:
        given = [f"--{f.name}" for f in dataclasses.fields(lora_args) if getattr(lora_args, f.name) != f.default]
        if given:
            raise UsageError(f"{', '.join(given)} given without --use_lora true, where LoRA settings do nothing")
    stages.get(training_args.stage).check_lora(training_args, lora_args)
    if lora_args.q_lora and (is_deepspeed_zero3_enabled() or training_args.fsdp):
        raise UsageError(
            "--q_lora does not work with FSDP or DeepSpeed ZeRO-3: 4-bit weights cannot be partitioned; "
            "use ZeRO-2 (ds_config_zero2.json) or no DeepSpeed"
        )


def parse_args(argv=None):
    """The four argument dataclasses of ``argv`` (default: the command line), checked. Each registered
    stage's own flags (its ``arguments`` dataclass, declared in its stages/ file) are parsed too and
    read as attributes of the TrainingArguments (``training_args.dpo_beta``)."""
    own = [stage.arguments for stage in stages.STAGES.values() if stage.arguments is not None]
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments, *own))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args, lora_args, *stage_args = parser.parse_args_into_dataclasses(
        args=distributed.adapt_deepspeed_argv(argv)
    )
    for group in stage_args:
        for flag in dataclasses.fields(group):
            setattr(training_args, flag.name, getattr(group, flag.name))
    validate(training_args, lora_args)
    if training_args.stop_at_eval_loss is not None and (not data_args.eval_data_path or training_args.eval_strategy == "no"):
        raise UsageError("--stop_at_eval_loss needs evaluations: give --eval_data_path and --eval_strategy steps")
    if training_args.eval_generate and (not data_args.eval_data_path or training_args.eval_strategy == "no"):
        raise UsageError("--eval_generate answers eval records at each evaluation: give --eval_data_path and "
                         "--eval_strategy steps (or epoch)")
    return model_args, data_args, training_args, lora_args


def looks_local(name_or_path):
    """Whether a model or adapter name is meant as a folder here rather than a hub id ("org/name"):
    a path that starts like one, has more than one "/", or whose parent folder exists here
    (``output/merged`` next to an ``output`` folder)."""
    return (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or ("/" in name_or_path and os.path.isdir(os.path.dirname(os.path.expanduser(name_or_path))))
    )


# The flags that name a model or adapter folder, and what that folder must hold (a stage adds its own:
# Stage.folder_flags).
FOLDER_FLAGS = {
    "model_name_or_path": "the folder that holds the model's config.json, or a hub id such as openbmb/MiniCPM-V-2_6",
    "lora_weight_path": "the adapter folder a LoRA run saved (adapter_config.json)",
}


def check_paths(model_args, training_args, lora_args):
    """The folders the run needs, checked before anything loads; returns the checkpoint to resume from
    (the one place --resume_from_checkpoint is resolved: the trainer takes this folder)."""
    folder_flags = {**FOLDER_FLAGS, **stages.get(training_args.stage).folder_flags}
    for args in (model_args, training_args, lora_args):
        for flag, hint in folder_flags.items():
            value = getattr(args, flag, None)
            if value and looks_local(value) and not os.path.isdir(os.path.expanduser(value)):
                raise UsageError(f"--{flag} {value}: no such folder; pass {hint}")
    try:
        checkpoint = resilience.resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if checkpoint is not None:
        lora.check_resume(checkpoint, training_args, lora_args)
    return checkpoint
