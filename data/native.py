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
that ends the turn -- the same spans as data.layouts.render_qwen.

Videos are decoded with PyAV (data/media.py); which frames is the video processor's own ``sample_frames``.
"""

import functools
import logging
import re

import torch
from torch.nn.utils.rnn import pad_sequence

from data.errors import MediaProblem
from data.layouts import chatml_assistant_spans, context_flags, wants_thinking
from data.media import decode_video, open_image
from data.records import IGNORE_INDEX, RecordDataset
from data.preference import PreferencePairs
from data.schema import MULTI_IMAGE_TAG, PREFERENCE_ANSWERS, SINGLE_IMAGE_TAG, VIDEO_TAG, record_images, validate_video
from data.shipping import ShippedBatch

logger = logging.getLogger(__name__)

MEDIA_TAG = re.compile(rf"({SINGLE_IMAGE_TAG}|{MULTI_IMAGE_TAG.pattern}|{VIDEO_TAG})")
# The model inputs of a sample's images and video frames (the collator packs them).
PIXEL_KEYS = ("pixel_values", "target_sizes", "pixel_values_videos", "target_sizes_videos")
# Where rows of a batch share an earlier row's images (a group's later rows: a preference pair's
# rejected row, GRPO's answers after the first), they carry the images' patch grids (target_sizes:
# the model lays out every row's positions by them, 4.7's M-RoPE) but not the pixels; the collator
# then gives the grids of the pixels it holds under this key, for the vision tower (NativeFamily.forward).
ENCODED_SIZES = "encoded_target_sizes"


def prompt_length(sample):
    """Where a sample's answer starts (labels are not shifted: its first learned position)."""
    return int((sample["labels"] != IGNORE_INDEX).nonzero()[0])


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
        except MediaProblem as e:
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
        self._refuse_truncation(index, record, full_length)
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
        for key in PIXEL_KEYS:
            if key in inputs:
                sample[key] = inputs[key]
        sample["record"] = {"index": index, "id": record.get("id")}  # names the record if its loss goes bad
        return sample, full_length


class NativeCollator:
    """Right-pads token sequences; packs every sample's pixels into one NaViT sequence.

    The native models take all images of a batch as one ``[1, 3, patch, total]`` tensor with a
    ``target_sizes`` row per image or slice, in the order their placeholders appear in the batch
    (sample by sample), which is concatenation in sample order. The batch is a ShippedBatch: from a
    DataLoader worker, its tensors travel as one block (data/shipping.py).
    """

    PAD = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        batch = ShippedBatch()
        for key, value in self.PAD.items():
            if key in examples[0]:
                value = self.pad_token_id if value is None else value
                batch[key] = pad_sequence([e[key] for e in examples], batch_first=True, padding_value=value)
        for pixels, sizes in (("pixel_values", "target_sizes"), ("pixel_values_videos", "target_sizes_videos")):
            present = [e for e in examples if pixels in e]
            if present:
                batch[pixels] = torch.cat([e[pixels] for e in present], dim=-1)
                batch[sizes] = torch.cat([e[sizes] for e in present], dim=0)
        sharing = [e for e in examples if "target_sizes" in e and "pixel_values" not in e]
        if sharing:
            batch[ENCODED_SIZES] = batch["target_sizes"]
            batch["target_sizes"] = torch.cat([e["target_sizes"] for e in examples if "target_sizes" in e], dim=0)
        batch["records"] = [e["record"] for e in examples]
        return batch


class NativePreferenceDataset(PreferencePairs, NativeDataset):
    """Preference records -> ``{"chosen": sample, "rejected": sample}``: each the SFT sample of the
    prompt with that answer (NativeDataset: the answer and its ``<|im_end|>`` labelled), the pair
    never truncated (``pair_too_long``). Only the chosen sample keeps the pixels; the rejected one
    keeps their grids, ``target_sizes`` (see ENCODED_SIZES), and has the same prompt (checked:
    ``prompts_differ``): the trainer encodes the images once per pair (NativeFamily.forward with
    ``group=2``). A video record is refused (``video_preference``): that grouped forward shares
    images only."""

    def validate(self, record, index):
        super().validate(record, index)
        if "video" in record:
            raise self._error(index, record, "--stage dpo takes preference records with images or text only, not "
                              "a video: each pair's vision features are shared by its two answers, and that "
                              "is done for images only", code="video_preference")

    def __getitem__(self, index):
        pair = self._same_prompt(index, True)
        chosen, rejected = (pair[key][0] for key in PREFERENCE_ANSWERS)
        return {"chosen": chosen, "rejected": {k: v for k, v in rejected.items() if k != "pixel_values"}}

    def check(self, index):
        """As NativeDataset.check, of the pair's longer row (the collator pads both to it)."""
        tokens = max(length for _, length in self._same_prompt(index, False).values())
        return {"tokens": tokens, "truncated": False, "length": tokens}

    def _same_prompt(self, index, *args):
        pair = self._pair(index, *args)
        prompts = [sample["input_ids"][: prompt_length(sample)] for sample, _ in pair.values()]
        if not torch.equal(*prompts):
            raise self._error(
                index, self.records[index],
                "the chosen and the rejected answer lay out different prompts (the chat template renders the prompt "
                "by its answers: a think block in one answer and not the other?); give both answers the same form",
                code="prompts_differ")
        return pair


class NativePreferenceCollator(NativeCollator):
    """Batches B pairs as 2B rows, each pair's chosen row then its rejected row (which carries the
    images' grids but not their pixels: ENCODED_SIZES): a group of 2 answers to one prompt, as
    NativeFamily.answered_batch lays them out and ``forward(..., group=2)`` takes them."""

    def __call__(self, examples):
        return super().__call__([example[key] for example in examples for key in PREFERENCE_ANSWERS])
