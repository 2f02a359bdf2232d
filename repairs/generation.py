"""Defects 5 and 10: generation as transformers 4.x ran it.

5. A class's `prepare_inputs_for_generation` is written for transformers 4.36's generate (MiniCPM-V
   2.0's LLM): it takes any cache it is given as the running one, and later generate passes an empty
   one at the first step (5.3 to 5.23) or none at all (`cache=` from 5.24). Detected by its
   signature (`past_key_values`, none of `LATER_GENERATION_PARAMETERS`); repaired by wrapping it so
   that it is called as 4.36's generate called it.
10. A language model defines `prepare_inputs_for_generation` without GenerationMixin (see
   `repair_generation_mixin`).
"""

import functools
import inspect
import sys
from pathlib import Path

import torch
import transformers
from transformers.cache_utils import Cache

from .log import logger
from .stand_ins import cache_limit

# Parameters of prepare_inputs_for_generation that transformers added after 4.36 (cache_position in
# 4.38; cache, next_sequence_length, is_first_iteration in 5.x). A remote override that takes
# past_key_values and names none of them was written for 4.36's generate, which passed no cache at
# the first step and the running cache as past_key_values after it.
LATER_GENERATION_PARAMETERS = ("cache", "cache_position", "next_sequence_length", "is_first_iteration")
_LEGACY_PREPARE_MARK = "__prepares_as_in_4_36__"


def prepares_inputs_as_in_4_36(function):
    """Whether `function` (a prepare_inputs_for_generation) is written for transformers 4.36's generate."""
    parameters = inspect.signature(function).parameters
    return "past_key_values" in parameters and not set(LATER_GENERATION_PARAMETERS) & set(parameters)


def _as_in_4_36(prepare):
    """`prepare` (a legacy prepare_inputs_for_generation) called as 4.36's generate called it."""

    @functools.wraps(prepare)
    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # This transformers holds an (initially empty) cache from the first step on and, from 5.24,
        # passes it as `cache`; the legacy code takes any cache it is given as holding the prompt.
        cache = kwargs.pop("cache", None)
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        running = None if isinstance(cache, Cache) and cache.get_seq_length() == 0 else cache
        if kwargs.get("attention_mask") is None:
            # 4.36's generate always passed a mask (all ones over the prompt's embeddings or ids and the
            # tokens generated since, when none was given); it is how the legacy code tells the new
            # tokens from the cached ones. Later ones drop an all-ones mask.
            embeds = kwargs.get("inputs_embeds")
            length = input_ids.shape[1] + (0 if embeds is None else embeds.shape[1])
            kwargs["attention_mask"] = torch.ones(input_ids.shape[0], length, dtype=torch.long, device=input_ids.device)
        if isinstance(running, Cache):
            # It reads get_max_length() as None for a cache without a limit; from 5.22 transformers'
            # answers -1 there (and relies on that elsewhere), so only this call sees None.
            running.get_max_length = functools.partial(cache_limit, running, 0)
        try:
            inputs = dict(prepare(self, input_ids, past_key_values=running, **kwargs))
        finally:
            if isinstance(running, Cache):
                del running.get_max_length
        # generate may keep position_ids for the whole sequence (5.x), which the legacy code passes
        # on unsliced: keep those of the inputs sent.
        sent = inputs.get("inputs_embeds") if inputs.get("inputs_embeds") is not None else inputs.get("input_ids")
        if inputs.get("position_ids") is not None and sent is not None:
            inputs["position_ids"] = inputs["position_ids"][..., -sent.shape[1]:]
        inputs.pop("past_key_values", None)
        if cache is not None:  # the forward fills generate's own cache, under the name it takes
            forward_parameters = inspect.signature(self.forward).parameters
            inputs["past_key_values" if "past_key_values" in forward_parameters else "cache"] = cache
        return inputs

    setattr(prepare_inputs_for_generation, _LEGACY_PREPARE_MARK, True)
    return prepare_inputs_for_generation


def repair_generation_inputs(model):
    """Wrap the prepare_inputs_for_generation of every class in `model` (itself and its submodules,
    such as MiniCPM-V 2.0's LLM) that is written for transformers 4.36's generate (defect 5), so that
    it sees the cache as it did then. Returns the names of the classes wrapped now."""
    wrapped = []
    for cls in {type(module) for module in model.modules()}:
        prepare = getattr(cls, "prepare_inputs_for_generation", None)
        if (prepare is None or (prepare.__module__ or "").partition(".")[0] == "transformers"  # its own fit it
                or getattr(prepare, _LEGACY_PREPARE_MARK, False) or not prepares_inputs_as_in_4_36(prepare)):
            continue
        cls.prepare_inputs_for_generation = _as_in_4_36(prepare)
        logger.warning(
            "Remote code %s.%s.prepare_inputs_for_generation takes past_key_values and none of %s (written for "
            "transformers 4.36's generate): it now gets the cache as past_key_values, None while the cache is "
            "empty, an all-ones attention mask where none is given, and its inputs go on to forward with the "
            "cache and position ids this generate expects.",
            cls.__module__, cls.__qualname__, ", ".join(LATER_GENERATION_PARAMETERS),
        )
        wrapped.append(cls.__name__)
    return sorted(wrapped)


def repair_generation_mixin(model_class):
    """Defect 10. Up to transformers 4.49 every PreTrainedModel inherited `generate`; since 4.50 only
    classes deriving from GenerationMixin have it. The published MiniCPM-V 2.0's LLM,
    `MiniCPMForCausalLM(MiniCPMPreTrainedModel)`, defines `prepare_inputs_for_generation` and has no
    GenerationMixin, so its model's `generate` fails (AttributeError: no attribute 'generate').
    Detected on the classes of the modules beside `model_class`'s (a PreTrainedModel subclass of the
    remote code with its own prepare_inputs_for_generation and no GenerationMixin); repaired by adding
    GenerationMixin after its bases, where transformers asks for it. Returns the names of the classes."""
    folder = Path(inspect.getfile(model_class)).parent
    repaired = []
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or Path(file).parent != folder:
            continue
        for cls in list(vars(module).values()):
            if (isinstance(cls, type) and cls.__module__ == module.__name__
                    and issubclass(cls, transformers.PreTrainedModel)
                    and "prepare_inputs_for_generation" in cls.__dict__
                    and not issubclass(cls, transformers.GenerationMixin)):
                cls.__bases__ = (*cls.__bases__, transformers.GenerationMixin)
                logger.warning("Remote code %s defines prepare_inputs_for_generation without GenerationMixin (which "
                               "transformers 4.49 and older gave every model): added GenerationMixin to its bases, so "
                               "it generates.", cls.__qualname__)
                repaired.append(cls.__name__)
    return repaired
