"""Batches from DataLoader workers: one block shipped, the batch the collator built received (data/shipping.py)."""

import io
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

import preflight
from data.packing import PackedDataset
from data.shipping import ShippedBatch
from launch import dataset_as_trained
from test_dpo import write_preferences

BATCH = 3


def assert_same(got, want, where="batch"):
    """``got`` has ``want``'s structure, and each tensor its dtype, shape and values."""
    assert type(got) is (dict if isinstance(want, dict) else type(want)), where
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for n, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{n}]")
    else:
        assert got == want, where


class CountingPickler(pickle.Pickler):
    """Counts the tensors it pickles (each a storage a DataLoader worker would ship on its own)."""

    tensors = 0

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors += 1
        return NotImplemented


def pickled_tensors(batch):
    pickler = CountingPickler(io.BytesIO())
    pickler.dump(batch)
    return pickler.tensors


@pytest.fixture(scope="module")
def cases(tiny_checkpoint, shapes, tmp_path_factory):
    """name -> (dataset, collator): remote-code SFT samples, packed rows, preference pairs, native samples
    and native preference pairs."""
    remote = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), shapes)
    checked = preflight.run({"train": remote[0], "eval": None}, str(tmp_path_factory.mktemp("preflight")))
    packed = PackedDataset(checked.datasets["train"], checked.lengths["train"], 160)
    preferences = write_preferences(shapes, tmp_path_factory.mktemp("pairs") / "pairs.json")
    return {
        "remote-code": remote,
        "packed rows": (packed, remote[1]),
        "preference pairs": dataset_as_trained(tiny_checkpoint("minicpmv2_6"), preferences, "--stage", "dpo"),
        "native": dataset_as_trained(tiny_checkpoint("minicpmv4_6"), shapes),
        "native preference pairs": dataset_as_trained(tiny_checkpoint("minicpmv4_6"), preferences, "--stage", "dpo"),
    }


@pytest.mark.parametrize("case", ["remote-code", "packed rows", "preference pairs", "native", "native preference pairs"])
def test_batches_from_workers_are_the_batches_built_in_process(cases, case):
    dataset, collator = cases[case]
    starts = range(0, len(dataset), BATCH)
    # The old way: the collator's batch as the process that built it holds it.
    built = [collator([dataset[i] for i in range(start, min(start + BATCH, len(dataset)))]) for start in starts]
    assert all(type(batch) is ShippedBatch for batch in built)
    received = list(DataLoader(dataset, batch_size=BATCH, num_workers=2, collate_fn=collator))
    assert len(received) == len(built) > 1
    for n, (got, want) in enumerate(zip(received, built)):
        assert_same(got, want, f"batch {n}")
    assert pickled_tensors(dict(built[0])) > 3  # what went storage by storage before
    if not case.startswith("native"):  # one object under two names stays one object
        assert all(a is b for batch in received for a, b in zip(batch["image_bound"], batch["image_bounds"]))
    # A packed row holds several records and restarts its position ids.
    if case == "packed rows":
        assert len(received[0]["records"]) > BATCH


def test_a_shipped_batch_pickles_as_one_tensor():
    ids = torch.arange(12).view(2, 6)
    batch = ShippedBatch(
        input_ids=ids, mask=torch.ones(2, 6, dtype=torch.bool), pixels=[torch.randint(0, 255, (3, 14, 28), dtype=torch.uint8)],
        bounds=[ids[:, :2], torch.zeros((0, 2), dtype=torch.int64)], sizes=torch.zeros((0, 2), dtype=torch.int32),
        weights=torch.rand(5, dtype=torch.bfloat16), count=torch.tensor(7), records=[{"index": 0, "id": "a"}],
    )
    assert pickled_tensors(dict(batch)) == 8
    assert pickled_tensors(batch) == 1
    back = pickle.loads(pickle.dumps(batch))
    assert_same(back, dict(batch))
