"""Load a MiniCPM-V model, its config and tokenizer through their remote code.

One place for what ``finetune.py``, ``infer.py`` and ``merge.py`` share: the ``AutoModel`` /
``AutoTokenizer`` calls with ``trust_remote_code=True``, the keyword arguments only some
model families accept, and the repairs (the ``repairs`` package) that remote code written for
transformers 4.4x needs to load correctly today (families/remote_code.py uses these for
remote-code checkpoints; families/native.py loads native ones itself). The model loads through the same repaired classes that
saved folders carry. Saved folders: the copying of remote code into them, and
``write_repaired_classes``, which gives every folder this project saves the same repairs, so that
it loads correctly with plain transformers. Each loader installs the stand-ins for removed
transformers names before anything imports the checkpoint's remote code.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import transformers
from transformers import dynamic_module_utils
from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

import repairs
from repairs.classes import repaired_model_class
from repairs.files import LEGACY_REPAIRS_FILE, REPAIRS_FILE_PREFIX, is_repairs_copy, remote_code_files
from repairs.imports import import_model_class
from repairs.removed_names import repair_removed_names
from repairs.rope import repair_legacy_rope_scaling
from repairs.tokenizer import SENTENCEPIECE_READ, repair_sentencepiece_ids

logger = logging.getLogger(__name__)


def load_config(name_or_path, cache_dir=None):
    """The checkpoint's config, its remote code's import-time repairs in place (families.load_config
    checks first that this transformers can run the checkpoint's family)."""
    # The config's remote code imports the model's (2.6: SigLIP's config lives in the vision file).
    repair_removed_names(name_or_path, cache_dir)
    config = transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=True, cache_dir=cache_dir)
    # Before the model's __init__ reads it.
    repair_legacy_rope_scaling(type(config), remote_code_files(name_or_path, cache_dir))
    return config


def load_tokenizer(name_or_path, cache_dir=None):
    # AutoTokenizer reads the model config too, importing its remote code.
    repair_removed_names(name_or_path, cache_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True, cache_dir=cache_dir)
    repair_sentencepiece_ids(tokenizer)
    return tokenizer


def load_model(name_or_path, config, *, dtype, cache_dir=None, device_map=None, quantization_config=None,
               init_kwargs=None):
    """``AutoModel.from_pretrained(..., trust_remote_code=True)`` with the remote code's defects
    repaired where present: the checkpoint's AutoModel class is imported with the import-time
    repairs in place, and the model loads through ``repairs.classes.repaired_model_class`` of it,
    the class a saved folder's ``repaired_classes.py`` defines. ``init_kwargs``: the switches the
    family's ``__init__`` reads from its config (families/minicpmo2_6.py).
    """
    repair_removed_names(name_or_path, cache_dir)
    if init_kwargs:
        # MiniCPM-o's __init__(config) reads the switches from the config; with an explicit
        # config object, from_pretrained would hand them to __init__ as keywords (TypeError).
        logger.info("Model config declares %s: loading with %s", ", ".join(init_kwargs), init_kwargs)
        for key, value in init_kwargs.items():
            setattr(config, key, value)
    kwargs = {}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    published = import_model_class(name_or_path, config, cache_dir=cache_dir)
    if published is None:  # no remote code: nothing to repair
        return transformers.AutoModel.from_pretrained(name_or_path, config=config, trust_remote_code=True, dtype=dtype,
                                                      cache_dir=cache_dir, device_map=device_map, **kwargs)
    # As AutoModel does with remote code: registered for AutoModel (saving names the class in
    # auto_map and copies its files), GenerationMixin added. In the published class's module, so that a
    # save writes what AutoModel's load would write; write_repaired_classes then points auto_map here.
    published.register_for_auto_class("AutoModel")
    model_class = add_generation_mixin_to_remote_model(repaired_model_class(published, None, published.__module__))
    return model_class.from_pretrained(name_or_path, config=config, trust_remote_code=True, dtype=dtype,
                                       cache_dir=cache_dir, device_map=device_map, **kwargs)


# Files besides the weights that make a checkpoint folder self-contained: the model's remote
# code and the processor description (the tokenizer is saved by the Trainer itself).
REMOTE_CODE_PATTERNS = ("*.py", "preprocessor_config.json", "processor_config.json")


def model_source_dir(name_or_path, cache_dir=None):
    """The local folder holding a model's files: the path itself, or its hub cache snapshot."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, cache_dir=cache_dir, allow_patterns=list(REMOTE_CODE_PATTERNS)))


def copy_remote_code(source_dir, output_dir):
    """Copy remote-code and processor files that ``output_dir`` does not have yet."""
    copied = []
    for pattern in REMOTE_CODE_PATTERNS:
        for src in sorted(Path(source_dir).glob(pattern)):
            dst = Path(output_dir) / src.name
            if not dst.exists():
                shutil.copy2(src, dst)
                copied.append(src.name)
    return copied


# A saved folder's config.json `auto_map` points to this generated module; the published targets it
# wraps are kept under PUBLISHED_AUTO_MAP, so that saving the folder again wraps the same classes.
REPAIRED_MODULE = "repaired_classes"
PUBLISHED_AUTO_MAP = "published_auto_map"

REPAIRED_MODULE_HEADER = '''"""Written by the MiniCPM-V fine-tuner when it saved this folder: the classes config.json's
`auto_map` points to. Each is the published class named in `published_auto_map` (whose files
beside this one are unchanged), with the fine-tuner's repairs (the {prefix}*.py files beside
this one) applied where their defect is found: typing names a module never imports, transformers
names since removed, a model that never calls post_init(), non-persistent buffers that
transformers 5 leaves unfilled after loading, and the others those files list. Each repair is
logged as a warning. Delete this file and restore `published_auto_map` as `auto_map` to load the
published classes unrepaired.
"""

'''.format(prefix=REPAIRS_FILE_PREFIX)

# The repairs package's modules, each copied flat into a saved folder as REPAIRS_FILE_PREFIX + its name
# (their relative imports of each other renamed alike), so that no copy can clash with a published file.
REPAIRS_DIR = Path(repairs.__file__).parent
REPAIRS_MODULES = tuple(sorted(path.stem for path in REPAIRS_DIR.glob("*.py") if path.stem != "__init__"))
SIBLING_IMPORT = re.compile(r"^from \.(\w+) import", re.MULTILINE)


def copy_repairs(folder):
    """Copy the repairs' modules into ``folder`` under their saved names, first removing the copies an
    earlier version of this project left there. Returns the names written."""
    folder = Path(folder)
    for earlier in [*folder.glob(f"{REPAIRS_FILE_PREFIX}*.py"), folder / LEGACY_REPAIRS_FILE]:
        earlier.unlink(missing_ok=True)
    written = []
    for module in REPAIRS_MODULES:
        source = (REPAIRS_DIR / f"{module}.py").read_text(encoding="utf-8")
        written.append(f"{REPAIRS_FILE_PREFIX}{module}.py")
        (folder / written[-1]).write_text(SIBLING_IMPORT.sub(rf"from .{REPAIRS_FILE_PREFIX}\1 import", source), encoding="utf-8")
    return written


def import_every_module(module_names):
    """Lines for a generated module that import each of ``module_names`` (beside it) directly:
    transformers 5.3 copies only a module's direct relative imports into its module cache, not
    theirs (the repairs' modules import each other; a published 2.6 module imports resampler.py)."""
    return [f"from .{name} import __name__ as _{name}_module  # noqa: E402,F401\n" for name in module_names]


def write_repaired_classes(folder):
    """Make the saved remote-code model in ``folder`` load correctly with plain transformers.

    Writes a copy of the repairs (``copy_repairs``) and a generated ``repaired_classes.py`` that wraps
    the published classes, and points config.json's ``auto_map`` to the latter (the published
    targets stay in ``published_auto_map``). Run after every save: a folder saved before gets this
    project's current repairs. Returns the names of the files written; nothing for a model
    without remote code.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    published = config.get(PUBLISHED_AUTO_MAP) or config.get("auto_map")
    if not published:
        return []
    classes = {}  # "module.Class" -> the auto class that decides how to wrap it
    for auto_class, target in published.items():
        module_name, _, class_name = target.rpartition(".")
        if "--" in module_name or not (folder / f"{module_name}.py").is_file():
            raise ValueError(f"{config_path}: auto_map {auto_class} -> {target}, but {module_name}.py is not in {folder}")
        classes.setdefault(target, auto_class)
    copied = copy_repairs(folder)
    lines = [f"from .{REPAIRS_FILE_PREFIX}imports import repair_imports\n",
             f"from .{REPAIRS_FILE_PREFIX}classes import repaired_config_class, repaired_model_class\n",
             *import_every_module(Path(name).stem for name in copied),
             "\nrepair_imports(__file__)  # before any published module is imported\n\n"]
    # transformers 5.3 copies only the direct relative imports of repaired_classes.py into its module
    # cache, not theirs (a 2.6 folder then missed resampler.py): import every module they need here.
    published_modules = {target.rpartition(".")[0] for target in classes}
    needed = set()
    for module_name in published_modules:
        needed.update(Path(f).stem for f in dynamic_module_utils.get_relative_import_files(str(folder / f"{module_name}.py")))
    lines += import_every_module(name for name in sorted(needed - published_modules) if not is_repairs_copy(f"{name}.py"))
    for target in classes:
        module_name, _, class_name = target.rpartition(".")
        lines.append(f"from .{module_name} import {class_name} as _Published{class_name}  # noqa: E402\n")
    lines.append("\n")
    config_class = None
    for target, auto_class in sorted(classes.items(), key=lambda item: item[1] != "AutoConfig"):
        class_name = target.rpartition(".")[2]
        if auto_class == "AutoConfig":
            config_class = class_name
            lines.append(f"{class_name} = repaired_config_class(_Published{class_name}, __name__)\n")
        else:
            lines.append(f"{class_name} = repaired_model_class(_Published{class_name}, {config_class}, __name__)\n")
    (folder / f"{REPAIRED_MODULE}.py").write_text(REPAIRED_MODULE_HEADER + "".join(lines))
    config["auto_map"] = {key: f"{REPAIRED_MODULE}.{target.rpartition('.')[2]}" for key, target in published.items()}
    config[PUBLISHED_AUTO_MAP] = published
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info(
        "Wrote %s.py and the repairs (%s*.py) into %s: its auto_map now loads %s through the repairs, so that "
        "plain AutoModel.from_pretrained(..., trust_remote_code=True) gives what this project's loader gives",
        REPAIRED_MODULE, REPAIRS_FILE_PREFIX, folder, ", ".join(classes),
    )
    return [f"{REPAIRED_MODULE}.py", *copied, "config.json"]


# ---- A saved folder names only files it holds (issue 22) ---------------------------------------
# A tokenizer saved into an adapter folder keeps the published tokenizer_config.json auto_map, which
# can name the processor's file (2.6: AutoProcessor -> processing_minicpmv.MiniCPMVProcessor) that
# only the model folder holds; loading the tokenizer or processor from such a folder then fails.

SETTINGS_WITH_AUTO_MAP = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def named_files_missing(folder):
    """[(settings file, module file)] for every module an ``auto_map`` in ``folder`` names (and those
    modules' relative imports) that ``folder`` does not hold."""
    folder = Path(folder)
    missing = []
    for settings in SETTINGS_WITH_AUTO_MAP:
        path = folder / settings
        if not path.is_file():
            continue
        auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}
        pending = []
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                if reference and "--" not in reference:  # "repo--module.Class" lives in another repository
                    pending.append(reference.rpartition(".")[0] + ".py")
        seen = set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            if not (folder / name).is_file():
                missing.append((settings, name))
                continue
            pending.extend(f"{module}.py" for module in dynamic_module_utils.get_relative_imports(str(folder / name)))
    return missing


def copy_named_files(source_dir, folder):
    """Copy into ``folder`` from ``source_dir`` the remote code its settings name but it lacks, with the
    processor's settings where a processor file comes (and what those name in turn); ValueError if
    ``source_dir`` lacks one too. Returns the names copied."""
    source_dir, folder = Path(source_dir), Path(folder)
    copied = []
    while missing := named_files_missing(folder):
        for settings, name in missing:
            if not (source_dir / name).is_file():
                raise ValueError(f"{folder / settings} names {name}, which neither {folder} nor {source_dir} holds")
            shutil.copy2(source_dir / name, folder / name)
            copied.append(name)
        for settings in ("preprocessor_config.json", "processor_config.json"):
            if not (folder / settings).exists() and (source_dir / settings).is_file():
                shutil.copy2(source_dir / settings, folder / settings)
                copied.append(settings)
    if copied:
        logger.info("Copied into %s the files its settings name: %s", folder, ", ".join(copied))
    return copied


# ---- A saved folder's tokenizer with the repairs (issue 22) ------------------------------------

REPAIRED_TOKENIZER_MODULE = "repaired_tokenizer"


def write_repaired_tokenizer(folder):
    """Point ``folder``'s tokenizer_config.json auto_map at a generated ``repaired_tokenizer.py`` that
    wraps the published tokenizer class with the repairs' tokenizer repair (defect 11), when
    that class needs it; the published targets stay under ``published_auto_map``. Run after
    write_repaired_classes (which copies the repairs). Returns the files written."""
    folder = Path(folder)
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return []
    tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    published = tokenizer_config.get(PUBLISHED_AUTO_MAP) or tokenizer_config.get("auto_map") or {}
    targets = [target for target in published.get("AutoTokenizer") or [] if target and "--" not in target]
    needed = [target for target in targets
              if SENTENCEPIECE_READ.search((folder / f"{target.rpartition('.')[0]}.py").read_text(encoding="utf-8"))]
    if not needed:
        return []
    lines = ['"""Written by the MiniCPM-V fine-tuner when it saved this folder: the tokenizer class that\n'
             "tokenizer_config.json's auto_map points to, the published one named in `published_auto_map` with\n"
             f'the tokenizer repair of {REPAIRS_FILE_PREFIX}tokenizer.py (ids it reads from a sentencepiece model)."""\n\n',
             f"from .{REPAIRS_FILE_PREFIX}classes import repaired_tokenizer_class\n",
             *import_every_module(f"{REPAIRS_FILE_PREFIX}{module}" for module in REPAIRS_MODULES)]
    for target in needed:
        module_name, _, class_name = target.rpartition(".")
        lines.append(f"from .{module_name} import {class_name} as _Published{class_name}\n")
    lines.append("\n")
    for target in needed:
        class_name = target.rpartition(".")[2]
        lines.append(f"{class_name} = repaired_tokenizer_class(_Published{class_name}, __name__)\n")
    (folder / f"{REPAIRED_TOKENIZER_MODULE}.py").write_text("".join(lines))
    tokenizer_config["auto_map"] = {
        key: [f"{REPAIRED_TOKENIZER_MODULE}.{t.rpartition('.')[2]}" if t in needed else t for t in value]
        if key == "AutoTokenizer" else value for key, value in published.items()
    }
    tokenizer_config[PUBLISHED_AUTO_MAP] = published
    path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return [f"{REPAIRED_TOKENIZER_MODULE}.py", "tokenizer_config.json"]
