"""Defect 1: a module uses a `typing` name (`List`) that it never imports.

It relied on `from torch.nn.functional import *`, which no longer exports it. Detected by reading
the module's source before import (names used, never bound, not builtins, not provided by its star
imports today); repaired by importing that module with those names already in its namespace. The
files on disk are left as they are.
"""

import ast
import builtins
import importlib
import importlib.util
import sys
import typing
from pathlib import Path

from transformers import dynamic_module_utils

from .log import logger

TYPING_NAMES = frozenset(typing.__all__)
# Set on a module imported with supplied names, so that later loads can say so again.
SUPPLIED_NAMES_ATTRIBUTE = "__supplied_typing_names__"


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
