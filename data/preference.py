"""Preference records (``--stage dpo``): a conversation ending with the user's message and two
answers, ``chosen`` and ``rejected``. Each answer makes an SFT record, built by the family's SFT
dataset (dataset.py's SupervisedDataset, data/native.py's NativeDataset), and a batch holds each
pair's two rows next to each other: chosen, rejected, chosen, rejected, ... (a group of 2 answers
to one prompt, as the families' ``forward(..., group=2)`` takes them)."""

from data.errors import DataError, record_failure
from data.schema import PREFERENCE_ANSWERS, RECORD_KEYS
from dataset import DataCollator, SupervisedDataset


def preference_pair(record, index, *, data_path=None):
    """A preference record's two SFT records: its conversation (ending with the user's message)
    answered by ``chosen`` and by ``rejected``; DataError naming the record if it is not one."""
    fail = record_failure(record, index, data_path)
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        fail("bad_conversations", "'conversations' must be a non-empty list of messages ending with the user's")
    last = conversations[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        fail(
            "prompt_not_user_last",
            "a preference record's 'conversations' must end with a user message; its answers go in "
            "'chosen' and 'rejected'",
        )
    for key in PREFERENCE_ANSWERS:
        answer = record.get(key)
        if not isinstance(answer, str) or not answer.strip():
            got = "missing" if answer is None else f"{answer!r:.40}"
            fail("missing_answer", f"'{key}' must be a non-empty string (the assistant's answer), got {got}")
    if record["chosen"].strip() == record["rejected"].strip():
        fail("identical_answers", "'chosen' and 'rejected' are the same answer: nothing to prefer")
    return {
        key: {**record, "conversations": conversations + [{"role": "assistant", "content": record[key]}]}
        for key in PREFERENCE_ANSWERS
    }


class PreferencePairs:
    """A record dataset's preference form (mixed in before an SFT dataset class): ``record_keys``
    with the answers, never truncated (an over-long pair is ``pair_too_long``), and ``_pair``,
    each answer's SFT record built by the dataset's own ``_checked_build``."""

    truncates = False
    record_keys = RECORD_KEYS + PREFERENCE_ANSWERS

    def _pair(self, index, *args):
        """``{"chosen": built, "rejected": built}``: ``_checked_build(index, *args)`` of each answer's
        SFT record; a DataError names the record and the answer."""
        pair = preference_pair(self.records[index], index, data_path=self.data_path)
        built = {}
        for key, record in pair.items():
            try:
                built[key] = self._checked_build(index, *args, record=record)
            except DataError as e:
                raise self._error(index, record, f"with the {key} answer: {e.reason}", path=e.path, code=e.code) from e
        return built


class PreferenceDataset(PreferencePairs, SupervisedDataset):
    """Preference records -> ``{"chosen": sample, "rejected": sample}``: each the SFT sample of the
    prompt with that answer, so only the answer (and its end-of-turn token) is labelled. Each row
    is built by the SFT path, images included (decoded and sliced twice per pair on the loader
    side; the trainer encodes them once)."""

    def __getitem__(self, index):
        return self._pair(index, True)

    def check(self, index):
        built = self._pair(index, False)
        return {
            "tokens": max(b["tokens"] for b in built.values()),
            "truncated": False,
            "length": sum(b["length"] for b in built.values()),
        }


class PreferenceCollator(DataCollator):
    """Batches B pairs as 2B rows, each pair's chosen row then its rejected row.

    Only the chosen rows keep their images (the rejected rows' ``pixel_values`` entries are empty):
    chosen and rejected share the prompt, and the family's ``forward(..., group=2)`` encodes each
    pair's first row's images once and hands their features to both rows.
    """

    def __call__(self, examples):
        batch = super().__call__([example[key] for example in examples for key in PREFERENCE_ANSWERS])
        batch["pixel_values"] = [pixels if n % 2 == 0 else [] for n, pixels in enumerate(batch["pixel_values"])]
        return batch
