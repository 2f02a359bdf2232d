"""The repairs that must be in place before remote code is imported (defects 1 and 4), and the
import of a checkpoint's model class with them in place."""

from pathlib import Path

from transformers import dynamic_module_utils

from .removed_names import supply_removed_names
from .typing_names import supply_missing_typing_names


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
