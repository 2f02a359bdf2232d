"""The text that stands for an image in a conversation, as the remote-code models' processor writes
it, and where it goes in the messages. The dataset tokenizes the compact form (no query run) and
splices the runs of ``unk`` ids in after (dataset.py)."""

import re

from data.schema import MULTI_IMAGE_TAG, SINGLE_IMAGE_TAG

# MiniCPM-V's placeholder tokens: the same strings in every family's vocabulary. Their ids come
# from the vocabulary, never from tokenizer attributes: the published tokenizer classes differ in
# which they define (2.5 has no slice_end_id, no im_id_start; see
# tiny_models/published_remote_code.json).
IMAGE_START, IMAGE_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
IMAGE_ID_START, IMAGE_ID_END = "<image_id>", "</image_id>"


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
