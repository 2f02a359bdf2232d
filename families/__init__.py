"""The family registry: the only place where a checkpoint's config becomes a family (families/base.py).

To add a family: write one descriptor file here, a subclass of RemoteCodeFamily (remote_code.py: set
``name``, ``llm_type``, ``versions``, ``published``) or of NativeFamily (native.py: ``name``,
``model_type``), stating only what differs; then add one ``register(...)`` line below. A test may
``register`` a toy family at run time. Families are asked in order; the first whose ``matches``
says yes is the checkpoint's (a ``fallback`` family takes a config no family matches).
"""

from types import SimpleNamespace

import transformers
from packaging.version import Version

import loading

from families.native import NATIVE_LLM_TYPE

from families import (
    minicpm_ocr,
    minicpmo2_6,
    minicpmv2_0,
    minicpmv2_5,
    minicpmv2_6,
    minicpmv4,
    minicpmv4_6,
    minicpmv4_7,
)

FAMILIES = []


def register(family_class):
    """Add a family (a Family subclass) to the registry, after those registered before; returns it."""
    FAMILIES.append(family_class)
    return family_class


# Native first: their model_type decides (their configs have no version, which 2.0's lacks too).
register(minicpmv4_6.MiniCPMV4_6)
register(minicpmv4_7.MiniCPMV4_7)
register(minicpm_ocr.MiniCPMOcr)
register(minicpmv2_0.MiniCPMV2_0)
register(minicpmv2_5.MiniCPMV2_5)
register(minicpmo2_6.MiniCPMO2_6)  # before 2.6: both say version 2.6, only o-2.6 has the init_* fields
register(minicpmv2_6.MiniCPMV2_6)
register(minicpmv4.MiniCPMV4)


def llm_types():
    """The chat layouts --llm_type names: the remote-code layouts, then native's."""
    return tuple(dict.fromkeys(sorted((family.llm_type for family in FAMILIES), key=lambda t: t == NATIVE_LLM_TYPE)))


def family_for(config, llm_type=None):
    """The family of the checkpoint whose config this is; ``llm_type`` (from the command line) must
    agree with the config, or be None (then the config's is used). ValueError if it contradicts."""
    family_class = next((family for family in FAMILIES if family.matches(config)), None)
    if family_class is None:
        family_class = next(family for family in FAMILIES if family.fallback)
    family = family_class()
    if llm_type is not None and llm_type != family.llm_type:
        version = getattr(config, "version", None)
        raise ValueError(
            f"--llm_type {llm_type} contradicts the checkpoint: its config (model_type {config.model_type!r}, "
            f"version {version!r}) says {family.llm_type}; omit --llm_type or pass --llm_type {family.llm_type}"
        )
    return family


def family_for_dict(config_dict):
    """The family of a raw config.json (a dict), before any of its code is imported (loading.py)."""
    return family_for(SimpleNamespace(**config_dict))


class TransformersTooOld(ValueError):
    """The installed transformers cannot run this checkpoint (the scripts report it as a usage error)."""


def load_config(name_or_path, cache_dir=None):
    """The checkpoint's config (loading.load_config), once its family is known to run on the installed
    transformers: TransformersTooOld if it is too old (a native family's model_type would be unknown, or
    what training needs missing, and fail later less clearly)."""
    raw, _ = transformers.PretrainedConfig.get_config_dict(name_or_path, cache_dir=cache_dir)
    floor = family_for_dict(raw).transformers_floor
    if floor and Version(transformers.__version__) < Version(floor):
        raise TransformersTooOld(
            f"{name_or_path} is a {raw.get('model_type')} checkpoint, which needs transformers {floor} "
            f"or newer (installed: {transformers.__version__}): pip install -r requirements.txt"
        )
    return loading.load_config(name_or_path, cache_dir)
