"""Shared fixtures: tiny random MiniCPM-V checkpoints and a small dataset, built once per test session."""

import logging

import pytest
import transformers

import demo_data
from tiny_models.build import build_checkpoint


@pytest.fixture(autouse=True)
def restore_logging():
    """finetune.main() and merge.main() set up their process's logging: a handler on sys.stderr as it is at
    that moment, under pytest the test's capture, closed when the test ends. Each test gets the root
    logger and transformers' verbosity back as they were, so later records never reach a closed stream
    ("ValueError: I/O operation on closed file")."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    verbosity = transformers.utils.logging.get_verbosity()
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    transformers.utils.logging.set_verbosity(verbosity)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A factory: `tiny_checkpoint("minicpmv2_6") -> Path` of a checkpoint folder (seed 0); any name of
    `tiny_models.build.ALL_FAMILIES`, remote-code or native (`"minicpmv4_6"`, ...).

    Each family is built once per session; treat the folder as read-only (copy it to change it).
    """
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_checkpoint(family, tmp_path_factory.mktemp(f"tiny_{family}"), seed=0)
        return built[family]

    return get


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small training file (demo_data: 8 images of coloured shapes, a two-image and a text-only record)."""
    return demo_data.generate(tmp_path_factory.mktemp("shapes"), count=8)
