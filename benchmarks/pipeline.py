"""Throughput of the remote-code data pipeline: uint8 pixels (now) vs float pixels (the path before).

    python benchmarks/pipeline.py [--repeats 5] [--passes 3] [--workers 0 1 2] [--images 48]

Writes --images JPEGs (48; noise and shapes, 448x448 up to 2000x500) and one-image records into a temporary
folder and builds the dataset as training does for MiniCPM-V 2.6 (qwen template, max_slice_nums 9,
scale_resolution 448, patch 14, 64 queries; the tiny 2.6 checkpoint's tokenizer). Two pipelines run
on the same images:

- ``uint8``: the dataset as it is (uint8 pixels; the trainer's backend normalises on the device);
- ``float``: the path before, kept here for the comparison: each view through IMAGE_TRANSFORM to
  float32 on the loader side, and the two full-size image copies its RGB conversion made.

First every sample of both is built and compared: ``model_pixels`` of the uint8 pixels must equal the
float pixels bit for bit (float32) and their bfloat16 cast (bfloat16); ids, labels, bounds and patch
grids must be equal. Then, with one torch thread and old and new interleaved (the machine may be
shared), it times ``__getitem__`` + the collator (batches of 4) in the main process, as samples per
CPU second (per core), median of the repeats; and through a torch DataLoader with 0, 1 and 2 workers:
samples per second of wall time and CPU seconds per sample of the process and its workers together
(``os.times``, children included once the workers are joined), and, from runs of P and 2P passes,
what each further sample costs apart from starting the workers (a cost per epoch). The main process only receives the
batches (no device copy). Last, the cost of normalising a batch on the CPU (``model_pixels``): work
that, without a GPU, moves from the loader to the training process.
"""

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dataset  # noqa: E402
import loading  # noqa: E402
from tiny_models.build import build_checkpoint  # noqa: E402

SIZES = ((448, 448), (640, 480), (800, 600), (1024, 768), (1280, 720), (1600, 900), (2000, 500), (500, 1500))
IMAGES = 48
BATCH = 4
# MiniCPM-V 2.6's published slicing and placeholder settings.
SETTINGS = dataset.DataSettings(
    slice_config={"max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14},
    query_num=64, patch_size=14, batch_vision=True, use_image_id=True,
)


def write_data(folder, images=IMAGES):
    rng = np.random.default_rng(0)
    records = []
    for n in range(images):
        width, height = SIZES[n % len(SIZES)]
        # Smooth noise (upscaled) with a shape: JPEG work like a photo's, not like pure noise's.
        noise = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((width, height), Image.Resampling.BILINEAR)
        ImageDraw.Draw(image).ellipse((10, 10, width // 2, height // 2), fill=(200, 30, 30))
        image.save(folder / f"{n:02d}.jpg", quality=90)
        records.append({"id": f"r{n}", "image": f"{n:02d}.jpg", "conversations": [
            {"role": "user", "content": "<image>\nWhat is in the image? Describe the colours and the shapes."},
            {"role": "assistant", "content": "A red ellipse on a mottled background, top left."}]})
    return records


class FloatPixelDataset(dataset.SupervisedDataset):
    """The pipeline before uint8 pixels: float32 views normalised on the loader side."""

    def _load_image(self, index, record, tag, path):
        # The two full-size copies the RGB conversion made: exif_transpose's and convert("RGB")'s.
        return super()._load_image(index, record, tag, path).copy().convert("RGB")

    def _image_tensors(self, images):
        tensors = [dataset.IMAGE_TRANSFORM(image) for image in images]
        p = self.patch_size
        sizes = [[t.shape[1] // p, t.shape[2] // p] for t in tensors]
        return [float_patches(t, p) for t in tensors], torch.tensor(sizes, dtype=torch.int32).reshape(-1, 2)


def float_patches(image, p):
    """The path before's reshape_by_patch: ``[3, H, W]`` float -> ``[3, p, H*W/p]``."""
    channels, height, width = image.shape
    patches = image[:, : height // p * p, : width // p * p].reshape(channels, height // p, p, width // p, p)
    return patches.permute(0, 2, 1, 3, 4).reshape(channels, p, -1)


def check_identical(new, old):
    for i in range(len(new)):
        a, b = new[i], old[i]
        for key in ("input_ids", "labels", "position_ids", "image_bound", "tgt_sizes"):
            assert torch.equal(a[key], b[key]), (i, key)
        assert {p.dtype for p in a["pixel_values"]} == {torch.uint8}
        for dtype in (torch.float32, torch.bfloat16):
            got = dataset.model_pixels([a["pixel_values"]], dtype)[0]
            assert len(got) == len(b["pixel_values"]), i
            assert all(torch.equal(g, f.to(dtype)) for g, f in zip(got, b["pixel_values"])), (i, dtype)


def in_process(data, collator):
    """Samples per CPU second: every sample built and collated, batches of BATCH, this process."""
    start = time.process_time()
    for first in range(0, len(data), BATCH):
        collator([data[i] for i in range(first, min(first + BATCH, len(data)))])
    return len(data) / (time.process_time() - start)


def cpu_seconds():
    """(this process's, its joined children's) CPU seconds."""
    times = os.times()
    return times.user + times.system, times.children_user + times.children_system


def through_loader(data, collator, workers, passes):
    """(samples per wall second, CPU seconds per sample in all, of which in the main process) through
    a DataLoader over ``passes`` passes of the samples: one start of the workers, as in a training
    epoch; they are joined at its end, so os.times counts them."""
    start_wall, (start_main, start_workers) = time.perf_counter(), cpu_seconds()
    order = list(range(len(data))) * passes
    count = 0
    for batch in DataLoader(data, batch_size=BATCH, sampler=order, num_workers=workers, collate_fn=collator):
        count += len(batch["input_ids"])
    wall = time.perf_counter() - start_wall
    main, workers = cpu_seconds()
    main -= start_main
    return count / wall, (main + workers - start_workers) / count, main / count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3, help="passes over the 48 samples per DataLoader timing")
    parser.add_argument("--images", type=int, default=IMAGES, help="images (and records), sizes in turn from SIZES")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = write_data(tmp, args.images)
        tokenizer = loading.load_tokenizer(str(build_checkpoint("minicpmv2_6", tmp / "model")))
        kwargs = dict(llm_type="qwen", max_length=4096, image_root=tmp)
        pipelines = {
            "uint8": dataset.make_dataset(records, tokenizer, SETTINGS, **kwargs),
            "float": FloatPixelDataset(records, tokenizer, slice_config=SETTINGS.slice_config, patch_size=14,
                                       query_num=64, batch_vision=True, use_image_id=True, **kwargs),
        }
        check_identical(pipelines["uint8"], pipelines["float"])
        views = sum(len(pipelines["uint8"][i]["pixel_values"]) for i in range(args.images))
        print(f"{args.images} images, {views} views (source + slices); uint8 and float outputs identical "
              "(float32 bit for bit, bfloat16 as the float32 cast)")
        collator = dataset.DataCollator(4096)

        rates = {name: [] for name in pipelines}
        for _ in range(args.repeats):
            for name, data in pipelines.items():  # interleaved
                rates[name].append(in_process(data, collator))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        print(f"\none thread, main process, median of {args.repeats} (samples per CPU second):")
        for name, values in rates.items():
            print(f"  {name:>5}: {medians[name]:6.1f}   (repeats: {', '.join(f'{v:.1f}' for v in values)})")
        paired = statistics.median(new / old for new, old in zip(rates["uint8"], rates["float"]))
        print(f"  uint8 / float: {medians['uint8'] / medians['float']:.2f}x (median of the paired repeats' "
              f"ratios: {paired:.2f}x)")

        print(f"\nDataLoader, batches of {BATCH}, {args.passes} passes over the {args.images}, median of {args.repeats}:")
        loader = {(workers, name): [] for workers in args.workers for name in pipelines}
        longer = {key: [] for key in loader}
        for _ in range(args.repeats):
            for workers, name in loader:  # interleaved
                loader[workers, name].append(through_loader(pipelines[name], collator, workers, args.passes))
                longer[workers, name].append(through_loader(pipelines[name], collator, workers, 2 * args.passes))
        for (workers, name), values in loader.items():
            speed, cost, main = (statistics.median(v[n] for v in values) for n in range(3))
            # Starting the workers is a cost per epoch, not per sample: the slope between the runs of
            # P and 2P passes is what each further sample costs, the rest is the start-up.
            samples = len(pipelines[name]) * args.passes
            marginal = statistics.median(
                (2 * long[1] - short[1]) for short, long in zip(values, longer[workers, name])
            )
            startup = (cost - marginal) * samples
            print(f"  {workers} workers, {name:>5}: {speed:6.1f} samples/s, {1000 * cost:6.1f} CPU ms/sample "
                  f"({1000 * main:.1f} of them in the main process); each further sample {1000 * marginal:5.1f} "
                  f"CPU ms, start-up {startup:.2f} CPU s")

        batch = collator([pipelines["uint8"][i] for i in range(BATCH)])
        times = []
        for _ in range(args.repeats):
            start = time.process_time()
            dataset.model_pixels(batch["pixel_values"], torch.float32)
            times.append(time.process_time() - start)
        print(f"\nmodel_pixels on the CPU, float32: {1000 * statistics.median(times) / BATCH:.1f} CPU ms/sample "
              "(on a GPU: a table lookup on the device)")


if __name__ == "__main__":
    main()
