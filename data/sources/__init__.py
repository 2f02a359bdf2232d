"""Data sources: where records come from. ``load(path, columns)`` asks each registered source, in
order, whether it reads ``path`` (``accepts``); the first that does reads it, and a path none
accepts is read as one JSON list (JsonList). Every source yields ``(index, record)`` (``items()``)
and is a sequence (``len``, ``[index]``), its rows mapped by --data_columns (columns.py).

To add one: write ``data/sources/<name>.py`` with a ``base.Source`` subclass (``accepts(path)``,
``__len__``, ``row(index)``) and add its ``register(...)`` line below. A test may call ``register``.
"""

from data.sources.arrow import ArrowRecords
from data.sources.json_list import JsonList
from data.sources.json_lines import JsonLines

SOURCES = []


def register(source):
    """Add ``source`` (a base.Source subclass), asked after those registered before it; returns it."""
    SOURCES.append(source)
    return source


register(ArrowRecords)  # .parquet, .arrow, a folder of Parquet files or of datasets' save_to_disk
register(JsonLines)  # .jsonl, .ndjson


def load(path, columns=None):
    """The records of the data file ``path`` (a Source, read on demand where the format allows), mapped
    by ``columns`` (--data_columns) when given; a DataError names the file where it cannot be read."""
    source = next((source for source in SOURCES if source.accepts(path)), JsonList)
    return source(path, columns)
