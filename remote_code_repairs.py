"""Narrow repairs for MiniCPM-V remote code written for transformers 4.4x and older torch.

The published `openbmb/MiniCPM-V-2_6` code (and its siblings) breaks on current versions in
three ways; each repair below first detects its defect and does nothing when it is absent:

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
import logging
import sys
import typing
from pathlib import Path

import torch
from transformers import dynamic_module_utils
from transformers.modeling_utils import local_torch_dtype

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
    the loader and saved folders' `repaired_classes.py` both call it."""
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


# ---- saved folders: the published classes with the repairs built in ---------------------------


def repaired_config_class(published, module_name):
    """`published` (a config class) unchanged, but defined in `module_name`: saving a config of this
    class names `module_name` in its `auto_map`, so a saved folder keeps loading through the repairs."""

    class Repaired(published):
        # Its own __init__: transformers would give a config subclass without one a generated one.
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    return _named_like(Repaired, published, module_name)


def repaired_model_class(published, config_class, module_name):
    """`published` (a model class) with defects 2 and 3 repaired where present, defined in
    `module_name` (so that saving the model names it in `auto_map`).

    Defect 2: `__init__` is followed by `post_init()` when the published `__init__` skipped it.
    Defect 3: `from_pretrained` compares every non-persistent buffer with a reference
    construction and restores the ones that differ, as `loading.load_model` does.
    """
    logged = []

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
