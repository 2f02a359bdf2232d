"""Defects 2 and 3, found on a reference construction of the model (parameters on the meta device).

2. The model's `__init__` never calls `post_init()`, which transformers 5 needs
   (`all_tied_weights_keys`). Detected on the instance after `__init__` (`lacks_post_init`);
   repaired by calling `post_init()` then (`classes.repaired_model_class`).
3. A non-persistent buffer computed in `__init__` (the resampler's 2D sin-cos `pos_embed`) is not
   refilled by the model's `_init_weights`; transformers 5 rebuilds such buffers empty after
   loading. Detected by comparing every non-persistent buffer of the loaded model with the
   reference construction's; repaired by copying the reference value in.
"""

import contextlib
import copy

import torch
from transformers.modeling_utils import local_torch_dtype

from .log import logger


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside keep their buffers real (computed on CPU) and put parameters on meta,
    so even an 8B model's reference costs only its buffers."""
    register_parameter = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register_parameter(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register_parameter


def build_reference(model_class, config, dtype):
    """A fresh construction of `model_class` (a repaired class: its `__init__` completes
    `post_init()`): parameters on meta, buffers as `__init__` computes them, under the dtype the
    real load uses."""
    dtype_context = local_torch_dtype(dtype) if isinstance(dtype, torch.dtype) else contextlib.nullcontext()
    with _parameters_on_meta(), dtype_context:
        return model_class(copy.deepcopy(config))


def lacks_post_init(model):
    return not hasattr(model, "all_tied_weights_keys")


def _holds(loaded, fresh):
    if loaded.shape != fresh.shape:
        return False
    if not loaded.is_floating_point():
        return torch.equal(loaded, fresh)
    tolerance = max(1e-3, 2 * torch.finfo(loaded.dtype).eps)  # the model's own refill may round differently
    return torch.allclose(loaded.float(), fresh.float(), rtol=tolerance, atol=tolerance)


@torch.no_grad()
def restore_non_persistent_buffers(model, reference):
    """Copy the reference value into every non-persistent buffer of `model` that does not hold it
    (defect 3). Returns the names of the buffers restored."""
    fresh_buffers = dict(reference.named_non_persistent_buffers())
    restored = []
    for name, loaded in model.named_non_persistent_buffers():
        fresh = fresh_buffers.get(name)
        if fresh is None or fresh.is_meta or loaded.is_meta:
            continue  # not computed in __init__ (or not materialised here): nothing to compare
        fresh = fresh.to(device=loaded.device, dtype=loaded.dtype)
        if _holds(loaded, fresh):
            continue
        if loaded.shape == fresh.shape:
            difference = (loaded.float() - fresh.float()).abs().max().item()
            loaded.copy_(fresh)  # in place: every module sharing the tensor sees the repair
        else:
            difference = float("nan")
            owner_name, _, leaf = name.rpartition(".")
            model.get_submodule(owner_name).register_buffer(leaf, fresh, persistent=False)
        logger.warning(
            "Non-persistent buffer %s did not hold what %s computes in __init__ (max |diff| %.3g): its "
            "remote code's _init_weights does not refill it after loading, as transformers 5 expects; "
            "recomputed it.",
            name, type(model).__name__, difference,
        )
        restored.append(name)
    return restored
