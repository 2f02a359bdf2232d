"""Time preflight over a generated dataset and count image decodes.

    python benchmarks/preflight_speed.py [--records 10000] [--images 10000] [--size 448x336] [--workers 1 2]

Writes JPEG images of the given size (noise plus shapes: real decode work) and a JSON file of
single-image records (every 20th has two images, every 50th none) into a temporary folder,
builds the dataset as finetune.py does for a tiny MiniCPM-V 2.6 checkpoint (its tokenizer is
small; the real one's BPE vocabulary is larger), runs the preflight check with each --workers count (worker processes
of one rank) and prints the time per 1,000 records, wall and CPU (this process and its workers: what
the check costs in core-seconds, whatever else loads the machine), and how many image decodes it did.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from multiprocessing import forkserver
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import arguments  # noqa: E402
import families  # noqa: E402
from stages import prepare  # noqa: E402
import loading  # noqa: E402
import preflight  # noqa: E402
from tiny_models.build import build_checkpoint  # noqa: E402


def write_data(folder, records, images, size):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    for n in range(images):
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        ImageDraw.Draw(image).ellipse((10, 10, size[0] // 2, size[1] // 2), fill=(200, 30, 30))
        image.save(folder / "images" / f"{n:05d}.jpg", quality=90)
    data = []
    for n in range(records):
        conversation = [
            {"role": "user", "content": "What is in the image? Describe the colours and the shapes."},
            {"role": "assistant", "content": "A red ellipse on a noisy background, top left."},
        ]
        record = {"id": f"r{n}", "conversations": conversation}
        if n % 20 == 0:
            record["image"] = {"<image_00>": f"images/{n % images:05d}.jpg", "<image_01>": f"images/{(n + 1) % images:05d}.jpg"}
            conversation[0]["content"] = "<image_00>\n<image_01>\n" + conversation[0]["content"]
        elif n % 50 != 1:
            record["image"] = f"images/{n % images:05d}.jpg"
        data.append(record)
    path = folder / "train.json"
    path.write_text(json.dumps(data))
    return path, sum(len(r.get("image", {})) if isinstance(r.get("image"), dict) else int("image" in r) for r in data)


def cpu_seconds():
    """CPU seconds of this process, of its children that have ended, and of the check's fork server
    (preflight.worker_context) with the workers it forked and reaped (Linux: /proc)."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server is not None and Path(f"/proc/{server}/stat").exists():
        # Fields 14-17 after the command's closing parenthesis: utime, stime, cutime, cstime, in ticks.
        fields = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def main(argv=None):
    """Run the benchmark; returns its figures (``records``, ``references``, ``decodes``, ``seconds``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=10_000, help="distinct image files")
    parser.add_argument("--size", default="448x336", help="image width x height")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="worker processes, one pass each")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    decodes = 0
    load = ImageFile.ImageFile.load

    def counting_load(self):
        nonlocal decodes
        decodes += bool(self.tile)  # tiles left to read: this call decodes the file
        return load(self)

    ImageFile.ImageFile.load = counting_load
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        path, references = write_data(tmp, args.records, args.images, size)
        print(f"wrote {args.records} records, {args.images} {args.size} JPEGs in {time.perf_counter() - start:.1f} s")
        model = build_checkpoint("minicpmv2_6", tmp / "model")
        _, data_args, training_args, _ = arguments.parse_args(
            ["--model_name_or_path", str(model), "--data_path", str(path), "--output_dir", str(tmp / "out"),
             "--use_cpu", "true", "--llm_type", "qwen", "--report_to", "none"]
        )
        config = loading.load_config(model)
        family = families.family_for(config, training_args.llm_type)
        processing = family.load_processing(model)
        train, _ = prepare.build_datasets(family, data_args, training_args, processing, config)
        results = []
        for workers in args.workers:
            decodes = 0
            start, start_cpu = time.perf_counter(), cpu_seconds()
            bad, _ = preflight.check_all({"train": train}, tmp / "out", skip_bad=False, preflight_only=True,
                                         workers=workers, cache=False)
            seconds = time.perf_counter() - start
            if workers > 1:
                time.sleep(0.5)  # the fork server reaps its ended workers (their CPU time counts then)
            cpu = cpu_seconds() - start_cpu
            assert not bad["train"], bad
            # Decodes in worker processes are not counted here: with workers, only the time is.
            counted = f"; {decodes} image decodes ({decodes / max(references, 1):.2f} per image reference)"
            print(
                f"preflight, {workers} worker{'s' * (workers > 1)}: {args.records} records ({references} image "
                f"references) in {seconds:.2f} s = {1000 * seconds / args.records:.3f} s per 1,000 records, "
                f"{1000 * cpu / args.records:.3f} CPU s per 1,000 records{counted if workers == 1 else ''}"
            )
            results.append(dict(workers=workers, records=args.records, references=references, decodes=decodes,
                                seconds=seconds, cpu_seconds=cpu))
    return results


if __name__ == "__main__":
    main()
