"""LoRA and QLoRA on the LLM of a MiniCPM-V model: the adapter layout, 4-bit loading, a starting adapter.

Which modules get LoRA by default, which are saved in full with the adapter and which stay out of
4-bit quantization depend on the kind of checkpoint: its family (families/) says, as data.
"""

import json
import logging
import os
import re

import transformers
from peft import (
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peft.utils import load_peft_weights

from usage import UsageError

logger = logging.getLogger(__name__)


def quantization_config(lora_args, dtype, unquantized_modules):
    """4-bit loading for --q_lora (None without it); ``unquantized_modules`` stay in ``dtype``."""
    if not lora_args.q_lora:
        return None
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # Only the LLM is quantized: the vision tower, resampler / merger and output head stay in `dtype`.
        llm_int8_skip_modules=list(unquantized_modules),
    )


def modules_to_save(family, training_args, lora_args):
    """The modules trained in full and saved with the adapter: --lora_modules_to_save, else the
    family's default. UsageError if --tune_vision is asked but the list leaves the vision tower out."""
    names = lora_args.modules_to_save() or family.default_modules_to_save(training_args.tune_vision)
    if training_args.tune_vision and family.vision_module_name not in names:
        raise UsageError(
            f"--tune_vision true, but --lora_modules_to_save leaves out {family.vision_module_name}, so the vision "
            f"tower would stay frozen: add {family.vision_module_name} to the list or pass --tune_vision false"
        )
    return names


def apply_lora(model, family, training_args, lora_args):
    """Wrap the model in LoRA adapters as ``lora_args`` lay them out (a PeftModel); the defaults are
    those of the model's ``family``. peft trains only the adapters and the modules saved in full:
    the LLM's own weights stay as stages/prepare.adapt_model left them (frozen: --use_lora needs
    --tune_llm false)."""
    pattern = lora_args.lora_target_modules or family.lora_targets
    target_modules = pattern
    if lora_args.lora_layers_to_transform is not None:
        # peft selects layers only for module-name suffixes, not for a regex, and suffixes such as
        # self_attn.q_proj would catch the vision tower's layers too: select the modules here.
        layer_index = re.compile(rf".*\.{re.escape(lora_args.lora_layers_pattern or 'layers')}\.(\d+)\.")
        target_modules = [
            name
            for name, _ in model.named_modules()
            if re.fullmatch(pattern, name)
            and (match := layer_index.match(name))
            and int(match.group(1)) in lora_args.lora_layers_to_transform
        ]
        if not target_modules:
            raise UsageError(
                f"--lora_target_modules {pattern!r} matches no module in layers "
                f"{lora_args.lora_layers_to_transform}"
            )
    elif not any(re.fullmatch(target_modules, name) for name, _ in model.named_modules()):
        example = next(
            (name for name, _ in model.named_modules() if re.fullmatch(family.lora_targets, name)), "(none matches)"
        )
        raise UsageError(
            f"--lora_target_modules {target_modules!r} matches no module of the model (the regex must match a "
            f"whole module name, e.g. {example}); the default is {family.lora_targets!r}"
        )
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        target_modules=target_modules,
        lora_dropout=lora_args.lora_dropout,
        bias=lora_args.lora_bias,
        modules_to_save=modules_to_save(family, training_args, lora_args),
    )
    if not hasattr(model, "get_input_embeddings"):
        # peft and gradient checkpointing reach the token embeddings through this method.
        model.get_input_embeddings = family.language_model(model)[0].get_input_embeddings
    if lora_args.q_lora:
        import bitsandbytes as bnb

        quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
        if not getattr(model, "is_loaded_in_4bit", False) or not quantized:
            raise RuntimeError("--q_lora was given but the model did not load in 4 bit")
        logger.info("QLoRA: %d linear layers in 4 bit (nf4), e.g. %s", len(quantized), quantized[0])
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    model = get_peft_model(model, config)
    log_lora_modules(model)
    if lora_args.lora_weight_path:
        load_adapter_weights(model, lora_args.lora_weight_path)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def log_lora_modules(model):
    """Log which modules got LoRA, layer numbers folded (``...layers.*.self_attn.q_proj x 2``)."""
    names = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    kinds = {}
    for name in names:
        kind = re.sub(r"\.\d+\.", ".*.", name.removeprefix("base_model.model."))
        kinds[kind] = kinds.get(kind, 0) + 1
    logger.info("LoRA on %d modules: %s", len(names), ", ".join(f"{kind} x {count}" for kind, count in kinds.items()))


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


def check_resume(checkpoint, training_args, lora_args):
    """Refuse, before the weights load, to resume ``checkpoint`` into another adapter layout: the
    Trainer would load its tensors into LoRA matrices of another shape (or none)."""
    try:
        with open(os.path.join(checkpoint, "adapter_config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        saved = None
    where = f"--resume_from_checkpoint {checkpoint}"
    if saved is None:
        if training_args.use_lora:
            raise UsageError(f"{where} holds a full model's weights, not a LoRA adapter: resume it without --use_lora")
        return
    if not training_args.use_lora:
        raise UsageError(
            f"{where} holds a LoRA adapter (rank {saved.get('r')}): resume it with --use_lora true --tune_llm false "
            f"--lora_r {saved.get('r')} --lora_alpha {saved.get('lora_alpha')}"
        )
    # (flag, adapter_config.json key, what it is, this run's value)
    settings = [
        ("lora_r", "r", "LoRA rank", lora_args.lora_r),
        ("lora_alpha", "lora_alpha", "lora_alpha", lora_args.lora_alpha),
        ("lora_bias", "bias", "bias", lora_args.lora_bias),
    ]
    if lora_args.lora_target_modules and isinstance(saved.get("target_modules"), str):
        settings.append(("lora_target_modules", "target_modules", "target modules", lora_args.lora_target_modules))
    differ = [
        (flag, f"{name} {value!r} (--{flag}), the checkpoint's adapter has {saved.get(key)!r}")
        for flag, key, name, value in settings if saved.get(key) != value
    ]
    if differ:
        fix = " ".join(f"--{flag} {saved.get(key)}" for flag, key, _, _ in settings if flag in dict(differ))
        raise UsageError(
            f"{where}: this run asks for {'; '.join(text for _, text in differ)}. Resume with the LoRA arguments "
            f"it was trained with ({fix}), or start a new run in another --output_dir"
        )
