"""Narrow repairs for MiniCPM-V remote code written for transformers 4.4x and older torch.

The published `openbmb/MiniCPM-V-2_6` code (and its siblings) breaks on current versions in
five ways; each repair below first detects its defect and does nothing when it is absent:

1. A module uses a `typing` name (`List`) that it never imports: it relied on
   `from torch.nn.functional import *`, which no longer exports it. Detected by reading the
   module's source before import (names used, never bound, not builtins, not provided by its
   star imports today); repaired by importing that module with those names already in its
   namespace. The files on disk are left as they are.
2. The model's `__init__` never calls `post_init()`, which transformers 5 needs
   (`all_tied_weights_keys`). Detected on a reference construction of the model (parameters on
   the meta device); repaired by calling `post_init()` right after that class's `__init__`
   while the model loads.
3. A non-persistent buffer computed in `__init__` (the resampler's 2D sin-cos `pos_embed`) is
   not refilled by the model's `_init_weights`; transformers 5 rebuilds such buffers empty
   after loading. Detected by comparing every non-persistent buffer of the loaded model with
   the reference construction's; repaired by copying the reference value in.
4. The code imports names that transformers has since removed (`_prepare_4d_attention_mask` and
   its siblings, `is_torch_fx_available`, `LogitsWarper`, `WHISPER_ATTENTION_CLASSES`, ...) or
   uses removed cache methods (`from_legacy_cache`, `seen_tokens`, ...). Detected by reading
   every remote-code file a checkpoint names (config, tokenizer and processor `auto_map`, and
   their relative imports) before any of it is imported; repaired by installing a stand-in that
   behaves as the removed name did (pinned by golden values recorded from the last release that
   had it) where the name is missing, and only there. A missing name without a stand-in raises
   `UnsupportedTransformersError`, naming the checkpoint's family, the name and the supported
   transformers range.
5. A class's `prepare_inputs_for_generation` is written for transformers 4.36's generate
   (MiniCPM-V 2.0's LLM): it takes any cache it is given as the running one, and later generate
   passes an empty one at the first step (5.3 to 5.23) or none at all (`cache=` from 5.24).
   Detected by its signature (`past_key_values`, none of `LATER_GENERATION_PARAMETERS`); repaired
   by wrapping it so that it is called as 4.36's generate called it.

Defects 6 to 11 (at the end of this module) were found by running the published files through the
user journey (conformance.py): `rope_scaling` read as transformers 4.x held it, a list of tied weights,
a `get_input_embeddings` that fails, 'cuda' under ZeRO-3 on a machine without CUDA, a language model
without GenerationMixin, a tokenizer reading sentencepiece's ids.

Every repair is logged at WARNING level, naming what was repaired; a model without defects
loads untouched and nothing is logged.

Folders this project saves carry a copy of this module, so that plain
`AutoModel.from_pretrained(folder, trust_remote_code=True)` applies the same repairs: their
config.json's `auto_map` points to a generated `repaired_classes.py` (see `loading.py`) that calls
`repair_imports` and wraps the published classes with `repaired_config_class` /
`repaired_model_class`. Keep this module self-contained: it may import only the standard library,
torch and transformers.
"""

import ast
import builtins
import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import re
import sys
import types
import typing
from pathlib import Path

import torch
import transformers
from transformers import dynamic_module_utils
from transformers.cache_utils import Cache
from transformers.modeling_utils import local_torch_dtype
from transformers.utils.hub import cached_file

logger = logging.getLogger(__name__)

TYPING_NAMES = frozenset(typing.__all__)
# Set on a module imported with supplied names, so that later loads can say so again.
SUPPLIED_NAMES_ATTRIBUTE = "__supplied_typing_names__"


# ---- defect 1: typing names a module never imports -------------------------------------------


def _star_import_names(module_name):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return set()  # the real import will fail (or sits in a try block) and provides nothing
    return set(getattr(module, "__all__", None) or (name for name in dir(module) if not name.startswith("_")))


def missing_typing_names(source):
    """The `typing` names `source` uses but that nothing (binding, import, builtin) provides."""
    tree = ast.parse(source)
    postponed = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )
    bound, used, star_modules = set(dir(builtins)), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    if node.level:  # a relative star import could provide anything: stay out
                        return []
                    star_modules.append(node.module)
                else:
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
    if postponed:  # annotations are never evaluated: names used only there cannot fail
        used = _names_outside_annotations(tree)
    missing = (used - bound) & TYPING_NAMES
    for module_name in star_modules:
        missing -= _star_import_names(module_name)
    return sorted(missing)


def _names_outside_annotations(tree):
    annotations = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            annotations.add(id(node.annotation))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            annotations.add(id(node.returns))
        elif isinstance(node, ast.AnnAssign):
            annotations.add(id(node.annotation))
    used = set()

    def visit(node):
        if id(node) in annotations:
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            used.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return used


def _import_with_names(dotted_name, path, names):
    """Import `path` as `dotted_name` with `names` from typing already in its namespace."""
    parent_name, _, child_name = dotted_name.rpartition(".")
    parent = importlib.import_module(parent_name)
    spec = importlib.util.spec_from_file_location(dotted_name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update({name: getattr(typing, name) for name in names})
    setattr(module, SUPPLIED_NAMES_ATTRIBUTE, names)
    sys.modules[dotted_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[dotted_name]
        raise
    setattr(parent, child_name, module)


def supply_missing_typing_names(module_file):
    """Pre-import `module_file` (in transformers' module cache) and its relative imports, each
    defective one with the typing names it lacks. Returns {file name: names supplied}."""
    module_file = Path(module_file)
    root = module_file.parent
    package = ".".join(root.relative_to(dynamic_module_utils.HF_MODULES_CACHE).parts)
    files = [module_file] + [Path(f) for f in dynamic_module_utils.get_relative_import_files(module_file)]
    missing, supplied = {}, {}
    for file in files:
        dotted_name = ".".join((package, *file.relative_to(root).with_suffix("").parts))
        if dotted_name in sys.modules:  # imported before; repaired then if it needed it
            names = getattr(sys.modules[dotted_name], SUPPLIED_NAMES_ATTRIBUTE, None)
        elif names := missing_typing_names(file.read_text(encoding="utf-8")):
            missing[file] = (dotted_name, file, names)
        if names:
            supplied[file.name] = names
            logger.warning(
                "Remote code %s uses %s without importing it (it relied on a star import that no "
                "longer provides it): supplied from typing.",
                file.name, ", ".join(names),
            )

    imported = set()

    def ensure(file):
        if file in imported:
            return
        imported.add(file)
        for dependency in dynamic_module_utils.get_relative_imports(file):
            dependency_file = root.joinpath(*dependency.split(".")).with_suffix(".py")
            if dependency_file in missing:
                ensure(dependency_file)
        _import_with_names(*missing[file])

    for file in missing:
        ensure(file)
    return supplied


def repair_imports(module_file):
    """Every repair that must be in place before `module_file` (in transformers' module cache) and
    the files it imports relatively are imported. The single entry point for import-time repairs:
    the loader and saved folders' `repaired_classes.py` both call it. Returns {file name: typing
    names supplied}."""
    module_file = Path(module_file)
    files = [module_file, *map(Path, dynamic_module_utils.get_relative_import_files(module_file))]
    supply_removed_names(files, f"remote code in {module_file.parent.name}")  # before anything imports them
    return supply_missing_typing_names(module_file)


def import_model_class(name_or_path, config, cache_dir=None):
    """The class `AutoModel` will load (from `config.auto_map`), imported with defect 1 repaired.

    Returns None for a model without remote code.
    """
    class_reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if class_reference is None:
        return None
    repo_id, _, reference = class_reference.rpartition("--")
    module_name = reference.split(".")[0]
    cached = dynamic_module_utils.get_cached_module_file(
        repo_id or str(name_or_path), module_name + ".py", cache_dir=cache_dir
    )
    repair_imports(Path(dynamic_module_utils.HF_MODULES_CACHE) / cached)
    return dynamic_module_utils.get_class_from_dynamic_module(class_reference, name_or_path, cache_dir=cache_dir)


# ---- defects 2 and 3: a reference construction ------------------------------------------------


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
    """A fresh construction of `model_class`: parameters on meta, buffers as `__init__` computes
    them, under the dtype the real load uses. Returns (reference, whether `__init__` skipped
    `post_init()`); the reference is completed with `post_init()` when it did."""
    dtype_context = local_torch_dtype(dtype) if isinstance(dtype, torch.dtype) else contextlib.nullcontext()
    with _parameters_on_meta(), dtype_context:
        reference = model_class(copy.deepcopy(config))
        missed_post_init = lacks_post_init(reference)
        if missed_post_init:
            reference.post_init()
    return reference, missed_post_init


def lacks_post_init(model):
    return not hasattr(model, "all_tied_weights_keys")


@contextlib.contextmanager
def post_init_after_init(model_class):
    """While loading, run `post_init()` after `model_class.__init__` (defect 2: it never does)."""
    logger.warning(
        "Remote code %s.__init__ never calls post_init() (written for transformers 4.x, which did not "
        "need it): calling it after __init__ while loading.",
        model_class.__name__,
    )
    own_init = model_class.__dict__.get("__init__")
    inherited_init = model_class.__init__
    # AutoModel loads a copy of the class with GenerationMixin added, whose namespace copies ours.
    patched = {model_class}

    @functools.wraps(inherited_init)
    def init_then_post_init(self, *args, **kwargs):
        inherited_init(self, *args, **kwargs)
        if type(self).__dict__.get("__init__") is init_then_post_init:
            patched.add(type(self))
        if lacks_post_init(self):
            self.post_init()

    model_class.__init__ = init_then_post_init
    try:
        yield
    finally:
        for cls in patched:
            if own_init is None:
                del cls.__init__
            else:
                cls.__init__ = own_init


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


# ---- defect 5: generation inputs prepared for transformers 4.36's generate ----------------------

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
            running.get_max_length = functools.partial(_cache_limit, running, 0)
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


# ---- saved folders: the published classes with the repairs built in ---------------------------


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
    """`published` (a model class) with defects 2, 3 and 5 repaired where present, defined in
    `module_name` (so that saving the model names it in `auto_map`).

    Defect 2: `__init__` is followed by `post_init()` when the published `__init__` skipped it.
    Defect 3: `from_pretrained` compares every non-persistent buffer with a reference
    construction and restores the ones that differ, as `loading.load_model` does.
    Defect 5: every construction wraps a legacy prepare_inputs_for_generation of its classes.
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
            reference, _ = build_reference(cls, model.config, model.dtype)
            restore_non_persistent_buffers(model, reference)
            return model

    if config_class is not None:
        Repaired.config_class = config_class
    return _named_like(Repaired, published, module_name)


def _named_like(cls, published, module_name):
    cls.__name__, cls.__qualname__, cls.__module__ = published.__name__, published.__qualname__, module_name
    cls.__doc__ = f"{published.__name__} from {published.__module__}, with remote_code_repairs applied."
    return cls
# ---- defect 4: names transformers has removed -------------------------------------------------

# The transformers releases this project is tested on; requirements.txt states the same range (a
# test checks that they agree). An error for a removed name without a stand-in names it.
SUPPORTED_TRANSFORMERS = ">=5.3.0,<=5.25.0"
# Cache methods the published generation code calls (not imports): the class they belong on.
CACHE_METHODS = {
    "from_legacy_cache": "DynamicCache",
    "to_legacy_cache": "DynamicCache",
    "seen_tokens": "Cache",
    "get_usable_length": "Cache",
    "get_max_length": "Cache",
}
# Modules transformers removed whole; a stand-in module is created only for these.
REMOVED_MODULES = frozenset({"transformers.modeling_attn_mask_utils"})
# (module, name) of every stand-in this process installed. transformers can rebuild its top-level
# module (`direct_transformers_import`), dropping a stand-in set on it; the next load puts it back
# without logging the same repair twice.
_installed = set()


class UnsupportedTransformersError(ImportError):
    """Remote code needs a name that this transformers lacks and no stand-in supplies."""


def _is_tracing(tensor):
    return torch.jit.is_tracing() or isinstance(tensor, torch.fx.Proxy) or torch.compiler.is_compiling()


def _bias(blocked, dtype):
    """Additive attention bias: 0 where attending is allowed, the dtype's minimum where blocked."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, torch.finfo(dtype).min)


# The stand-ins below carry the removed names, so that code wrapping them by name (torch.fx.wrap,
# as MiniCPM-V 2.0 does) sees what it saw before.


def _prepare_4d_attention_mask(mask, dtype, tgt_len=None):
    """[batch, kv] mask (1 attends; anything else is blocked) -> [batch, 1, tgt_len or kv, kv] bias."""
    batch, kv_length = mask.shape
    query_length = kv_length if tgt_len is None else tgt_len
    kept = mask[:, None, None, :].expand(batch, 1, query_length, kv_length).to(dtype)
    return _bias((1 - kept) != 0, dtype)


class AttentionMaskConverter:
    """Builds additive 4D attention masks: causal (optionally within a sliding window) and/or padding."""

    def __init__(self, is_causal, sliding_window=None):
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive integer, not {sliding_window}")
        self.is_causal = is_causal
        self.sliding_window = sliding_window

    @staticmethod
    def _make_causal_mask(input_ids_shape, dtype, device, past_key_values_length=0, sliding_window=None):
        batch, query_length = input_ids_shape
        # Query i sits at absolute position past + i and may see every key up to that position.
        query_positions = torch.arange(query_length, device=device)[:, None] + past_key_values_length
        key_positions = torch.arange(query_length + past_key_values_length, device=device)[None, :]
        blocked = key_positions > query_positions
        if sliding_window is not None:
            blocked |= key_positions < query_positions - sliding_window
        return _bias(blocked, dtype)[None, None].expand(batch, 1, *blocked.shape)

    @staticmethod
    def _expand_mask(mask, dtype, tgt_len=None):
        return _prepare_4d_attention_mask(mask, dtype, tgt_len)

    @staticmethod
    def _unmask_unattended(expanded_mask, min_dtype):
        """Rows that attend to nothing attend to everything instead (SDPA's memory-efficient kernel
        returns NaN for fully masked rows)."""
        if expanded_mask.dtype == torch.bool:
            raise ValueError("_unmask_unattended expects a float mask, got a BoolTensor")
        fully_masked = (expanded_mask == min_dtype).all(dim=-1, keepdim=True)
        return expanded_mask.mul(~fully_masked)

    @staticmethod
    def _ignore_causal_mask_sdpa(attention_mask, inputs_embeds, past_key_values_length, sliding_window=None,
                                 is_training=False):
        """Whether SDPA's own `is_causal` can replace the mask (nothing padded, no cache offset)."""
        query_length = inputs_embeds.shape[1]
        kv_length = query_length + past_key_values_length
        square = query_length == 1 or kv_length == query_length
        within_window = sliding_window is None or kv_length < sliding_window
        tracing = _is_tracing(inputs_embeds)
        if attention_mask is None:
            return bool((is_training or not tracing) and square and within_window)
        if not within_window or attention_mask.dim() == 4:
            return False
        return bool(not tracing and square and torch.all(attention_mask == 1))

    def to_causal_4d(self, batch_size, query_length, key_value_length, dtype, device="cpu"):
        if not self.is_causal:
            raise ValueError("to_causal_4d needs a causal AttentionMaskConverter")
        if query_length == 1 and self.sliding_window is None:
            return None
        return self._make_causal_mask((batch_size, query_length), dtype, device,
                                      key_value_length - query_length, self.sliding_window)

    def to_4d(self, attention_mask_2d, query_length, dtype, key_value_length=None):
        causal = None
        if self.is_causal and (query_length > 1 or self.sliding_window is not None):
            if key_value_length is None:
                raise ValueError("a causal AttentionMaskConverter needs key_value_length")
            causal = self._make_causal_mask((attention_mask_2d.shape[0], query_length), dtype,
                                            attention_mask_2d.device, key_value_length - query_length,
                                            self.sliding_window)
        elif self.sliding_window is not None:
            raise NotImplementedError("a sliding window needs a causal AttentionMaskConverter")
        padding = self._expand_mask(attention_mask_2d, dtype, query_length).to(attention_mask_2d.device)
        if causal is None:
            return padding
        return causal.masked_fill(padding.bool(), torch.finfo(dtype).min)


def _causal_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length, sliding_window):
    """The causal mask, with a 2D `attention_mask`'s padding folded in (both helpers below)."""
    converter = AttentionMaskConverter(is_causal=True, sliding_window=sliding_window)
    query_length = input_shape[-1]
    kv_length = query_length + past_key_values_length
    if attention_mask is not None and attention_mask.dim() == 2:
        return converter.to_4d(attention_mask, query_length, inputs_embeds.dtype, key_value_length=kv_length)
    return converter.to_causal_4d(input_shape[0], query_length, kv_length, inputs_embeds.dtype, inputs_embeds.device)


def _prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length,
                                      sliding_window=None):
    if attention_mask is not None and attention_mask.dim() == 4:  # 1 attends, 0 is blocked
        expected = (input_shape[0], 1, input_shape[-1], input_shape[-1] + past_key_values_length)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(f"Incorrect 4D attention_mask shape: {tuple(attention_mask.shape)}; expected: {expected}.")
        inverted = 1.0 - attention_mask  # a bias in the mask's own dtype
        return torch.zeros_like(inverted).masked_fill(inverted != 0, torch.finfo(inputs_embeds.dtype).min)
    return _causal_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length, sliding_window)


def _prepare_4d_causal_attention_mask_for_sdpa(attention_mask, input_shape, inputs_embeds, past_key_values_length,
                                               sliding_window=None):
    """As `_prepare_4d_causal_attention_mask`, but None where SDPA's `is_causal` does the job, and a
    4D mask is taken as the bias itself."""
    if AttentionMaskConverter._ignore_causal_mask_sdpa(attention_mask, inputs_embeds, past_key_values_length,
                                                       sliding_window):
        return None
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask
    else:
        mask = _causal_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length, sliding_window)
    if attention_mask is not None and not _is_tracing(inputs_embeds) and mask.device.type in ("cuda", "xpu"):
        mask = AttentionMaskConverter._unmask_unattended(mask, torch.finfo(inputs_embeds.dtype).min)
    return mask


def _prepare_4d_causal_attention_mask_with_cache_position(attention_mask, sequence_length, target_length, dtype,
                                                          device, min_dtype, cache_position, batch_size,
                                                          is_training=False, token_type_ids=None, **kwargs):
    """PaliGemma's mask: the prefix (token_type_ids == 0) is seen whole while training, the rest
    causally; at inference every query sees the whole prompt. A 4D mask is returned as given."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    keys = torch.arange(target_length, device=device)[None, :]
    if sequence_length == 1:
        blocked = torch.ones(sequence_length, target_length, dtype=torch.bool, device=device)
    elif is_training:
        blocked = keys > torch.arange(sequence_length, device=device)[:, None]
    else:
        blocked = (keys >= sequence_length).expand(sequence_length, target_length)
    blocked = blocked & (torch.arange(target_length, device=cache_position.device) > cache_position.reshape(-1, 1)).to(device)
    blocked = blocked[None, None].expand(batch_size, 1, -1, -1).clone()
    if attention_mask is not None:
        length = attention_mask.shape[-1]
        padded = (attention_mask[:, None, None, :] == 0).to(blocked.device)
        blocked[..., :length] |= padded
        if is_training:
            blocked[..., :length] &= (token_type_ids[:, None, None, :] != 0).to(blocked.device)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, min_dtype)


def is_torch_fx_available():
    return True  # torch.fx ships with every torch this project runs on


class LogitsWarper:
    """Abstract base of logits warpers (transformers folded them into LogitsProcessor)."""

    def __call__(self, input_ids, scores):
        raise NotImplementedError(f"{self.__class__} is an abstract class. Only classes inheriting this class can be called.")


def _whisper_attention_classes():
    """Every implementation name maps to WhisperAttention, which now dispatches on the config."""
    from transformers.models.whisper.modeling_whisper import WhisperAttention

    return {"eager": WhisperAttention, "flash_attention_2": WhisperAttention, "sdpa": WhisperAttention}


def _cache_limit(cache, layer_idx):
    """The cache's maximum length, or None for one that grows without bound."""
    if hasattr(cache, "get_max_cache_shape"):  # transformers 5.0 to 5.21
        limit = cache.get_max_cache_shape(layer_idx)
    else:  # later: each layer knows its own (and get_max_length may be this module's stand-in)
        limit = cache.layers[layer_idx].get_max_length() if layer_idx < len(cache.layers) else -1
    return None if limit is None or limit < 0 else limit


def _seen_tokens(cache):
    return cache.get_seq_length()


def _get_usable_length(cache, new_seq_length, layer_idx=0):
    """How much of the cache the next `new_seq_length` tokens can attend to."""
    limit = _cache_limit(cache, layer_idx)
    previous = cache.get_seq_length(layer_idx)
    if limit is not None and previous + new_seq_length > limit:
        return limit - new_seq_length
    return previous


def _get_max_length(cache):
    # Installed only where transformers lacks the name (before 5.22); from 5.22 the native method
    # answers -1, not None, for a dynamic cache. That difference does not decide whether the
    # published MiniCPM-V 2.0 LLM generates: its prepare_inputs_for_generation (MiniCPM-2B, the
    # transformers 4.36 Llama one) reads get_max_length only when handed a Cache, and from 5.3 to
    # 5.23 generate hands it an empty DynamicCache at the first step, where it already drops the
    # inputs_embeds for the empty input_ids; from 5.24 the cache arrives as `cache=`, so it never
    # sees one and feeds the prompt embeddings again at every step. Both are defect 5, repaired by
    # repair_generation_inputs, which also gives that call None in place of the -1.
    return _cache_limit(cache, 0)


def _from_legacy_cache(cls, past_key_values=None):
    """A cache holding a tuple of per-layer (key, value) pairs."""
    cache = cls()
    for layer_idx, (key, value, *_) in enumerate(past_key_values or ()):
        cache.update(key, value, layer_idx)
    return cache


def _to_legacy_cache(cache):
    return tuple((layer.keys, layer.values) for layer in cache.layers)


# (module, name) -> a function returning the stand-in. "Class.attribute" names a class attribute.
STAND_INS = {
    ("transformers.modeling_attn_mask_utils", "AttentionMaskConverter"): lambda: AttentionMaskConverter,
    ("transformers.modeling_attn_mask_utils", "_prepare_4d_attention_mask"): lambda: _prepare_4d_attention_mask,
    ("transformers.modeling_attn_mask_utils", "_prepare_4d_causal_attention_mask"):
        lambda: _prepare_4d_causal_attention_mask,
    ("transformers.modeling_attn_mask_utils", "_prepare_4d_causal_attention_mask_for_sdpa"):
        lambda: _prepare_4d_causal_attention_mask_for_sdpa,
    ("transformers.models.paligemma.modeling_paligemma", "_prepare_4d_causal_attention_mask_with_cache_position"):
        lambda: _prepare_4d_causal_attention_mask_with_cache_position,
    ("transformers.utils.import_utils", "is_torch_fx_available"): lambda: is_torch_fx_available,
    ("transformers", "LogitsWarper"): lambda: LogitsWarper,
    ("transformers.models.whisper.modeling_whisper", "WHISPER_ATTENTION_CLASSES"): _whisper_attention_classes,
    ("transformers.cache_utils", "Cache.seen_tokens"): lambda: property(_seen_tokens),
    ("transformers.cache_utils", "Cache.get_usable_length"): lambda: _get_usable_length,
    ("transformers.cache_utils", "Cache.get_max_length"): lambda: _get_max_length,
    ("transformers.cache_utils", "DynamicCache.from_legacy_cache"): lambda: classmethod(_from_legacy_cache),
    ("transformers.cache_utils", "DynamicCache.to_legacy_cache"): lambda: _to_legacy_cache,
}


def transformers_references(source):
    """Every transformers name `source` needs: [(module, name, guarded)].

    `from transformers... import name` at any depth (inside functions too), `transformers.name` after
    `import transformers`, and the removed cache methods it calls (`CACHE_METHODS`). `guarded`: the
    import sits in a `try` whose handler catches ImportError, so the code copes without it.
    """
    tree = ast.parse(source)
    references = []
    imports_package = any(
        isinstance(node, ast.Import) and any(alias.name == "transformers" and alias.asname is None for alias in node.names)
        for node in ast.walk(tree)
    )

    def catches_import_error(handler):
        names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
        caught = handler.type
        if caught is None:
            return True
        options = caught.elts if isinstance(caught, ast.Tuple) else [caught]
        return any(isinstance(option, ast.Name) and option.id in names for option in options)

    def visit(node, guarded):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
            node.module == "transformers" or node.module.startswith("transformers.")
        ):
            references.extend((node.module, alias.name, guarded) for alias in node.names if alias.name != "*")
        elif (imports_package and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "transformers"):
            references.append(("transformers", node.attr, guarded))
        elif isinstance(node, ast.Attribute) and node.attr in CACHE_METHODS:
            references.append(("transformers.cache_utils", f"{CACHE_METHODS[node.attr]}.{node.attr}", guarded))
        if isinstance(node, ast.Try) and any(catches_import_error(handler) for handler in node.handlers):
            for child in node.body:
                visit(child, True)
            for child in (*node.handlers, *node.orelse, *node.finalbody):
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return references


def resolves(module_name, name):
    """Whether `module_name` imports and has `name` ("Class.attribute" walks into the class)."""
    try:
        target = importlib.import_module(module_name)
    except ImportError:
        return False
    for part in name.split("."):
        if hasattr(target, part):
            target = getattr(target, part)
        elif isinstance(target, types.ModuleType):  # `from package import submodule` imports it
            try:
                target = importlib.import_module(f"{target.__name__}.{part}")
            except ImportError:
                return False
        else:
            return False
    return True


def _install_stand_in(module_name, name):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        if module_name not in REMOVED_MODULES:
            raise
        module = types.ModuleType(module_name, f"Stand-in for the removed {module_name} ({__name__}).")
        sys.modules[module_name] = module
        parent_name, _, child_name = module_name.rpartition(".")
        setattr(importlib.import_module(parent_name), child_name, module)
    owner_name, _, attribute = name.rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    setattr(owner, attribute, STAND_INS[(module_name, name)]())


def _read_json(name_or_path, file_name, cache_dir):
    path = cached_file(name_or_path, file_name, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False)
    if path is None:
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def family_name(config_dict):
    """How an error names a checkpoint: "MiniCPM-V 2.6", "MiniCPM-o 2.6", ... from its config."""
    model_type = config_dict.get("model_type", "unknown model type")
    kind = {"minicpmv": "MiniCPM-V", "minicpmo": "MiniCPM-o"}.get(model_type, model_type)
    version = config_dict.get("version")
    return kind if version is None else f"{kind} {version}"


def remote_code_files(name_or_path, cache_dir=None):
    """Every remote-code file the checkpoint names (config, tokenizer and processor `auto_map`, and
    their relative imports), fetched into transformers' module cache without importing any."""
    references = set()
    for file_name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        for value in (_read_json(name_or_path, file_name, cache_dir).get("auto_map") or {}).values():
            for class_reference in value if isinstance(value, list) else [value]:
                if class_reference:
                    references.add(class_reference)
    files, pending = {}, []
    for class_reference in sorted(references):
        repo_id, _, reference = class_reference.rpartition("--")
        pending.append((repo_id or str(name_or_path), reference.split(".")[0] + ".py"))
    # One file at a time: older transformers fetch only a file's direct relative imports.
    while pending:
        repo, file_name = pending.pop()
        if (repo, file_name) in files:
            continue
        cached = dynamic_module_utils.get_cached_module_file(repo, file_name, cache_dir=cache_dir)
        files[repo, file_name] = module_file = Path(dynamic_module_utils.HF_MODULES_CACHE) / cached
        pending.extend((repo, name.replace(".", "/") + ".py") for name in dynamic_module_utils.get_relative_imports(module_file))
    return sorted(set(files.values()))


def repair_removed_names(name_or_path, cache_dir=None):
    """Install a stand-in for every removed transformers name the checkpoint's remote code needs
    (every file its config, tokenizer and processor name). Returns [(module, name)] found missing."""
    family = family_name(_read_json(name_or_path, "config.json", cache_dir))
    return supply_removed_names(remote_code_files(name_or_path, cache_dir), f"{family} checkpoint {name_or_path}")


def supply_removed_names(files, checkpoint):
    """Install a stand-in for every removed transformers name `files` need; `checkpoint` names them
    in the error for a name without one.

    Names that resolve (the installed transformers has them, or a stand-in went in earlier) are
    left alone. Each stand-in is logged the first time this process installs it.
    """
    missing = {}
    for file in files:
        if file.name == Path(__file__).name:  # a saved folder's copy of this module repairs, needs nothing
            continue
        for module_name, name, guarded in transformers_references(file.read_text(encoding="utf-8")):
            if not guarded and not resolves(module_name, name):
                missing.setdefault((module_name, name), file.name)
    unsupported = sorted(key for key in missing if key not in STAND_INS)
    if unsupported:
        needs = "; ".join(f"{module_name}.{name} (in {missing[module_name, name]})" for module_name, name in unsupported)
        raise UnsupportedTransformersError(
            f"{checkpoint}: its remote code needs {needs}, which transformers {transformers.__version__} "
            f"does not have and no repair supplies. This project supports transformers"
            f"{SUPPORTED_TRANSFORMERS}: pip install -r requirements.txt"
        )
    for (module_name, name), file_name in sorted(missing.items()):
        _install_stand_in(module_name, name)
        if (module_name, name) in _installed:
            continue
        _installed.add((module_name, name))
        logger.warning(
            "Remote code %s needs %s from %s, which transformers %s no longer has: installed a stand-in "
            "that behaves as the removed one did.",
            file_name, name, module_name, transformers.__version__,
        )
    return sorted(missing)


# ---- defect 6: the rope_scaling of transformers 4.x -------------------------------------------
# (Kept apart from the repairs above: issue 22, found by the conformance run of the published files.)

# How remote code written for transformers 4.x reads a scaled rope: `config.rope_scaling["type"]`
# (MiniCPM-V 2.0's modeling_minicpm.py, `_init_rope`), after testing `rope_scaling is None`.
LEGACY_ROPE_READ = re.compile(r"""rope_scaling\[\s*["']type["']\s*\]""")


def _legacy_rope_scaling(config):
    """`rope_scaling` as transformers 4.x held it: None for an unscaled rope, else {"type", "factor", ...}."""
    parameters = config.rope_parameters
    if not parameters or parameters.get("rope_type", "default") == "default":
        return None
    legacy = {key: value for key, value in parameters.items() if key not in ("rope_type", "rope_theta")}
    return {"type": parameters["rope_type"], **legacy}


def legacy_rope_readers(files):
    """The names of the remote-code `files` that read `rope_scaling["type"]`."""
    return sorted({Path(file).name for file in files
                   if Path(file).name != Path(__file__).name and LEGACY_ROPE_READ.search(Path(file).read_text(encoding="utf-8"))})


def repair_legacy_rope_scaling(config_class, files):
    """Defect 6. transformers 5 keeps rope settings in `rope_parameters` and makes `rope_scaling` an
    alias of it, so a published `"rope_scaling": null` reads back as {"rope_type": "default", ...},
    and code that tests `rope_scaling is None`, then reads `rope_scaling["type"]`, raises KeyError.
    Detected by reading the checkpoint's remote-code `files`; repaired by giving the config class (of
    remote code) a `rope_scaling` that reads as transformers 4.x's did (setting it is unchanged).
    Returns the files that read it (empty: nothing changed)."""
    if getattr(config_class, "__legacy_rope_scaling__", False) or config_class.__module__.startswith("transformers."):
        return []
    readers = legacy_rope_readers(files)
    if not readers:
        return []
    config_class.rope_scaling = property(_legacy_rope_scaling, transformers.PretrainedConfig.rope_scaling.fset)
    config_class.__legacy_rope_scaling__ = True
    logger.warning(
        "Remote code %s reads config.rope_scaling[\"type\"] (transformers 4.x's layout), which transformers %s "
        "keeps as rope_parameters with rope_type: %s.rope_scaling now reads as 4.x's did (None when unscaled).",
        ", ".join(readers), transformers.__version__, config_class.__name__,
    )
    return readers


# Repairs 7, 8 and 11 mend instances (each load); a user reads of each repair once per process, as of
# the class patches above.
_warned = set()


def warn_once(message, cls, *args):
    """Log ``message`` (%-formatted with ``cls``'s name and ``args``) once per message and class name:
    the same repair of a second folder's copy of a class reads the same, so it is said once."""
    key = (message, cls.__name__)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, cls.__name__, *args)


# ---- defect 7: a list of tied weights ---------------------------------------------------------


def repair_tied_weights_keys(model):
    """Defect 7. transformers 4.x's `_tied_weights_keys` was a list of output weights tied to the input
    embeddings (MiniCPM-V 2.0's `MiniCPMForCausalLM`: ["lm_head.weight"]); transformers 5 reads a
    {target: source} dict, and `save_pretrained` fails on a list (AttributeError: 'list' object has no
    attribute 'keys'). Detected per module of `model`; repaired on that module (not its class) with the
    dict 4.x meant: each listed weight -> the module's input-embedding weight. Returns the modules'
    class names repaired."""
    repaired = []
    for module in model.modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if not isinstance(keys, (list, tuple)):
            continue
        embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
        names = {sub: name for name, sub in module.named_modules()}
        if embeddings not in names:
            raise TypeError(f"{type(module).__name__}._tied_weights_keys is a list {keys}, and its input embeddings "
                            "are not among its modules: cannot tell what they are tied to")
        module._tied_weights_keys = {key: f"{names[embeddings]}.weight" for key in keys}
        warn_once(
            "Remote code %s._tied_weights_keys is a list (transformers 4.x's layout): read as %s, the mapping "
            "transformers 5 expects.", type(module), module._tied_weights_keys,
        )
        repaired.append(type(module).__name__)
    return repaired



# ---- defect 8: input embeddings out of reach ---------------------------------------------------


def repair_input_embeddings(model):
    """Defect 8. The published MiniCPM-V 2.0 `get_input_embeddings` returns `self.llm.embed_tokens`,
    which its LLM (`MiniCPMForCausalLM`, embeddings under `.model`) does not have: AttributeError
    wherever transformers or peft reach the token embeddings (gradient checkpointing's
    `enable_input_require_grads`, LoRA). Detected by calling it; repaired on `model` (not its class)
    by the LLM's own get/set_input_embeddings. A model without such a method is left alone (the LoRA
    setup gives it one). Returns True when repaired."""
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "llm"):
        return False
    try:
        model.get_input_embeddings()
    except AttributeError as e:
        model.get_input_embeddings = model.llm.get_input_embeddings
        model.set_input_embeddings = model.llm.set_input_embeddings
        warn_once("Remote code %s.get_input_embeddings fails (%s): using its LLM's get/set_input_embeddings.",
                  type(model), e)
        return True
    return False


# ---- defect 9: 'cuda' under ZeRO-3 on a machine without CUDA ------------------------------------

# The published 2.5 and 2.6 resampler.py, `_set_2d_pos_cache`: `if is_deepspeed_zero3_enabled(): device='cuda'`.
CUDA_UNDER_ZERO3 = re.compile(r"""if\s+is_deepspeed_zero3_enabled\(\)\s*:\s*\n\s*device\s*=\s*['"]cuda['"]""")


def repair_cuda_under_zero3(model_class):
    """Defect 9. Under DeepSpeed ZeRO-3 the published resampler builds its `pos_embed` buffer on
    'cuda', whatever the machine: a CPU ZeRO-3 run (this project's launchers on CPU) fails with "Found
    no NVIDIA driver". Detected by reading the modules beside `model_class`'s, on a machine without
    CUDA only; repaired by giving such a module an `is_deepspeed_zero3_enabled` that is also False
    without CUDA, so the buffer goes where it goes without ZeRO-3 (GPU runs are untouched).
    Returns the names of the modules repaired."""
    if torch.cuda.is_available():
        return []
    folder = Path(inspect.getfile(model_class)).parent
    repaired = []
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if (not file or Path(file).parent != folder or getattr(module, "__cuda_under_zero3_repaired__", False)
                or not CUDA_UNDER_ZERO3.search(Path(file).read_text(encoding="utf-8"))):
            continue
        zero3_enabled = module.is_deepspeed_zero3_enabled
        module.is_deepspeed_zero3_enabled = lambda: zero3_enabled() and torch.cuda.is_available()
        module.__cuda_under_zero3_repaired__ = True
        logger.warning("Remote code %s puts tensors on 'cuda' whenever ZeRO-3 is on; this machine has no CUDA: "
                       "they stay where they go without ZeRO-3.", Path(file).name)
        repaired.append(module.__name__)
    return repaired


# ---- defect 10: a language model that generates without GenerationMixin ------------------------


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


# ---- defect 11: a tokenizer reading sentencepiece's ids ---------------------------------------

SENTENCEPIECE_READ = re.compile(r"self\.sp_model\.(bos|eos|unk|pad)_id\(\)|self\._convert_token_to_id\(")


class SentencePieceIds:
    """What remote code reads of a sentencepiece model's ids, from the tokenizer's own special tokens
    (sentencepiece's -1 where the tokenizer has none)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def _id(self, name):
        value = getattr(self._tokenizer, f"{name}_token_id")
        return -1 if value is None else value

    def bos_id(self):
        return self._id("bos")

    def eos_id(self):
        return self._id("eos")

    def unk_id(self):
        return self._id("unk")

    def pad_id(self):
        return self._id("pad")


def needs_sentencepiece_ids(tokenizer_class):
    """Whether `tokenizer_class` or a remote-code class it derives from reads `self.sp_model.*_id()`."""
    return any(SENTENCEPIECE_READ.search(inspect.getsource(sys.modules[cls.__module__]))
               for cls in tokenizer_class.__mro__
               if cls.__module__.partition(".")[0] not in ("transformers", "builtins", "tokenizers"))


def repair_sentencepiece_ids(tokenizer):
    """Defect 11. The published MiniCPM-V 2.0 tokenizer (a LlamaTokenizer subclass) reads its ids from
    `self.sp_model.bos_id()` and the like; transformers 5's LlamaTokenizer is backed by `tokenizers` and
    has no `sp_model`, so `tokenizer.bos_id` gives no id (its processor then fails building input ids).
    Its `im_start_id` calls the slow tokenizers' `_convert_token_to_id`, which it lacks too.
    Detected by reading the tokenizer's remote code, on a tokenizer without an sp_model; repaired by
    giving it one that answers those ids from its own special tokens, and `convert_tokens_to_ids` as
    `_convert_token_to_id`. Returns True when repaired."""
    if getattr(tokenizer, "sp_model", None) is not None or not needs_sentencepiece_ids(type(tokenizer)):
        return False
    tokenizer.sp_model = SentencePieceIds(tokenizer)
    if not hasattr(type(tokenizer), "_convert_token_to_id"):
        tokenizer._convert_token_to_id = tokenizer.convert_tokens_to_ids
    warn_once("Remote code %s reads its ids from sp_model, which transformers %s's tokenizers-backed "
              "tokenizer lacks: they come from its own special tokens.", type(tokenizer),
              transformers.__version__)
    return True



def repaired_tokenizer_class(published, module_name):
    """`published` (a tokenizer class) with defect 11 repaired on every instance, defined in `module_name`."""

    class Repaired(published):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            repair_sentencepiece_ids(self)

    return _named_like(Repaired, published, module_name)
