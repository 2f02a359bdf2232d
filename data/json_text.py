"""Reading a JSON data file's text: UTF-8 (with or without a byte-order mark), duplicate keys
noted, nesting too deep refused like any invalid JSON; errors as DataErrors naming the file."""

import json

from data.errors import DataError


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
