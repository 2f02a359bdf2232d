"""A model ready to answer: base weights, an optional LoRA adapter, its processing class and family."""

import logging
from pathlib import Path

import torch
from peft import PeftModel

import loading
from families import family_for, load_config

logger = logging.getLogger(__name__)


def load_for_inference(model_path, adapter=None, dtype=torch.float32, device="cpu", llm_type=None):
    """``(model, processing, config, family)``: the model (with the adapter applied, if any) in eval
    mode on ``device``, its tokenizer or processor, its config and family (``llm_type`` as in
    family_for)."""
    config = load_config(model_path)
    family = family_for(config, llm_type)
    # The adapter folder carries the tokenizer (and processor) the run trained with, unless it was saved
    # without them, or (saved before copy_named_files) names files it lacks: then the base model's.
    trained_with = adapter and (Path(adapter) / "tokenizer_config.json").exists()
    if trained_with and loading.named_files_missing(adapter):
        logger.warning("%s names files it lacks (%s): taking the tokenizer and processor from %s", adapter,
                       ", ".join(name for _, name in loading.named_files_missing(adapter)), model_path)
        trained_with = False
    processing = family.load_processing(adapter if trained_with else model_path)
    model = family.load_model(model_path, config, dtype=dtype)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval(), processing, config, family
