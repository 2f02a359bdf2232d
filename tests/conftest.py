"""Shared fixtures: tiny random MiniCPM-V checkpoints and a small dataset, built once per test session."""

import pytest

import demo_data
from tiny_models.build import build_checkpoint


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
