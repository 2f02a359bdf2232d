"""The published MiniCPM-V copies the conformance run reads (conformance.py): git mirrors of hub files.

A copy is ``MIRROR@COMMIT[:SUBDIR]``: a bare git directory, or OWNER+NAME under $MINICPMV_PUBLISHED laid
out as the `fetch` tool lays out GitHub copies (``$MINICPMV_PUBLISHED/OWNER+NAME/repo``). Files are read
with ``git show`` at run time and never stored in this project. A second copy after a comma supplies
the files the first lacks (the 2.6 fork at 8490e59 holds the Python files but no config.json or
tokenizer files). KNOWN_COPIES lists the copies checked so far.
"""

import dataclasses
import re
import subprocess
from pathlib import Path

PUBLISHED_ENV = "MINICPMV_PUBLISHED"

# Copies of the published hub files whose bytes agree with an independent copy (issue 22), by label.
KNOWN_COPIES = {
    "2.0": "HwwwwwwwH+MiniCPM-V-2@84ce9b0",
    "2.5": "theonlyengine+VQA_Model@4520826",
    "2.6": "wusongbai139+AnyCaption@0d75254:MiniCPM-V-2_6",
    # Another hub revision of processing_minicpmv.py / image_processing_minicpmv.py (same model files).
    "2.6 (8490e59 processor)": "404805854+minicpmv2.6-onnx@8490e59,wusongbai139+AnyCaption@0d75254:MiniCPM-V-2_6",
}

# Files taken from a copy; the rest (weights, sentencepiece / BPE vocabularies, READMEs) are not.
SETTINGS_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json",
                  "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class Copy:
    """One tree of a git mirror: ``git -C git_dir show commit:subdir/NAME``."""

    git_dir: Path
    commit: str
    subdir: str = ""

    def path(self, name):
        return f"{self.subdir}/{name}" if self.subdir else name

    def names(self):
        listing = git(self.git_dir, "ls-tree", "--name-only", f"{self.commit}:{self.subdir}" if self.subdir else self.commit)
        return listing.decode().split()

    def read(self, name):
        return git(self.git_dir, "show", f"{self.commit}:{self.path(name)}")

    def full_commit(self):
        return git(self.git_dir, "rev-parse", self.commit).decode().strip()

    def label(self):
        owner_name = self.git_dir.parent.name if self.git_dir.name == "repo" else self.git_dir.name
        return f"{owner_name.replace('+', '/')}@{self.commit}" + (f":{self.subdir}" if self.subdir else "")


def git(git_dir, *args):
    return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True).stdout


def parse_spec(spec, root=None):
    """``MIRROR@COMMIT[:SUBDIR][,MIRROR@COMMIT[:SUBDIR]]`` -> [Copy, ...] (first wins). ValueError if malformed."""
    copies = []
    for part in spec.split(","):
        match = re.fullmatch(r"(?P<mirror>[^@]+)@(?P<commit>[0-9a-fA-F]{4,40})(?::(?P<subdir>.+))?", part)
        if not match:
            raise ValueError(f"{part!r}: expected MIRROR@COMMIT[:SUBDIR]")
        mirror = Path(match["mirror"])
        if not mirror.is_dir():
            if root is None:
                raise ValueError(f"{part!r}: {mirror} is not a folder, and ${PUBLISHED_ENV} is not set")
            mirror = Path(root) / match["mirror"] / "repo"
        if not mirror.is_dir():
            raise ValueError(f"{part!r}: no mirror at {mirror}")
        copies.append(Copy(mirror, match["commit"], (match["subdir"] or "").strip("/")))
    return copies


def find_known(root):
    """({label: spec} of KNOWN_COPIES whose mirrors and commits are under ``root``, [labels missing])."""
    found, missing = {}, []
    for label, spec in KNOWN_COPIES.items():
        try:
            copies = parse_spec(spec, root)
            for copy in copies:
                copy.full_commit()
        except (ValueError, subprocess.CalledProcessError):
            missing.append(label)
        else:
            found[label] = spec
    return found, missing


def published_files(copies):
    """{name: bytes} of the copies' Python and settings files, the first copy holding a name winning."""
    files = {}
    for copy in copies:
        for name in copy.names():
            if name not in files and (name.endswith(".py") or name in SETTINGS_FILES):
                files[name] = copy.read(name)
    missing = [name for name in ("config.json", "tokenizer_config.json") if name not in files]
    if missing:
        raise ValueError(f"{', '.join(c.label() for c in copies)}: no {', '.join(missing)}")
    return files
