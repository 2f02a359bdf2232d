"""Packing (``--packing``): whole samples side by side in one training row, each seeing only itself."""

import bisect

import torch
from torch.utils.data import Dataset

from data.records import IGNORE_INDEX


def pack_lengths(lengths, capacity):
    """Rows of sample indices whose lengths sum to at most ``capacity`` each, every index in one row.

    Best-fit decreasing: longest first, each sample goes into the fullest row it still fits in, so
    rows come out nearly full. Deterministic (ties go to the lower index and the older row): the
    same lengths always give the same rows, which a resumed run relies on.
    """
    too_long = [index for index, length in enumerate(lengths) if length > capacity]
    if too_long:
        raise ValueError(
            f"samples {too_long[:5]} are longer than the row length {capacity}; build them with that max_length"
        )
    rows = []
    room = []  # (tokens still free, row number) of the rows not yet full, in increasing order
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        at = bisect.bisect_left(room, (length, -1))
        if at == len(room):
            rows.append([index])
            free, number = capacity - length, len(rows) - 1
        else:
            free, number = room.pop(at)
            rows[number].append(index)
            free -= length
        if free:
            bisect.insort(room, (free, number))
    return [sorted(row) for row in rows]


def pack_samples(samples):
    """One training row holding ``samples`` (of SupervisedDataset) side by side, for DataCollator.

    Ids, labels and attention masks are concatenated; position ids restart at 0 with each sample;
    image bounds move by the tokens before their sample; images and their sizes follow in order;
    ``records`` names every sample's record. The remote-code models give their LLM position ids and
    no attention mask, and transformers (masking_utils' packed-sequence detection) then keeps each
    position's attention inside its run of increasing position ids: every sample sees only itself,
    with the positions it has alone, so its logits are those of its own row. Labels are stored
    shifted (``labels[i]`` is the token at ``i + 1``), so a sample's last position has none: no
    sample learns the next one's first token.
    """
    offsets = [0]
    for n, sample in enumerate(samples):
        if sample["labels"][-1] != IGNORE_INDEX:
            raise ValueError(
                f"sample {n} has a label at its last position: packed, it would learn the next sample's first "
                "token; pack samples whose labels are stored shifted (shifted_labels)"
            )
        offsets.append(offsets[-1] + len(sample["input_ids"]))

    def joined(key):
        return torch.cat([sample[key] for sample in samples])

    return dict(
        records=[sample["record"] for sample in samples],
        input_ids=joined("input_ids"),
        position_ids=joined("position_ids"),
        labels=joined("labels"),
        attention_mask=joined("attention_mask"),
        pixel_values=[image for sample in samples for image in sample["pixel_values"]],
        tgt_sizes=joined("tgt_sizes"),
        image_bound=torch.cat([sample["image_bound"] + offset for sample, offset in zip(samples, offsets)]),
    )


class PackedDataset(Dataset):
    """The samples of ``dataset`` packed into rows of at most ``max_length`` tokens (``--packing``).

    The rows are chosen once, by pack_lengths over ``lengths``, each sample's token count as
    preflight measured it (``preflight.run``'s ``Checked.lengths``: no sample is built to learn its
    length), and built by pack_samples. Fixed rows make an epoch a known number of rows, hence of
    optimizer steps, and let a resumed run replay the rows it started with; the Trainer's sampler
    shuffles the rows' order each epoch.
    """

    def __init__(self, dataset, lengths, max_length):
        if len(lengths) != len(dataset):
            raise ValueError(f"packing needs each sample's length: {len(lengths)} lengths for {len(dataset)} samples; "
                             "run preflight over the dataset first")
        self.dataset = dataset
        self.max_length = max_length
        self.rows = pack_lengths(lengths, max_length)
        # Each row's token count: what --group_by_length reads (CPMTrainer's train_lengths).
        self.lengths = [sum(lengths[index] for index in row) for row in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return pack_samples([self.dataset[i] for i in self.rows[index]])

    def fill(self):
        """The share of the rows' ``max_length`` tokens that are real (the rest is padding)."""
        return sum(self.lengths) / (len(self.rows) * self.max_length)
