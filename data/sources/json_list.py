"""A ``.json`` data file: one JSON list of records, held in memory. Any file no other source
accepts is read as one (see data.sources.load)."""

import json

from data.errors import DataError
from data.sources.base import Source
from data.json_text import parse_json, read_text


class JsonList(Source):
    """A ``.json`` file holding a list of records, read whole. A file that cannot be read, is not
    UTF-8 or not a JSON list raises DataError."""

    def __init__(self, path, columns=None):
        super().__init__(path, columns)
        text = read_text(self.path)
        try:
            records = parse_json(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e}", data_path=self.path, code="invalid_json") from e
        if not isinstance(records, list):
            raise DataError(
                f"a .json data file must hold a list of records, got {type(records).__name__}", data_path=self.path,
                code="invalid_json",
            )
        self.rows = records

    @classmethod
    def accepts(cls, path):
        return True  # the fallback: a file no other source takes is one JSON document

    def __len__(self):
        return len(self.rows)

    def row(self, index):
        return self.rows[index]
