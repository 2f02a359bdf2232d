"""Parquet, Arrow and Hugging Face ``datasets`` folders as training data, through the ``datasets`` library.

    --data_path train.parquet          # or a folder of .parquet files, an .arrow file,
                                       # or a folder written by datasets' save_to_disk
    --data_columns rlaif-v             # how the columns become our records (columns.py)

The table is memory-mapped, not loaded: ``datasets`` reads an .arrow file or a save_to_disk folder
in place, and converts Parquet once into Arrow files in its cache (``HF_HOME``), read in place
after. A record is built from its row when it is asked for, so memory does not grow with the table.

Images may be paths (a string column, resolved like a JSON record's, against --image_folder or the
data's folder) or embedded bytes (the ``datasets`` Image feature, as hub datasets store them):
those become ``EmbeddedImage``s (data/media.py), decoded as a file would be. A list of images becomes
``{"<image_00>": ..., ...}``, for text that tags them so.

How a row becomes a record is --data_columns' mapping (data/sources/columns.py).
"""

import os

from data.errors import DataError
from data.sources.base import Source

ARROW_SUFFIXES = (".parquet", ".arrow")


def is_arrow_source(path):
    """Whether ``path`` is read as a table: a .parquet or .arrow file, a save_to_disk folder or a folder of Parquet files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return saved_by_datasets(path) or any(name.lower().endswith(".parquet") for name in os.listdir(path))
    return path.lower().endswith(ARROW_SUFFIXES)


def saved_by_datasets(folder):
    """Whether ``folder`` was written by save_to_disk (one table, or a dict of splits)."""
    return any(os.path.exists(os.path.join(folder, name)) for name in ("state.json", "dataset_dict.json"))


def parquet_files(folder):
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.lower().endswith(".parquet"))


class ArrowRecords(Source):
    """The rows of a Parquet / Arrow table or a save_to_disk folder, memory-mapped, as records.

    A DataError names the file where it cannot be read as a table.
    """

    # A table's cells go through to_record always: images stored as bytes become EmbeddedImages.
    always_mapped = True

    def __init__(self, path, columns=None):
        # Imported here: a run on JSON data does not wait for datasets and pyarrow to import.
        import datasets

        super().__init__(path, columns)
        try:
            if os.path.isdir(self.path) and saved_by_datasets(self.path):
                table = datasets.load_from_disk(self.path)
            elif os.path.isdir(self.path):
                table = datasets.Dataset.from_parquet(parquet_files(self.path))
            elif self.path.lower().endswith(".parquet"):
                table = datasets.Dataset.from_parquet(self.path)
            else:
                table = datasets.Dataset.from_file(self.path)
        except (OSError, ValueError, TypeError, datasets.exceptions.DatasetGenerationError) as e:
            raise DataError(f"cannot read the table: {type(e).__name__}: {e}", data_path=self.path,
                            code="unreadable_file") from e
        if isinstance(table, datasets.DatasetDict):
            raise DataError(f"the folder holds the splits {', '.join(table)}, not one table: give the folder of one "
                            f"of them ({os.path.join(self.path, next(iter(table)))})", data_path=self.path,
                            code="unreadable_file")
        # Images come as their encoded bytes or paths ({"bytes", "path"}), decoded where training
        # decodes every image (open_rgb), not by datasets into PIL images on every row read.
        for name, feature in table.features.items():
            if isinstance(feature, datasets.Image):
                table = table.cast_column(name, datasets.Image(decode=False))
            elif isinstance(feature, (list, datasets.Sequence, datasets.List)) and isinstance(
                    getattr(feature, "feature", None), datasets.Image):
                table = table.cast_column(name, datasets.Sequence(datasets.Image(decode=False)))
        self.table = table

    @classmethod
    def accepts(cls, path):
        return is_arrow_source(path)

    def __len__(self):
        return len(self.table)

    def row(self, index):
        return self.table[index]
