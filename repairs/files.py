"""Which remote-code files a checkpoint names, and which files of a saved folder are the repairs' copies.

A folder this project saves carries the modules of this package, each copied flat beside the
published files under the name `REPAIRS_FILE_PREFIX + module` (`minicpmv_repairs_rope.py`, ...),
which no published MiniCPM-V file uses; folders saved before the repairs became a package carry a
single `LEGACY_REPAIRS_FILE`. The repairs that read remote code skip these copies: they repair,
they need no repair.
"""

import json
from pathlib import Path

from transformers import dynamic_module_utils
from transformers.utils.hub import cached_file

REPAIRS_FILE_PREFIX = "minicpmv_repairs_"
LEGACY_REPAIRS_FILE = "remote_code_repairs.py"


def is_repairs_copy(file):
    """Whether `file` (a path) is a saved folder's copy of the repairs, of this version or an earlier one."""
    name = Path(file).name
    return name.startswith(REPAIRS_FILE_PREFIX) or name == LEGACY_REPAIRS_FILE


def read_json(name_or_path, file_name, cache_dir):
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
        for value in (read_json(name_or_path, file_name, cache_dir).get("auto_map") or {}).values():
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
