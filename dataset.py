"""Records -> tensors for MiniCPM-V fine-tuning. Never loads a model.

A record is ``{"id", "image", "conversations": [{"role", "content"}, ...]}`` where ``image`` is
a path (one image, tagged ``<image>``), a dict ``{"<image_00>": path, ...}`` (several images),
or absent (text only). ``SupervisedDataset`` turns a record into what the model's
``forward(data=...)`` reads: token ids with each image's placeholder spliced in, labels
shifted by one like the reference fine-tuner, ``image_bound`` pairs pointing at each
placeholder's query slots, and the image tensors (sliced like the model's own processor): raw
uint8 pixels, which ``model_pixels`` normalises where the batch meets the model.

Placeholder ids are built directly: the conversation is rendered and tokenized with each
query run left out (``<image></image>`` instead of ``<image><unk>*64</image>``), then the runs
of ``unk`` ids are inserted after every opening token. Query runs sit between special tokens,
which the tokenizer splits on before anything else, so the ids equal those of the full string
(a test checks this for every family) at a fraction of the tokenizing cost.
"""

import array
import bisect
import difflib
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, Subset
from torchvision import transforms

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LLM_TYPES = ("minicpm", "llama3", "qwen")
ROLES = ("user", "assistant")
MULTI_IMAGE_TAG = re.compile(r"<image_\d+>")
SINGLE_IMAGE_TAG = "<image>"
THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
# Special tokens that are content, not structure, and so may appear in message text: the
# grounding markup MiniCPM-V reads and writes (<ref>cat</ref><box>...</box>) and the thinking
# block of MiniCPM-V 4.5's answers.
CONTENT_MARKUP = frozenset(
    ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>", "<think>", "</think>")
)
# What a Qwen3-style template writes into the last assistant turn when it has no think block.
EMPTY_THINK = "<think>\n\n</think>\n\n"

# MiniCPM-V's placeholder tokens: the same strings in every family's vocabulary. Their ids come
# from the vocabulary, never from tokenizer attributes: the published tokenizer classes differ in
# which they define (2.5 has no slice_end_id, no im_id_start; see
# tiny_models/published_remote_code.json).
IMAGE_START, IMAGE_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
IMAGE_ID_START, IMAGE_ID_END = "<image_id>", "</image_id>"
# Ends every Llama-3 turn; learned after the last assistant token.
LLAMA3_END_OF_TURN = "<|eot_id|>"


class DataError(ValueError):
    """A record that cannot become a training sample.

    ``path`` is the file at fault: the image that failed to load, else the data file.
    ``code`` is a stable short name of the kind of problem (``missing_image``,
    ``no_assistant_turn``, ...; see ``preflight.REASONS``), for summaries and reports.
    """

    def __init__(self, reason, *, index=None, record_id=None, path=None, data_path=None, code="invalid_record"):
        self.index = index
        self.record_id = record_id
        self.reason = reason
        self.code = code
        self.path = path if path is not None else data_path
        self.data_path = data_path
        where = [] if index is None else [f"record {index} (id {record_id!r})"]
        if data_path is not None:
            where.append(os.fspath(data_path))
        super().__init__(f"{' of '.join(where)}: {reason}")


# --------------------------------------------------------------------------------------------
# Loading and structure checks


class BadLine:
    """A line of a ``.jsonl`` file that is not valid JSON, kept in its record's place.

    Validation reports it as that record's problem (``invalid_json``), so preflight lists it
    with the others and ``--skip_bad_samples`` can drop it like any bad record.
    """

    def __init__(self, line_no, error):
        self.line_no = line_no
        self.error = error

    def __repr__(self):
        return f"<line {self.line_no}: not valid JSON>"


def not_utf8(path, raw, error, offset=0):
    """The DataError of a data file whose bytes ``raw`` (at ``offset`` in the file) are not UTF-8."""
    guess = " (it starts with a UTF-16 byte-order mark)" if offset == 0 and raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return DataError(
        f"not UTF-8 text{guess}: byte {raw[error.start]:#04x} at offset {offset + error.start} ({error.reason}); "
        "save the file as UTF-8",
        data_path=path,
        code="bad_encoding",
    )


def unreadable(path, error):
    return DataError(f"cannot read the file: {error.strerror or error}", data_path=path, code="unreadable_file")


def read_text(path):
    """The text of a data file: UTF-8, with or without a byte-order mark, else a DataError saying why."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise unreadable(path, e) from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise not_utf8(path, raw, e) from e


# File names read as JSON Lines (compared in lower case); any other is one JSON document.
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
UTF8_BOM = b"\xef\xbb\xbf"


def is_json_lines(path):
    return os.fspath(path).lower().endswith(JSON_LINES_SUFFIXES)


class JsonLines:
    """The records of a JSON Lines file, read on demand: a sequence (``len``, ``[index]``) that holds
    each record's byte offset and line number, not the records, so memory does not grow with the
    file's text. Indexing reads one line and parses it; a line that is not valid JSON comes back
    as a ``BadLine`` in its record's place.

    Lines end at ``\n`` (``\r\n`` too) only: U+2028, U+0085 and the other characters that
    ``str.splitlines()`` also cuts at are legal, unescaped, inside JSON strings. Blank lines are
    no records. The whole file is checked to be UTF-8 (a BOM is allowed) when indexed, as
    ``read_text`` checks a ``.json`` file. A copy sent to another process (a pickle) reopens the
    file there.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        # Compact arrays, 16 bytes a record, from the start: Python ints in lists would take about 70.
        offsets, line_numbers = array.array("q"), array.array("q")
        try:
            with open(self.path, "rb") as f:
                offset = 0
                for line_no, line in enumerate(f, 1):
                    start = offset
                    offset += len(line)
                    if line_no == 1 and line.startswith(UTF8_BOM):
                        line, start = line[len(UTF8_BOM):], start + len(UTF8_BOM)
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise not_utf8(self.path, line, e, start) from e
                    if text.strip():
                        offsets.append(start)
                        line_numbers.append(line_no)
        except OSError as e:
            raise unreadable(self.path, e) from e
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.line_numbers = np.frombuffer(line_numbers, dtype=np.int64)
        self._file = None

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (held for the dataset's life, reopened per process)
        self._file.seek(int(self.offsets[index]))
        line = self._file.readline().decode("utf-8")
        try:
            return parse_json(line)
        except json.JSONDecodeError as e:  # parse_json: nesting too deep to parse is one too
            return BadLine(int(self.line_numbers[index]), e)

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()


class DuplicateKeys(dict):
    """A JSON object that held a key more than once (``json.loads`` would keep the last silently);
    ``duplicate_keys`` names them. Only such objects get this type: a plain record stays a dict."""

    duplicate_keys = ()


def json_object(pairs):
    """``object_pairs_hook`` of parse_json: the object as a dict, a DuplicateKeys if a key repeats."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    obj = DuplicateKeys(pairs)
    seen = set()
    obj.duplicate_keys = tuple(sorted({key for key, _ in pairs if key in seen or seen.add(key)}))
    return obj


def parse_json(text):
    """``json.loads`` of a data file or line, noting duplicate keys (json_object); nesting too deep for
    the parser is a JSONDecodeError like any other invalid JSON, not a RecursionError."""
    try:
        return json.loads(text, object_pairs_hook=json_object)
    except RecursionError as e:
        raise json.JSONDecodeError(f"nested too deeply for the JSON parser ({e})", text, 0) from e


def load_records(path):
    """Read a data file: ``.json`` holding a list of records (held in memory), or JSON Lines
    (``.jsonl``, ``.ndjson``, in any case: one record per line, read on demand; see JsonLines).

    A file that cannot be read, is not UTF-8 or (``.json``) not a JSON list raises DataError.
    A JSON Lines line that is not valid JSON becomes a ``BadLine`` in its record's place.
    """
    path = os.fspath(path)
    if is_json_lines(path):
        return JsonLines(path)
    text = read_text(path)
    try:
        records = parse_json(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e}", data_path=path, code="invalid_json") from e
    if not isinstance(records, list):
        raise DataError(
            f"a .json data file must hold a list of records, got {type(records).__name__}", data_path=path, code="invalid_json"
        )
    return records


def record_images(record):
    """The record's images as ``{tag: path}`` (``{}`` for a text-only record), unchecked."""
    image = record.get("image")
    if image is None:
        return {}
    if isinstance(image, str):
        return {SINGLE_IMAGE_TAG: image}
    return dict(image)


def record_failure(record, index, data_path):
    """``fail(code, reason)``, raising the DataError that names ``record``, once it is known to be
    a JSON object (else that is the failure)."""
    record_id = record.get("id") if isinstance(record, dict) else None

    def fail(code, reason):
        raise DataError(reason, index=index, record_id=record_id, data_path=data_path, code=code)

    if isinstance(record, BadLine):
        fail("invalid_json", f"line {record.line_no} is not valid JSON: {record.error}")
    if not isinstance(record, dict):
        fail("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    return fail


# The keys a record and a message may hold. Any other key is reported (unknown_key): ignored, it
# would leave the record training as something other than its author meant (an 'images' list
# read as a text-only record, an image attached to a message, a top-level system prompt).
RECORD_KEYS = ("id", "image", "video", "conversations")
MESSAGE_KEYS = ("role", "content")
# Chat layouts that take a system message, as the first message (where each model's chat() puts its
# system_prompt): Llama-3's template writes any role's header, ChatML writes <|im_start|>system (2.6,
# o-2.6, 4.x, and the native models' templates). MiniCPM-V 2.0's has none: its tokenizer's
# apply_chat_template asserts user/assistant roles and its chat() takes no system prompt.
SYSTEM_LLM_TYPES = ("llama3", "qwen")
SYSTEM = "system"
# How to write, as text, a tag that would otherwise be read as an image or video.
LITERAL_TAG_HINT = (
    "to write such a tag as text (e.g. a question about HTML), break it so it is not read as one, "
    "e.g. '< image >' or '&lt;image&gt;'"
)
# Keys other tools write, and what they map to in our format.
SHAREGPT_HINT = (
    "ShareGPT/LLaVA layout: write {\"role\": \"user\", \"content\": ...} for {\"from\": \"human\", \"value\": ...} "
    "and role \"assistant\" for \"gpt\""
)
FOREIGN_RECORD_KEYS = {
    "images": "a list of images is not read: one image goes in 'image' (a path), several in 'image' as "
    "{\"<image_00>\": path, \"<image_01>\": path} with those tags in the text",
    "messages": "OpenAI layout: the messages go in 'conversations', each {\"role\", \"content\"} with text "
    "content, images as <image> tags in it and their paths in 'image'",
    "question": "an RLAIF-V-style row: the question goes in 'conversations' as the user message, with an "
    "<image> tag (README, Preference records)",
    "chosen": "a preference record: train it with --stage dpo",
    "rejected": "a preference record: train it with --stage dpo",
}
FOREIGN_MESSAGE_KEYS = {
    "from": SHAREGPT_HINT,
    "value": SHAREGPT_HINT,
    "image": "an image attached to a message is not read: put its path in the record's 'image' and an "
    "<image> tag where it goes in the text",
    "images": "images attached to a message are not read: put their paths in the record's 'image' as "
    "{\"<image_00>\": path, ...} and the <image_NN> tags where they go in the text",
}


# Keys kept on purpose (metadata such as a source) are left out by naming the ones to read.
KEEP_ON_PURPOSE = (
    ". Records that carry other keys on purpose (metadata) train when --data_columns names the keys to "
    "read, e.g. --data_columns id=id,image=image,conversations=conversations: the others are left out"
)


# What to say about a top-level 'system', by whether the chat template takes a system message.
SYSTEM_KEY_HINTS = {
    True: "put it first in 'conversations' as {\"role\": \"system\", \"content\": ...}",
    False: "this model's chat template has no system message: fold it into the first user message",
}


def check_duplicates(obj, what, fail):
    if isinstance(obj, DuplicateKeys):
        fail("duplicate_key", f"{what} holds the key(s) {', '.join(map(repr, obj.duplicate_keys))} more than "
             "once; JSON keeps only the last, so the others would be lost without a word")


def check_keys(obj, what, known, hints, fail, after=""):
    """Refuse ``obj`` (a record or a message) if it repeats a key or holds one that is not read; each
    such key is named with the mapping of a known foreign layout (``hints``) or the key it resembles."""
    check_duplicates(obj, what, fail)
    unknown = [key for key in obj if key not in known]
    if unknown:
        said = []
        for key in unknown:
            close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.6)
            said.append(f"{key!r} ({hints.get(key) or (f'did you mean {close[0]!r}?' if close else 'remove it')})")
        fail("unknown_key", f"{what} has key(s) that are not read: " + "; ".join(said) + after)


def utf8_error(text):
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate, from a ``\\udXXX`` escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"it holds a lone surrogate {text[e.start]!r} at {e.start} (an unpaired \\u escape), which UTF-8 cannot encode"
    return None


def validate_record(
    record, index, *, data_path=None, reserved_tokens=(), special_tokens=(), keys=RECORD_KEYS, system=False
):
    """Check a record's structure (no files opened); raise DataError naming it if it is unusable.

    ``reserved_tokens``: strings of the tokenizer's image tokens other than ``<image>``
    (``</image>``, ``<slice>``, ``<unk>``, ...); ``special_tokens``: its other special tokens
    (chat control such as ``<|im_start|>``, bos, eos). Neither may appear in message text: the
    tokenizer would read them as structure, not as the user's words. ``keys``: the record keys the
    dataset reads; ``system``: whether its chat template takes a system message (SYSTEM_LLM_TYPES).
    """
    fail = record_failure(record, index, data_path)
    record_id = record.get("id")
    if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, (str, int))):
        fail("bad_id", f"'id' must be a string or an integer, got {type(record_id).__name__}")
    if isinstance(record_id, str) and utf8_error(record_id):
        fail("bad_id", f"'id' cannot be written to the UTF-8 report and logs: {utf8_error(record_id)}")
    check_keys(record, "the record", keys, {**FOREIGN_RECORD_KEYS, SYSTEM: SYSTEM_KEY_HINTS[system]}, fail,
               after=KEEP_ON_PURPOSE)
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        fail("bad_conversations", "'conversations' must be a list of at least two messages")
    for n, message in enumerate(conversations):
        if not isinstance(message, dict):
            fail("bad_message", f"message {n} must be an object with a 'role' and a 'content', got {message!r:.80}")
        check_keys(message, f"message {n}", MESSAGE_KEYS, FOREIGN_MESSAGE_KEYS, fail)
        if message.get("role") not in (*ROLES, SYSTEM):
            fail("bad_message", f"message {n} must have role 'user' or 'assistant' (or 'system' first), got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, list):
            fail("bad_content", f"message {n} ({message['role']}) has a list as 'content' (OpenAI layout); write it "
                 "as text, with images as <image> / <image_NN> tags and their paths in the record's 'image'")
        if not isinstance(content, str):
            fail("bad_content", f"message {n} ({message['role']}) has no text 'content'")
        unwritable = utf8_error(content)
        if unwritable:
            fail("bad_content", f"message {n} ({message['role']}) cannot be tokenized: {unwritable}")
    first = 1 if conversations[0]["role"] == SYSTEM else 0
    if first and not system:
        fail("system_message", "message 0 is a system message, but this model's chat template has none "
             "(MiniCPM-V 2.0's takes user and assistant turns only); fold it into the first user message")
    for n, message in enumerate(conversations[first:], first):
        if message["role"] == SYSTEM:
            fail("system_message", f"message {n} is a system message; only the first message may be one")
    if len(conversations) - first < 2:
        fail("bad_conversations", "'conversations' must hold at least a user and an assistant message after the system one")
    if conversations[first]["role"] != "user":
        fail("first_not_user", f"the first message must come from 'user', not {conversations[first]['role']!r}")
    for n, message in enumerate(conversations[first:], first):
        if message["role"] != ROLES[(n - first) % 2]:
            fail(
                "roles_not_alternating",
                f"message {n} comes from {message['role']!r} like message {n - 1}; roles must alternate "
                "user, assistant, user, ...",
            )
        if message["role"] == "assistant" and not message["content"].strip():
            fail("empty_answer", f"message {n}, an assistant answer, is {'white space only' if message['content'] else 'empty'}: "
                 "there is nothing to learn; write the answer or end the conversation before it")

    image = record.get("image")
    if image is not None and not isinstance(image, (str, dict)):
        fail("bad_image_field", f"'image' must be a path or a dict of <image_NN> -> path, got {type(image).__name__}")
    if isinstance(image, dict):
        check_duplicates(image, "'image'", fail)
        if not image:
            fail("bad_image_field", "'image' is an empty dict")
        for tag, path in image.items():
            if not MULTI_IMAGE_TAG.fullmatch(tag):
                fail("bad_image_field", f"image key {tag!r} is not of the form <image_NN>")
            if not isinstance(path, str) or not path:
                fail("bad_image_field", f"image {tag} has no path")
    elif isinstance(image, str) and not image:
        fail("bad_image_field", "'image' is an empty path")

    for n, message in enumerate(conversations):
        for token in reserved_tokens:
            if token in message["content"]:
                fail("reserved_token", f"message {n} contains the reserved image token {token!r}")
        for token in special_tokens:
            if token in message["content"]:
                fail(
                    "special_token",
                    f"message {n} contains the tokenizer's special token {token!r}, which would be read as "
                    "chat structure, not text; remove it",
                )
    singles = [n for n, m in enumerate(conversations) if SINGLE_IMAGE_TAG in m["content"]]
    if isinstance(image, str):
        if sum(m["content"].count(SINGLE_IMAGE_TAG) for m in conversations) > 1:
            fail("image_tag_count", "<image> appears more than once, but the record has one image; " + LITERAL_TAG_HINT)
        if singles and conversations[singles[0]]["role"] != "user":
            fail(
                "image_in_assistant",
                f"<image> sits in message {singles[0]}, {'a system' if singles[0] < first else 'an assistant'} "
                "message; put it in a user message",
            )
    elif singles:
        fail("unknown_image_tag", "a message contains <image> but the record has no single 'image' path; " + LITERAL_TAG_HINT)
    used = [tag for m in conversations for tag in MULTI_IMAGE_TAG.findall(m["content"])]
    if isinstance(image, dict):
        unknown = sorted(set(used) - set(image))
        if unknown:
            fail("unknown_image_tag", f"{', '.join(unknown)} not found among the record's images {sorted(image)}")
        unused = sorted(set(image) - set(used))
        if unused:
            fail("unused_image", f"image {', '.join(unused)} is never referenced in the conversation")
        repeated = sorted({tag for tag in used if used.count(tag) > 1})
        if repeated:
            fail("repeated_image_tag", f"image {', '.join(repeated)} is referenced more than once")
        for n, message in enumerate(conversations):
            if message["role"] != "user" and MULTI_IMAGE_TAG.search(message["content"]):
                fail(
                    "image_in_assistant",
                    f"{MULTI_IMAGE_TAG.search(message['content']).group()} sits in message {n}, "
                    f"{'an' if message['role'] == 'assistant' else 'a'} {message['role']} message; put it in a user message",
                )
    elif used:
        fail("unknown_image_tag", f"{used[0]} appears but the record has no image dict; " + LITERAL_TAG_HINT)


# --------------------------------------------------------------------------------------------
# Images

# Images with more pixels are refused before they are decoded. PIL only warns above its
# MAX_IMAGE_PIXELS and raises at twice that; a training set has no use for either.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
# Errors PIL raises on a file it cannot decode (truncated streams, broken chunks).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Modes of more than 8 bits per value (see check_mode).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageProblem(Exception):
    """An image file that cannot be used; ``code`` as in DataError."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device"}


def regular_file_size(path, media="image", problem=ImageProblem):
    """The size of ``path``, or ``problem`` (ImageProblem; native_data's VideoProblem for videos)
    if it is not a regular file.

    Checked before opening: opening a FIFO blocks until something writes to it, and a folder
    or a symlink loop would otherwise surface as a misleading decode error.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise problem("symlink_loop", "the path is a loop of symbolic links that never reaches a file") from e
        raise problem(f"missing_{media}", f"no such file ({e.strerror})") from e
    if stat.S_ISDIR(info.st_mode):
        raise problem(f"{media}_is_folder", f"the path is a folder, not {'an' if media == 'image' else 'a'} {media} file")
    if not stat.S_ISREG(info.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
        raise problem("not_a_file", f"the path is {kind}, not a regular {media} file; it was not opened")
    return info.st_size


class EmbeddedImage(str):
    """An image a record carries as bytes (a column of the ``datasets`` Image feature in a Parquet or
    Arrow source, see data_source.py), not as a file.

    It is a str, its name (the file name it was stored under, else its place in the table), so a
    record keeps its form and messages can name it; ``data`` holds the encoded image, which is
    decoded as a file's content would be.
    """

    def __new__(cls, name, data):
        image = super().__new__(cls, name)
        image.data = data
        return image

    def __reduce__(self):
        return EmbeddedImage, (str(self), self.data)


def open_image(path, max_pixels=MAX_IMAGE_PIXELS):
    """Open and fully decode an image, or raise ImageProblem saying why not; its mode is kept.

    The whole file is decoded here (a truncated file fails now, not mid-training). EXIF
    orientation is applied, as viewers show the picture and transformers' ``load_image`` does. The
    mode is left for the model's processor to convert (check_mode: only where that is faithful);
    the remote-code dataset converts as that processor would (open_rgb).
    """
    if isinstance(path, EmbeddedImage):
        size, source = len(path.data), io.BytesIO(path.data)
    else:
        size, source = regular_file_size(path), path
    try:
        image = Image.open(source)
    except UnidentifiedImageError as e:
        if size == 0:
            raise ImageProblem("empty_image", "the file is empty (0 bytes)") from e
        raise ImageProblem("not_an_image", f"not an image file PIL can read: {e}") from e
    except Image.DecompressionBombError as e:
        raise ImageProblem("image_too_large", str(e)) from e
    except DECODE_ERRORS as e:
        raise ImageProblem("truncated_image", f"cannot read the image header: {e}") from e
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageProblem(
                "image_too_large",
                f"{width}x{height} = {width * height} pixels is more than the limit of {max_pixels} "
                "(a decompression bomb, or an image far larger than the model uses); downscale it",
            )
        try:
            image.load()
        except DECODE_ERRORS as e:
            raise ImageProblem("truncated_image", f"the image data is truncated or corrupt: {e}") from e
        # Turned in place: a full-size copy would cost a few percent of building a sample.
        ImageOps.exif_transpose(image, in_place=True)
        check_mode(image)
        return image


def check_mode(image):
    """Raise ImageProblem (``image_mode``) unless the processors' conversion of ``image`` to 8-bit RGB
    keeps what it shows.

    Both kinds of processor convert with PIL (remote code: ``convert("RGB")``; transformers:
    ``convert_to_rgb``, which goes through ``convert("RGBA")`` for transparency), and PIL clips values
    of the wide modes (16- and 32-bit integers, floats) to 0..255 and truncates fractions. So a wide
    image converts faithfully only when every value is a whole number in 0..255; a typical 16-bit
    picture (0..65535) would turn white where it is brighter than 255/65535. Every 8-bit mode a file
    can hold (palette, CMYK, LAB, ...) PIL converts.
    """
    if image.mode in WIDE_MODES:
        values = np.asarray(image)
        finite = values[np.isfinite(values)]
        flaws = []
        if finite.size and (finite.min() < 0 or finite.max() > 255):
            flaws.append(f"values from {finite.min()} to {finite.max()}")
        if (finite != np.floor(finite)).any():
            flaws.append("fractions")
        if finite.size < values.size:
            flaws.append("NaN or infinite values")
        if flaws:
            raise ImageProblem(
                "image_mode",
                f"a {image.mode} image with {' and '.join(flaws)}: the model's processor converts it to 8 bits "
                "by clipping to 0..255 (and cutting fractions), which is not this picture; save it as an 8-bit "
                "image, scaled as you mean it (e.g. 16-bit values divided by 257)",
            )


def open_rgb(path, max_pixels=MAX_IMAGE_PIXELS):
    """open_image, converted to RGB as the remote-code models' processor converts every image:
    ``image.convert("RGB")`` (image_processing_minicpmv.py's preprocess). Transparency is dropped,
    not composited: the colour under a transparent pixel is what the model sees at inference too."""
    image = open_image(path, max_pixels)
    return image if image.mode == "RGB" else image.convert("RGB")


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


def reshape_by_patch(pixels, patch_size):
    """``[H, W, 3]`` array -> ``[3, patch, rows, cols, patch]`` view of it (nothing copied).

    Flattened over its last three axes it is ``[3, patch, H*W/patch]``, the layout of the model
    processor's ``reshape_by_patch`` (``unfold`` + permute): element ``[c, i, k * patch + j]`` is
    channel ``c`` of pixel ``(i, j)`` of patch ``k``, patches in raster order, side by side.
    """
    height, width, channels = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    patches = pixels[: rows * patch_size, : cols * patch_size].reshape(rows, patch_size, cols, patch_size, channels)
    return patches.transpose(4, 1, 0, 2, 3)


# --------------------------------------------------------------------------------------------
# Pixels: uint8 from the dataset, normalised where the batch meets the model

# The vision tower's input normalisation: to tensor, then mean = std = 0.5 per channel. The dataset
# hands on raw uint8 pixels instead (a quarter of the bytes to build, copy and send from DataLoader
# workers, and no float work on the loader side); model_pixels gives the model this transform's values.
IMAGE_TRANSFORM = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))]
)


def value_table(transform):
    """``[3, 256]`` float: what ``transform`` (a per-pixel map of an RGB image) makes of each 8-bit
    value, per channel."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # a 1 x 256 RGB image
    return transform(Image.fromarray(levels, "RGB"))[:, 0, :]


PIXEL_VALUES = value_table(IMAGE_TRANSFORM)


def model_pixels(pixel_values, dtype):
    """The collator's ``pixel_values`` (per sample, a list of uint8 tensors ``[3, ...]``) as the vision
    tower takes them: IMAGE_TRANSFORM's values in ``dtype``, on the pixels' device, same nesting.

    The values are looked up per 8-bit value, not computed: a lookup copies IMAGE_TRANSFORM's float32
    values to the bit on any device (CUDA would divide by 255 through its reciprocal), and a lower
    precision rounds each once, as casting the float32 pixels would.
    """
    tables = {}

    def normalised(pixels):
        if pixels.dtype != torch.uint8:
            raise TypeError(f"model_pixels takes the dataset's uint8 pixels, got {pixels.dtype} (normalised twice?)")
        if pixels.device not in tables:
            tables[pixels.device] = PIXEL_VALUES.to(device=pixels.device, dtype=dtype)
        return tables[pixels.device].gather(1, pixels.reshape(3, -1).long()).view(pixels.shape)

    return [[normalised(pixels) for pixels in sample] for sample in pixel_values]


# --------------------------------------------------------------------------------------------
# Placeholders and chat templates


def image_placeholder(tokenizer, *, query_num, grid=None, new_schema=False, image_id=None):
    """The text standing for one image, as the model's processor writes it.

    ``grid`` is ``[cols, rows]`` of slices (None: not sliced); ``image_id`` (new schema, with
    ``use_image_id``) prefixes ``<image_id>N</image_id>``. With ``query_num=0`` this is the
    compact form the dataset tokenizes before splicing in the query runs.
    """
    unk = tokenizer.unk_token * query_num
    text = "" if image_id is None else f"{IMAGE_ID_START}{image_id}{IMAGE_ID_END}"
    text += IMAGE_START + unk + IMAGE_END
    if grid is None:
        return text
    cols, rows = grid
    if new_schema:
        one_slice = SLICE_START + unk + SLICE_END
        return text + "\n".join(one_slice * cols for _ in range(rows))
    one_slice = IMAGE_START + unk + IMAGE_END
    return text + SLICE_START + "\n".join(one_slice * cols for _ in range(rows)) + SLICE_END


def place_images(conversations, placeholders):
    """Messages with each image tag replaced by its placeholder text (a new list).

    One image (tag ``<image>``): its tag is replaced where it sits; without a tag, the
    placeholder and a newline go in front of the first user message (after a system message). Several images
    (``<image_NN>``): a message is split at its tags, and the pieces, trimmed of surrounding
    white space, are joined with "\\n", as the model's ``chat()`` lays out a list of images and
    texts (``"<image_00>\\n<image_01>\\nWhat?"`` -> ``"[A]\\n[B]\\nWhat?"``).
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in conversations]
    if SINGLE_IMAGE_TAG in placeholders:
        placeholder = placeholders[SINGLE_IMAGE_TAG]
        for message in messages:
            if SINGLE_IMAGE_TAG in message["content"]:
                message["content"] = message["content"].replace(SINGLE_IMAGE_TAG, placeholder)
                break
        else:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = placeholder + "\n" + first_user["content"]
        return messages
    if placeholders:
        for message in messages:
            if MULTI_IMAGE_TAG.search(message["content"]):
                pieces = [p.strip() for p in re.split(f"({MULTI_IMAGE_TAG.pattern})", message["content"])]
                message["content"] = "\n".join(placeholders.get(p, p) for p in pieces if p)
    return messages


def render_llama3(messages, tokenizer):
    """Llama-3 layout: ``(text, learned character spans)``; assistant content through <|eot_id|>."""
    text = tokenizer.bos_token
    spans = []
    for message in messages:
        text += f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        start = len(text)
        text += message["content"].strip() + LLAMA3_END_OF_TURN
        if message["role"] == "assistant":
            spans.append((start, len(text)))
    return text, spans


def render_qwen(messages, tokenizer):
    """The tokenizer's own ChatML template: ``(text, learned character spans)``.

    Learned: after each ``<|im_start|>assistant\\n`` through its ``<|im_end|>``, except an empty
    think block the template writes into a turn whose message had none.
    """
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, enable_thinking=wants_thinking(assistants)
    )
    return text, chatml_assistant_spans(text, assistants)


def wants_thinking(assistants):
    """``enable_thinking`` for a Qwen3-style template: whether the last answer holds a think block."""
    return bool(THINK_BLOCK.search(assistants[-1]))


def chatml_assistant_spans(text, assistants):
    """The learned character spans of a rendered ChatML conversation (see render_qwen);
    ``assistants`` are the assistant messages' texts, in order."""
    header, end = "<|im_start|>assistant\n", "<|im_end|>"
    spans = []
    position = 0
    for content in assistants:
        found = text.find(header, position)
        if found < 0:
            raise ValueError("the chat template output lacks an assistant turn")
        start = found + len(header)
        if text.startswith(EMPTY_THINK, start) and "<think>" not in content:
            start += len(EMPTY_THINK)
        stop = text.find(end, start)
        if stop < 0:
            raise ValueError("an assistant turn in the chat template output has no <|im_end|>")
        position = stop + len(end)
        spans.append((start, position))
    return spans


def tokenize_with_spans(tokenizer, text, spans):
    """Ids of ``text`` and a context flag per token (1: not learned): learned tokens start in a span."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    return ids, context_flags(encoding["offset_mapping"], spans)


def context_flags(offset_mapping, spans):
    """Per token (by its character offsets), 0 if it starts inside a learned span, else 1."""
    token_starts = torch.tensor([start for start, _ in offset_mapping], dtype=torch.long)
    context = torch.ones(len(token_starts), dtype=torch.int8)
    for start, stop in spans:
        context[(token_starts >= start) & (token_starts < stop)] = 0
    return context


def tokenize_minicpm(messages, tokenizer):
    """MiniCPM layout: ``<用户>``/``<AI>`` prefixes, eos after the last message, pieces encoded alone."""
    ids, context = [], []
    for n, message in enumerate(messages):
        prefix = "<用户>" if message["role"] == "user" else "<AI>"
        content = message["content"] + (tokenizer.eos_token if n == len(messages) - 1 else "")
        prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
        content_ids = tokenizer.encode(content, add_special_tokens=False)
        ids += prefix_ids + content_ids
        context += [1] * len(prefix_ids) + [int(message["role"] != "assistant")] * len(content_ids)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(context, dtype=torch.int8)


def tokenizer_fingerprint(tokenizer):
    """A hash of all a tokenizer's output depends on: its full definition (vocabulary, merges,
    normalizer, added tokens; the vocabulary where it has no such backend), special tokens and
    chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(definition.encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.chat_template],
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()


def special_token_id(tokenizer, token, needed_for):
    """The id of ``token`` in the tokenizer's vocabulary, as one token; ValueError naming it if absent.

    ``needed_for`` says what the pipeline uses it for (the error names it, with the tokenizer).
    """
    where = f"the tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path or 'built in memory'})"
    if token is None:
        raise ValueError(f"{where} defines no end-of-sequence token, which {needed_for} needs")
    token_id = tokenizer.convert_tokens_to_ids(token)
    # convert_tokens_to_ids answers the unk id (or None) for a token the vocabulary lacks.
    missing = token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token)
    if missing or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        raise ValueError(
            f"{where} has no single token {token!r}, which {needed_for} needs; "
            "is the checkpoint a MiniCPM-V model of that family?"
        )
    return token_id


def shifted_labels(ids, context, end_of_turn_id):
    """The reference's labels: ``labels[i-1] = ids[i]`` where token ``i`` is learned; where a
    learned run ends, the last learned position gets ``end_of_turn_id``."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    learned_next = context[1:] == 0
    labels[:-1][learned_next] = ids[1:][learned_next]
    labels[:-1][(context[1:] == 1) & (context[:-1] == 0)] = end_of_turn_id
    return labels


# --------------------------------------------------------------------------------------------
# Dataset and collator


class RecordDataset(Dataset):
    """What a dataset of records is, whichever model it feeds: the records, the folder their
    relative paths resolve against, the checks of validate_record, and errors naming the record.

    A subclass sets ``reserved_tokens``, ``special_tokens`` and ``takes_system`` (see validate_record;
    ``special_tokens`` from ``special_tokens_of``) and defines ``_build(record, index, *args)``;
    ``_checked_build(index, *args)`` validates and builds record ``index`` (or ``record``, one
    made from it, such as a preference pair's answer).
    """

    # The record keys the dataset reads (validate_record refuses any other).
    record_keys = RECORD_KEYS

    def __init__(self, records, *, max_length, image_root, data_path):
        self.records = records
        self.max_length = max_length
        self.data_path = None if data_path is None else os.fspath(data_path)
        if image_root is None:
            image_root = os.path.dirname(os.path.abspath(self.data_path)) if self.data_path else os.getcwd()
        self.image_root = os.fspath(image_root)
        # Each record's token count as trained (after truncation), once preflight has checked it:
        # what length grouping and packing need, without building every sample to learn it.
        self.lengths = None

    def __len__(self):
        return len(self.records)

    def validate(self, record, index):
        validate_record(
            record,
            index,
            data_path=self.data_path,
            reserved_tokens=self.reserved_tokens,
            special_tokens=self.special_tokens,
            keys=self.record_keys,
            system=self.takes_system,
        )

    def check_settings(self):
        """Everything besides the data file that decides what ``check`` finds (JSON values): a
        preflight result is reused only where these are equal (preflight's cache)."""
        return dict(dataset=type(self).__name__, max_length=self.max_length, image_root=self.image_root,
                    tokenizer=tokenizer_fingerprint(self.tokenizer))

    def special_tokens_of(self, tokenizer):
        """The tokenizer's special tokens that message text must not hold: all of them but the
        image tag, the reserved tokens (refused with their own reason) and CONTENT_MARKUP."""
        special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        special |= set(tokenizer.all_special_tokens)
        return tuple(sorted(special - {SINGLE_IMAGE_TAG, *self.reserved_tokens} - CONTENT_MARKUP))

    def _checked_build(self, index, *args, record=None):
        record = self.records[index] if record is None else record
        self.validate(record, index)
        try:
            return self._build(record, index, *args)
        except DataError:
            raise
        except Exception as e:  # any other failure still names the record; the cause stays chained
            raise self._error(index, record, f"{type(e).__name__}: {e}", code="build_failed") from e

    def _error(self, index, record, reason, path=None, code="invalid_record"):
        return DataError(
            reason, index=index, record_id=record.get("id"), path=path, data_path=self.data_path, code=code
        )

    def _full_path(self, path):
        return path if isinstance(path, EmbeddedImage) or os.path.isabs(path) else os.path.join(self.image_root, path)

    def _open_image(self, path):
        """A decoded image as this dataset hands it on (remote code: RGB as its processor converts it)."""
        return open_rgb(path)

    def _load_image(self, index, record, tag, path):
        full_path = self._full_path(path)
        try:
            return self._open_image(full_path)
        except ImageProblem as e:
            raise self._error(
                index, record, f"cannot load image {tag} from {full_path}: {e}", path=full_path, code=e.code
            ) from e


class SupervisedDataset(RecordDataset):
    """Records -> model inputs. See the module docstring and docs/CONTRACTS.md."""

    # Over-long samples are cut at max_length (with a warning); a preference pair must not be.
    truncates = True

    def __init__(
        self,
        records,
        tokenizer,
        *,
        slice_config,
        llm_type,
        patch_size,
        query_num,
        batch_vision,
        max_length,
        use_image_id,
        image_root,
        data_path=None,
    ):
        if llm_type not in LLM_TYPES:
            raise ValueError(f"llm_type must be one of {LLM_TYPES}, got {llm_type!r}")
        super().__init__(records, max_length=max_length, image_root=image_root, data_path=data_path)
        self.tokenizer = tokenizer
        self.slice_config = (
            None
            if slice_config is None
            else {key: slice_config[key] for key in ("max_slice_nums", "scale_resolution", "patch_size")}
        )
        self.llm_type = llm_type
        self.takes_system = llm_type in SYSTEM_LLM_TYPES
        self.new_schema = llm_type == "qwen"
        self.patch_size = patch_size
        self.query_num = query_num
        self.batch_vision = batch_vision
        self.use_image_id = use_image_id

        # Every special token the layout uses, checked against the vocabulary before any record is built.
        sliced = slice_config is not None
        unk = tokenizer.unk_token or "<unk>"
        end_of_turn = LLAMA3_END_OF_TURN if llm_type == "llama3" else tokenizer.eos_token
        needed = [IMAGE_START, IMAGE_END, unk, end_of_turn]
        needed += [SLICE_START, SLICE_END] if sliced else []
        needed += [IMAGE_ID_START, IMAGE_ID_END] if use_image_id else []
        ids = {token: special_token_id(tokenizer, token, f"the {llm_type} layout") for token in needed}
        self.unk_id = ids[unk]
        self.end_of_turn_id = ids[end_of_turn]
        slice_runs = self.new_schema and sliced  # the new schema gives each slice its own query run
        self.opener_ids = torch.tensor([ids[IMAGE_START]] + ([ids[SLICE_START]] if slice_runs else []), dtype=torch.long)
        self.closer_ids = torch.tensor([ids[IMAGE_END]] + ([ids[SLICE_END]] if slice_runs else []), dtype=torch.long)
        # The sliced old schema closes an image with slice_end after its last slice.
        self.image_end_extra = ids[SLICE_END] if sliced and not self.new_schema else None
        self.im_id_start_id = ids[IMAGE_ID_START] if use_image_id else None
        self.reserved_tokens = (IMAGE_END, SLICE_START, SLICE_END, IMAGE_ID_START, IMAGE_ID_END, unk)
        self.special_tokens = self.special_tokens_of(tokenizer)

    def __getitem__(self, index):
        return self._checked_build(index, True)

    def check_settings(self):
        return super().check_settings() | dict(
            llm_type=self.llm_type, slice_config=self.slice_config, patch_size=self.patch_size,
            query_num=self.query_num, batch_vision=self.batch_vision, use_image_id=self.use_image_id,
        )

    def validate(self, record, index):
        super().validate(record, index)
        if "video" in record:
            raise self._error(
                index, record, "the record has a 'video', but this model (remote code) takes no video; "
                "video needs a native MiniCPM-V (4.6, 4.7, MiniCPM-OCR)", code="video_unsupported",
            )

    def check(self, index):
        """Build record ``index`` exactly as training does, minus the image tensors.

        Raises DataError if the record is unusable; else returns ``{"tokens", "truncated", "length"}``.
        Every image is opened and decoded once. This is what preflight.py runs over a dataset.
        """
        return self._checked_build(index, False)

    def _build(self, record, index, pixels=True):
        paths = record_images(record)
        # Images are numbered, and their tensors ordered, as their tags appear in the text.
        if SINGLE_IMAGE_TAG in paths:
            order = [SINGLE_IMAGE_TAG]
        else:
            order = [tag for m in record["conversations"] for tag in MULTI_IMAGE_TAG.findall(m["content"])]

        views, placeholders, layouts = [], {}, []
        for number, tag in enumerate(order):
            image = self._load_image(index, record, tag, paths[tag])
            grid = None
            if self.slice_config is not None:
                grid = best_grid(image.size, self.slice_config["max_slice_nums"], self.slice_config["scale_resolution"])
            if pixels:  # slice_image cuts along the same best_grid
                source, slices = slice_image(image, **self.slice_config) if self.slice_config else (image, [])
                views.append([source] + [s for row in slices for s in row])
            layouts.append(1 + (grid[0] * grid[1] if grid else 0))  # query runs of this image: source + slices
            placeholders[tag] = image_placeholder(
                self.tokenizer,
                query_num=0,
                grid=grid,
                new_schema=self.new_schema,
                image_id=number if self.use_image_id else None,
            )

        messages = place_images(record["conversations"], placeholders)
        if self.llm_type == "minicpm":
            ids, context = tokenize_minicpm(messages, self.tokenizer)
        else:
            render = render_llama3 if self.llm_type == "llama3" else render_qwen
            ids, context = tokenize_with_spans(self.tokenizer, *render(messages, self.tokenizer))
        ids, context, bounds = self._splice_query_runs(ids, context)
        if len(bounds) != sum(layouts):
            raise self._error(
                index, record, f"found {len(bounds)} image query runs, expected {sum(layouts)}", code="build_failed"
            )
        spans = self._image_spans(ids, bounds, layouts)

        full_length = len(ids)
        truncated = full_length > self.max_length
        if truncated and not self.truncates:
            raise self._error(
                index,
                record,
                f"{full_length} tokens, more than max_length {self.max_length}: a preference pair must fit whole, "
                "with its answer intact; raise model_max_length or shorten the record",
                code="pair_too_long",
            )
        if truncated:
            cut = self.max_length
            for number, (first, last) in enumerate(spans):
                if first < cut <= last:
                    raise self._error(
                        index,
                        record,
                        f"{len(ids)} tokens: max_length {cut} would cut image {order[number]}'s placeholder "
                        f"(tokens {first}..{last}); raise model_max_length or shorten the record",
                        code="too_long",
                    )
            kept = sum(last < cut for _, last in spans)
            if pixels:  # a check (preflight) counts truncations in its own summary
                logger.warning(
                    "record %d (id %r) of %s: %d tokens truncated to max_length %d (%d of %d images kept)",
                    index, record.get("id"), self.data_path, len(ids), cut, kept, len(order),
                )
            ids, context = ids[:cut], context[:cut]
            bounds = bounds[: sum(layouts[:kept])]
            views = views[:kept]

        labels = shifted_labels(ids, context, self.end_of_turn_id)
        for start, end in bounds.tolist():
            labels[start - 1 : end - 1] = IGNORE_INDEX  # image features are never prediction targets
        if not (labels != IGNORE_INDEX).any():
            after = f" after truncation to max_length {self.max_length}" if truncated else ""
            raise self._error(index, record, f"no learnable token left{after}", code="no_learnable_tokens")
        if not pixels:
            return {"tokens": full_length, "truncated": truncated, "length": len(ids)}

        pixel_values, tgt_sizes = self._image_tensors([v for group in views for v in group])
        return dict(
            record={"index": index, "id": record.get("id")},  # names the record if its loss goes bad
            input_ids=ids,
            position_ids=torch.arange(len(ids), dtype=torch.long),
            labels=labels,
            attention_mask=torch.ones(len(ids), dtype=torch.bool),
            pixel_values=pixel_values,
            tgt_sizes=tgt_sizes,
            image_bound=bounds,
        )

    def _splice_query_runs(self, ids, context):
        """Insert ``query_num`` unk ids after every opening token; return ids, context, bounds.

        In numpy: these arrays are a few hundred elements, and torch's multi-threaded
        repeat_interleave costs milliseconds per call on a machine whose cores are busy.
        """
        q = self.query_num
        ids, context = ids.numpy(), context.numpy()
        is_opener = (ids[:, None] == self.opener_ids.numpy()).any(axis=1)
        counts = 1 + q * is_opener
        new_positions = np.cumsum(counts) - counts
        ids = np.repeat(ids, counts)
        context = np.repeat(context, counts)
        starts = new_positions[is_opener] + 1
        ids[(starts[:, None] + np.arange(q)).reshape(-1)] = self.unk_id
        bounds = np.stack([starts, starts + q], axis=1).reshape(-1, 2)
        ends = bounds[:, 1]
        if (ends >= len(ids)).any() or not (ids[ends.clip(max=len(ids) - 1), None] == self.closer_ids.numpy()).any(axis=1).all():
            raise ValueError("an image start token is not followed by its end token after the chat template")
        return torch.from_numpy(ids), torch.from_numpy(context), torch.from_numpy(bounds.astype(np.int64))

    def _image_spans(self, ids, bounds, layouts):
        """Per image, the (first, last) token of its whole placeholder, id prefix included."""
        id_starts = torch.where(ids == self.im_id_start_id)[0] if self.im_id_start_id is not None else None
        spans, run = [], 0
        for runs in layouts:
            first = int(bounds[run, 0]) - 1
            last = int(bounds[run + runs - 1, 1])
            if id_starts is not None:
                first = int(id_starts[id_starts < first].max())
            if runs > 1 and self.image_end_extra is not None:
                last += 1  # the old schema's slice_end
            spans.append((first, last))
            run += runs
        return spans

    def _image_tensors(self, images):
        """The views' uint8 pixels (model_pixels normalises them) and their patch grids.

        A sample's tensors are views of one buffer: a DataLoader worker hands them to the training
        process as one shared-memory block, not one per view (measured: benchmarks/pipeline.py).
        """
        arrays = [np.asarray(image) for image in images]  # [H, W, 3], read-only views of PIL's bytes
        p = self.patch_size
        if self.batch_vision:
            layouts = [reshape_by_patch(a, p) for a in arrays]
            shapes = [(3, p, -1)] * len(arrays)
            sizes = torch.tensor([[a.shape[0] // p, a.shape[1] // p] for a in arrays], dtype=torch.int32)
        else:
            layouts = [a.transpose(2, 0, 1) for a in arrays]  # [3, H, W]
            shapes = [layout.shape for layout in layouts]
            sizes = torch.zeros((0, 2), dtype=torch.int32)
        buffer = torch.empty(sum(layout.size for layout in layouts), dtype=torch.uint8)
        tensors, start = [], 0
        for layout, shape in zip(layouts, shapes):
            tensor = buffer[start : start + layout.size]
            np.copyto(tensor.numpy().reshape(layout.shape), layout)
            tensors.append(tensor.view(shape))
            start += layout.size
        return tensors, sizes.reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# Preference pairs (DPO)

# The two answers of a preference record, in the order their rows are batched.
PREFERENCE_ANSWERS = ("chosen", "rejected")


def preference_pair(record, index, *, data_path=None):
    """A preference record's two SFT records: its conversation (ending with the user's message)
    answered by ``chosen`` and by ``rejected``; DataError naming the record if it is not one."""
    fail = record_failure(record, index, data_path)
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        fail("bad_conversations", "'conversations' must be a non-empty list of messages ending with the user's")
    last = conversations[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        fail(
            "prompt_not_user_last",
            "a preference record's 'conversations' must end with a user message; its answers go in "
            "'chosen' and 'rejected'",
        )
    for key in PREFERENCE_ANSWERS:
        answer = record.get(key)
        if not isinstance(answer, str) or not answer.strip():
            got = "missing" if answer is None else f"{answer!r:.40}"
            fail("missing_answer", f"'{key}' must be a non-empty string (the assistant's answer), got {got}")
    if record["chosen"].strip() == record["rejected"].strip():
        fail("identical_answers", "'chosen' and 'rejected' are the same answer: nothing to prefer")
    return {
        key: {**record, "conversations": conversations + [{"role": "assistant", "content": record[key]}]}
        for key in PREFERENCE_ANSWERS
    }


class PreferenceDataset(SupervisedDataset):
    """Preference records -> ``{"chosen": sample, "rejected": sample}``: each the SFT sample of the
    prompt with that answer, so only the answer (and its end-of-turn token) is labelled. A pair is
    never truncated: an over-long one is an error (``pair_too_long``). Each row is built by the SFT
    path, images included (decoded and sliced twice per pair on the loader side; the collator keeps
    one set and the trainer encodes it once)."""

    truncates = False
    record_keys = RECORD_KEYS + PREFERENCE_ANSWERS

    def __getitem__(self, index):
        return self._pair(index, pixels=True)

    def check(self, index):
        built = self._pair(index, pixels=False)
        return {
            "tokens": max(b["tokens"] for b in built.values()),
            "truncated": False,
            "length": sum(b["length"] for b in built.values()),
        }

    def _pair(self, index, pixels):
        pair = preference_pair(self.records[index], index, data_path=self.data_path)
        built = {}
        for key, record in pair.items():
            try:
                built[key] = self._checked_build(index, pixels, record=record)
            except DataError as e:
                raise self._error(index, record, f"with the {key} answer: {e.reason}", path=e.path, code=e.code) from e
        return built


class DataCollator:
    """Pads a list of samples into a batch; images, bounds and sizes stay per-sample lists (images
    as uint8: the backend's forward normalises them, see model_pixels).

    Samples are expected to be truncated by the dataset already (it knows where images are);
    cutting here is a last resort and refuses to cut through an image placeholder.
    """

    def __init__(self, max_length, pad_token_id=0):
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        for n, example in enumerate(examples):
            bounds = example["image_bound"]
            if len(bounds) and int(bounds[:, 1].max()) >= self.max_length:
                raise ValueError(
                    f"sample {n} of the batch ({len(example['input_ids'])} tokens) has an image placeholder past "
                    f"max_length {self.max_length}; build the dataset with the same max_length"
                )

        def pad(key, value):
            return pad_sequence([e[key][: self.max_length] for e in examples], batch_first=True, padding_value=value)

        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "position_ids": pad("position_ids", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": pad("attention_mask", False),
            "pixel_values": [e["pixel_values"] for e in examples],
            "image_bound": [e["image_bound"] for e in examples],
            # The same list under the name the published MiniCPM-V 2.0 forward reads (its revision
            # "adapt for transformers processing", HwwwwwwwH/MiniCPM-V-2@84ce9b0); the others read image_bound.
            "image_bounds": [e["image_bound"] for e in examples],
            "tgt_sizes": [e["tgt_sizes"] for e in examples],
            # A packed row (pack_samples) names all the records it holds.
            "records": [record for e in examples for record in (e["records"] if "records" in e else [e["record"]])],
        }


class PreferenceCollator(DataCollator):
    """Batches B pairs as 2B rows, chosen answers first, then rejected in the same order.

    Images are kept once per pair (``pixel_values`` and ``tgt_sizes`` have B entries, for the
    first B rows): chosen and rejected share the prompt, so the trainer encodes them once.
    """

    def __call__(self, examples):
        batch = super().__call__([example[key] for key in PREFERENCE_ANSWERS for example in examples])
        batch["pixel_values"] = batch["pixel_values"][: len(examples)]
        batch["tgt_sizes"] = batch["tgt_sizes"][: len(examples)]
        return batch


# --------------------------------------------------------------------------------------------
# Packing: whole samples side by side in one training row (--packing)


def record_lengths(dataset):
    """Token count of each sample of a dataset (or a Subset of one) as preflight measured it, without
    building any; None if preflight has not run over it. A PackedDataset gives its rows' lengths."""
    if isinstance(dataset, Subset):
        lengths = record_lengths(dataset.dataset)
        return None if lengths is None else [lengths[i] for i in dataset.indices]
    return getattr(dataset, "lengths", None)


def pack_lengths(lengths, capacity):
    """Rows of sample indices whose lengths sum to at most ``capacity`` each, every index in one row.

    Best-fit decreasing: longest first, each sample goes into the fullest row it still fits in, so
    rows come out nearly full. Deterministic (ties go to the lower index and the older row): the
    same lengths always give the same rows, which a resumed run relies on.
    """
    too_long = [index for index, length in enumerate(lengths) if length > capacity]
    if too_long:
        raise ValueError(
            f"samples {too_long[:5]} are longer than the row length {capacity}; build them with that max_length"
        )
    rows = []
    room = []  # (tokens still free, row number) of the rows not yet full, in increasing order
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        at = bisect.bisect_left(room, (length, -1))
        if at == len(room):
            rows.append([index])
            free, number = capacity - length, len(rows) - 1
        else:
            free, number = room.pop(at)
            rows[number].append(index)
            free -= length
        if free:
            bisect.insort(room, (free, number))
    return [sorted(row) for row in rows]


def pack_samples(samples):
    """One training row holding ``samples`` (of SupervisedDataset) side by side, for DataCollator.

    Ids, labels and attention masks are concatenated; position ids restart at 0 with each sample;
    image bounds move by the tokens before their sample; images and their sizes follow in order;
    ``records`` names every sample's record. The remote-code models give their LLM position ids and
    no attention mask, and transformers (masking_utils' packed-sequence detection) then keeps each
    position's attention inside its run of increasing position ids: every sample sees only itself,
    with the positions it has alone, so its logits are those of its own row. Labels are stored
    shifted (``labels[i]`` is the token at ``i + 1``), so a sample's last position has none: no
    sample learns the next one's first token.
    """
    offsets = [0]
    for n, sample in enumerate(samples):
        if sample["labels"][-1] != IGNORE_INDEX:
            raise ValueError(
                f"sample {n} has a label at its last position: packed, it would learn the next sample's first "
                "token; pack samples whose labels are stored shifted (shifted_labels)"
            )
        offsets.append(offsets[-1] + len(sample["input_ids"]))

    def joined(key):
        return torch.cat([sample[key] for sample in samples])

    return dict(
        records=[sample["record"] for sample in samples],
        input_ids=joined("input_ids"),
        position_ids=joined("position_ids"),
        labels=joined("labels"),
        attention_mask=joined("attention_mask"),
        pixel_values=[image for sample in samples for image in sample["pixel_values"]],
        tgt_sizes=joined("tgt_sizes"),
        image_bound=torch.cat([sample["image_bound"] + offset for sample, offset in zip(samples, offsets)]),
    )


class PackedDataset(Dataset):
    """The samples of ``dataset`` packed into rows of at most ``max_length`` tokens (``--packing``).

    The rows are chosen once, by pack_lengths over the lengths preflight measured (no sample is
    built to learn its length), and built by pack_samples. Fixed rows make an epoch a known number
    of rows, hence of optimizer steps, and let a resumed run replay the rows it started with; the
    Trainer's sampler shuffles the rows' order each epoch.
    """

    def __init__(self, dataset, max_length):
        lengths = record_lengths(dataset)
        if lengths is None:
            raise ValueError("packing needs each sample's length: run preflight over the dataset first")
        self.dataset = dataset
        self.max_length = max_length
        self.rows = pack_lengths(lengths, max_length)
        # Each row's token count: what --group_by_length reads (record_lengths).
        self.lengths = [sum(lengths[index] for index in row) for row in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return pack_samples([self.dataset[i] for i in self.rows[index]])

    def fill(self):
        """The share of the rows' ``max_length`` tokens that are real (the rest is padding)."""
        return sum(self.lengths) / (len(self.rows) * self.max_length)


# --------------------------------------------------------------------------------------------
# The dataset as training and inference build it from a model config


@dataclass(frozen=True)
class DataSettings:
    """What the dataset needs from the model config: slicing, placeholder size, image layout."""

    slice_config: dict | None  # max_slice_nums, scale_resolution, patch_size; None: no slicing
    query_num: int
    patch_size: int
    batch_vision: bool
    use_image_id: bool


def data_settings(config, max_slice_nums):
    """The DataSettings of a model config, slicing images into at most ``max_slice_nums``.

    ``max_slice_nums`` applies to the data only: the model config is left as it is, so a saved
    model keeps the slicing its processor (preprocessor_config.json) and its own ``chat()`` agree
    on, and inference may use more slices than training did.
    """
    slice_config = getattr(config, "slice_config", None)
    if slice_config is not None:
        slicing = {**slice_config.to_dict(), "max_slice_nums": max_slice_nums}
    elif getattr(config, "slice_mode", True):  # MiniCPM-V 2.0 keeps its slicing fields on the config itself
        slicing = {**config.to_dict(), "max_slice_nums": max_slice_nums}
    else:
        slicing = None
    return DataSettings(
        slice_config=slicing,
        query_num=config.query_num,
        patch_size=getattr(config, "patch_size", 14),
        batch_vision=getattr(config, "batch_vision_input", False),
        use_image_id=getattr(config, "use_image_id", False),
    )


def make_dataset(records, tokenizer, settings, *, llm_type, max_length, image_root, data_path=None, preference=False):
    """A SupervisedDataset laid out as training lays it out (infer.py asks its questions through it too);
    with ``preference``, a PreferenceDataset of the same layout."""
    return (PreferenceDataset if preference else SupervisedDataset)(
        records,
        tokenizer,
        slice_config=settings.slice_config,
        llm_type=llm_type,
        patch_size=settings.patch_size,
        query_num=settings.query_num,
        batch_vision=settings.batch_vision,
        max_length=max_length,
        use_image_id=settings.use_image_id,
        image_root=image_root,
        data_path=data_path,
    )


def log_sample(dataset, tokenizer):
    """Log the first sample as the model reads it, and the tokens it learns (both rows of a pair)."""
    sample = dataset[0]
    rows = {key: sample[key] for key in PREFERENCE_ANSWERS} if PREFERENCE_ANSWERS[0] in sample else {"sample": sample}
    for name, row in rows.items():
        ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
        logger.info("First training %s, as the model reads it:\n%s", name, tokenizer.decode(ids))
        learned = [label for label in labels if label != IGNORE_INDEX]
        logger.info("...and the tokens it learns to predict (%d):\n%s", len(learned), tokenizer.decode(learned))
