"""Preflight's cache: a restart or a resume with the same data and settings reuses the check
(``<output_dir>/preflight_cache.json``), keyed by the data files, the datasets' settings and the code."""

import hashlib
import inspect
import json
import os
from dataclasses import asdict

from data.errors import DataError
from data.preflight_report import Problem

CACHE_NAME = "preflight_cache.json"
HASHED_WHOLE = 16 << 20  # a data file up to this size is hashed whole; a larger one by its first and last MiB
EDGE = 1 << 20


def file_identity(path):
    """What identifies a data file's content: path, size, modification time and a SHA-256 (see
    HASHED_WHOLE); of a folder (a table's files), those of every file in it."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
        return dict(path=os.path.abspath(path), files=[file_identity(name) for name in files])
    info = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if info.st_size <= HASHED_WHOLE:
            for block in iter(lambda: f.read(EDGE), b""):
                digest.update(block)
        else:
            digest.update(f.read(EDGE))
            f.seek(-EDGE, os.SEEK_END)
            digest.update(f.read(EDGE))
    return dict(path=os.path.abspath(path), size=info.st_size, mtime_ns=info.st_mtime_ns, sha256=digest.hexdigest())


def code_identity(dataset):
    """A hash of the checking code: the source files of the dataset's classes at the top level
    (dataset.py), preflight.py and every file of the data package (the checks, media, layouts,
    sources, this module): new checks, new results."""
    package = os.path.dirname(os.path.abspath(__file__))
    top = os.path.dirname(package)
    files = {os.path.abspath(inspect.getfile(cls)) for cls in type(dataset).__mro__ if cls.__module__ != "builtins"}
    files = {f for f in files | {os.path.join(top, "preflight.py")} if os.path.dirname(f) == top}
    files |= {os.path.join(root, name) for root, _, names in os.walk(package) for name in names if name.endswith(".py")}
    files = sorted(files)
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def cache_key(datasets):
    """The key of a check of ``{split: dataset}``: each data file's identity, each dataset's
    check_settings (tokenizer, family, slicing, model_max_length, ...) and the checking code. None
    where a split has no data file (records built in memory) or its file could not be read."""
    if any(isinstance(d, DataError) or d.data_path is None for d in datasets.values()):
        return None
    identity = {
        split: dict(file=file_identity(d.data_path), settings=d.check_settings(), code=code_identity(d))
        for split, d in datasets.items()
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def load_cache(output_dir, key):
    """The check cached under ``key`` in ``output_dir`` (as check_everywhere returns it), or None."""
    path = os.path.join(output_dir, CACHE_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable (a run stopped while writing it): check afresh
        return None
    if cached.get("key") != key:
        return None
    return {
        split: ([Problem(**p) for p in entry["problems"]], entry["stats"], entry["lengths"])
        for split, entry in cached["checked"].items()
    }


def save_cache(output_dir, key, checked):
    path = os.path.join(output_dir, CACHE_NAME)
    os.makedirs(output_dir, exist_ok=True)
    entries = {
        split: dict(problems=[asdict(p) for p in problems], stats=stats, lengths=lengths)
        for split, (problems, stats, lengths) in checked.items()
    }
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        # ASCII escapes: a lone surrogate (a bad_id record's id) has no UTF-8 form, and its \u escape
        # reads back as the same string, so a cached problem is the one checked.
        json.dump(dict(key=key, checked=entries), f, default=str)
    os.replace(path + ".tmp", path)  # whole or not at all
