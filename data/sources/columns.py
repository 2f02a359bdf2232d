"""--data_columns: how a source's rows become our records (the form of data/schema.py: ``id``,
``image``, ``conversations`` of ``role``/``content``, and ``chosen``/``rejected`` for preference
records). The same mappings apply to every source, record by record:

- not given: the rows already have our names and are taken as they are (a key we do not read is
  reported, as an unknown key of a JSON record is);
- ``rlaif-v``: RLAIF-V's layout, ``image``, ``question``, ``chosen``, ``rejected`` (and ``idx`` as
  the id): a preference record (``--stage dpo``) whose user message is ``<image>`` and the question;
- ``sharegpt`` (also ``llava``): ``id``, ``image`` and ``conversations`` of ``from``/``value``
  messages (``human`` -> ``user``, ``gpt`` -> ``assistant``), as LLaVA's and ShareGPT's files;
- ``KEY=COLUMN,...``: our key from the column of that name (e.g. ``id=uid,image=img,conversations=messages``);
  other columns are left out.

Images may be paths or embedded bytes (the ``datasets`` Image feature, as hub datasets store
them): those become ``EmbeddedImage``s (data/media.py), decoded as a file would be. A list of
images becomes ``{"<image_00>": ..., ...}``, for text that tags them so.
"""

from data.media import EmbeddedImage

COLUMNS = {
    "rlaif-v": "RLAIF-V: image, question, chosen, rejected (idx as the id) -> a preference record",
    "sharegpt": "ShareGPT / LLaVA: id, image, conversations of from/value messages",
    "llava": "the same as sharegpt",
}
OUR_KEYS = ("id", "image", "video", "conversations", "chosen", "rejected")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def check_columns(columns):
    """The error message for a --data_columns value that is not a preset or KEY=COLUMN pairs, or None."""
    if columns is None or columns in COLUMNS:
        return None
    pairs = [pair.partition("=") for pair in columns.split(",")]
    if any(not key or not sep or not column for key, sep, column in pairs):
        return (f"--data_columns {columns!r}: give one of {', '.join(COLUMNS)}, or pairs KEY=COLUMN separated by commas "
                f"(KEY one of {', '.join(OUR_KEYS)})")
    unknown = [key for key, _, _ in pairs if key not in OUR_KEYS]
    if unknown:
        return f"--data_columns: {', '.join(map(repr, unknown))} is not a record key (one of {', '.join(OUR_KEYS)})"
    return None


def image_value(value, where):
    """A cell of an image column as our record holds it: a path, an EmbeddedImage, or a dict of tagged ones."""
    if isinstance(value, list):
        if len(value) == 1:
            return image_value(value[0], where)
        return {f"<image_{n:02d}>": image_value(item, f"{where}[{n}]") for n, item in enumerate(value)}
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:  # the Image feature, not decoded
        if value.get("bytes") is not None:
            return EmbeddedImage(value.get("path") or where, value["bytes"])
        return value.get("path")
    return value


def to_record(row, index, columns):
    """Our record of a table row (or of a JSON record) under the --data_columns mapping ``columns``."""
    if columns is None or not isinstance(row, dict):
        record = row
    elif columns == "rlaif-v":
        record = {
            "id": row.get("idx", row.get("id")),
            "image": row.get("image"),
            "conversations": [{"role": "user", "content": f"<image>\n{row.get('question')}"}],
            "chosen": row.get("chosen"),
            "rejected": row.get("rejected"),
        }
    elif columns in ("sharegpt", "llava"):
        record = {key: row[key] for key in ("id", "image") if row.get(key) is not None}
        messages = row.get("conversations")
        record["conversations"] = messages if not isinstance(messages, list) else [
            {"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
            if isinstance(m, dict) else m
            for m in messages
        ]
    else:
        pairs = [pair.partition("=") for pair in columns.split(",")]
        record = {key: row.get(column) for key, _, column in pairs if row.get(column) is not None}
    if isinstance(record, dict) and record.get("image") is not None:
        record = {**record, "image": image_value(record["image"], f"image of row {index}")}
    return record
