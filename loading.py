"""Load a MiniCPM-V model, its config and tokenizer through their remote code.

One place for what ``finetune.py``, ``infer.py`` and ``merge.py`` share: the ``AutoModel`` /
``AutoTokenizer`` calls with ``trust_remote_code=True``, and the keyword arguments only some
model families accept.
"""

import logging

import transformers

logger = logging.getLogger(__name__)

# MiniCPM-o 2.6 builds its vision, audio and TTS towers only when asked; the fine-tuner wants
# vision alone. Other families' __init__ raises TypeError on these keywords.
OMNI_INIT_KWARGS = {"init_vision": True, "init_audio": False, "init_tts": False}


def load_config(name_or_path, cache_dir=None):
    return transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=True, cache_dir=cache_dir)


def load_tokenizer(name_or_path, cache_dir=None):
    return transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True, cache_dir=cache_dir)


def init_kwargs_for(config):
    """The omni init switches, for models whose config declares them, else nothing."""
    if all(hasattr(config, key) for key in OMNI_INIT_KWARGS):
        return dict(OMNI_INIT_KWARGS)
    return {}


def load_model(name_or_path, config, *, dtype, cache_dir=None, device_map=None, quantization_config=None):
    kwargs = init_kwargs_for(config)
    if kwargs:
        logger.info("Model config declares %s: loading with %s", ", ".join(kwargs), kwargs)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return transformers.AutoModel.from_pretrained(
        name_or_path,
        config=config,
        trust_remote_code=True,
        dtype=dtype,
        cache_dir=cache_dir,
        device_map=device_map,
        **kwargs,
    )
