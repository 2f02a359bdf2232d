"""Share of real (non-padding) tokens in training batches: random order, length grouping, packing.

    python benchmarks/padding.py [--records 240] [--batch 8] [--rows 2] [--epochs 5]

Writes a mix of text-only, one-image and two-image records (images of several sizes, so slice
counts vary), builds the dataset as finetune.py does for a tiny MiniCPM-V 2.6 checkpoint
(max_slice_nums 9, model_max_length 2048; the tiny model's placeholders are shorter than the real
model's 64 queries), runs preflight (which measures every record's length) and counts, per
epoch of batches, real tokens / (batch size x longest sample of the batch). For packing (what
--packing trains on: data.packing.PackedDataset, whole samples side by side up to model_max_length) a
batch is --rows packed rows, counted the same way. It also times what the stock Trainer does for
length grouping without lengths: building every sample to measure it.
"""

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import families  # noqa: E402
import finetune  # noqa: E402
from stages import prepare  # noqa: E402
import loading  # noqa: E402
import preflight  # noqa: E402
from data.packing import PackedDataset  # noqa: E402
from tiny_models.build import build_checkpoint  # noqa: E402

SIZES = ((112, 112), (224, 112), (336, 224), (448, 448), (560, 280))
WORDS = "the a red green blue shape circle square triangle large small left right top bottom".split()


def write_data(folder, count, rng):
    (folder / "images").mkdir()
    for n, size in enumerate(SIZES):
        Image.new("RGB", size, (40 * n, 120, 200)).save(folder / "images" / f"{n}.png")
    records = []
    for n in range(count):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))
        question = "Describe it. " * rng.randint(1, 20)
        record = {"id": f"r{n}", "conversations": [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": answer}]}
        kind = n % 3
        if kind == 1:
            record["image"] = f"images/{rng.randrange(len(SIZES))}.png"
        elif kind == 2:
            record["image"] = {f"<image_0{i}>": f"images/{rng.randrange(len(SIZES))}.png" for i in range(2)}
            record["conversations"][0]["content"] = "<image_00>\n<image_01>\n" + question
        records.append(record)
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def real_fraction(batches, lengths):
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return real / padded


def batches_of(order, size):
    order = list(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=240)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per batch")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_data(tmp, args.records, random.Random(0))
        model = build_checkpoint("minicpmv2_6", tmp / "model")
        _, data_args, training_args, _ = finetune.parse_args(
            ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(tmp / "out"),
             "--llm_type", "qwen", "--max_slice_nums", "9", "--model_max_length", "2048"]
        )
        config = loading.load_config(model)
        family = families.family_for(config)
        train, _ = prepare.build_datasets(family, data_args, training_args, family.load_processing(model), config)
        start = time.perf_counter()
        result = preflight.run({"train": train}, str(tmp / "out"))
        train = result.datasets["train"]
        checked = time.perf_counter() - start
        lengths = result.lengths["train"]
        start = time.perf_counter()
        measured = LengthGroupedSampler(args.batch, dataset=train).lengths
        built = time.perf_counter() - start
        assert measured == lengths, "preflight's lengths differ from the built samples'"
        start = time.perf_counter()
        packed = PackedDataset(train, lengths, training_args.model_max_length)
        packing = time.perf_counter() - start
        assert [len(packed[n]["input_ids"]) for n in range(len(packed))] == packed.lengths

    print(f"{args.records} records (text-only, one image, two images), lengths {min(lengths)}..{max(lengths)} tokens")
    print(f"lengths: from preflight's check {checked:.2f} s (which runs anyway); "
          f"building every sample to measure them (stock Trainer) {built:.2f} s more")
    generator = torch.Generator().manual_seed(0)
    print(f"packing: {len(lengths)} samples into {len(packed)} rows of at most {training_args.model_max_length} "
          f"tokens in {packing:.3f} s, {100 * packed.fill():.1f}% of the rows' tokens real")
    results = {"random order": [], "length grouping": [], "packing": []}
    for _ in range(args.epochs):
        results["random order"].append(real_fraction(batches_of(RandomSampler(lengths, generator=generator), args.batch), lengths))
        grouped = LengthGroupedSampler(args.batch, lengths=lengths, generator=generator)
        results["length grouping"].append(real_fraction(batches_of(grouped, args.batch), lengths))
        rows = RandomSampler(packed.lengths, generator=generator)
        results["packing"].append(real_fraction(batches_of(rows, args.rows), packed.lengths))
    ideal = real_fraction(batches_of(sorted(range(len(lengths)), key=lengths.__getitem__), args.batch), lengths)
    for name, values in results.items():
        size = f"{args.rows} packed rows" if name == "packing" else f"{args.batch} samples"
        print(f"{name:>16}: {100 * sum(values) / len(values):.1f}% real tokens (batches of {size}, "
              f"mean of {args.epochs} epochs)")
    print(f"{'sorted globally':>16}: {100 * ideal:.1f}% (the bound, no randomness)")


if __name__ == "__main__":
    main()
