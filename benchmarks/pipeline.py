"""Throughput of the remote-code data pipeline, and what a DataLoader worker's batch costs to ship.

    python benchmarks/pipeline.py [--repeats 3] [--passes 2] [--workers 0 1 2] [--images 48] [--batch 1]
                                  [--step_ms 0 150] [--native]

Writes --images JPEGs (48; noise and shapes, 448x448 up to 2000x500) and one-image records into a temporary
folder and builds the dataset as training does for MiniCPM-V 2.6 (qwen template, max_slice_nums 9,
scale_resolution 448, patch 14, 64 queries; the tiny 2.6 checkpoint's tokenizer). With one torch
thread, old and new interleaved (the machine may be shared), medians of --repeats:

1. uint8 pixels (the dataset as it is; the trainer's backend normalises on the device) against the
   float path before (each view through IMAGE_TRANSFORM to float32 on the loader side, and the two
   full-size copies its RGB conversion made), kept for the comparison: every sample of both is built
   and compared (``model_pixels`` of the uint8 pixels equal the float pixels bit for bit in float32
   and as their bfloat16 cast; ids, labels, bounds and patch grids equal), then ``__getitem__`` + the
   collator (batches of 4) are timed in the main process, as samples per CPU second.
2. The cost of handing one collated batch (--batch samples) from a DataLoader worker to the training
   process: ``before``, a plain dict, each tensor storage shipped on its own; ``now``, the collator's
   ShippedBatch, one block (data/shipping.py). A worker that only ships --ships batches; ms per batch
   of wall time, of the main process's CPU and of the worker's. ``--native`` adds a batch of the tiny
   MiniCPM-V 4.6's collator (its processor's slicing, float pixels) over the same images.
3. End to end through a DataLoader with --workers workers, before and now: samples per wall second and
   the main process's CPU ms per sample, over --passes passes of the samples (one start of the workers,
   as in an epoch), the main process sleeping --step_ms per batch: the wait on a GPU's training step,
   which the workers' loading overlaps (0: the main process only receives).

Last, the cost of normalising a batch on the CPU (``model_pixels``): work that, without a GPU, is the
training process's.
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
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dataset  # noqa: E402
import families  # noqa: E402
import loading  # noqa: E402
from data.layouts import LAYOUTS  # noqa: E402
from data.native import NativeDataset  # noqa: E402
from data.slicing import IMAGE_TRANSFORM, model_pixels  # noqa: E402
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
        tensors = [IMAGE_TRANSFORM(image) for image in images]
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
            got = model_pixels([a["pixel_values"]], dtype)[0]
            assert len(got) == len(b["pixel_values"]), i
            assert all(torch.equal(g, f.to(dtype)) for g, f in zip(got, b["pixel_values"])), (i, dtype)


def in_process(data, collator, batch=BATCH):
    """Samples per CPU second: every sample built and collated, batches of ``batch``, this process."""
    start = time.process_time()
    for first in range(0, len(data), batch):
        collator([data[i] for i in range(first, min(first + batch, len(data)))])
    return len(data) / (time.process_time() - start)


class PlainBatches:
    """The collator's batch as a plain dict: shipped from a worker tensor storage by tensor storage,
    as every batch was before data/shipping.py."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        return dict(self.collator(examples))


def storages(batch):
    """``(distinct tensor storages, their MiB)`` in ``batch``: what a worker ships one by one unless packed."""
    found = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            found[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(batch)
    return len(found), sum(found.values()) / 2**20


class Repeated(Dataset):
    """One prebuilt batch, ``count`` times: a worker that only ships."""

    def __init__(self, batch, count):
        self.batch, self.count = batch, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.batch


def as_is(batch):
    return batch


def cpu_seconds():
    """(this process's, its joined children's) CPU seconds (in clock ticks: time many batches)."""
    times = os.times()
    return times.user + times.system, times.children_user + times.children_system


def ship_cost(batch, count):
    """``(wall ms, main-process CPU ms, worker CPU ms)`` per batch of handing ``batch`` from one
    DataLoader worker to this process ``count`` times (the worker does nothing else)."""
    loader = DataLoader(Repeated(batch, count), batch_size=None, num_workers=1, collate_fn=as_is, prefetch_factor=4)
    start_wall, start_main, (_, start_workers) = time.perf_counter(), time.process_time(), cpu_seconds()
    for _ in loader:
        pass
    wall, main = time.perf_counter() - start_wall, time.process_time() - start_main
    workers = cpu_seconds()[1] - start_workers  # the worker is joined at the loader's end
    return 1000 * wall / count, 1000 * main / count, 1000 * workers / count


def through_loader(data, collator, workers, passes, batch, step_ms):
    """``(samples per wall second, main-process CPU ms per sample)`` through a DataLoader over
    ``passes`` passes of the samples (one start of the workers, as in an epoch), the main process
    sleeping ``step_ms`` per batch: a training step's wait on the GPU, which workers overlap."""
    start_wall, start_main = time.perf_counter(), time.process_time()
    order = list(range(len(data))) * passes
    count = 0
    for got in DataLoader(data, batch_size=batch, sampler=order, num_workers=workers, collate_fn=collator):
        count += len(got["input_ids"])
        time.sleep(step_ms / 1000)
    return count / (time.perf_counter() - start_wall), 1000 * (time.process_time() - start_main) / count


def native_batch(tmp, images, batch):
    """A batch of the tiny MiniCPM-V 4.6's collator (its processor's own slicing) over the same images."""
    model = build_checkpoint("minicpmv4_6", tmp / "native")
    family = families.family_for(loading.load_config(model))
    processing = family.load_processing(str(model))
    records = [{"id": f"n{n}", "image": f"{n:02d}.jpg", "conversations": [
        {"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": "A red ellipse on a mottled background."}]} for n in range(images)]
    data = NativeDataset(records, processing, max_length=8192, image_root=tmp, max_slice_nums=9)
    return family.collator("sft", processing, 8192)([data[i] for i in range(batch)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="passes over the samples per DataLoader timing")
    parser.add_argument("--images", type=int, default=IMAGES, help="images (and records), sizes in turn from SIZES")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=1, help="samples per batch (the launchers' per-device batch: 1)")
    parser.add_argument("--step_ms", type=float, nargs="+", default=[0, 150],
                        help="the main process's wait per batch, as on a GPU's training step")
    parser.add_argument("--ships", type=int, default=200, help="batches per ship-cost timing")
    parser.add_argument("--native", action="store_true", help="also the ship cost of a native (4.6) batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = write_data(tmp, args.images)
        tokenizer = loading.load_tokenizer(str(build_checkpoint("minicpmv2_6", tmp / "model")))
        kwargs = dict(layout=LAYOUTS["qwen"], max_length=4096, image_root=tmp)
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
        print(f"\none thread, main process, batches of {BATCH}, median of {args.repeats} (samples per CPU second):")
        for name, values in rates.items():
            print(f"  {name:>5}: {medians[name]:6.1f}   (repeats: {', '.join(f'{v:.1f}' for v in values)})")
        paired = statistics.median(new / old for new, old in zip(rates["uint8"], rates["float"]))
        print(f"  uint8 / float: {medians['uint8'] / medians['float']:.2f}x (median of the paired repeats' "
              f"ratios: {paired:.2f}x)")

        data = pipelines["uint8"]
        shipped = {"remote-code": collator([data[i] for i in range(args.batch)])}
        if args.native:
            shipped["native 4.6"] = native_batch(tmp, args.images, args.batch)
        print(f"\nshipping one batch of {args.batch} from a DataLoader worker, median of {args.repeats} x "
              f"{args.ships} batches (ms per batch):")
        for family, batch in shipped.items():
            ways = {"before": dict(batch), "now": batch}  # a plain dict: storage by storage
            costs = {way: [] for way in ways}
            for _ in range(args.repeats):
                for way, sent in ways.items():  # interleaved
                    costs[way].append(ship_cost(sent, args.ships))
            tensors, megabytes = storages(batch)
            print(f"  {family}: {tensors} tensor storages, {megabytes:.1f} MiB")
            for way, values in costs.items():
                wall, main, worker = (statistics.median(v[n] for v in values) for n in range(3))
                shipped = tensors if way == "before" else 1
                print(f"    {way:>6} ({shipped:2d} shipped): {wall:5.2f} wall, {main:5.2f} CPU in the main "
                      f"process, {worker:5.2f} CPU in the worker   (main, repeats: "
                      f"{', '.join(f'{v[1]:.2f}' for v in values)})")

        print(f"\nDataLoader, batches of {args.batch}, {args.passes} passes over the {args.images}, median of "
              f"{args.repeats} (samples per second; main-process CPU ms per sample):")
        ways = {"before": PlainBatches(collator), "now": collator}
        for step_ms in args.step_ms:
            loader = {(workers, way): [] for workers in args.workers for way in ways}
            for _ in range(args.repeats):
                for workers, way in loader:  # interleaved
                    loader[workers, way].append(
                        through_loader(data, ways[way], workers, args.passes, args.batch, step_ms))
            for (workers, way), values in loader.items():
                speed, main = (statistics.median(v[n] for v in values) for n in range(2))
                print(f"  step {step_ms:5.0f} ms, {workers} workers, {way:>6}: {speed:6.2f} samples/s, {main:6.1f} "
                      f"CPU ms/sample in the main process   (samples/s, repeats: "
                      f"{', '.join(f'{v[0]:.2f}' for v in values)})")

        batch = collator([data[i] for i in range(BATCH)])
        times = []
        for _ in range(args.repeats):
            start = time.process_time()
            model_pixels(batch["pixel_values"], torch.float32)
            times.append(time.process_time() - start)
        print(f"\nmodel_pixels on the CPU, float32: {1000 * statistics.median(times) / BATCH:.1f} CPU ms/sample "
              "(on a GPU: a table lookup on the device)")


if __name__ == "__main__":
    main()
