"""A record's form, checked before any file is opened: its keys, messages, roles, image and video
tags. ``validate_record`` raises the DataError naming a record that is unusable, with a hint where
the record is in a known foreign layout (ShareGPT/LLaVA, OpenAI messages, RLAIF-V rows)."""

import difflib
import re

from data.errors import record_failure
from data.json_text import DuplicateKeys

ROLES = ("user", "assistant")
MULTI_IMAGE_TAG = re.compile(r"<image_\d+>")
SINGLE_IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
# The two answers of a preference record, in the order their rows are batched.
PREFERENCE_ANSWERS = ("chosen", "rejected")

# The keys a record and a message may hold. Any other key is reported (unknown_key): ignored, it
# would leave the record training as something other than its author meant (an 'images' list
# read as a text-only record, an image attached to a message, a top-level system prompt).
RECORD_KEYS = ("id", "image", "video", "conversations")
MESSAGE_KEYS = ("role", "content")
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
    dataset reads; ``system``: whether its chat template takes a system message (ChatLayout.takes_system).
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


def record_images(record):
    """The record's images as ``{tag: path}`` (``{}`` for a text-only record), unchecked."""
    image = record.get("image")
    if image is None:
        return {}
    if isinstance(image, str):
        return {SINGLE_IMAGE_TAG: image}
    return dict(image)


def validate_video(record, index, *, data_path=None):
    """The video part of a record's structure: ``"video"`` a path; ``<video>`` at most once, in a
    user message, and only when there is a video."""
    fail = record_failure(record, index, data_path)
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
