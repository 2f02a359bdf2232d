"""Parquet, Arrow and Hugging Face ``datasets`` folders as training data, through the ``datasets`` library.

    --data_path train.parquet          # or a folder of .parquet files, an .arrow file,
                                       # or a folder written by datasets' save_to_disk
    --data_columns rlaif-v             # how the table's columns become our records (see COLUMNS)

The table is memory-mapped, not loaded: ``datasets`` reads an .arrow file or a save_to_disk folder
in place, and converts Parquet once into Arrow files in its cache (``HF_HOME``), read in place
after. A record is built from its row when it is asked for, so memory does not grow with the table.

Images may be paths (a string column, resolved like a JSON record's, against --image_folder or the
data's folder) or embedded bytes (the ``datasets`` Image feature, as hub datasets store them):
those become ``dataset.EmbeddedImage``s, decoded as a file would be. A list of images becomes
``{"<image_00>": ..., ...}``, for text that tags them so.

``--data_columns`` says how a row becomes a record (dataset.py's form: ``id``, ``image``,
``conversations`` of ``role``/``content``, and ``chosen``/``rejected`` for preference records):

- not given: the columns already have our names; every column is taken as it is (a column we do not
  read is reported, as an unknown key of a JSON record is);
- ``rlaif-v``: RLAIF-V's layout, ``image``, ``question``, ``chosen``, ``rejected`` (and ``idx`` as
  the id): a preference record (``--stage dpo``) whose user message is ``<image>`` and the question;
- ``sharegpt`` (also ``llava``): ``id``, ``image`` and ``conversations`` of ``from``/``value``
  messages (``human`` -> ``user``, ``gpt`` -> ``assistant``), as LLaVA's and ShareGPT's files;
- ``KEY=COLUMN,...``: our key from the column of that name (e.g. ``id=uid,image=img,conversations=messages``);
  other columns are left out.

The same mappings apply to JSON and JSON Lines files (``load``), record by record.
"""

import os

from dataset import EmbeddedImage, load_records

COLUMNS = {
    "rlaif-v": "RLAIF-V: image, question, chosen, rejected (idx as the id) -> a preference record",
    "sharegpt": "ShareGPT / LLaVA: id, image, conversations of from/value messages",
    "llava": "the same as sharegpt",
}
OUR_KEYS = ("id", "image", "video", "conversations", "chosen", "rejected")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ARROW_SUFFIXES = (".parquet", ".arrow")


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


class MappedRecords:
    """Records of a sequence (a JSON list, JsonLines) under a --data_columns mapping, mapped when read."""

    def __init__(self, records, columns):
        self.records, self.columns = records, columns

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return to_record(self.records[index], index, self.columns)

    def items(self):
        """``(index, record)`` of every record, in order."""
        return ((index, self[index]) for index in range(len(self)))


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


class ArrowRecords(MappedRecords):
    """The rows of a Parquet / Arrow table or a save_to_disk folder, memory-mapped, as records.

    A DataError (dataset.py) names the file where it cannot be read as a table.
    """

    def __init__(self, path, columns=None):
        # Imported here: a run on JSON data does not wait for datasets and pyarrow to import.
        import datasets

        from dataset import DataError

        self.path = os.fspath(path)
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
        super().__init__(table, columns)


def load(path, columns=None):
    """The records of a data file, as a sequence: ArrowRecords for a table, else dataset.load_records'
    (a JSON list, or JsonLines), mapped by ``columns`` (--data_columns) when given."""
    if is_arrow_source(path):
        return ArrowRecords(path, columns)
    records = load_records(path)
    return records if columns is None else MappedRecords(records, columns)
