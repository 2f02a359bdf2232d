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


def test_reshape_by_patch_matches_the_processor_unfold_layout():
    p = 14
    image = torch.randn(3, 2 * p, 3 * p)
    # The model processor's formulation: unfold, then [3, p, p, n] -> permute -> [3, p, n*p].
    unfolded = torch.nn.functional.unfold(image, (p, p), stride=(p, p))
    expected = unfolded.reshape(3, p, p, -1).permute(0, 1, 3, 2).reshape(3, p, -1)
    got = dataset.reshape_by_patch(image, p)
    assert got.shape == (3, p, 6 * p)
    assert torch.equal(got, expected)
    # Patch k (raster order) occupies columns k*p..(k+1)*p: patch 4 is row 1, column 1.
    assert torch.equal(got[:, :, 4 * p : 5 * p], image[:, p : 2 * p, p : 2 * p])


# --------------------------------------------------------------------------------------------
# Samples: helpers

Q = 2  # query_num: short placeholders keep the golden strings readable
SCALE = 56  # scale_resolution: a 112x56 image gives a 84x42 source and a 2x1 grid of 56x56 slices
SLICE_CONFIG = {"max_slice_nums": 9, "scale_resolution": SCALE, "patch_size": 14}
LLM_TYPES = ("minicpm", "llama3", "qwen")


def transform():
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


@pytest.fixture(scope="module")
def tokenizers():
    from dataset_tokenizers import build_tokenizer

    made = {t: build_tokenizer(t) for t in LLM_TYPES}
    made["qwen-thinking"] = build_tokenizer("qwen", thinking=True)
    return made


def write_image(path, size, color=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


def make_dataset(records, tokenizer, llm_type, root, **overrides):
    kwargs = dict(
        transform=transform(),
        slice_config=SLICE_CONFIG,
        llm_type=llm_type,
        patch_size=14,
        query_num=Q,
        batch_vision=True,
        max_length=512,
        use_image_id=llm_type == "qwen",
        image_root=root,
        data_path=str(Path(root) / "data.json"),
    )
    kwargs.update(overrides)
    return dataset.SupervisedDataset(records, tokenizer, **kwargs)


def learned_runs(labels):
    """Contiguous (start, stop) runs of positions with a label."""
    runs, start = [], None
    flags = (labels != -100).tolist() + [False]
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def two_turn_record(image="cat.png", first="What is this?"):
    return {
        "id": "r0",
        "image": image,
        "conversations": [
            {"role": "user", "content": first},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And the color?"},
            {"role": "assistant", "content": "Black."},
        ],
    }


UNK2 = "<unk>" * Q
GOLDEN_INPUT = {
    "minicpm": (
        f"<用户><image>{UNK2}</image><slice><image>{UNK2}</image><image>{UNK2}</image></slice>\nWhat is this?"
        "<AI>A cat.<用户>And the color?<AI>Black.</s>"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        f"<image>{UNK2}</image><slice><image>{UNK2}</image><image>{UNK2}</image></slice>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the color?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>"
    ),
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<image_id>0</image_id><image>{UNK2}</image><slice>{UNK2}</slice><slice>{UNK2}</slice>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd the color?<|im_end|>\n"
        "<|im_start|>assistant\nBlack.<|im_end|>\n"
    ),
}
# Per learned run: what the text before it ends with, and the decoded labels of the run.
# The reference ends every learned run with eot (llama3) / eos: hence the doubled end token
# where a turn's own end token is followed by more text.
GOLDEN_RUNS = {
    "minicpm": [("<AI>", "A cat.</s>"), ("<AI>", "Black.</s>")],
    "llama3": [
        ("assistant<|end_header_id|>\n\n", "A cat.<|eot_id|><|eot_id|>"),
        ("assistant<|end_header_id|>\n\n", "Black.<|eot_id|>"),
    ],
    "qwen": [
        ("<|im_start|>assistant\n", "A cat.<|im_end|><|im_end|>"),
        ("<|im_start|>assistant\n", "Black.<|im_end|><|im_end|>"),
    ],
}


def check_bounds(sample, tokenizer, new_schema):
    ids = sample["input_ids"]
    bounds = sample["image_bound"]
    openers = {tokenizer.im_start_id} | ({tokenizer.slice_start_id} if new_schema else set())
    closers = {tokenizer.im_end_id} | ({tokenizer.slice_end_id} if new_schema else set())
    assert bounds.dtype == torch.long and bounds.shape == (len(sample["pixel_values"]), 2)
    covered = torch.zeros(len(ids), dtype=torch.bool)
    for start, end in bounds.tolist():
        assert end - start == Q
        assert int(ids[start - 1]) in openers and int(ids[end]) in closers
        assert (ids[start:end] == tokenizer.unk_id).all()
        covered[start:end] = True
    assert torch.equal(covered, ids == tokenizer.unk_id)  # every query slot is inside a bound


# --------------------------------------------------------------------------------------------
# Samples: golden layouts and labels


@pytest.mark.parametrize("llm_type", LLM_TYPES)
def test_golden_two_turn_sample(llm_type, tokenizers, tmp_path):
    tok = tokenizers[llm_type]
    write_image(tmp_path / "cat.png", (112, 56))
    sample = make_dataset([two_turn_record()], tok, llm_type, tmp_path)[0]
    ids, labels = sample["input_ids"], sample["labels"]

    assert tok.decode(ids) == GOLDEN_INPUT[llm_type]
    runs = learned_runs(labels)
    assert len(runs) == len(GOLDEN_RUNS[llm_type])
    for (start, stop), (before, learned) in zip(runs, GOLDEN_RUNS[llm_type]):
        assert tok.decode(ids[: start + 1]).endswith(before)
        assert tok.decode(labels[start:stop]) == learned
    # Shifted like the reference: inside a run each label is the next input token.
    for start, stop in runs:
        assert torch.equal(labels[start : stop - 1], ids[start + 1 : stop])

    assert ids.dtype == labels.dtype == sample["position_ids"].dtype == torch.long
    assert torch.equal(sample["position_ids"], torch.arange(len(ids)))
    assert sample["attention_mask"].dtype == torch.bool and sample["attention_mask"].all()
    check_bounds(sample, tok, new_schema=llm_type == "qwen")
    # Source 84x42 then two 56x56 slices, each [3, 14, h*w/14] with tgt_sizes in patches.
    assert sample["tgt_sizes"].dtype == torch.int32
    assert sample["tgt_sizes"].tolist() == [[3, 6], [4, 4], [4, 4]]
    assert [tuple(p.shape) for p in sample["pixel_values"]] == [(3, 14, 252), (3, 14, 224), (3, 14, 224)]


@pytest.mark.parametrize("llm_type", LLM_TYPES)
def test_image_tag_in_a_later_user_turn_and_no_slicing(llm_type, tokenizers, tmp_path):
    tok = tokenizers[llm_type]
    write_image(tmp_path / "cat.png", (112, 56))
    record = two_turn_record()
    record["conversations"][2]["content"] = "And here: <image> the color?"
    sample = make_dataset([record], tok, llm_type, tmp_path, slice_config=None, batch_vision=False)[0]
    text = tok.decode(sample["input_ids"])
    prefix = "<image_id>0</image_id>" if llm_type == "qwen" else ""  # every image gets its id, sliced or not
    assert f"And here: {prefix}<image>{UNK2}</image> the color?" in text
    assert text.count("<image>") == 1 and "<slice>" not in text
    assert [tuple(p.shape) for p in sample["pixel_values"]] == [(3, 56, 112)]  # unsliced, unresized [3, H, W]
    assert sample["tgt_sizes"].shape == (0, 2)
    check_bounds(sample, tok, new_schema=llm_type == "qwen")


@pytest.mark.parametrize("llm_type", LLM_TYPES)
def test_spliced_ids_equal_the_full_string_route(llm_type, tokenizers, tmp_path):
    """Splicing query runs into compact ids gives exactly the ids of tokenizing the full text."""
    tok = tokenizers[llm_type]
    write_image(tmp_path / "a.png", (200, 60))
    write_image(tmp_path / "b.png", (40, 40))
    new_schema = llm_type == "qwen"
    records = [
        two_turn_record("a.png", first="  Describe <image>  in detail. "),
        {
            "id": "multi",
            "image": {"<image_00>": "a.png", "<image_01>": "b.png"},
            "conversations": [
                {"role": "user", "content": "Compare <image_00> with\n<image_01>"},
                {"role": "assistant", "content": " They differ. "},
            ],
        },
    ]
    data = make_dataset(records, tok, llm_type, tmp_path, query_num=5)
    for n, record in enumerate(records):
        sample = data[n]
        placeholders = {}
        tags = list(dataset.record_images(record))
        for number, tag in enumerate(tags):
            _, rows = slice_image(Image.open(tmp_path / record_path(record, tag)), **SLICE_CONFIG)
            grid = [len(rows[0]), len(rows)] if rows else None
            placeholders[tag] = dataset.image_placeholder(
                tok, query_num=5, grid=grid, new_schema=new_schema, image_id=number if new_schema else None
            )
        messages = dataset.place_images(record["conversations"], placeholders)
        if llm_type == "minicpm":  # the reference: each piece encoded, bos dropped
            expected = []
            for i, m in enumerate(messages):
                content = m["content"] + (tok.eos_token if i == len(messages) - 1 else "")
                expected += tok.encode("<用户>" if m["role"] == "user" else "<AI>")[1:] + tok.encode(content)[1:]
        elif llm_type == "llama3":
            expected = tok(dataset.render_llama3(messages, tok)[0], add_special_tokens=False)["input_ids"]
        else:
            text = tok.apply_chat_template(messages, tokenize=False)
            expected = tok(text, add_special_tokens=False)["input_ids"]
        assert sample["input_ids"].tolist() == expected
        check_bounds_q(sample, tok, new_schema, q=5)


def record_path(record, tag):
    image = record["image"]
    return image if isinstance(image, str) else image[tag]


def check_bounds_q(sample, tok, new_schema, q):
    ids = sample["input_ids"]
    closers = {tok.im_end_id} | ({tok.slice_end_id} if new_schema else set())
    assert len(sample["image_bound"]) == len(sample["pixel_values"]) == len(sample["tgt_sizes"])
    for start, end in sample["image_bound"].tolist():
        assert end - start == q and int(ids[end]) in closers and (ids[start:end] == tok.unk_id).all()
