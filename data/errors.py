"""The data pipeline's errors: a record that cannot become a sample, a line that is not JSON, a
media file that cannot be used."""

import functools
import os


class DataError(ValueError):
    """A record that cannot become a training sample.

    ``path`` is the file at fault: the image that failed to load, else the data file.
    ``code`` is a stable short name of the kind of problem (``missing_image``,
    ``no_assistant_turn``, ...; see ``data.preflight_report.REASONS``), for summaries and reports.
    """

    def __init__(self, reason, *, index=None, record_id=None, path=None, data_path=None, code="invalid_record"):
        self.index = index
        self.record_id = record_id
        self.reason = reason
        self.code = code
        self.path = path if path is not None else data_path
        self.data_path = data_path
        where = [] if index is None else [f"record {index} (id {record_id!r})"]
        if data_path is not None:
            where.append(os.fspath(data_path))
        super().__init__(f"{' of '.join(where)}: {reason}")

    def __reduce__(self):
        # Sent to another process (a rank's share of a .jsonl index, gathered) as it was made.
        fields = dict(index=self.index, record_id=self.record_id, path=self.path, data_path=self.data_path,
                      code=self.code)
        return functools.partial(DataError, self.reason, **fields), ()


class MediaProblem(Exception):
    """An image or video file that cannot be used; ``code`` as in DataError. The dataset turns it
    into the DataError naming the record."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class BadLine:
    """A line of a ``.jsonl`` file that is not valid JSON, kept in its record's place.

    Validation reports it as that record's problem (``invalid_json``), so preflight lists it
    with the others and ``--skip_bad_samples`` can drop it like any bad record.
    """

    def __init__(self, line_no, error):
        self.line_no = line_no
        self.error = error

    def __repr__(self):
        return f"<line {self.line_no}: not valid JSON>"


def record_failure(record, index, data_path):
    """``fail(code, reason)``, raising the DataError that names ``record``, once it is known to be
    a JSON object (else that is the failure)."""
    record_id = record.get("id") if isinstance(record, dict) else None

    def fail(code, reason):
        raise DataError(reason, index=index, record_id=record_id, data_path=data_path, code=code)

    if isinstance(record, BadLine):
        fail("invalid_json", f"line {record.line_no} is not valid JSON: {record.error}")
    if not isinstance(record, dict):
        fail("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    return fail
