"""dataset.py and data/: slicing, placeholder layouts, chat templates, labels, image bounds, collator, errors."""

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import families
from data.errors import DataError
from data.layouts import LAYOUTS, layout_named, render_llama3, special_token_id
from data.placeholders import image_placeholder, place_images
from data.schema import record_images, validate_record
from data.slicing import (
    ensure_divide,
    find_best_resize,
    get_refine_size,
    model_pixels,
    reshape_by_patch,
    slice_image,
)
from data.sources import load
from data.sources.json_lines import JsonLines, is_json_lines
from index_ranks import index_on_ranks

# A copy of the team's shared golden file (shared/golden/slice_cases.json), kept in the repo so
# the test runs on any checkout.
GOLDEN = Path(__file__).resolve().parent / "golden" / "slice_cases.json"


# --------------------------------------------------------------------------------------------
# Slicing


def load_golden_cases():
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
    pixels = np.random.default_rng(0).integers(0, 256, (2 * p, 3 * p, 3), dtype=np.uint8)  # [H, W, 3]
    image = torch.from_numpy(pixels).permute(2, 0, 1).float()  # the processor's [3, H, W]
    # The model processor's formulation: unfold, then [3, p, p, n] -> permute -> [3, p, n*p].
    unfolded = torch.nn.functional.unfold(image, (p, p), stride=(p, p))
    expected = unfolded.reshape(3, p, p, -1).permute(0, 1, 3, 2).reshape(3, p, -1)
    got = torch.from_numpy(reshape_by_patch(pixels, p).reshape(3, p, -1)).float()
    assert got.shape == (3, p, 6 * p)
    assert torch.equal(got, expected)
    # Patch k (raster order) occupies columns k*p..(k+1)*p: patch 4 is row 1, column 1.
    assert torch.equal(got[:, :, 4 * p : 5 * p], image[:, p : 2 * p, p : 2 * p])


# --------------------------------------------------------------------------------------------
# Samples: helpers

Q = 2  # query_num: short placeholders keep the golden strings readable
SCALE = 56  # scale_resolution: a 112x56 image gives a 84x42 source and a 2x1 grid of 56x56 slices
SLICE_CONFIG = {"max_slice_nums": 9, "scale_resolution": SCALE, "patch_size": 14}
TOKENIZER_FAMILY = {"minicpm": "minicpmv2_0", "llama3": "minicpmv2_5", "qwen": "minicpmv2_6", "qwen-thinking": "minicpmv4_5"}


@pytest.fixture(scope="module")
def checkpoints(request, tmp_path_factory):
    """The session's tiny checkpoints (tests/conftest.py), else built here once for this module."""
    try:
        return request.getfixturevalue("tiny_checkpoint")
    except pytest.FixtureLookupError:
        from tiny_models.build import build_checkpoint

        root, built = tmp_path_factory.mktemp("tiny"), {}
        return lambda family: built.setdefault(family, build_checkpoint(family, root / family))


@pytest.fixture(scope="module")
def tokenizers(checkpoints):
    """The tiny checkpoints' own tokenizers, by llm_type ("qwen-thinking": the Qwen3-style template)."""
    import loading

    return {name: loading.load_tokenizer(str(checkpoints(family))) for name, family in TOKENIZER_FAMILY.items()}


def write_image(path, size, color=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


def make_dataset(records, tokenizer, llm_type, root, **overrides):
    kwargs = dict(
        slice_config=SLICE_CONFIG,
        layout=layout_named(llm_type),
        patch_size=14,
        query_num=Q,
        batch_vision=True,
        max_length=512,
        use_image_id=llm_type == "qwen",
        image_root=root,
        data_path=str(Path(root) / "data.json") if root is not None else None,
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


@pytest.mark.parametrize("llm_type", dataset.LLM_TYPES)
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


@pytest.mark.parametrize("llm_type", dataset.LLM_TYPES)
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


@pytest.mark.parametrize("llm_type", dataset.LLM_TYPES)
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
        tags = list(record_images(record))
        for number, tag in enumerate(tags):
            _, rows = slice_image(Image.open(tmp_path / record_path(record, tag)), **SLICE_CONFIG)
            grid = [len(rows[0]), len(rows)] if rows else None
            placeholders[tag] = image_placeholder(
                tok, query_num=5, grid=grid, new_schema=new_schema, image_id=number if new_schema else None
            )
        messages = place_images(record["conversations"], placeholders)
        if llm_type == "minicpm":  # the reference: each piece encoded, bos dropped
            expected = []
            for i, m in enumerate(messages):
                content = m["content"] + (tok.eos_token if i == len(messages) - 1 else "")
                expected += tok.encode("<用户>" if m["role"] == "user" else "<AI>")[1:] + tok.encode(content)[1:]
        elif llm_type == "llama3":
            expected = tok(render_llama3(messages, tok)[0], add_special_tokens=False)["input_ids"]
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


@pytest.mark.parametrize("llm_type", dataset.LLM_TYPES)
def test_multi_image_tags_in_two_turns(llm_type, tokenizers, tmp_path):
    tok = tokenizers[llm_type]
    write_image(tmp_path / "wide.png", (112, 56))  # sliced 2x1
    write_image(tmp_path / "small.png", (28, 28))  # not sliced
    record = {
        "id": "multi",
        "image": {"<image_00>": "wide.png", "<image_01>": "small.png"},
        "conversations": [
            {"role": "user", "content": "Look: <image_01>"},
            {"role": "assistant", "content": "A small one."},
            {"role": "user", "content": "<image_00>And this?"},
            {"role": "assistant", "content": "A wide one."},
        ],
    }
    sample = make_dataset([record], tok, llm_type, tmp_path)[0]
    text = tok.decode(sample["input_ids"])
    one = f"<image>{UNK2}</image>"
    if llm_type == "qwen":  # numbered in order of appearance, pieces joined with "\n"
        assert f"Look:\n<image_id>0</image_id>{one}<|im_end|>" in text
        assert f"<image_id>1</image_id>{one}<slice>{UNK2}</slice><slice>{UNK2}</slice>\nAnd this?" in text
    else:
        assert f"Look:\n{one}" in text
        assert f"{one}<slice>{one}{one}</slice>\nAnd this?" in text
    # Tensors follow the placeholders' order: the small image first, then the wide one's views.
    assert sample["tgt_sizes"].tolist() == [[SCALE // 14, SCALE // 14], [3, 6], [4, 4], [4, 4]]
    check_bounds(sample, tok, new_schema=llm_type == "qwen")
    assert len(learned_runs(sample["labels"])) == 2


@pytest.mark.parametrize("llm_type", dataset.LLM_TYPES)
def test_text_only_record(llm_type, tokenizers, tmp_path):
    tok = tokenizers[llm_type]
    record = {"id": "t", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    sample = make_dataset([record], tok, llm_type, tmp_path)[0]
    assert sample["pixel_values"] == []
    assert sample["image_bound"].shape == (0, 2) and sample["tgt_sizes"].shape == (0, 2)
    assert tok.unk_id not in sample["input_ids"].tolist()
    (start, stop), = learned_runs(sample["labels"])
    assert tok.decode(sample["labels"][start:stop]).startswith("Yo")


def test_qwen_thinking_record(tokenizers, tmp_path):
    tok = tokenizers["qwen-thinking"]
    thought = "<think>\nIt has whiskers.\n</think>\n\nA cat."
    records = [
        {"id": "think", "conversations": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": thought}]},
        {"id": "plain", "conversations": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "A cat."}]},
    ]
    data = make_dataset(records, tok, "qwen", tmp_path)
    kept = data[0]
    (start, stop), = learned_runs(kept["labels"])
    assert tok.decode(kept["input_ids"]).endswith(f"<|im_start|>assistant\n{thought}<|im_end|>\n")
    assert tok.decode(kept["labels"][start:stop]) == thought + "<|im_end|><|im_end|>"  # the think block is learned

    inserted = data[1]
    text = tok.decode(inserted["input_ids"])
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA cat.<|im_end|>\n")
    (start, stop), = learned_runs(inserted["labels"])
    assert tok.decode(inserted["input_ids"][: start + 1]).endswith("</think>\n\n")  # the empty block is context
    assert tok.decode(inserted["labels"][start:stop]) == "A cat.<|im_end|><|im_end|>"


def test_qwen_thinking_flag_reaches_the_template(tokenizers, tmp_path, monkeypatch):
    tok = tokenizers["qwen-thinking"]
    seen = []
    original = type(tok).apply_chat_template

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("enable_thinking"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "apply_chat_template", spy)
    conv = lambda answer: [{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}]  # noqa: E731
    data = make_dataset([{"conversations": conv("<think>x</think>A")}, {"conversations": conv("A")}], tok, "qwen", tmp_path)
    data[0], data[1]
    assert seen == [True, False]


# --------------------------------------------------------------------------------------------
# Files: data formats and image paths


def test_load_records_accepts_a_utf8_byte_order_mark(tmp_path):
    records = [{"id": "é", "conversations": conv("a", "b")}]
    (tmp_path / "bom.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8-sig")
    (tmp_path / "bom.jsonl").write_text(json.dumps(records[0], ensure_ascii=False) + "\n", encoding="utf-8-sig")
    assert list(load(tmp_path / "bom.json")) == records
    assert list(load(tmp_path / "bom.jsonl")) == records


def test_load_records_json_and_jsonl(tmp_path):
    records = [two_turn_record(), {"id": "t", "conversations": []}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert list(load(tmp_path / "d.json")) == records
    assert list(load(str(tmp_path / "d.jsonl"))) == records


@pytest.mark.parametrize("name", ["d.JSONL", "d.ndjson", "d.NDJson", "d.Jsonl"])
def test_json_lines_by_extension_in_any_case(tmp_path, name):
    records = [two_turn_record(), {"id": "t", "conversations": []}]
    assert is_json_lines(name)
    (tmp_path / name).write_text("\n".join(json.dumps(r) for r in records) + "\n")
    loaded = load(tmp_path / name)
    assert isinstance(loaded, JsonLines) and list(loaded) == records


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_json_lines_split_at_newline_only(tmp_path, separator):
    # Characters str.splitlines() cuts at, but legal unescaped inside a JSON string.
    record = {"id": "a", "conversations": conv(f"one{separator}two", "b")}
    other = two_turn_record()
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(record, ensure_ascii=False) + "\r\n" + json.dumps(other) + "\n").encode())
    assert separator in path.read_text(encoding="utf-8")  # written raw, not escaped
    assert list(load(path)) == [record, other]


def test_json_lines_are_read_on_demand(tmp_path):
    records = [{"id": n, "conversations": conv(f"q{n}", "a" * 1000 + str(n))} for n in range(50)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n".join(json.dumps(r) for r in records) + "\n")
    loaded = load(path)
    # All it holds (what a copy to another process carries): 16 bytes a record, not the 50 kB of text.
    shipped = pickle.dumps(loaded)
    assert len(shipped) < 16 * len(records) + 1000 < path.stat().st_size // 20
    copy = pickle.loads(shipped)
    assert copy[49] == records[49] and copy[-1] == records[-1] and loaded[7] == records[7]
    with pytest.raises(IndexError):
        loaded[50]
    assert loaded.line_numbers[3] == 7  # blank lines between records are counted, not records


def test_ranks_index_a_json_lines_file_by_halves_and_hold_the_same_index(tmp_path):
    records = [{"id": n, "conversations": conv(f"q{n}", "a" * (n % 300) + str(n))} for n in range(4000)]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n\n".join(json.dumps(r) for r in records) + "\n")
    raw = good.read_bytes()
    at = raw.index(b'"q3500"') + 2  # a line that is not UTF-8, in the second half
    bad.write_bytes(raw[:at] + b"\xe9" + raw[at + 1 :])
    one = load(good)
    with pytest.raises(DataError) as single:
        load(bad)
    longest = max(len(line) for line in raw.splitlines(keepends=True))
    for (read, index), (_, error) in index_on_ranks([good, bad], tmp_path / "store"):
        assert index == (one.offsets.tolist(), one.line_numbers.tolist())
        # Its half of the file, the line across its edge and a buffer's read-ahead: not the whole file.
        assert read <= len(raw) / 2 + longest + io.DEFAULT_BUFFER_SIZE
        # Both ranks stop with the error one reader meets.
        assert error == ("bad_encoding", str(single.value))


def test_json_lines_encoding_is_checked_when_indexed(tmp_path):
    path = tmp_path / "d.jsonl"
    first = json.dumps(two_turn_record()).encode() + b"\n"
    path.write_bytes(first + b'{"id": "\xe9"}\n')
    with pytest.raises(DataError, match=rf"not UTF-8 text: byte 0xe9 at offset {len(first) + 8} ") as info:
        load(path)
    assert info.value.code == "bad_encoding"


def test_image_paths_resolve_against_image_root_and_absolute_paths_stay(tokenizers, tmp_path):
    tok = tokenizers["qwen"]
    (tmp_path / "imgs").mkdir()
    write_image(tmp_path / "imgs" / "rel.png", (28, 28))
    elsewhere = write_image(tmp_path / "abs.png", (56, 28))
    records = [two_turn_record("imgs/rel.png"), two_turn_record(str(elsewhere))]
    data = make_dataset(records, tok, "qwen", tmp_path, slice_config=None, batch_vision=False)
    assert data[0]["pixel_values"][0].shape == (3, 28, 28)
    assert data[1]["pixel_values"][0].shape == (3, 28, 56)
    # image_root None: relative to the data file's folder.
    data = make_dataset(records, tok, "qwen", None, slice_config=None, batch_vision=False,
                        data_path=str(tmp_path / "data.json"))
    assert data[0]["pixel_values"][0].shape == (3, 28, 28)


def test_images_convert_to_rgb(tokenizers, tmp_path):
    write_image(tmp_path / "gray.png", (28, 28), mode="L")
    data = make_dataset([two_turn_record("gray.png")], tokenizers["llama3"], "llama3", tmp_path,
                        slice_config=None, batch_vision=False)
    assert data[0]["pixel_values"][0].shape == (3, 28, 28)


# --------------------------------------------------------------------------------------------
# Over-long samples


def long_answer_record(image="cat.png"):
    record = two_turn_record(image)
    record["conversations"] = record["conversations"][:2]
    record["conversations"][1]["content"] = "word " * 40
    return record


def test_truncation_keeps_images_whole_and_warns(tokenizers, tmp_path, caplog):
    tok = tokenizers["llama3"]
    write_image(tmp_path / "cat.png", (112, 56))
    full = make_dataset([long_answer_record()], tok, "llama3", tmp_path)[0]
    cut = int(full["image_bound"][-1, 1]) + 30  # well after the image, inside the answer
    with caplog.at_level("WARNING", logger="dataset"):
        sample = make_dataset([long_answer_record()], tok, "llama3", tmp_path, max_length=cut)[0]
    assert "record 0 (id 'r0')" in caplog.text and "truncated" in caplog.text
    assert len(sample["input_ids"]) == cut
    assert torch.equal(sample["input_ids"], full["input_ids"][:cut])
    assert torch.equal(sample["labels"][:-1], full["labels"][: cut - 1])
    assert sample["labels"][-1] == -100  # the reference builds labels after cutting
    assert torch.equal(sample["image_bound"], full["image_bound"])


@pytest.mark.parametrize("llm_type", dataset.LLM_TYPES)
def test_truncation_inside_an_image_placeholder_is_an_error(llm_type, tokenizers, tmp_path):
    tok = tokenizers[llm_type]
    write_image(tmp_path / "cat.png", (112, 56))
    full = make_dataset([long_answer_record()], tok, llm_type, tmp_path)[0]
    bounds = full["image_bound"]
    # Inside the source's query run, between source and slices, and on the image's very last token.
    last = int(bounds[-1, 1]) + (0 if llm_type == "qwen" else 1)  # old schema: </slice> closes the image
    for cut in (int(bounds[0, 0]) + 1, int(bounds[1, 0]) - 1, last):
        with pytest.raises(DataError, match=r"record 0 \(id 'r0'\).*would cut image <image>"):
            make_dataset([long_answer_record()], tok, llm_type, tmp_path, max_length=cut)[0]
    if llm_type == "qwen":  # the image id belongs to the image
        with pytest.raises(DataError, match="would cut image"):
            make_dataset([long_answer_record()], tok, llm_type, tmp_path, max_length=int(bounds[0, 0]) - 2)[0]


def test_truncation_drops_whole_later_images(tokenizers, tmp_path):
    tok = tokenizers["qwen"]
    write_image(tmp_path / "a.png", (28, 28))
    record = {
        "id": "m",
        "image": {"<image_00>": "a.png", "<image_01>": "a.png"},
        "conversations": [
            {"role": "user", "content": "<image_00>first"},
            {"role": "assistant", "content": "answer " * 10},
            {"role": "user", "content": "<image_01>second"},
            {"role": "assistant", "content": "more"},
        ],
    }
    full = make_dataset([record], tok, "qwen", tmp_path)[0]
    second_image = int(torch.where(full["input_ids"] == tok.im_id_start_id)[0][1])
    cut = second_image  # the cut falls right before the second image's <image_id>
    sample = make_dataset([record], tok, "qwen", tmp_path, max_length=cut)[0]
    assert len(sample["pixel_values"]) == 1 and sample["image_bound"].tolist() == full["image_bound"][:1].tolist()
    assert sample["tgt_sizes"].shape == (1, 2)


def test_truncation_leaving_nothing_to_learn_is_an_error(tokenizers, tmp_path):
    write_image(tmp_path / "cat.png", (112, 56))
    tok = tokenizers["minicpm"]
    full = make_dataset([long_answer_record()], tok, "minicpm", tmp_path)[0]
    cut = learned_runs(full["labels"])[0][0] + 1  # ends on the <AI> prefix: no answer token left
    with pytest.raises(DataError, match=r"record 0 \(id 'r0'\).*no learnable token left after truncation"):
        make_dataset([long_answer_record()], tok, "minicpm", tmp_path, max_length=cut)[0]


# --------------------------------------------------------------------------------------------
# Errors: every one names the record (index, id), the file, and the reason


def conv(*contents):
    roles = ["user", "assistant"] * len(contents)
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


BAD_RECORDS = {
    "not an object": (["a list"], "must be a JSON object"),
    "one message": ({"id": "x", "conversations": conv("hi")}, "at least two messages"),
    "bad role": ({"id": "x", "conversations": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
                 "role 'user' or 'assistant'"),
    "no content": ({"id": "x", "conversations": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
                   "no text 'content'"),
    "assistant first": ({"id": "x", "conversations": conv("a", "b")[::-1]}, "first message must come from 'user'"),
    "no assistant": ({"id": "x", "conversations": [{"role": "user", "content": "a"}] * 2},
                     "message 1 comes from 'user' like message 0; roles must alternate"),
    "two assistants": ({"id": "x", "conversations": conv("a", "b") + [{"role": "assistant", "content": "c"}]},
                       "message 2 comes from 'assistant'"),
    "image twice": ({"id": "x", "image": "cat.png", "conversations": conv("<image><image>", "b")},
                    "more than once"),
    "image in assistant": ({"id": "x", "image": "cat.png", "conversations": conv("a", "<image>")},
                           "an assistant message"),
    "tag without image": ({"id": "x", "conversations": conv("<image> a", "b")}, "no single 'image' path"),
    "unknown tag": ({"id": "x", "image": {"<image_00>": "cat.png"}, "conversations": conv("<image_00><image_07>", "b")},
                    "<image_07> not found"),
    "unused image": ({"id": "x", "image": {"<image_00>": "cat.png", "<image_01>": "cat.png"},
                      "conversations": conv("<image_00>", "b")}, "<image_01> is never referenced"),
    "tag used twice": ({"id": "x", "image": {"<image_00>": "cat.png"}, "conversations": conv("<image_00>", "<image_00>")},
                       "referenced more than once"),
    "bad key": ({"id": "x", "image": {"img0": "cat.png"}, "conversations": conv("a", "b")}, "not of the form"),
    "multi tag in assistant": ({"id": "x", "image": {"<image_00>": "cat.png", "<image_01>": "cat.png"},
                                "conversations": conv("<image_00>", "see <image_01>")},
                               "<image_01> sits in message 1, an assistant message"),
    "multi tag without dict": ({"id": "x", "image": "cat.png", "conversations": conv("<image_00>", "b")},
                               "no image dict"),
    "image not a path": ({"id": "x", "image": 3, "conversations": conv("a", "b")}, "'image' must be a path"),
    "reserved token": ({"id": "x", "conversations": conv("a <slice> b", "c")}, "reserved image token '<slice>'"),
    "chat control token": ({"id": "x", "conversations": conv("a<|im_end|>\n<|im_start|>assistant\nb", "c")},
                           "message 0 contains the tokenizer's special token '<|im_end|>'"),
    "eos in an answer": ({"id": "x", "conversations": conv("a", "b<|endoftext|>")}, "special token '<|endoftext|>'"),
    "missing file": ({"id": "x", "image": "nowhere.png", "conversations": conv("a", "b")},
                     "cannot load image <image> from .*nowhere.png"),
    "corrupt file": ({"id": "x", "image": "broken.png", "conversations": conv("a", "b")},
                     "cannot load image <image> from .*broken.png"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_raises_data_error_naming_it(case, tokenizers, tmp_path):
    record, reason = BAD_RECORDS[case]
    write_image(tmp_path / "cat.png", (28, 28))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = two_turn_record()
    data = make_dataset([good, record], tokenizers["qwen"], "qwen", tmp_path)
    data[0]  # a good record next to it still builds
    with pytest.raises(DataError) as info:
        data[1]
    error = info.value
    record_id = record.get("id") if isinstance(record, dict) else None
    assert error.index == 1 and error.record_id == record_id
    assert str(error).startswith(f"record 1 (id {record_id!r}) of {tmp_path / 'data.json'}: ")
    assert re.search(reason, error.reason), error.reason
    if case in ("missing file", "corrupt file"):
        assert error.path == str(tmp_path / record["image"]) and error.__cause__ is not None
    else:
        assert error.path == str(tmp_path / "data.json")


def test_validate_record_is_usable_alone():
    validate_record(two_turn_record(), 0)
    with pytest.raises(DataError, match=r"record 5 \(id 'x'\): .*at least two messages"):
        validate_record({"id": "x", "conversations": []}, 5)


def test_unexpected_failure_is_wrapped_naming_the_record(tokenizers, tmp_path, monkeypatch):
    def broken_layout(pixels, patch_size):
        raise RuntimeError("boom")

    monkeypatch.setattr(dataset, "reshape_by_patch", broken_layout)
    write_image(tmp_path / "cat.png", (28, 28))
    data = make_dataset([two_turn_record()], tokenizers["llama3"], "llama3", tmp_path)
    with pytest.raises(DataError, match=r"record 0 \(id 'r0'\) of .*data.json: RuntimeError: boom") as info:
        data[0]
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    "content, reason",
    [("[1, 2", "not valid JSON"), ('{"id": 1}', "must hold a list")],
)
def test_load_records_errors_name_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=reason) as info:
        load(path)
    assert info.value.path == str(path) and str(info.value).startswith(f"{path}: ")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n{oops\n')
    records = load(path)  # a bad line is its record's problem, reported with the others
    with pytest.raises(DataError, match=r"record 1 .*line 2 is not valid JSON") as info:
        validate_record(records[1], 1, data_path=str(path))
    assert info.value.code == "invalid_json"


def test_a_special_token_the_vocabulary_lacks_is_a_start_up_error(tokenizers, tmp_path):
    # Ids come from the vocabulary, so a tokenizer of another family fails at once, naming the token.
    with pytest.raises(ValueError, match=r"MiniCPMVTokenizerFast .*no single token '<\|eot_id\|>', which the llama3"):
        make_dataset([], tokenizers["qwen"], "llama3", tmp_path)
    tokenizer = tokenizers["llama3"]
    assert not hasattr(tokenizer, "slice_end_id")  # as published: the ids come from the vocabulary
    with pytest.raises(ValueError, match=r"no single token '<think>'"):
        special_token_id(tokenizer, "<think>", "a test")


def test_unknown_llm_type_is_rejected(tokenizers, tmp_path):
    with pytest.raises(ValueError, match="llm_type must be one of"):
        make_dataset([], tokenizers["qwen"], "qwen2", tmp_path)


# --------------------------------------------------------------------------------------------
# Collator


def test_collator_pads_truncates_and_keeps_per_sample_lists(tokenizers, tmp_path):
    tok = tokenizers["qwen"]
    write_image(tmp_path / "cat.png", (112, 56))
    text_only = {"id": "t", "conversations": conv("Hi", "Hello there, " * 5)}
    data = make_dataset([two_turn_record(), text_only], tok, "qwen", tmp_path)
    samples = [data[0], data[1]]
    lengths = [len(s["input_ids"]) for s in samples]
    assert lengths[0] > lengths[1]

    batch = dataset.DataCollator(max_length=512, pad_token_id=7)(samples)
    L = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, L)
    short = lengths[1]
    assert (batch["input_ids"][1, short:] == 7).all()
    assert (batch["position_ids"][1, short:] == 0).all()
    assert (batch["labels"][1, short:] == -100).all()
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"][1, :short].all() and not batch["attention_mask"][1, short:].any()
    assert torch.equal(batch["input_ids"][0], samples[0]["input_ids"])
    assert batch["pixel_values"][0] is samples[0]["pixel_values"] and batch["pixel_values"][1] == []
    assert [b.shape for b in batch["image_bound"]] == [(3, 2), (0, 2)]
    assert [t.shape for t in batch["tgt_sizes"]] == [(3, 2), (0, 2)]

    # Cutting: fine after every image, refused through one.
    cut = int(samples[0]["image_bound"][-1, 1]) + 1
    batch = dataset.DataCollator(max_length=cut)([samples[0], samples[1]])
    assert batch["input_ids"].shape == (2, cut)
    with pytest.raises(ValueError, match="sample 0 of the batch .* image placeholder past max_length"):
        dataset.DataCollator(max_length=cut - 1)(samples)


# --------------------------------------------------------------------------------------------
# The built batch feeds a tiny checkpoint of each family

FAMILY_LLM_TYPE = {
    "minicpmv2_0": "minicpm",
    "minicpmv2_5": "llama3",
    "minicpmv2_6": "qwen",
    "minicpmo2_6": "qwen",
    "minicpmv4_5": "qwen",
}


@pytest.mark.parametrize("family", list(FAMILY_LLM_TYPE))
def test_built_batch_feeds_the_tiny_model_forward(family, checkpoints, tmp_path):
    import loading

    path = checkpoints(family)
    config = loading.load_config(str(path))
    tokenizer = loading.load_tokenizer(str(path))
    model = loading.load_model(str(path), config, dtype=torch.float32).eval()

    write_image(tmp_path / "wide.png", (300, 120))
    write_image(tmp_path / "small.png", (40, 30))
    records = [
        two_turn_record("wide.png"),
        {"id": "text", "conversations": conv("Hi", "Hello there")},
        {
            "id": "multi",
            "image": {"<image_00>": "small.png", "<image_01>": "wide.png"},
            "conversations": conv("<image_00> vs <image_01>?", "Same colour.", "Sure?", "<think>\nhm\n</think>\n\nYes."),
        },
    ]
    llm_type = FAMILY_LLM_TYPE[family]
    data = dataset.make_dataset(
        records, tokenizer, families.family_for(config).data_settings(config, max_slice_nums=9), layout=LAYOUTS[llm_type], max_length=2048,
        image_root=tmp_path, data_path=tmp_path / "data.json",
    )
    samples = [data[i] for i in range(len(data))]
    for sample in samples:
        bounds = sample["image_bound"]
        assert ((bounds[:, 1] - bounds[:, 0]) == config.query_num).all()
        assert len(bounds) == len(sample["pixel_values"])
    batch = dataset.DataCollator(max_length=2048, pad_token_id=0)(samples)
    pixels = model_pixels(batch["pixel_values"], torch.float32)
    with torch.no_grad():
        logits = model(data=dict(batch, pixel_values=pixels)).logits
    assert logits.shape == (*batch["input_ids"].shape, config.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), batch["labels"].view(-1))
    assert torch.isfinite(loss)


def test_multi_image_pieces_join_like_chat():
    """chat(msgs=[{"content": [img_a, img_b, "What?"]}]) joins the pieces with single newlines."""
    conversations = [
        {"role": "user", "content": "<image_00>\n<image_01>\nWhat changed?"},
        {"role": "assistant", "content": "The door."},
    ]
    placed = place_images(conversations, {"<image_00>": "[A]", "<image_01>": "[B]"})
    assert placed[0]["content"] == "[A]\n[B]\nWhat changed?"
    assert placed[1] == conversations[1]


def processor_layout(image, patch_size):
    """``[3, H, W]`` -> ``[3, patch, n * patch]`` as the model's processor writes it (unfold + permute)."""
    unfolded = torch.nn.functional.unfold(image[None], (patch_size, patch_size), stride=(patch_size, patch_size))
    return unfolded.reshape(3, patch_size, patch_size, -1).permute(0, 1, 3, 2).reshape(3, patch_size, -1)


@pytest.mark.parametrize(
    "family, dtype",
    [("minicpmv2_6", torch.float32), ("minicpmv2_6", torch.bfloat16), ("minicpmv2_0", torch.float32)],
)
def test_vision_tower_sees_the_torchvision_pixels(family, dtype, checkpoints, tmp_path):
    """The dataset hands on uint8 pixels; what reaches the vision tower through the backend's forward
    equals, bit for bit, what it gets from the float pixels of torchvision's ToTensor + Normalize(0.5, 0.5)
    on the same views (the dataset's output before), each cast by the model to its dtype: in float32
    the same floats, in bfloat16 those floats rounded once to bfloat16. model_pixels alone gives the
    torchvision floats in float32 and their bfloat16 cast in bfloat16."""
    from torchvision import transforms

    import loading
    from families.remote_code import RemoteCodeFamily

    path = checkpoints(family)
    config = loading.load_config(str(path))
    model = loading.load_model(str(path), config, dtype=dtype).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (120, 250, 3), dtype=np.uint8)  # every 8-bit value
    Image.fromarray(pixels, "RGB").save(tmp_path / "noise.png")
    llm_type = FAMILY_LLM_TYPE[family]
    data = dataset.make_dataset(
        [two_turn_record("noise.png")], loading.load_tokenizer(str(path)), families.family_for(config).data_settings(config, 9),
        layout=LAYOUTS[llm_type], max_length=2048, image_root=tmp_path,
    )
    batch = dataset.DataCollator(2048)([data[0]])
    assert {p.dtype for p in batch["pixel_values"][0]} == {torch.uint8}

    to_float = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    source, rows = slice_image(Image.open(tmp_path / "noise.png"), **data.slice_config)
    views = [to_float(view) for view in [source] + [s for row in rows for s in row]]
    assert len(views) > 1  # sliced
    if data.batch_vision:
        views = [processor_layout(view, config.patch_size) for view in views]
    got = model_pixels(batch["pixel_values"], dtype)[0]
    assert [p.dtype for p in got] == [dtype] * len(views)
    assert all(torch.equal(g, v.to(dtype)) for g, v in zip(got, views, strict=True))

    seen = []
    model.vpm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        RemoteCodeFamily().forward(model, batch)
        new = list(seen)
        seen.clear()
        model(data=dict(batch, pixel_values=[views]), use_cache=False)  # the float pixels, as before
    assert len(new) == len(seen) > 0
    assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(new, seen))


# --------------------------------------------------------------------------------------------
# System messages: as each family's template takes them


SYSTEM = {"role": "system", "content": "Answer in two words."}


@pytest.mark.parametrize("llm_type", [*dataset.LLM_TYPES, "qwen-thinking"])
def test_system_message_as_each_template_lays_it_out(llm_type, tokenizers, tmp_path):
    """llama3 and ChatML write a system turn (each model's chat() puts its system_prompt first); the
    MiniCPM-V 2.0 template has none (its apply_chat_template asserts user/assistant roles)."""
    tok = tokenizers[llm_type]
    layout = "qwen" if llm_type == "qwen-thinking" else llm_type
    question = {"role": "user", "content": "What is this?"}
    record = {"id": "sys", "conversations": [SYSTEM, question, {"role": "assistant", "content": "A cat."}]}
    data = make_dataset([record], tok, layout, tmp_path)
    if not LAYOUTS[layout].takes_system:
        with pytest.raises(DataError) as error:
            data[0]
        assert error.value.code == "system_message" and "has none" in error.value.reason
        return
    sample = data[0]
    learned = torch.where(sample["labels"] != -100)[0]
    first = int(learned[0]) + 1  # labels are stored shifted by one: position i holds token i + 1
    prompt = tok.apply_chat_template([SYSTEM, question], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert SYSTEM["content"] in prompt and "You are a helpful assistant" not in prompt
    assert sample["input_ids"][:first].tolist() == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(sample["labels"][learned]).startswith("A cat.")  # the system text is not learned


def test_untagged_image_goes_to_the_first_user_message_after_a_system_one():
    messages = place_images([SYSTEM, {"role": "user", "content": "What?"}], {"<image>": "[IMG]"})
    assert messages == [SYSTEM, {"role": "user", "content": "[IMG]\nWhat?"}]
