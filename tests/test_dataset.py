"""dataset.py: slicing, placeholder layouts, chat templates, labels, image bounds, collator, errors."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import dataset
from dataset import DataError, ensure_divide, find_best_resize, get_refine_size, slice_image

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "slice_cases.json"


# --------------------------------------------------------------------------------------------
# Slicing


def load_golden_cases():
    if not GOLDEN.exists():
        pytest.skip(f"golden slice cases not found at {GOLDEN}")
    return json.loads(GOLDEN.read_text())


def test_slice_image_matches_every_golden_case():
    cases = load_golden_cases()
    assert len(cases) >= 100
    images = {}
    mismatches = []
    for case in cases:
        size = (case["width"], case["height"])
        # Slicing is geometry only: a one-channel image gives the same sizes at a third of the cost.
        image = images.setdefault(size, Image.new("L", size, 90))
        source, rows = slice_image(image, case["max_slice_nums"], case["scale_resolution"], case["patch_size"])
        got = {
            "source_size": list(source.size),
            "grid": [len(rows[0]), len(rows)] if rows else None,
            "slice_size": list(rows[0][0].size) if rows else None,
            "rows": len(rows),
            "cols": len(rows[0]) if rows else 0,
        }
        expected = {key: case[key] for key in got}
        if got != expected:
            mismatches.append((size, case["max_slice_nums"], got, expected))
        for row in rows:  # every slice of a grid has the same size
            assert [s.size for s in row] == [rows[0][0].size] * len(row)
    assert mismatches == []


def test_slice_helpers_by_hand():
    assert ensure_divide(5, 14) == 14
    assert ensure_divide(994.9, 14) == 994
    assert find_best_resize((1000, 200), 448, 14) == (994, 196)  # below the scale: only rounded to patches
    # Small images are scaled up to the scale only when upscaling is allowed.
    assert find_best_resize((100, 100), 448, 14) == (98, 98)
    assert find_best_resize((100, 100), 448, 14, allow_upscale=True) == (448, 448)
    assert get_refine_size((1344, 1344), (3, 3), 448, 14, allow_upscale=True) == (1344, 1344)


def test_slices_tile_the_refined_image_in_row_major_order():
    image = Image.new("RGB", (1344, 448))
    for x in range(0, 1344, 448):
        image.paste((x // 448 * 100, 0, 0), (x, 0, x + 448, 448))
    source, rows = slice_image(image, 9, 448, 14)
    assert len(rows) == 1 and len(rows[0]) == 3
    assert [s.getpixel((224, 224))[0] for s in rows[0]] == [0, 100, 200]
    assert source.mode == "RGB"
