"""Records -> tensors for MiniCPM-V fine-tuning. Never loads a model.

A record is ``{"id", "image", "conversations": [{"role", "content"}, ...]}`` where ``image`` is
a path (one image, tagged ``<image>``), a dict ``{"<image_00>": path, ...}`` (several images),
or absent (text only). ``SupervisedDataset`` turns a record into what the model's
``forward(data=...)`` reads: token ids with each image's placeholder spliced in, labels
shifted by one like the reference fine-tuner, ``image_bound`` pairs pointing at each
placeholder's query slots, and the image tensors (sliced like the model's own processor).

Placeholder ids are built directly: the conversation is rendered and tokenized with each
query run left out (``<image></image>`` instead of ``<image><unk>*64</image>``), then the runs
of ``unk`` ids are inserted after every opening token. Query runs sit between special tokens,
which the tokenizer splits on before anything else, so the ids equal those of the full string
(a test checks this for every family) at a fraction of the tokenizing cost.
"""

import json
import logging
import math
import os
import re

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LLM_TYPES = ("minicpm", "llama3", "qwen")
ROLES = ("user", "assistant")
MULTI_IMAGE_TAG = re.compile(r"<image_\d+>")
SINGLE_IMAGE_TAG = "<image>"
THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
# What a Qwen3-style template writes into the last assistant turn when it has no think block.
EMPTY_THINK = "<think>\n\n</think>\n\n"


class DataError(ValueError):
    """A record that cannot become a training sample.

    ``path`` is the file at fault: the image that failed to load, else the data file.
    """

    def __init__(self, reason, *, index=None, record_id=None, path=None, data_path=None):
        self.index = index
        self.record_id = record_id
        self.reason = reason
        self.path = path if path is not None else data_path
        self.data_path = data_path
        where = f"record {index} (id {record_id!r})"
        if data_path is not None:
            where += f" of {data_path}"
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------------------------
# Loading and structure checks


def load_records(path):
    """Read a data file: ``.json`` holding a list of records, or ``.jsonl`` (one per line)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = []
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"line {line_no} is not valid JSON: {e}", index=len(records), data_path=path) from e
            return records
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e}", data_path=path) from e
    if not isinstance(records, list):
        raise DataError(f"a .json data file must hold a list of records, got {type(records).__name__}", data_path=path)
    return records


def record_images(record):
    """The record's images as ``{tag: path}`` (``{}`` for a text-only record), unchecked."""
    image = record.get("image")
    if image is None:
        return {}
    if isinstance(image, str):
        return {SINGLE_IMAGE_TAG: image}
    return dict(image)


def validate_record(record, index, *, data_path=None, reserved_tokens=()):
    """Check a record's structure (no files opened); raise DataError naming it if it is unusable.

    ``reserved_tokens``: strings of the tokenizer's image tokens other than ``<image>``
    (``</image>``, ``<slice>``, ``<unk>``, ...), which must not appear in message text.
    """
    record_id = record.get("id") if isinstance(record, dict) else None

    def fail(reason):
        raise DataError(reason, index=index, record_id=record_id, data_path=data_path)

    if not isinstance(record, dict):
        fail(f"a record must be a JSON object, got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        fail("'conversations' must be a list of at least two messages")
    for n, message in enumerate(conversations):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            fail(f"message {n} must be an object with role 'user' or 'assistant', got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            fail(f"message {n} ({message['role']}) has no text 'content'")
    if conversations[0]["role"] != "user":
        fail(f"the first message must come from 'user', not {conversations[0]['role']!r}")
    if not any(m["role"] == "assistant" for m in conversations):
        fail("no assistant message: nothing to learn")

    image = record.get("image")
    if image is not None and not isinstance(image, (str, dict)):
        fail(f"'image' must be a path or a dict of <image_NN> -> path, got {type(image).__name__}")
    if isinstance(image, dict):
        if not image:
            fail("'image' is an empty dict")
        for tag, path in image.items():
            if not MULTI_IMAGE_TAG.fullmatch(tag):
                fail(f"image key {tag!r} is not of the form <image_NN>")
            if not isinstance(path, str) or not path:
                fail(f"image {tag} has no path")
    elif isinstance(image, str) and not image:
        fail("'image' is an empty path")

    for n, message in enumerate(conversations):
        for token in reserved_tokens:
            if token in message["content"]:
                fail(f"message {n} contains the reserved image token {token!r}")
    singles = [n for n, m in enumerate(conversations) if SINGLE_IMAGE_TAG in m["content"]]
    if isinstance(image, str):
        if sum(m["content"].count(SINGLE_IMAGE_TAG) for m in conversations) > 1:
            fail("<image> appears more than once, but the record has one image")
        if singles and conversations[singles[0]]["role"] != "user":
            fail(f"<image> sits in message {singles[0]}, an assistant message; put it in a user message")
    elif singles:
        fail("a message contains <image> but the record has no single 'image' path")
    used = [tag for m in conversations for tag in MULTI_IMAGE_TAG.findall(m["content"])]
    if isinstance(image, dict):
        unknown = sorted(set(used) - set(image))
        if unknown:
            fail(f"{', '.join(unknown)} not found among the record's images {sorted(image)}")
        unused = sorted(set(image) - set(used))
        if unused:
            fail(f"image {', '.join(unused)} is never referenced in the conversation")
        repeated = sorted({tag for tag in used if used.count(tag) > 1})
        if repeated:
            fail(f"image {', '.join(repeated)} is referenced more than once")
    elif used:
        fail(f"{used[0]} appears but the record has no image dict")


# --------------------------------------------------------------------------------------------
# Slicing: must match the model's own image processor exactly.


def ensure_divide(length, patch_size):
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(original_size, scale_resolution, patch_size, allow_upscale=False):
    width, height = original_size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(original_size, grid, scale_resolution, patch_size, allow_upscale=False):
    width, height = original_size
    grid_x, grid_y = grid
    refine_width = ensure_divide(width, grid_x)
    refine_height = ensure_divide(height, grid_y)
    slice_width, slice_height = find_best_resize(
        (refine_width / grid_x, refine_height / grid_y), scale_resolution, patch_size, allow_upscale=allow_upscale
    )
    return slice_width * grid_x, slice_height * grid_y


def best_grid(size, max_slice_nums, scale_resolution):
    """The ``[cols, rows]`` grid the image is cut into, or None when it is not sliced."""
    width, height = size
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [[m, n // m] for n in counts for m in range(1, n + 1) if n % m == 0]
    log_ratio = math.log(width / height)
    # min() keeps the first of equal errors, like the processor's strict "<" scan.
    return min(candidates, key=lambda grid: abs(log_ratio - math.log(grid[0] / grid[1])))


def slice_image(image, max_slice_nums, scale_resolution, patch_size):
    """Return ``(source_image, rows_of_slices)``; ``rows_of_slices`` is ``[]`` when not sliced."""
    grid = best_grid(image.size, max_slice_nums, scale_resolution)
    if grid is None:
        size = find_best_resize(image.size, scale_resolution, patch_size, allow_upscale=True)
        return image.resize(size, Image.Resampling.BICUBIC), []
    source = image.resize(find_best_resize(image.size, scale_resolution, patch_size), Image.Resampling.BICUBIC)
    refine_size = get_refine_size(image.size, grid, scale_resolution, patch_size, allow_upscale=True)
    refined = image.resize(refine_size, Image.Resampling.BICUBIC)
    cols, rows = grid
    slice_w, slice_h = refine_size[0] // cols, refine_size[1] // rows
    slices = [
        [refined.crop((c * slice_w, r * slice_h, (c + 1) * slice_w, (r + 1) * slice_h)) for c in range(cols)]
        for r in range(rows)
    ]
    return source, slices


def reshape_by_patch(image, patch_size):
    """``[3, H, W]`` -> ``[3, patch, H*W/patch]``: patches in raster order, side by side.

    Element ``[c, i, k * patch + j]`` is pixel ``(i, j)`` of patch ``k`` -- the layout of the
    model processor's ``reshape_by_patch`` (``unfold`` + permute), written as one view.
    """
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    patches = image[:, : rows * patch_size, : cols * patch_size].reshape(channels, rows, patch_size, cols, patch_size)
    return patches.permute(0, 2, 1, 3, 4).reshape(channels, patch_size, -1)
