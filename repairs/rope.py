"""Defect 6: remote code reads `config.rope_scaling` as transformers 4.x held it.

Kept apart from the other repairs: issue 22, found by the conformance run of the published files.
"""

import re
from pathlib import Path

import transformers

from .files import is_repairs_copy
from .log import logger

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
                   if not is_repairs_copy(file) and LEGACY_ROPE_READ.search(Path(file).read_text(encoding="utf-8"))})


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
