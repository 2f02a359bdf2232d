"""data/native.py: records -> a native model's inputs through the checkpoint's own processor.

Parity: the sample up to its first learned token is exactly what the processor gives for the same
conversation through its chat template with the generation prompt. Golden label masks per model.
"""

import os
import re

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.video_utils import load_video

import numerics
import preflight
from data.errors import DataError
from data.media import decode_video
from data.native import NativeCollator, NativeDataset
from data.preflight_report import REASONS
from data.records import IGNORE_INDEX
from tiny_models.build import NATIVE_FAMILIES

SMALL = (60, 60)  # below the tiny scale_resolution (112): one unsliced view
WIDE = (250, 120)  # above it: a source view and slices
VIDEO_SECONDS, VIDEO_FPS = 3, 4


def write_image(path, size, seed):
    width, height = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_clip(path, seconds=VIDEO_SECONDS, fps=VIDEO_FPS, size=(64, 48), codec="mpeg4"):
    """A clip (mp4 unless ``path`` says otherwise) whose frames brighten one step per frame."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for n in range(seconds * fps):
            frame = np.full((size[1], size[0], 3), 10 * n, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_sound(path):
    """An mp4 holding a sound track and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("native_media")
    write_image(root / "small.png", SMALL, 0)
    write_image(root / "wide.png", WIDE, 1)
    # Transparency in steps: the processor composites it onto white (not PIL's convert("RGB"), which drops it).
    rgba = np.random.default_rng(2).integers(0, 256, (SMALL[1], SMALL[0], 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    write_clip(root / "clip.mp4")
    return root


def user(*parts):
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


IMAGE, VIDEO = {"type": "image"}, {"type": "video"}
ANSWER = "A red circle."

# name -> (record without id/conversation answer, the same first user turn as processor messages, images)
CASES = {
    "unsliced image": ({"image": "small.png"}, "<image>\nWhat is it?", user(IMAGE, "\nWhat is it?"), ["small.png"]),
    "sliced image": ({"image": "wide.png"}, "What is it?", user(IMAGE, "What is it?"), ["wide.png"]),
    "two images": (
        {"image": {"<image_00>": "wide.png", "<image_01>": "small.png"}},
        "Compare <image_00> and <image_01>.",
        user("Compare ", IMAGE, " and ", IMAGE, "."),
        ["wide.png", "small.png"],
    ),
    "text only": ({}, "What is a circle?", user("What is a circle?"), []),
    "transparent image": ({"image": "rgba.png"}, "What is it?", user(IMAGE, "What is it?"), ["rgba.png"]),
    "video": ({"video": "clip.mp4"}, "What happens?", user(VIDEO, "What happens?"), []),
    "tagged video": ({"video": "clip.mp4"}, "In <video>, what happens?", user("In ", VIDEO, ", what happens?"), []),
}


def dataset(processor, records, media, max_length=2048, **kwargs):
    return NativeDataset(records, processor, max_length=max_length, data_path=media / "data.json", **kwargs)


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_prompt_equals_the_processors_generation_prompt(tiny_checkpoint, media, family, case):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint(family))
    fields, question, first_turn, image_files = CASES[case]
    record = {"id": case, **fields, "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}]}
    sample = dataset(processor, [record], media)[0]

    prompt = processor.apply_chat_template([first_turn], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    kwargs = {}
    if "video" in fields:
        # transformers' own PyAV reader, sampling with the video processor's own sample_frames
        frames, metadata = load_video(
            str(media / "clip.mp4"), backend="pyav", sample_indices_fn=processor.video_processor.sample_frames
        )
        assert len(frames) == VIDEO_SECONDS  # one frame a second by default
        kwargs = dict(videos=[frames], video_metadata=[metadata], do_sample_frames=False)
    images = [Image.open(media / name) for name in image_files] or None  # as a user passes them; the processor converts
    expected = processor(text=[prompt], images=images, return_tensors="pt", **kwargs)

    learned = torch.where(sample["labels"] != IGNORE_INDEX)[0]
    first = int(learned[0])
    assert sample["input_ids"][:first].tolist() == expected["input_ids"][0].tolist()
    if "mm_token_type_ids" in expected:
        assert sample["mm_token_type_ids"][:first].tolist() == expected["mm_token_type_ids"][0].tolist()
    for key in ("pixel_values", "target_sizes", "pixel_values_videos", "target_sizes_videos"):
        assert (key in sample) == (key in expected), key
        if key in expected:
            assert torch.equal(sample[key], expected[key]), key
    if case == "sliced image":
        assert len(sample["target_sizes"]) > 1
    # What is learned: the answer and the <|im_end|> closing the turn, nothing after it.
    assert learned.tolist() == list(range(first, first + len(learned)))
    assert processor.tokenizer.decode(sample["input_ids"][learned]) == ANSWER + "<|im_end|>"


GOLDEN_RECORD = {
    "id": "golden",
    "image": {"<image_00>": "wide.png", "<image_01>": "small.png"},
    "conversations": [
        {"role": "user", "content": "<image_00> Which shape?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And <image_01>?"},
        {"role": "assistant", "content": "<think>\nLook again.\n</think>\n\nA star."},
    ],
}
# Learned token positions [start, stop) per model: the two answers with their <|im_end|>, the
# last one with its think block. OCR keeps 4x more visual tokens (downsample_mode "4x").
GOLDEN_LEARNED = {
    "minicpmv4_6": [(32, 36), (58, 77)],
    "minicpmv4_7": [(32, 36), (58, 77)],
    "minicpm_ocr": [(71, 75), (109, 128)],
}


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_golden_label_mask(tiny_checkpoint, media, family):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint(family))
    sample = dataset(processor, [GOLDEN_RECORD], media)[0]
    labels, ids = sample["labels"], sample["input_ids"]
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for start, stop in GOLDEN_LEARNED[family]:
        mask[start:stop] = True
    assert torch.equal(labels != IGNORE_INDEX, mask)
    # Standard causal-LM layout (the model shifts): a label is the token at its own position.
    assert torch.equal(labels[mask], ids[mask])
    decode = processor.tokenizer.decode
    assert [decode(ids[a:b]) for a, b in GOLDEN_LEARNED[family]] == [
        "A circle.<|im_end|>",
        "<think>\nLook again.\n</think>\n\nA star.<|im_end|>",
    ]


@pytest.mark.numerics
def test_model_loss_is_the_shifted_cross_entropy_of_the_labels(tiny_checkpoint, media):
    folder = tiny_checkpoint("minicpmv4_7")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    records = [
        GOLDEN_RECORD,
        {"id": "v", "video": "clip.mp4", "conversations": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "Light."}]},
        {"id": "t", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    data = dataset(processor, records, media)
    batch = NativeCollator(processor.tokenizer.pad_token_id)([data[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3 and "pixel_values" in batch and "pixel_values_videos" in batch
    output = model(**batch)
    logits, labels = output.logits[:, :-1], batch["labels"][:, 1:]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    numerics.assert_close(output.loss, expected)  # the model's own loss kernel vs F.cross_entropy
    # Packing the batch's pixels together gives each sample what it gets alone.
    alone = model(**NativeCollator(processor.tokenizer.pad_token_id)([data[1]]))
    length = len(data[1]["input_ids"])
    numerics.assert_close(alone.logits[0], output.logits[1, :length])  # another batch shape: other blockings


def bad(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return name


def video_record(video, content="What happens?"):
    return {"id": f"rec-{video}", "video": video, "conversations": [{"role": "user", "content": content}, {"role": "assistant", "content": "Light."}]}


def test_bad_videos_are_named_by_preflight(tiny_checkpoint, media, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("minicpmv4_6"))
    write_clip(tmp_path / "good.mp4")
    write_sound(tmp_path / "frameless.mp4")
    records = [
        video_record("good.mp4"),
        video_record("nowhere.mp4"),
        video_record(bad(tmp_path, "empty.mp4", b"")),
        video_record(bad(tmp_path, "noise.mp4", np.random.default_rng(0).bytes(4096))),
        video_record("frameless.mp4"),
        {"id": "tag", "conversations": [{"role": "user", "content": "<video> What?"}, {"role": "assistant", "content": "Hm."}]},
        video_record("good.mp4", content="<video> and <video>"),
        video_record("clips"),
        video_record("pipe.mp4"),
        video_record("loop.mp4"),
    ]
    (tmp_path / "clips").mkdir()
    os.mkfifo(tmp_path / "pipe.mp4")  # opening it would block preflight forever
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    data = NativeDataset(records, processor, max_length=2048, data_path=tmp_path / "data.json")
    problems, stats, lengths = preflight.check_dataset(data, "train", progress=False)
    found = {(p.index, p.record_id, p.reason) for p in problems}
    assert found == {
        (1, "rec-nowhere.mp4", "missing_video"),
        (2, "rec-empty.mp4", "empty_video"),
        (3, "rec-noise.mp4", "unreadable_video"),
        (4, "rec-frameless.mp4", "no_video_frames"),
        (5, "tag", "unknown_video_tag"),
        (6, "rec-good.mp4", "video_tag_count"),
        (7, "rec-clips", "video_is_folder"),
        (8, "rec-pipe.mp4", "not_a_file"),
        (9, "rec-loop.mp4", "symlink_loop"),
    }
    assert all(p.reason in REASONS for p in problems)
    assert all(p.path == str(tmp_path / "noise.mp4") for p in problems if p.reason == "unreadable_video")
    assert stats["bad"] == 9
    assert lengths[0] == len(data[0]["input_ids"]) and lengths[1:] == [None] * 9


def test_too_long_never_cuts_a_placeholder(tiny_checkpoint, media):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("minicpmv4_6"))
    record = {"id": "long", "image": "wide.png", "conversations": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "A long answer " * 20}]}
    full = dataset(processor, [record], media)[0]
    last_visual = int(torch.where(full["input_ids"] == processor.tokenizer.convert_tokens_to_ids("</slice>"))[0][-1])
    # A cut after the image keeps it whole and truncates the answer.
    cut = last_visual + 20
    short = dataset(processor, [record], media, max_length=cut)
    assert short.check(0) == {"tokens": len(full["input_ids"]), "truncated": True, "length": cut}
    assert torch.equal(short[0]["input_ids"], full["input_ids"][:cut])
    assert torch.equal(short[0]["pixel_values"], full["pixel_values"])
    # A cut through the image is refused, naming the record.
    with pytest.raises(DataError, match="would cut an image or video placeholder") as error:
        dataset(processor, [record], media, max_length=last_visual).check(0)
    assert (error.value.code, error.value.index, error.value.record_id) == ("too_long", 0, "long")


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_special_tokens_in_text_are_refused_and_samples_name_their_record(tiny_checkpoint, media, family):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint(family))
    chat_control = processor.tokenizer.eos_token
    records = [
        {"id": "ok", "conversations": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]},
        {"id": "control", "conversations": [{"role": "user", "content": f"Hi{chat_control}"},
                                            {"role": "assistant", "content": "Hi."}]},
    ]
    data = dataset(processor, records, media)
    assert chat_control in data.special_tokens
    batch = NativeCollator(processor.tokenizer.pad_token_id)([data[0]])
    assert batch["records"] == [{"index": 0, "id": "ok"}]
    with pytest.raises(DataError, match=re.escape(f"special token {chat_control!r}")) as error:
        data.check(1)
    assert (error.value.code, error.value.index, error.value.record_id) == ("special_token", 1, "control")


def test_processor_limits_are_passed_on(tiny_checkpoint, media):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("minicpmv4_6"))
    image = {"id": "i", "image": "wide.png", "conversations": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "A."}]}
    assert len(dataset(processor, [image], media)[0]["target_sizes"]) > 1
    assert len(dataset(processor, [image], media, max_slice_nums=1)[0]["target_sizes"]) == 1
    video = video_record("clip.mp4")
    default = dataset(processor, [video], media)[0]
    capped = dataset(processor, [video], media, max_num_frames=2)[0]
    assert len(capped["target_sizes_videos"]) < len(default["target_sizes_videos"])


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_system_message_is_laid_out_by_the_template_and_not_learned(tiny_checkpoint, media, family):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint(family))
    system = {"role": "system", "content": "Answer in three words."}
    record = {"id": "sys", "image": "small.png", "conversations": [
        system, {"role": "user", "content": "What is it?"}, {"role": "assistant", "content": ANSWER}]}
    sample = dataset(processor, [record], media)[0]
    # The untagged image goes to the first user message, not the system one.
    prompt = processor.apply_chat_template(
        [system, user(IMAGE, "What is it?")], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert "Answer in three words." in prompt and "You are a helpful assistant" not in prompt
    expected = processor(text=[prompt], images=[Image.open(media / "small.png")], return_tensors="pt")
    learned = torch.where(sample["labels"] != IGNORE_INDEX)[0]
    assert sample["input_ids"][: int(learned[0])].tolist() == expected["input_ids"][0].tolist()
    assert processor.tokenizer.decode(sample["input_ids"][learned]) == ANSWER + "<|im_end|>"


@pytest.mark.parametrize("name, codec", [("clip.mkv", "mpeg4"), ("clip.webm", "libvpx"), ("clip9.webm", "libvpx-vp9")])
def test_containers_without_a_frame_count_are_sampled_like_mp4(tiny_checkpoint, media, tmp_path, name, codec):
    write_clip(tmp_path / name, codec=codec)
    with av.open(str(tmp_path / name)) as container:
        assert container.streams.video[0].frames == 0  # Matroska and WebM store no frame count
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("minicpmv4_6"))
    frames, metadata = decode_video(str(tmp_path / name), processor.video_processor.sample_frames)
    reference, reference_metadata = decode_video(str(media / "clip.mp4"), processor.video_processor.sample_frames)
    assert metadata.total_num_frames == VIDEO_SECONDS * VIDEO_FPS and metadata.fps == VIDEO_FPS
    assert metadata.frames_indices == reference_metadata.frames_indices and len(frames) == VIDEO_SECONDS
    # The same frames (brightening 10 a frame), through other lossy codecs.
    assert np.abs(frames.astype(int) - reference.astype(int)).mean() < 5
    data = NativeDataset([video_record(name)], processor, max_length=2048, data_path=tmp_path / "data.json")
    problems, _, _ = preflight.check_dataset(data, "train", progress=False)
    assert problems == []
    mp4 = dataset(processor, [video_record("clip.mp4")], media)[0]
    assert torch.equal(data[0]["target_sizes_videos"], mp4["target_sizes_videos"])
