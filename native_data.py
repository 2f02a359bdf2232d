"""Records -> inputs of a native MiniCPM-V (4.6, 4.7, MiniCPM-OCR) through the checkpoint's own processor.

The native models ship in transformers with a processor that lays out tokens and pixels itself:
image slicing, ``<|image_pad|>`` / ``<|video_pad|>`` expansion, image ids, frame sampling, the chat
template. This module re-implements none of that. A record (the README's format, the same as for
the remote-code families, plus an optional ``"video"``) becomes chat messages whose content is a
list of parts, ``{"type": "image"}`` / ``{"type": "video"}`` where the tags stood; the processor's
chat template renders them and the processor turns the text, images and video frames into
``input_ids``, ``attention_mask`` (and ``mm_token_type_ids`` for 4.7), ``pixel_values`` /
``target_sizes`` and ``pixel_values_videos`` / ``target_sizes_videos``.

Labels use the standard causal-LM layout, ``labels[i] = input_ids[i]`` where token ``i`` is learned,
because these models shift inside their own loss. (The remote-code families' dataset builds labels
already shifted by one, the reference fine-tuner's layout; see dataset.shifted_labels.) Learned are
each assistant turn's content, its think block where the record has one, and the ``<|im_end|>``
that ends the turn -- the same spans as dataset.render_qwen.

Videos are decoded with PyAV; which frames is the video processor's own ``sample_frames``.
"""

import functools
import logging
import re

import av
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers.video_utils import VideoMetadata

from dataset import (
    IGNORE_INDEX,
    LITERAL_TAG_HINT,
    MULTI_IMAGE_TAG,
    SINGLE_IMAGE_TAG,
    DataError,
    RecordDataset,
    chatml_assistant_spans,
    context_flags,
    open_image,
    record_images,
    regular_file_size,
    wants_thinking,
)

logger = logging.getLogger(__name__)

VIDEO_TAG = "<video>"
MEDIA_TAG = re.compile(rf"({SINGLE_IMAGE_TAG}|{MULTI_IMAGE_TAG.pattern}|{VIDEO_TAG})")


class VideoProblem(Exception):
    """A video file that cannot be used; ``code`` as in DataError."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def validate_video(record, index, *, data_path=None):
    """The video part of a record's structure: ``"video"`` a path; ``<video>`` at most once, in a
    user message, and only when there is a video."""
    record_id = record.get("id")

    def fail(code, reason):
        raise DataError(reason, index=index, record_id=record_id, data_path=data_path, code=code)

    video = record.get("video")
    if video is not None and (not isinstance(video, str) or not video):
        fail("bad_video_field", f"'video' must be a path, got {video!r:.80}")
    tagged = [n for n, m in enumerate(record["conversations"]) if VIDEO_TAG in m["content"]]
    if video is None and tagged:
        fail("unknown_video_tag", "a message contains <video> but the record has no 'video' path; " + LITERAL_TAG_HINT)
    if sum(m["content"].count(VIDEO_TAG) for m in record["conversations"]) > 1:
        fail("video_tag_count", "<video> appears more than once, but a record has at most one video")
    if tagged and record["conversations"][tagged[0]]["role"] != "user":
        role = record["conversations"][tagged[0]]["role"]
        article = "an" if role == "assistant" else "a"
        fail("video_in_assistant", f"<video> sits in message {tagged[0]}, {article} {role} message; put it in a user message")


def record_messages(conversations, *, image_untagged, video_untagged):
    """Chat messages with content parts: text pieces verbatim, a part per media tag.

    A record's one image or its video without a tag goes at the front of the first user message
    (video first), as a user passes ``[video, image, question]`` at inference. A system message
    (first, where validate_record allows it) stays text, as the chat template takes it.
    Returns ``(messages, media)``: ``media`` lists ``"<image>"`` / ``"<image_NN>"`` / ``"<video>"`` in
    the order the rendered text holds them, which is the order the processor pairs them with.
    """
    messages, media = [], []
    first_user = next(n for n, message in enumerate(conversations) if message["role"] == "user")
    for n, message in enumerate(conversations):
        if message["role"] != "user":
            messages.append({"role": message["role"], "content": message["content"]})
            continue
        front = []
        if n == first_user:
            front = ([VIDEO_TAG] if video_untagged else []) + ([SINGLE_IMAGE_TAG] if image_untagged else [])
        pieces = front + [piece for piece in MEDIA_TAG.split(message["content"]) if piece]
        parts = []
        for piece in pieces:
            if MEDIA_TAG.fullmatch(piece):
                parts.append({"type": "video" if piece == VIDEO_TAG else "image"})
                media.append(piece)
            else:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": parts})
    return messages, media


def count_frames(path):
    """The frames of ``path``'s first video stream, counted by decoding it: for containers that store
    no count (Matroska, WebM). Decoded, not demuxed: a packet need not be a shown frame (VP8's hidden
    alt-ref frames), and the count must be what decode_video can pick from."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def decode_video(path, sample_indices):
    """Decode the frames ``sample_indices(metadata)`` picks, as RGB ``[T, H, W, 3]``, with PyAV.

    Raises VideoProblem: missing, a folder, a symlink loop, a FIFO or device (never opened: that
    would block), empty, not a video, no frames, or frames that do not decode.
    """
    if regular_file_size(path, "video", VideoProblem) == 0:
        raise VideoProblem("empty_video", "the file is empty (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoProblem("no_video_frames", "the file has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or count_frames(path)
            fps = float(stream.average_rate or 0)
            if not fps and total and container.duration:  # no frame rate stored: frames over the duration
                fps = total / (container.duration / av.time_base)
            if not total or not fps:
                raise VideoProblem("no_video_frames", f"no frames to sample ({total} frames at {fps} fps)")
            metadata = VideoMetadata(
                total_num_frames=int(total),
                fps=fps,
                duration=total / fps,
                video_backend="pyav",
                height=stream.height,
                width=stream.width,
            )
            indices = [int(i) for i in sample_indices(metadata=metadata)]
            wanted, frames = set(indices), {}
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted:
                    frames[number] = frame.to_ndarray(format="rgb24")
                if number >= indices[-1]:
                    break
    except av.error.FFmpegError as e:
        raise VideoProblem("unreadable_video", f"PyAV cannot decode it: {e}") from e
    missing = sorted(wanted - set(frames))
    if missing:
        raise VideoProblem(
            "unreadable_video", f"frames {missing[:5]} of {metadata.total_num_frames} could not be decoded (truncated?)"
        )
    metadata.frames_indices = indices
    return np.stack([frames[i] for i in indices]), metadata


class NativeDataset(RecordDataset):
    """Records -> a native model's inputs through its processor. See the module docstring.

    ``max_slice_nums`` goes to the image processor; ``max_num_frames`` and ``stack_frames`` to the
    video processor (None: the processor's own defaults). Offers ``check(index)`` like
    dataset.SupervisedDataset, so preflight runs over it unchanged.
    """

    def __init__(
        self,
        records,
        processor,
        *,
        max_length,
        image_root=None,
        data_path=None,
        max_slice_nums=None,
        max_num_frames=None,
        stack_frames=None,
    ):
        super().__init__(records, max_length=max_length, image_root=image_root, data_path=data_path)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.takes_system = True  # the native models' ChatML templates take a system message first
        self.images_kwargs = {} if max_slice_nums is None else {"max_slice_nums": max_slice_nums}
        self.videos_kwargs = {
            key: value
            for key, value in (("max_num_frames", max_num_frames), ("stack_frames", stack_frames))
            if value is not None
        }
        t = self.tokenizer
        # Message text must not hold these: the processor would take them for placeholders.
        # (<image> is the image-start token too, but in a record it is the image tag.)
        self.reserved_tokens = tuple(
            token
            for token in (t.image_token, t.video_token, t.image_end_token, t.slice_start_token, t.slice_end_token,
                          t.image_id_start_token, t.image_id_end_token)
            if token
        )
        self.special_tokens = self.special_tokens_of(t)
        # The ids of every token a visual placeholder is made of: a cut must not fall before any.
        self.media_ids = torch.tensor(
            [t.convert_tokens_to_ids(token) for token in self.reserved_tokens + (t.image_start_token,)]
        )

    def __getitem__(self, index):
        sample, _ = self._checked_build(index, True)
        return sample

    def check_settings(self):
        # The processor's settings (image and video processors, chat template) as it would save them.
        return super().check_settings() | dict(processor=self.processor.to_json_string(), images=self.images_kwargs,
                                               videos=self.videos_kwargs)

    def check(self, index):
        """Build record ``index`` as training does (every image and the video decoded).

        Raises DataError if the record is unusable; else returns ``{"tokens", "truncated", "length"}``
        (length: as trained, after truncation).
        """
        _, full_length = self._checked_build(index, False)
        return {
            "tokens": full_length,
            "truncated": full_length > self.max_length,
            "length": min(full_length, self.max_length),
        }

    def validate(self, record, index):
        super().validate(record, index)
        validate_video(record, index, data_path=self.data_path)

    def _open_image(self, path):
        """The decoded image in its own mode: the processor converts it (transformers' convert_to_rgb,
        transparency composited onto white), as it does at inference."""
        return open_image(path)

    def _load_video(self, index, record):
        full_path = self._full_path(record["video"])
        sample = functools.partial(self.processor.video_processor.sample_frames, **self.videos_kwargs)
        try:
            return decode_video(full_path, sample)
        except VideoProblem as e:
            raise self._error(
                index, record, f"cannot load video from {full_path}: {e}", path=full_path, code=e.code
            ) from e

    def _build(self, record, index, log_truncation):
        """``(sample, length before truncation)``."""
        conversations = record["conversations"]
        paths = record_images(record)
        image_untagged = SINGLE_IMAGE_TAG in paths and not any(SINGLE_IMAGE_TAG in m["content"] for m in conversations)
        video_untagged = "video" in record and not any(VIDEO_TAG in m["content"] for m in conversations)
        messages, media = record_messages(
            conversations, image_untagged=image_untagged, video_untagged=video_untagged
        )
        images = [self._load_image(index, record, tag, paths[tag]) for tag in media if tag != VIDEO_TAG]
        videos = metadata = None
        if "video" in record:
            frames, video_metadata = self._load_video(index, record)
            videos, metadata = [frames], [video_metadata]

        assistants = [m["content"] for m in conversations if m["role"] == "assistant"]
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, enable_thinking=wants_thinking(assistants)
        )
        spans = chatml_assistant_spans(text, assistants)
        inputs = self.processor(
            text=[text],
            images=images or None,
            videos=videos,
            video_metadata=metadata,
            do_sample_frames=False,  # decode_video sampled them with the processor's own sample_frames
            images_kwargs=self.images_kwargs,
            videos_kwargs=self.videos_kwargs,
            padding=False,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_tensors="pt",
        )
        # The processor expanded each placeholder in the text before tokenizing; move the learned
        # spans (which hold no placeholder: media sit in user messages) by the growth before them.
        replacements = inputs.pop("text_replacement_offsets")[0]

        def expanded(position):
            return position + sum(
                (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
                for r in replacements
                if r["span"][1] <= position
            )

        context = context_flags(inputs.pop("offset_mapping")[0].tolist(), [(expanded(a), expanded(b)) for a, b in spans])
        sample = {key: value[0] for key, value in inputs.items() if key in ("input_ids", "attention_mask", "mm_token_type_ids")}
        ids = sample["input_ids"]
        labels = torch.where(context == 0, ids, IGNORE_INDEX)
        sample["labels"] = labels

        full_length = len(ids)
        if full_length > self.max_length:
            media_positions = torch.where(torch.isin(ids, self.media_ids))[0]
            if len(media_positions) and int(media_positions[-1]) >= self.max_length:
                raise self._error(
                    index,
                    record,
                    f"{full_length} tokens: max_length {self.max_length} would cut an image or video placeholder "
                    f"(its tokens run to {int(media_positions[-1])}); raise model_max_length or shorten the record",
                    code="too_long",
                )
            if log_truncation:
                logger.warning(
                    "record %d (id %r) of %s: %d tokens truncated to max_length %d",
                    index, record.get("id"), self.data_path, full_length, self.max_length,
                )
            sample = {key: value[: self.max_length] for key, value in sample.items()}
        if not (sample["labels"] != IGNORE_INDEX).any():
            after = f" after truncation to max_length {self.max_length}" if full_length > self.max_length else ""
            raise self._error(index, record, f"no learnable token left{after}", code="no_learnable_tokens")
        for key in ("pixel_values", "target_sizes", "pixel_values_videos", "target_sizes_videos"):
            if key in inputs:
                sample[key] = inputs[key]
        sample["record"] = {"index": index, "id": record.get("id")}  # names the record if its loss goes bad
        return sample, full_length


class NativeCollator:
    """Right-pads token sequences; packs every sample's pixels into one NaViT sequence.

    The native models take all images of a batch as one ``[1, 3, patch, total]`` tensor with a
    ``target_sizes`` row per image or slice, in the order their placeholders appear in the batch
    (sample by sample), which is concatenation in sample order.
    """

    PAD = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        batch = {}
        for key, value in self.PAD.items():
            if key in examples[0]:
                value = self.pad_token_id if value is None else value
                batch[key] = pad_sequence([e[key] for e in examples], batch_first=True, padding_value=value)
        for pixels, sizes in (("pixel_values", "target_sizes"), ("pixel_values_videos", "target_sizes_videos")):
            present = [e for e in examples if pixels in e]
            if present:
                batch[pixels] = torch.cat([e[pixels] for e in present], dim=-1)
                batch[sizes] = torch.cat([e[sizes] for e in present], dim=0)
        batch["records"] = [e["record"] for e in examples]
        return batch
