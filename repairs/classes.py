"""The published classes with the repairs built in.

A saved folder's generated `repaired_classes.py` and `repaired_tokenizer.py` define their classes
with these, and the loader (`loading.load_model`) loads through `repaired_model_class` too: one
repair path for both. Each repair detects its defect first and does nothing where it is absent.
"""

import sys

from transformers import dynamic_module_utils

from .construction import build_reference, lacks_post_init, restore_non_persistent_buffers
from .embeddings import repair_input_embeddings, repair_tied_weights_keys
from .generation import repair_generation_inputs, repair_generation_mixin
from .log import logger
from .rope import repair_legacy_rope_scaling
from .tokenizer import repair_sentencepiece_ids
from .zero3 import repair_cuda_under_zero3


def repaired_config_class(published, module_name):
    """`published` (a config class) unchanged, but defined in `module_name`: saving a config of this
    class names `module_name` in its `auto_map`, so a saved folder keeps loading through the repairs."""

    module_file = sys.modules[module_name].__file__  # the saved folder's repaired_classes.py, importing now
    repair_legacy_rope_scaling(published, [module_file, *dynamic_module_utils.get_relative_import_files(module_file)])

    class Repaired(published):
        # Its own __init__: transformers would give a config subclass without one a generated one.
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    return _named_like(Repaired, published, module_name)


def repaired_model_class(published, config_class, module_name):
    """`published` (a model class) with defects 2, 3, 5 and 7 to 10 repaired where present, defined in
    `module_name` (so that saving the model names it in `auto_map`).

    Defect 2: `__init__` is followed by `post_init()` when the published `__init__` skipped it.
    Defect 3: `from_pretrained` compares every non-persistent buffer with a reference
    construction and restores the ones that differ.
    Defects 5, 7 and 8: every construction mends the instance (and its classes' legacy
    prepare_inputs_for_generation). Defects 9 and 10 are repaired on the published modules now.
    """
    logged = []
    repair_cuda_under_zero3(published)
    repair_generation_mixin(published)

    class Repaired(published):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            if lacks_post_init(self):
                if not logged:
                    logged.append(True)
                    logger.warning(
                        "Remote code %s.__init__ never calls post_init() (written for transformers 4.x, which "
                        "did not need it): calling it after __init__.",
                        published.__name__,
                    )
                self.post_init()
            repair_generation_inputs(self)
            repair_tied_weights_keys(self)
            repair_input_embeddings(self)

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            model = super().from_pretrained(*args, **kwargs)
            restore_non_persistent_buffers(model, build_reference(cls, model.config, model.dtype))
            return model

    if config_class is not None:
        Repaired.config_class = config_class
    return _named_like(Repaired, published, module_name)


def repaired_tokenizer_class(published, module_name):
    """`published` (a tokenizer class) with defect 11 repaired on every instance, defined in `module_name`."""

    class Repaired(published):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            repair_sentencepiece_ids(self)

    return _named_like(Repaired, published, module_name)


def _named_like(cls, published, module_name):
    cls.__name__, cls.__qualname__, cls.__module__ = published.__name__, published.__qualname__, module_name
    cls.__doc__ = f"{published.__name__} from {published.__module__}, with the MiniCPM-V fine-tuner's repairs applied."
    return cls
