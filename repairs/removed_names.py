"""Defect 4: the remote code imports names that transformers has since removed.

`_prepare_4d_attention_mask` and its siblings, `is_torch_fx_available`, `LogitsWarper`,
`WHISPER_ATTENTION_CLASSES`, ..., or it calls removed cache methods (`from_legacy_cache`,
`seen_tokens`, ...). Detected by reading every remote-code file a checkpoint names (config,
tokenizer and processor `auto_map`, and their relative imports) before any of it is imported;
repaired by installing a stand-in (`stand_ins`) that behaves as the removed name did where the name
is missing, and only there. A missing name without a stand-in raises
`UnsupportedTransformersError`, naming the checkpoint's family, the name and the supported
transformers range.
"""

import ast
import importlib
import sys
import types

import transformers

from .files import family_name, is_repairs_copy, read_json, remote_code_files
from .log import logger
from .stand_ins import STAND_INS

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


def repair_removed_names(name_or_path, cache_dir=None):
    """Install a stand-in for every removed transformers name the checkpoint's remote code needs
    (every file its config, tokenizer and processor name). Returns [(module, name)] found missing."""
    family = family_name(read_json(name_or_path, "config.json", cache_dir))
    return supply_removed_names(remote_code_files(name_or_path, cache_dir), f"{family} checkpoint {name_or_path}")


def supply_removed_names(files, checkpoint):
    """Install a stand-in for every removed transformers name `files` need; `checkpoint` names them
    in the error for a name without one.

    Names that resolve (the installed transformers has them, or a stand-in went in earlier) are
    left alone. Each stand-in is logged the first time this process installs it.
    """
    missing = {}
    for file in files:
        if is_repairs_copy(file):  # a saved folder's copy of the repairs repairs, needs nothing
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
