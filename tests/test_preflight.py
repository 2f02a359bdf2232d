"""Preflight: a corpus of malformed records, each reported with its reason; the CLI; skip mode."""

import importlib.machinery
import json
import os
import re
import struct
import subprocess
import sys
import time
import types
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import preflight
from data import sources
from data.errors import DataError, MediaProblem
from data.media import open_image, open_rgb
from data.preflight_cache import CACHE_NAME, cache_key
from data.preflight_report import REASONS
from data.schema import KEEP_ON_PURPOSE, validate_record
from launch import dataset_as_trained, finetune_args, run, run_finetune, subprocess_env, torchrun_finetune, trainer_state

MAX_LENGTH = 512  # FAST_ARGS's --model_max_length


def png_header_only(path, width, height):
    """A valid PNG header announcing a huge image, with no pixel data: a decompression bomb's shape."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def write_images(folder):
    """Good images in unusual modes, and bad image files of every kind."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.new("CMYK", (40, 30), (0, 0, 0, 0)).save(folder / "cmyk.jpg")
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(folder / "rgba.png")
    Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)).save(folder / "gray16.png")
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) % 256).save(folder / "gray16_low.png")
    Image.fromarray(np.linspace(0, 300, 600, dtype=np.float32).reshape(20, 30)).save(folder / "float.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (60, 30), (0, 0, 255)).save(folder / "rotated.jpg", exif=exif)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("these are not pixels")
    full = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    png_header_only(folder / "bomb.png", 10_000, 10_000)  # 100M pixels: over PIL's limit, under twice it
    (folder / "folder.png").mkdir()
    (folder / "loop.png").symlink_to("loop.png")
    os.mkfifo(folder / "pipe.png")  # opening it would block until a writer came


def conv(user="<image>\nWhat is it?", assistant="a shape"):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def build_corpus(folder, filler_words):
    """``(records, expected)``: ``expected`` maps the index of each bad record to its reason."""
    write_images(folder / "images")
    good = [
        {"id": "good-rgb", "image": "images/rgb.png", "conversations": conv()},
        {"id": "good-cmyk", "image": "images/cmyk.jpg", "conversations": conv()},
        {"id": "good-palette", "image": "images/palette.png", "conversations": conv()},
        {"id": "good-rgba", "image": "images/rgba.png", "conversations": conv()},
        {"id": "good-16bit-low", "image": "images/gray16_low.png", "conversations": conv()},
        {"id": "good-exif", "image": "images/rotated.jpg", "conversations": conv()},
        {"id": "good-multi", "image": {"<image_00>": "images/rgb.png", "<image_01>": "images/cmyk.jpg"},
         "conversations": conv("<image_00> and <image_01>: which is brighter?", "the second")},
        {"id": "good-text", "conversations": conv("Count to three.", "one two three")},
        # ChatML (2.6) takes a system message first, as its chat() puts its system_prompt.
        {"id": "good-system", "image": "images/rgb.png",
         "conversations": [{"role": "system", "content": "Answer in two words."}, *conv()]},
        {"id": 7, "conversations": conv("An integer id.", "is fine")},
        # Grounding markup is made of special tokens too, but it is content the model learns to write.
        {"id": "good-grounding", "image": "images/rgb.png",
         "conversations": conv("<image>\nWhere is the <ref>noise</ref>?", "<ref>noise</ref><box>0 0 999 999</box>")},
        {"id": "good-truncated", "image": "images/rgb.png",  # over max length, still learnable: a note
         "conversations": conv("<image>\nRepeat.", "word " * (MAX_LENGTH + 50))},
    ]
    two = {"<image_00>": "images/rgb.png", "<image_01>": "images/cmyk.jpg"}
    bad = [
        ("not_an_object", "just a string"),
        ("bad_conversations", {"id": "one-message", "conversations": conv()[:1]}),
        ("bad_message", {"id": "tool-role", "conversations": [{"role": "tool", "content": "x"}, *conv()]}),
        ("system_message", {"id": "late-system", "image": "images/rgb.png",
                            "conversations": [*conv(), {"role": "system", "content": "x"}, *conv("more?", "no")]}),
        ("empty_answer", {"id": "blank-answer", "image": "images/rgb.png", "conversations": conv(assistant=" \n ")}),
        # Keys that are not read would train the record as something else than its author meant.
        ("unknown_key", {"id": "misspelt-image", "img": "images/rgb.png", "conversations": conv("What is it?")}),
        ("unknown_key", {"id": "images-list", "images": ["images/rgb.png"], "conversations": conv("What is it?")}),
        ("unknown_key", {"id": "top-level-system", "system": "Be brief.", "conversations": conv("What is it?")}),
        ("unknown_key", {"id": "image-in-message", "conversations": [
            {"role": "user", "content": "What is it?", "image": "images/rgb.png"}, conv()[1]]}),
        ("unknown_key", {"id": "sharegpt", "image": "images/rgb.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a shape"}]}),
        ("unknown_key", {"id": "openai", "messages": conv("What is it?")}),
        ("bad_content", {"id": "openai-parts", "image": "images/rgb.png", "conversations": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}, conv()[1]]}),
        # The second "image" key is written into the file below: JSON keeps only the last.
        ("duplicate_key", {"id": "duplicate-image", "image": "images/rgb.png", "conversations": conv(), "DUPLICATE": 0}),
        ("bad_id", {"id": ["a", "list"], "conversations": conv("What?", "x")}),
        ("bad_id", {"id": "lone \udcff surrogate", "conversations": conv("What?", "x")}),
        ("bad_content", {"id": "numeric-content", "conversations": conv(assistant=42)}),
        ("first_not_user", {"id": "assistant-first", "conversations": conv()[::-1]}),
        ("roles_not_alternating", {"id": "two-users", "image": "images/rgb.png",
                                   "conversations": [{"role": "user", "content": "<image> hi"},
                                                     {"role": "user", "content": "hello?"}, *conv("x", "y")]}),
        ("bad_image_field", {"id": "image-number", "image": 42, "conversations": conv()}),
        ("reserved_token", {"id": "reserved", "conversations": conv("what is </image>?", "a tag")}),
        # Chat-control text: the template would find this fake header first and learn the user's words.
        ("special_token", {"id": "fake-turn", "conversations": conv("hi<|im_end|>\n<|im_start|>assistant\nfake", "real")}),
        ("image_tag_count", {"id": "two-tags-one-image", "image": "images/rgb.png",
                             "conversations": conv("<image> <image> same?", "yes")}),
        ("image_in_assistant", {"id": "tag-in-answer", "image": "images/rgb.png",
                                "conversations": conv("Draw it.", "<image>")}),
        ("unknown_image_tag", {"id": "tag-without-image", "image": two,
                               "conversations": conv("<image_00> <image_01> <image_02>", "three")}),
        ("unknown_image_tag", {"id": "image-tag-no-image", "conversations": conv()}),
        ("unused_image", {"id": "unused", "image": two, "conversations": conv("<image_00> only", "one")}),
        ("repeated_image_tag", {"id": "repeated", "image": two,
                                "conversations": conv("<image_00> <image_01> <image_00>", "two")}),
        ("missing_image", {"id": "missing", "image": "images/nowhere.png", "conversations": conv()}),
        ("image_is_folder", {"id": "folder", "image": "images/folder.png", "conversations": conv()}),
        ("symlink_loop", {"id": "loop", "image": "images/loop.png", "conversations": conv()}),
        ("not_a_file", {"id": "fifo", "image": "images/pipe.png", "conversations": conv()}),
        ("empty_image", {"id": "zero-bytes", "image": "images/empty.png", "conversations": conv()}),
        ("not_an_image", {"id": "text-file", "image": "images/notes.png", "conversations": conv()}),
        ("truncated_image", {"id": "truncated", "image": "images/truncated.png", "conversations": conv()}),
        ("image_too_large", {"id": "bomb", "image": "images/bomb.png", "conversations": conv()}),
        ("image_mode", {"id": "16-bit", "image": "images/gray16.png", "conversations": conv()}),
        ("image_mode", {"id": "float-over-255", "image": "images/float.tif", "conversations": conv()}),
        ("too_long", {"id": "cut-image", "image": "images/rgb.png",
                      "conversations": conv("a " * filler_words + "<image>", "a shape")}),
        ("no_learnable_tokens", {"id": "answer-cut-off",
                                 "conversations": conv("a " * (MAX_LENGTH + 10), "a shape")}),
    ]
    records, expected = [], {}
    for n in range(max(len(good), len(bad))):  # interleaved: good records sit between bad ones
        if n < len(bad):
            expected[len(records)] = bad[n][0]
            records.append(bad[n][1])
        if n < len(good):
            records.append(good[n])
    return records, expected


def filler_that_cuts_the_image(model, folder):
    """How many filler words before an image make max_length fall inside its placeholder."""
    write_images(folder / "images")
    probe = folder / "probe.json"
    probe.write_text("[]")
    data = dataset_as_trained(model, probe)[0]
    for words in range(MAX_LENGTH - 40, MAX_LENGTH):
        data.records = [{"id": "probe", "image": "images/rgb.png", "conversations": conv("a " * words + "<image>", "x")}]
        try:
            data.check(0)
        except DataError as e:
            if e.code == "too_long":
                return words
    raise AssertionError("no filler length cuts the image placeholder")


@pytest.fixture(scope="module")
def corpus(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("minicpmv2_6")
    folder = tmp_path_factory.mktemp("corpus")
    records, expected = build_corpus(folder, filler_that_cuts_the_image(model, tmp_path_factory.mktemp("probe")))
    path = folder / "train.json"
    path.write_text(json.dumps(records, indent=1).replace('"DUPLICATE": 0', '"image": "images/cmyk.jpg"'))
    duplicate = next(r for r in records if isinstance(r, dict) and "DUPLICATE" in r)
    del duplicate["DUPLICATE"]
    return model, path, records, expected


def test_image_modes_convert_as_the_remote_code_processor_converts_them(tmp_path):
    """image_processing_minicpmv.py converts every image with PIL's convert("RGB"): transparency is
    dropped (the colour under it stays), not composited; 16-bit values within 0..255 are kept exactly."""
    write_images(tmp_path)
    assert open_rgb(tmp_path / "cmyk.jpg").getpixel((5, 5)) == (255, 255, 255)
    assert open_rgb(tmp_path / "palette.png").getpixel((5, 5)) == (255, 0, 0)  # the palette colour
    assert open_rgb(tmp_path / "rgba.png").getpixel((5, 5)) == (255, 0, 0)  # the colour under alpha 0
    for name in ("cmyk.jpg", "palette.png", "rgba.png", "gray16_low.png"):
        with Image.open(tmp_path / name) as published:
            assert np.array_equal(np.asarray(open_rgb(tmp_path / name)), np.asarray(published.convert("RGB")))
    gray = np.asarray(open_rgb(tmp_path / "gray16_low.png"))
    assert np.array_equal(gray[..., 1], np.arange(600).reshape(20, 30) % 256)  # every 16-bit value kept
    rotated = open_rgb(tmp_path / "rotated.jpg")
    assert rotated.size == (30, 60)  # EXIF orientation applied
    assert all(abs(a - b) < 8 for a, b in zip(rotated.getpixel((15, 30)), (0, 0, 255)))


@pytest.mark.parametrize("values, seen", [
    (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000, "I;16 image with values from 0 to 60000"),
    (np.full((4, 4), 300.0, np.float32), "F image with values from 300.0 to 300.0:"),
    (np.full((4, 4), 0.5, np.float32), "F image with fractions:"),  # a 0..1 float image: PIL would truncate it to black
    (np.array([[np.nan, 2.0]], np.float32), "F image with NaN or infinite values:"),
])
def test_wide_images_that_8_bits_cannot_hold_are_refused(values, seen, tmp_path):
    Image.fromarray(values).save(tmp_path / "wide.tif")
    with pytest.raises(MediaProblem, match=f"a {seen}.*clipping to 0..255") as caught:
        open_image(tmp_path / "wide.tif")
    assert caught.value.code == "image_mode"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bomb record, refused
def test_corpus_every_bad_record_is_reported_with_its_reason(corpus, tmp_path):
    model, path, records, expected = corpus
    assert len(set(expected.values())) >= 15
    train = dataset_as_trained(model, path)[0]
    bad, lengths = preflight.check_all({"train": train}, tmp_path, skip_bad=False, preflight_only=True, progress=False)
    assert bad == {"train": sorted(expected)}
    # Each good record's length as it trains; None for the bad ones.
    assert [i for i, n in enumerate(lengths["train"]) if n is None] == sorted(expected)
    good = next(i for i, n in enumerate(lengths["train"]) if n is not None)
    assert lengths["train"][good] == len(train[good]["input_ids"])
    report = json.loads((tmp_path / preflight.REPORT_NAME).read_text())
    found = {p["index"]: p["reason"] for p in report["problems"]}
    assert found == expected
    for problem in report["problems"]:
        record = records[problem["index"]]
        record_id = record.get("id") if isinstance(record, dict) else None
        assert problem["record_id"] == record_id and problem["file"] == str(path)
        assert problem["message"].startswith(f"record {problem['index']} (id {record_id!r}) of {path}: ")
        assert problem["reason"] in REASONS
    [stats] = report["files"]
    assert stats["records"] == len(records) and stats["bad"] == len(expected)
    good_truncated = next(i for i, r in enumerate(records) if isinstance(r, dict) and r.get("id") == "good-truncated")
    assert stats["truncated"] == [good_truncated]
    assert report["action"] == "stopped" and not report["ok"]


@pytest.mark.launch
def test_preflight_only_exits_nonzero_with_table_and_report_before_weights(corpus, tmp_path):
    model, path, records, expected = corpus
    out = tmp_path / "out"
    code, output = run_finetune(
        finetune_args(model, path, out, "--eval_data_path", path, "--preflight_only", "true"), expect_ok=False
    )
    assert code == 1, output[-3000:]
    n_bad, total = len(expected), 2 * len(records)
    assert f"Preflight: {2 * n_bad} of {total} records are unusable" in output
    for reason in set(expected.values()):
        assert reason in output
    assert "Parameters:" not in output  # the model was never loaded
    assert "Traceback" not in output
    report = json.loads((out / preflight.REPORT_NAME).read_text())
    assert report["bad_records"] == 2 * n_bad and report["action"] == "stopped"
    assert {(p["split"], p["index"]) for p in report["problems"]} == {
        (split, i) for split in ("train", "eval") for i in expected
    }
    # Run again (a restart): the check is reused, says so in one line, and stops as before.
    code, again = run_finetune(
        finetune_args(model, path, out, "--eval_data_path", path, "--preflight_only", "true"), expect_ok=False
    )
    assert code == 1 and again.count("its results are reused") == 1, again[-3000:]
    assert f"Preflight: {2 * n_bad} of {total} records are unusable" in again
    assert json.loads((out / preflight.REPORT_NAME).read_text()) == report
    _, fresh = run_finetune(finetune_args(model, path, out, "--eval_data_path", path, "--preflight_only", "true",
                                          "--preflight_cache", "false"), expect_ok=False)
    assert "its results are reused" not in fresh and f"{2 * n_bad} of {total} records are unusable" in fresh


@pytest.mark.launch
def test_skip_bad_samples_trains_on_exactly_the_good_ones(corpus, tmp_path):
    model, path, records, expected = corpus
    out = tmp_path / "out"
    env = subprocess_env()
    _, output = run(
        [*torchrun_finetune(env), *finetune_args(
            model, path, out, "--skip_bad_samples", "true", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_strategy", "no",
        )],
        env=env,
    )
    good = len(records) - len(expected)
    report = json.loads((out / preflight.REPORT_NAME).read_text())
    assert report["action"] == "skipped" and report["dropped"] == {"train": sorted(expected)}
    # Both ranks drop the same records (each checked its half; the results are gathered on both).
    line = f"--skip_bad_samples: dropping {len(expected)} of {len(records)} train records flagged by preflight; training on {good}"
    assert output.count(line) == 2, output[-3000:]
    # One epoch over the good records at one per rank and step: every one was trained on, no other
    # (a bad record reaching the loader would have raised DataError).
    assert trainer_state(out)["global_step"] == -(-good // 2)


def test_skip_mode_with_nothing_left_stops(corpus, tmp_path):
    model, path, records, expected = corpus
    only_bad = tmp_path / "only_bad.json"
    only_bad.write_text(json.dumps([records[i] for i in sorted(expected)][:3]))
    train = dataset_as_trained(model, only_bad)[0]
    with pytest.raises(preflight.PreflightFailed, match="all 3 train records are unusable; nothing is left"):
        preflight.run({"train": train, "eval": None}, tmp_path, skip_bad=True)


GOOD_RECORD = {"id": "café", "conversations": conv("Count to two, s'il vous plaît.", "un deux")}
# A data file that cannot be used at all: (file name, bytes, reason, what the message says).
UNUSABLE_FILES = {
    "not json": ("train.json", b'[{"id": 1', "invalid_json", "not valid JSON"),
    "latin-1": ("train.json", json.dumps([GOOD_RECORD], ensure_ascii=False).encode("latin-1"), "bad_encoding",
                r"not UTF-8 text: byte 0xe9 at offset \d+ \(invalid continuation byte\); save the file as UTF-8"),
    "utf-16": ("train.jsonl", json.dumps(GOOD_RECORD).encode("utf-16"), "bad_encoding", "UTF-16 byte-order mark"),
    "no records": ("train.json", b"[]", "no_records", "holds no records"),
    "blank jsonl": ("train.jsonl", b"\n \n", "no_records", "holds no records"),
    "a folder": ("train.json", None, "unreadable_file", "cannot read the file: Is a directory"),
}


@pytest.mark.parametrize("case", list(UNUSABLE_FILES))
def test_unusable_data_file_is_reported_like_a_record_and_stops_even_in_skip_mode(case, tiny_checkpoint, tmp_path):
    name, content, reason, message = UNUSABLE_FILES[case]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    train = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), path)[0]
    with pytest.raises(preflight.PreflightFailed, match="the train data file cannot be used"):
        preflight.run({"train": train, "eval": None}, tmp_path / "out", skip_bad=True)
    report = json.loads((tmp_path / "out" / preflight.REPORT_NAME).read_text())
    [problem] = report["problems"]
    assert report["action"] == "stopped" and report["reasons"] == {reason: 1} and reason in REASONS
    assert problem["file"] == str(path) and problem["index"] is None
    assert problem["message"].startswith(f"{path}: ") and re.search(message, problem["message"]), problem["message"]


def test_bad_jsonl_line_is_a_record_problem_that_skip_mode_drops(tiny_checkpoint, tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps(GOOD_RECORD, ensure_ascii=False)
    path.write_text(f"{good}\n\n{{oops\n{good}\n", encoding="utf-8")
    train = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), path)[0]
    kept = preflight.run({"train": train, "eval": None}, tmp_path, skip_bad=True).datasets["train"]
    assert list(kept.indices) == [0, 2]
    [problem] = json.loads((tmp_path / preflight.REPORT_NAME).read_text())["problems"]
    assert (problem["index"], problem["reason"]) == (1, "invalid_json")
    assert problem["message"].startswith(f"record 1 (id None) of {path}: line 3 is not valid JSON")


@pytest.mark.launch
def test_unreadable_file_exits_1_with_the_table_and_no_traceback(tiny_checkpoint, tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(UNUSABLE_FILES["latin-1"][1])
    out = tmp_path / "out"
    code, output = run_finetune(
        ["--model_name_or_path", tiny_checkpoint("minicpmv2_6"), "--data_path", path, "--llm_type", "qwen",
         "--output_dir", out, "--use_cpu", "true"],
        expect_ok=False,
    )
    assert code == 1, output[-3000:]
    assert "Traceback" not in output
    assert "bad_encoding" in output and f"unusable data files: {path}" in output
    assert json.loads((out / preflight.REPORT_NAME).read_text())["reasons"] == {"bad_encoding": 1}


# (record, system template?, reason, what the message must say): keys we do not read, named with the
# mapping of the layout they come from; the system decision; answers with nothing to learn.
RECORD_CASES = {
    "misspelt image": ({"img": "a.png", "conversations": conv()}, True, "unknown_key", r"'img' \(did you mean 'image'\?\)"),
    "images list": ({"images": ["a.png"], "conversations": conv()}, True, "unknown_key",
                    r"'images' \(a list of images is not read: one image goes in 'image'"),
    "image on a message": ({"conversations": [{**conv()[0], "image": "a.png"}, conv()[1]]}, True, "unknown_key",
                           r"message 0 has key\(s\) that are not read: 'image' \(an image attached to a message"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, True,
                 "unknown_key", r"'from' \(ShareGPT/LLaVA layout: .*\"role\": \"user\".*\"from\": \"human\""),
    "rlaif-v row": ({"question": "What?", "chosen": "a", "rejected": "b"}, True, "unknown_key",
                    r"'question' \(an RLAIF-V-style row: .*'chosen' \(a preference record: train it with --stage dpo\)"),
    "openai messages": ({"messages": conv()}, True, "unknown_key", r"'messages' \(OpenAI layout: the messages go in 'conversations'"),
    "openai parts": ({"conversations": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, conv()[1]]}, True,
                     "bad_content", r"a list as 'content' \(OpenAI layout\)"),
    "system key, template with one": ({"system": "Be brief.", "conversations": conv()}, True, "unknown_key",
                                      r"'system' \(put it first in 'conversations' as \{\"role\": \"system\""),
    "system key, template without": ({"system": "Be brief.", "conversations": conv()}, False, "unknown_key",
                                     r"'system' \(this model's chat template has no system message"),
    "system message, template without": ({"conversations": [{"role": "system", "content": "Be brief."}, *conv()]}, False,
                                         "system_message", "message 0 is a system message, but this model's chat template has none"),
    "system message not first": ({"conversations": [*conv(), {"role": "system", "content": "x"}, *conv()]}, True,
                                 "system_message", "message 2 is a system message; only the first message may be one"),
    "system message only": ({"conversations": [{"role": "system", "content": "x"}, conv()[0]]}, True,
                            "bad_conversations", "at least a user and an assistant message after the system one"),
    "empty answer": ({"conversations": conv(assistant="")}, True, "empty_answer", "message 1, an assistant answer, is empty"),
    "blank answer": ({"conversations": conv(assistant=" \t\n")}, True, "empty_answer", "is white space only"),
    "float id": ({"id": 1.5, "conversations": conv()}, True, "bad_id", "'id' must be a string or an integer, got float"),
    "boolean id": ({"id": True, "conversations": conv()}, True, "bad_id", "got bool"),
    "lone surrogate id": ({"id": "a\udc80", "conversations": conv()}, True, "bad_id", r"lone surrogate '\\udc80' at 1"),
    "lone surrogate text": ({"conversations": conv(assistant="x\ud800")}, True, "bad_content", "cannot be tokenized"),
    # A text-only record discussing the tag itself: refused (the tokenizer would read the image token),
    # with how to write it.
    "literal image tag": ({"conversations": conv("What does the HTML tag <image> do?", "It shows one.")}, True,
                          "unknown_image_tag", r"to write such a tag as text .* '< image >'"),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_record_problems_are_named_with_how_to_fix_them(case):
    record, system, reason, said = RECORD_CASES[case]
    record = {"id": "r", **record}
    with pytest.raises(DataError) as caught:
        validate_record(record, 4, data_path="d.json", system=system)
    assert caught.value.code == reason and reason in REASONS
    assert re.search(said, str(caught.value)), str(caught.value)
    assert str(caught.value).startswith(f"record 4 (id {record['id']!r}) of d.json: ")


def test_metadata_keys_are_refused_unless_data_columns_names_the_keys_to_read(tmp_path):
    """A key kept on purpose (a source) is refused with the way to keep it: --data_columns naming the
    keys to read leaves the others out, and the record then passes."""
    record = {"id": "m", "source": "web", "conversations": conv("hi", "yo")}
    with pytest.raises(DataError) as caught:
        validate_record(record, 0, data_path="d.json")
    assert caught.value.code == "unknown_key" and "'source' (remove it)" in str(caught.value)
    assert KEEP_ON_PURPOSE in str(caught.value)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record]))
    [mapped] = sources.load(path, "id=id,image=image,conversations=conversations")
    assert mapped == {"id": "m", "conversations": conv("hi", "yo")}
    validate_record(mapped, 0, data_path=str(path))


def test_system_message_first_passes_where_the_template_has_one():
    record = {"id": "s", "conversations": [{"role": "system", "content": "Be brief."}, *conv("hi", "yo")]}
    validate_record(record, 0, system=True)
    with pytest.raises(DataError, match="has none"):
        validate_record(record, 0, system=False)


def test_duplicate_keys_are_reported_wherever_they_sit(tiny_checkpoint, tmp_path):
    """JSON keeps a repeated key's last value; the record, a message and the 'image' dict are checked."""
    lines = [
        '{"id": "a", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], '
        '"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        '{"id": "b", "conversations": [{"role": "user", "content": "hi", "content": "bye"}, {"role": "assistant", "content": "yo"}]}',
        '{"id": "c", "image": {"<image_00>": "x.png", "<image_00>": "y.png"}, "conversations": '
        '[{"role": "user", "content": "<image_00>"}, {"role": "assistant", "content": "yo"}]}',
        json.dumps({"id": "good", "conversations": conv("hi", "yo")}),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    train = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), path)[0]
    kept = preflight.run({"train": train, "eval": None}, tmp_path, skip_bad=True).datasets["train"]
    assert list(kept.indices) == [3]
    problems = json.loads((tmp_path / preflight.REPORT_NAME).read_text())["problems"]
    assert [(p["index"], p["reason"]) for p in problems] == [(0, "duplicate_key"), (1, "duplicate_key"), (2, "duplicate_key")]
    assert "the record holds the key(s) 'conversations' more than once" in problems[0]["message"]
    assert "message 0 holds the key(s) 'content' more than once" in problems[1]["message"]
    assert "'image' holds the key(s) '<image_00>' more than once" in problems[2]["message"]


def test_json_nested_too_deeply_is_invalid_json_not_a_traceback(tiny_checkpoint, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    good = json.dumps({"id": "good", "conversations": conv("hi", "yo")})
    lines = tmp_path / "train.jsonl"
    lines.write_text(f'{good}\n{{"id": "deep", "conversations": {deep}}}\n')
    train = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), lines)[0]
    kept = preflight.run({"train": train, "eval": None}, tmp_path / "lines", skip_bad=True).datasets["train"]
    assert list(kept.indices) == [0]
    [problem] = json.loads((tmp_path / "lines" / preflight.REPORT_NAME).read_text())["problems"]
    assert problem["reason"] == "invalid_json" and "line 2 is not valid JSON: nested too deeply" in problem["message"]
    whole = tmp_path / "train.json"
    whole.write_text(f"[{good}, {deep}]")
    with pytest.raises(DataError, match="not valid JSON: nested too deeply") as caught:
        sources.load(whole)
    assert caught.value.code == "invalid_json"


def test_any_error_checking_a_record_is_that_records_problem(tiny_checkpoint, tmp_path, monkeypatch):
    """An error nothing foresaw (here a RecursionError while validating) names the record; the others are checked."""
    records = [{"id": n, "conversations": conv(f"question {n}", "answer")} for n in range(3)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    train = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), path)[0]
    real = validate_record

    def validate(record, index, **kwargs):
        if index == 1:
            raise RecursionError("maximum recursion depth exceeded")
        return real(record, index, **kwargs)

    monkeypatch.setattr("data.records.validate_record", validate)
    bad, lengths = preflight.check_all({"train": train}, tmp_path, skip_bad=False, preflight_only=True, progress=False)
    assert bad == {"train": [1]} and lengths["train"][0] and lengths["train"][2]
    [problem] = json.loads((tmp_path / preflight.REPORT_NAME).read_text())["problems"]
    assert problem["reason"] == "check_failed" and problem["record_id"] == 1
    assert problem["message"] == f"record 1 (id 1) of {path}: checking it raised RecursionError: maximum recursion depth exceeded"


# --------------------------------------------------------------------------------------------
# Across ranks and cores


@pytest.mark.parametrize("count", [0, 1, 5, 1000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_ranges_cover_every_record_once(count, world_size):
    ranges = [preflight.rank_range(count, rank, world_size) for rank in range(world_size)]
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(count))
    assert max(stop - start for start, stop in ranges) - min(stop - start for start, stop in ranges) <= 1


class LoggedChecks:
    """A dataset whose check appends the index to a file (from any process) and fails every 7th record;
    each check takes ``seconds``, so that one worker cannot take every task before the others start."""

    data_path = "logged.json"
    max_length = 100

    def __init__(self, log, count, seconds=0.0):
        self.log, self.count, self.seconds = log, count, seconds

    def __len__(self):
        return self.count

    def check(self, index):
        time.sleep(self.seconds)
        with open(self.log, "a") as f:
            f.write(f"{index} {os.getpid()}\n")
        if index % 7 == 3:
            raise DataError("bad", index=index, record_id=f"r{index}", data_path=self.data_path, code="bad_content")
        return {"tokens": 10 + index, "length": min(10 + index, self.max_length), "truncated": 10 + index > self.max_length}


def test_default_workers_only_where_records_pay_for_their_start(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert preflight.default_workers(10) == 1  # a small share: checked in the rank's own process
    assert preflight.default_workers(3 * preflight.MIN_RECORDS_PER_WORKER) == 3
    assert preflight.default_workers(100 * preflight.MIN_RECORDS_PER_WORKER) == 4  # 8 cores over 2 ranks


def test_worker_processes_check_each_record_once_and_results_come_back_in_order(tmp_path):
    log = tmp_path / "checks.log"
    data = LoggedChecks(log, 300, seconds=0.02)
    one = preflight.check_dataset(data, "train", progress=False, workers=1)
    assert sorted(int(line.split()[0]) for line in log.read_text().splitlines()) == list(range(300))
    log.unlink()
    # This process has computed with torch's thread pool: workers forked from it inherit its locks as
    # held and hung here; workers forked from the fork server (a fresh process) start clean.
    torch.set_num_threads(2)
    torch.ones(512, 512) @ torch.ones(512, 512)
    three = preflight.check_dataset(data, "train", progress=False, workers=3)
    checks = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(index) for index, _ in checks) == list(range(300))  # each once
    assert len({pid for _, pid in checks} - {str(os.getpid())}) > 1  # in several other processes
    (problems, stats, lengths), (problems1, stats1, lengths1) = three, one
    assert problems == problems1 and lengths == lengths1
    assert {**stats, "seconds": 0} == {**stats1, "seconds": 0}
    assert [p.index for p in problems] == list(range(3, 300, 7))
    assert stats["truncated"] == [i for i in range(91, 300) if i % 7 != 3] and stats["longest_tokens"] == 309


def test_the_fork_server_imports_the_script_that_workers_run_again(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(preflight.__file__)))
    script = types.ModuleType("__main__")
    script.__file__, script.__spec__ = os.path.join(root, "finetune.py"), None
    monkeypatch.setitem(sys.modules, "__main__", script)
    monkeypatch.setattr(sys, "path", [root, *sys.path[1:]])
    assert preflight.script_module() == "finetune"
    monkeypatch.setattr(sys, "path", [os.path.join(root, "tests"), *sys.path[1:]])
    assert preflight.script_module() is None  # not importable under that name from here
    monkeypatch.setattr(sys, "path", [root, *sys.path[1:]])
    script.__file__ = os.path.join(root, ".venv", "bin", "pytest")
    assert preflight.script_module() is None  # a console script, not a module
    script.__file__, script.__spec__ = os.path.join(root, "finetune.py"), importlib.machinery.ModuleSpec("finetune", None)
    assert preflight.script_module() is None  # python -m: a worker does not run it again


@pytest.mark.launch
def test_workers_are_spawned_with_a_warning_where_the_fork_server_cannot_start(tmp_path):
    # A fork server listens on a socket under TMPDIR; a path of over ~108 bytes cannot be bound.
    long_tmp = tmp_path / ("t" * 120)
    long_tmp.mkdir()
    log = tmp_path / "checks.log"
    code = (
        "import logging, sys; logging.basicConfig(); import preflight; from test_preflight import LoggedChecks; "
        f"problems, _, _ = preflight.check_dataset(LoggedChecks({str(log)!r}, 40), 'train', progress=False, workers=2); "
        "import os; print('bad', [p.index for p in problems], 'parent', os.getpid())"
    )
    tests = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(TMPDIR=long_tmp, PYTHONPATH=f"{os.path.dirname(tests)}:{tests}"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Preflight workers are spawned" in done.stderr and "AF_UNIX path too long" in done.stderr
    assert "bad [3, 10, 17, 24, 31, 38]" in done.stdout
    checks = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(index) for index, _ in checks) == list(range(40))
    assert done.stdout.split()[-1] not in {pid for _, pid in checks}  # by the spawned workers


@pytest.mark.launch
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bomb record, refused
def test_two_ranks_with_two_workers_report_as_one_process(corpus, tmp_path):
    """torchrun, 2 processes of 2 workers each: the report, the bad records and the lengths are
    those of one process checking alone."""
    model, path, records, expected = corpus
    alone = tmp_path / "alone"
    train = dataset_as_trained(model, path)[0]
    bad, lengths = preflight.check_all({"train": train, "eval": dataset_as_trained(model, path)[0]}, alone,
                                       skip_bad=False, preflight_only=True, progress=False, workers=1)
    out = tmp_path / "ranks"
    env = subprocess_env()
    code, output = run(
        [*torchrun_finetune(env), *finetune_args(model, path, out, "--eval_data_path", path, "--preflight_only", "true",
                                                 "--preflight_workers", "2")],
        env=env, expect_ok=False,
    )
    assert code == 1, output[-3000:]

    def timeless(report):
        report = {**report, "seconds": 0, "seconds_per_1000_records": 0}
        report["files"] = [{**f, "seconds": 0} for f in report["files"]]
        return report

    ranks = json.loads((out / preflight.REPORT_NAME).read_text())
    assert timeless(ranks) == timeless(json.loads((alone / preflight.REPORT_NAME).read_text()))
    assert ranks["bad_records"] == 2 * len(expected)
    assert output.count(f"Preflight: {2 * len(expected)} of {2 * len(records)} records are unusable") == 1


# --------------------------------------------------------------------------------------------
# The cache


def test_cache_reuses_an_unchanged_check_and_anything_changed_checks_again(tiny_checkpoint, shapes, tmp_path, caplog,
                                                                            monkeypatch):
    model = tiny_checkpoint("minicpmv2_6")
    data = tmp_path / "train.json"
    data.write_text(shapes.read_text())
    for image in shapes.parent.iterdir():
        if image != shapes:
            (tmp_path / image.name).symlink_to(image)
    out = tmp_path / "out"
    checks = []
    counted = dataset.SupervisedDataset.check

    def counting(self, index):
        checks.append(index)
        return counted(self, index)

    monkeypatch.setattr(dataset.SupervisedDataset, "check", counting)

    def check(**changes):
        """One preflight pass over the data with these flags changed; True if it reused the cache."""
        argv = [f"--{name}={value}" for name, value in changes.items()]
        train = dataset_as_trained(model, data, *argv)[0]
        before = len(checks)
        caplog.clear()
        with caplog.at_level("INFO", logger="preflight"):
            result = preflight.check_all({"train": train}, out, skip_bad=False, preflight_only=True, progress=False,
                                         workers=1)
        reused = "its results are reused" in caplog.text
        assert reused == (len(checks) == before)  # the line says so exactly when nothing was checked
        return reused, result

    first, result = check()
    assert not first and (out / CACHE_NAME).exists()
    assert check() == (True, result)  # a restart: the same data and settings
    assert sum("its results are reused" in r.getMessage() for r in caplog.records) == 1
    assert not check(model_max_length=400)[0]
    assert not check(max_slice_nums=1)[0]
    assert check(max_slice_nums=1)[0]  # that check is the cached one now
    stat = data.stat()
    text = data.read_text()
    data.write_text(text.replace("square", "sqware", 1))  # same size, then the same time: the hash differs
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size
    reused, changed = check(max_slice_nums=1)
    assert not reused
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: checked again
    assert not check(max_slice_nums=1)[0]
    # Another tokenizer (one token more) is another check.
    train = dataset_as_trained(model, data, "--max_slice_nums=1")[0]
    key = cache_key({"train": train})
    train.tokenizer.add_tokens(["<extra_token_for_the_test>"])
    assert cache_key({"train": train}) != key
