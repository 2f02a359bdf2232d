"""What a data source is: one data file's (or folder's) records as a sequence, read on demand, each
mapped to our record's form by --data_columns (data.sources.columns)."""

import abc
import os

from data.sources.columns import to_record


class Source(abc.ABC):
    """The records of one data file: ``len``, ``[index]`` and ``items()`` (``(index, record)`` in order).

    A subclass says which paths it reads (``accepts``) and gives ``len`` and ``row(index)``, the
    record as stored; ``[index]`` maps it to our form under ``columns`` (--data_columns; None: the
    rows are records already, taken as they are). Where the file cannot be read, the constructor
    raises a DataError naming it; a copy sent to another process (a pickle) must read the same rows.
    """

    # Whether every row goes through to_record, ``columns`` given or not (a table's cells: images
    # stored as bytes become EmbeddedImages).
    always_mapped = False

    def __init__(self, path, columns=None):
        self.path = os.fspath(path)
        self.columns = columns

    @classmethod
    @abc.abstractmethod
    def accepts(cls, path):
        """Whether this source reads ``path`` (data.sources.load asks the registered sources in order)."""

    @abc.abstractmethod
    def __len__(self):
        """The number of records."""

    @abc.abstractmethod
    def row(self, index):
        """Record ``index`` as stored, before the --data_columns mapping."""

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        row = self.row(index)
        if self.columns is None and not self.always_mapped:
            return row
        return to_record(row, index, self.columns)

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def items(self):
        """``(index, record)`` of every record, in order."""
        return ((index, self[index]) for index in range(len(self)))
