"""A JSON Lines data file (``.jsonl``, ``.ndjson``, in any case): one record per line, read on demand."""

import array
import datetime
import json
import os

import numpy as np

from data.errors import BadLine, DataError
from data.json_text import not_utf8, parse_json, unreadable
from data.ranks import gather, world
from data.sources.base import Source

# File names read as JSON Lines (compared in lower case); any other is one JSON document.
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
UTF8_BOM = b"\xef\xbb\xbf"
# How long a rank waits for the others' share of the index.
INDEX_WAIT = datetime.timedelta(hours=1)


def is_json_lines(path):
    return os.fspath(path).lower().endswith(JSON_LINES_SUFFIXES)


def index_lines(path, start, stop):
    """``(offsets, line numbers, lines)`` of the lines of ``path`` that start at a byte in
    ``[start, stop)``: each non-blank line's offset and its number counted from the first line of
    the range (1), and how many lines (blank ones too) start there. Reads those lines and the one
    byte before ``start``'s line, nothing else; a line that is not UTF-8 is a DataError."""
    # Compact arrays, 16 bytes a record, from the start: Python ints in lists would take about 70.
    offsets, line_numbers = array.array("q"), array.array("q")
    line_no = 0
    try:
        with open(path, "rb") as f:
            if start:
                f.seek(start - 1)
                f.readline()  # the end of the line before: its own range's
            offset = f.tell()
            while offset < stop:
                line = f.readline()
                if not line:
                    break
                line_no += 1
                begin = offset
                offset += len(line)
                if begin == 0 and line.startswith(UTF8_BOM):
                    line, begin = line[len(UTF8_BOM):], begin + len(UTF8_BOM)
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise not_utf8(path, line, e, begin) from e
                if text.strip():
                    offsets.append(begin)
                    line_numbers.append(line_no)
    except OSError as e:
        raise unreadable(path, e) from e
    return np.frombuffer(offsets, dtype=np.int64), np.frombuffer(line_numbers, dtype=np.int64), line_no


class JsonLines(Source):
    """The records of a JSON Lines file, read on demand: a sequence (``len``, ``[index]``) that holds
    each record's byte offset and line number, not the records, so memory does not grow with the
    file's text. Indexing reads one line and parses it; a line that is not valid JSON comes back
    as a ``BadLine`` in its record's place.

    Lines end at ``\n`` (``\r\n`` too) only: U+2028, U+0085 and the other characters that
    ``str.splitlines()`` also cuts at are legal, unescaped, inside JSON strings. Blank lines are
    no records. The whole file is checked to be UTF-8 (a BOM is allowed) when indexed, as
    ``read_text`` checks a ``.json`` file. In a distributed run every rank indexes its share of the
    bytes (index_lines) and the shares are gathered (every rank constructs it, together). A copy
    sent to another process (a pickle) reopens the file there.
    """

    def __init__(self, path, columns=None):
        super().__init__(path, columns)
        # Each rank indexes the lines that start in its share of the bytes, and the ranks gather the
        # shares: no rank reads the whole file, and each holds the whole index.
        rank, world_size = world()
        try:
            size = os.path.getsize(self.path)
            mine = index_lines(self.path, size * rank // world_size, size * (rank + 1) // world_size)
        except DataError as e:  # raised below on every rank, after the gather every rank joins
            mine = e
        except OSError as e:
            mine = unreadable(self.path, e)
        shares = gather(mine, INDEX_WAIT)
        failed = [share for share in shares if isinstance(share, DataError)]
        if failed:
            raise failed[0]  # the first in the file, as one reader would have met it
        lines_before = np.cumsum([0] + [lines for _, _, lines in shares[:-1]])
        self.offsets = np.concatenate([offsets for offsets, _, _ in shares])
        self.line_numbers = np.concatenate([numbers + before for (_, numbers, _), before in zip(shares, lines_before)])
        self._file = None

    def __len__(self):
        return len(self.offsets)

    @classmethod
    def accepts(cls, path):
        return is_json_lines(path)

    def row(self, index):
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (held for the dataset's life, reopened per process)
        self._file.seek(int(self.offsets[index]))
        line = self._file.readline().decode("utf-8")
        try:
            return parse_json(line)
        except json.JSONDecodeError as e:  # parse_json: nesting too deep to parse is one too
            return BadLine(int(self.line_numbers[index]), e)

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()
