"""Load a MiniCPM-V model, its config and tokenizer through their remote code.

One place for what ``finetune.py``, ``infer.py`` and ``merge.py`` share: the ``AutoModel`` /
``AutoTokenizer`` calls with ``trust_remote_code=True``, the keyword arguments only some
model families accept, and the repairs (``remote_code_repairs``) that remote code written for
transformers 4.4x needs to load correctly today.
"""

import contextlib
import logging

import transformers

import remote_code_repairs

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
    """``AutoModel.from_pretrained`` with the remote code's defects repaired where present.

    The model class is imported first (supplying typing names a module lacks); a reference
    construction with parameters on the meta device shows whether ``__init__`` skips
    ``post_init()`` and holds the non-persistent buffers as ``__init__`` computes them, which the
    loaded model must match.
    """
    init_kwargs = init_kwargs_for(config)
    if init_kwargs:
        # MiniCPM-o's __init__(config) reads the switches from the config; with an explicit
        # config object, from_pretrained would hand them to __init__ as keywords (TypeError).
        logger.info("Model config declares %s: loading with %s", ", ".join(init_kwargs), init_kwargs)
        for key, value in init_kwargs.items():
            setattr(config, key, value)
    model_class = remote_code_repairs.import_model_class(name_or_path, config, cache_dir=cache_dir)
    reference, missed_post_init = None, False
    if model_class is not None:
        reference, missed_post_init = remote_code_repairs.build_reference(model_class, config, dtype)
    kwargs = {}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    repair_init = contextlib.nullcontext()
    if missed_post_init:
        repair_init = remote_code_repairs.post_init_after_init(model_class)
    with repair_init:
        model = transformers.AutoModel.from_pretrained(
            name_or_path,
            config=config,
            trust_remote_code=True,
            dtype=dtype,
            cache_dir=cache_dir,
            device_map=device_map,
            **kwargs,
        )
    if reference is not None:
        remote_code_repairs.restore_non_persistent_buffers(model, reference)
    return model
