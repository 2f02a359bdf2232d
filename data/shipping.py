"""Batches that leave a DataLoader worker as one block of shared memory.

A DataLoader worker hands the training process each tensor storage of a batch on its own: a
shared-memory block, its file descriptor passed over a socket, a map on arrival. That costs about as
much for a few bytes of image bounds as for megabytes of pixels (benchmarks/pipeline.py measures it),
and a remote-code batch of 4 samples held 16 storages: ids, positions, labels, mask, and per sample
its pixels, bounds and patch grid.

The collators return a ShippedBatch: in the process that built it, a dict like any other. Pickled,
which a worker's result queue does, its tensors travel as one uint8 block plus each tensor's dtype,
shape and place in it; unpickling, in the training process, rebuilds the same dict (a plain one)
whose tensors are views of the block: equal values, dtypes and shapes (contiguous), and one tensor
object where the batch held one object twice (``image_bound`` and ``image_bounds``). The model sees
the batch the collator built, tensor for tensor (tests/test_shipping.py), whatever the number of
workers; with none, nothing is packed at all.
"""

import torch

# Each tensor starts at a multiple of this many bytes of the block: a view of any dtype is aligned.
ALIGN = 64


class Leaf:
    """Where tensor ``number`` of a shipped batch stood in its structure."""

    __slots__ = ("number",)

    def __init__(self, number):
        self.number = number

    def __reduce__(self):
        return Leaf, (self.number,)


def _strip(value, tensors, numbers):
    """``value`` with every tensor replaced by its Leaf (in dicts, lists and tuples); the tensors are
    appended to ``tensors``, each object once (``numbers``: id -> its number)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in numbers:
            numbers[id(value)] = len(tensors)
            tensors.append(value)
        return Leaf(numbers[id(value)])
    if isinstance(value, dict):
        return {key: _strip(item, tensors, numbers) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(item, tensors, numbers) for item in value)
    return value


def _fill(value, tensors):
    if isinstance(value, Leaf):
        return tensors[value.number]
    if isinstance(value, dict):
        return {key: _fill(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(item, tensors) for item in value)
    return value


def pack(batch):
    """``(block, structure, specs)``: every tensor of ``batch`` copied into one uint8 tensor in
    shared memory, ``batch`` with Leafs in their places, and each tensor's ``(dtype, shape, offset)``."""
    tensors = []
    structure = _strip(dict(batch), tensors, {})
    specs, end = [], 0
    for tensor in tensors:
        offset = -(-end // ALIGN) * ALIGN
        specs.append((tensor.dtype, tuple(tensor.shape), offset))
        end = offset + tensor.numel() * tensor.element_size()
    # Allocated in shared memory: the worker's queue sends its descriptor without copying it again.
    block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(end, 1)))
    for tensor, spec in zip(tensors, specs):
        _view(block, *spec).copy_(tensor)
    return block, structure, specs


def _view(block, dtype, shape, offset):
    size = torch.Size(shape).numel() * dtype.itemsize
    return block[offset : offset + size].view(dtype).view(shape)


def unpack(block, structure, specs):
    """The batch ``pack`` took apart, as a plain dict: its tensors views of ``block``."""
    return _fill(structure, [_view(block, *spec) for spec in specs])


class ShippedBatch(dict):
    """A collator's batch: a dict, which a DataLoader worker ships as one block (see the module docstring)."""

    def __reduce__(self):
        return unpack, pack(self)
