"""What a dataset of records is, whichever model it feeds (remote code: dataset.SupervisedDataset;
native: data/native.py): the records, the folder their relative paths resolve against, the checks of
data/schema.py, images loaded or refused, and errors naming the record."""

import hashlib
import json
import os

from torch.utils.data import Dataset

from data.errors import DataError, MediaProblem
from data.media import EmbeddedImage, open_rgb
from data.schema import RECORD_KEYS, SINGLE_IMAGE_TAG, validate_record

# The label of a position that is not learned (the loss ignores it).
IGNORE_INDEX = -100
# Special tokens that are content, not structure, and so may appear in message text: the
# grounding markup MiniCPM-V reads and writes (<ref>cat</ref><box>...</box>) and the thinking
# block of MiniCPM-V 4.5's answers.
CONTENT_MARKUP = frozenset(
    ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>", "<think>", "</think>")
)


def tokenizer_fingerprint(tokenizer):
    """A hash of all a tokenizer's output depends on: its full definition (vocabulary, merges,
    normalizer, added tokens; the vocabulary where it has no such backend), special tokens and
    chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(definition.encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.chat_template],
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()


class RecordDataset(Dataset):
    """What a dataset of records is, whichever model it feeds: the records, the folder their
    relative paths resolve against, the checks of validate_record, and errors naming the record.

    A subclass sets ``tokenizer``, ``reserved_tokens``, ``special_tokens`` and ``takes_system`` (see
    validate_record and check_settings; ``special_tokens`` from ``special_tokens_of``) and defines ``_build(record, index, *args)``;
    ``_checked_build(index, *args)`` validates and builds record ``index`` (or ``record``, one
    made from it, such as a preference pair's answer).
    """

    # The record keys the dataset reads (validate_record refuses any other).
    record_keys = RECORD_KEYS
    # Over-long samples are cut at max_length (with a warning); a preference pair must not be.
    truncates = True

    def __init__(self, records, *, max_length, image_root, data_path):
        self.records = records
        self.max_length = max_length
        self.data_path = None if data_path is None else os.fspath(data_path)
        if image_root is None:
            image_root = os.path.dirname(os.path.abspath(self.data_path)) if self.data_path else os.getcwd()
        self.image_root = os.fspath(image_root)

    def __len__(self):
        return len(self.records)

    def validate(self, record, index):
        validate_record(
            record,
            index,
            data_path=self.data_path,
            reserved_tokens=self.reserved_tokens,
            special_tokens=self.special_tokens,
            keys=self.record_keys,
            system=self.takes_system,
        )

    def check_settings(self):
        """Everything besides the data file that decides what ``check`` finds (JSON values): a
        preflight result is reused only where these are equal (preflight's cache)."""
        return dict(dataset=type(self).__name__, max_length=self.max_length, image_root=self.image_root,
                    tokenizer=tokenizer_fingerprint(self.tokenizer))

    def special_tokens_of(self, tokenizer):
        """The tokenizer's special tokens that message text must not hold: all of them but the
        image tag, the reserved tokens (refused with their own reason) and CONTENT_MARKUP."""
        special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        special |= set(tokenizer.all_special_tokens)
        return tuple(sorted(special - {SINGLE_IMAGE_TAG, *self.reserved_tokens} - CONTENT_MARKUP))

    def _checked_build(self, index, *args, record=None):
        record = self.records[index] if record is None else record
        self.validate(record, index)
        try:
            return self._build(record, index, *args)
        except DataError:
            raise
        except Exception as e:  # any other failure still names the record; the cause stays chained
            raise self._error(index, record, f"{type(e).__name__}: {e}", code="build_failed") from e

    def _refuse_truncation(self, index, record, full_length):
        """Raise ``pair_too_long`` where this dataset may not truncate (preference pairs) and the
        sample of ``full_length`` tokens would be."""
        if full_length > self.max_length and not self.truncates:
            raise self._error(
                index,
                record,
                f"{full_length} tokens, more than max_length {self.max_length}: a preference pair must fit whole, "
                "with its answer intact; raise model_max_length or shorten the record",
                code="pair_too_long",
            )

    def _error(self, index, record, reason, path=None, code="invalid_record"):
        return DataError(
            reason, index=index, record_id=record.get("id"), path=path, data_path=self.data_path, code=code
        )

    def _full_path(self, path):
        return path if isinstance(path, EmbeddedImage) or os.path.isabs(path) else os.path.join(self.image_root, path)

    def _open_image(self, path):
        """A decoded image as this dataset hands it on (remote code: RGB as its processor converts it)."""
        return open_rgb(path)

    def _load_image(self, index, record, tag, path):
        full_path = self._full_path(path)
        try:
            return self._open_image(full_path)
        except MediaProblem as e:
            raise self._error(
                index, record, f"cannot load image {tag} from {full_path}: {e}", path=full_path, code=e.code
            ) from e
