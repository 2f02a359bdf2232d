"""Seconds from launch to the first optimizer step, and peak memory per rank, as the data grows.

    python benchmarks/startup.py [--records 10000 100000] [--distinct 10000] [--world 1 2]
                                 [--workers N] [--old PATH] [--json results.json]

Writes ``--records`` synthetic one-image records (a .jsonl; every record its own 448x336 JPEG up
to ``--distinct`` images, then the images are shared) and a tiny MiniCPM-V 2.6 checkpoint, then
launches finetune.py as the LoRA launcher does (``python`` for one process, torchrun for more;
``--max_steps 1``, a checkpoint at step 1) and times, from the launch, the first logged training
loss: the first optimizer step. The same run is then resumed (``--resume_from_checkpoint true
--max_steps 2``: weights, optimizer and data order from checkpoint-1) and timed to its first step.
Peak resident memory (VmHWM) of each rank and of the largest preflight worker are read from
/proc while the run goes.

``--old PATH``: also run the code in PATH (e.g. ``git archive 6bc115c | tar -x -C PATH``: today's
code before this work) on the same data, runs interleaved, so the two compare on one machine.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tiny_models.build import build_checkpoint  # noqa: E402

SIZE = (448, 336)
FLAGS = [
    "--llm_type", "qwen", "--use_cpu", "true", "--use_lora", "true", "--tune_llm", "false", "--report_to", "none",
    "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
    "--save_steps", "1", "--save_strategy", "steps", "--max_slice_nums", "2", "--model_max_length", "512",
    "--dataloader_num_workers", "0", "--seed", "0",
]


def write_data(folder, records, distinct):
    """A .jsonl of ``records`` one-image records over ``distinct`` JPEGs (noise and a shape each)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    for n in range(distinct):
        noise = rng.integers(0, 256, (SIZE[1] // 8, SIZE[0] // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize(SIZE, Image.Resampling.BILINEAR)
        ImageDraw.Draw(image).ellipse((10 + n % 50, 10, SIZE[0] // 2, SIZE[1] // 2), fill=(200, 30, 30))
        image.save(folder / "images" / f"{n:06d}.jpg", quality=90)
    path = folder / "train.jsonl"
    with open(path, "w") as f:
        for n in range(records):
            f.write(json.dumps({"id": f"r{n}", "image": f"images/{n % distinct:06d}.jpg", "conversations": [
                {"role": "user", "content": "<image>\nWhat is in the image? Describe the colours and the shapes."},
                {"role": "assistant", "content": f"A red ellipse on a mottled background, number {n}."}]}) + "\n")
    return path


def process_table():
    """``{pid: (ppid, VmHWM bytes)}`` of every process that can be read."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:  # ended while being read
                continue
            table[int(entry)] = (int(status["PPid"]), int(status.get("VmHWM", "0 kB").split()[0]) * 1024)
    return table


def descendants(table, root):
    """``{pid: depth}`` of ``root`` (depth 0) and the processes below it."""
    found, frontier = {root: 0}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = found[parent] + 1
                frontier.append(pid)
    return found


def launch(code, world, data, model, out, extra, workers):
    """Run finetune.py from ``code``; ``(seconds to the first logged loss, peak RSS per rank, peak RSS of a worker)``."""
    port = 29500 + os.getpid() % 1000 + int(time.time()) % 500
    if world == 1:
        command = [sys.executable, str(code / "finetune.py")]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
                   "127.0.0.1", "--master_port", str(port), str(code / "finetune.py")]
    command += ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out), *FLAGS, *extra]
    if workers and (code / "startup.py").exists():  # the new code only: the old has no such flag
        command += ["--preflight_workers", str(workers)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks, first = {}, []  # pid -> (depth under the launched process, peak RSS)
    done = threading.Event()
    # The launched process is the rank with one process; under torchrun its children are.
    rank_depth = 0 if world == 1 else 1

    def watch():
        while not done.is_set():
            table = process_table()
            for pid, depth in descendants(table, process.pid).items():
                if pid in table:
                    peaks[pid] = (depth, max(table[pid][1], peaks.get(pid, (0, 0))[1]))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    tail = []
    for line in process.stdout:
        tail = (tail + [line])[-40:]
        if not first and "'loss'" in line:
            first.append(time.perf_counter() - start)
    process.wait()
    done.set()
    watcher.join()
    if process.returncode or not first:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{''.join(tail)}")
    ranks = [peak for depth, peak in peaks.values() if depth == rank_depth]
    workers_peak = [peak for depth, peak in peaks.values() if depth > rank_depth]
    return first[0], sorted(ranks), max(workers_peak, default=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--distinct", type=int, default=10_000, help="distinct images (then shared)")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="processes (ranks)")
    parser.add_argument("--workers", type=int, default=None, help="--preflight_workers (default: finetune.py's)")
    parser.add_argument("--old", type=Path, help="a folder holding the code to compare with")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    codes = {"new": ROOT} | ({"old": args.old.resolve()} if args.old else {})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_checkpoint("minicpmv2_6", tmp / "model")
        print(f"{'records':>8} {'world':>5} {'code':>4} {'run':>8} {'to step (s)':>11} "
              f"{'peak RSS per rank (GiB)':>24} {'worker (GiB)':>12}", flush=True)
        for records in args.records:
            data = write_data(tmp / f"data{records}", records, min(records, args.distinct))
            for world in args.world:
                for name, code in codes.items():  # interleaved
                    out = tmp / f"out-{records}-{world}-{name}"
                    for run, extra in (("first", ["--max_steps", "1"]),
                                       ("resumed", ["--max_steps", "2", "--resume_from_checkpoint", "true"])):
                        seconds, ranks, worker = launch(code, world, data, model, out, extra, args.workers)
                        row = dict(records=records, world=world, code=name, run=run, seconds=round(seconds, 1),
                                   rank_peak_gib=[round(r / 2**30, 2) for r in ranks],
                                   worker_peak_gib=round(worker / 2**30, 2))
                        results.append(row)
                        print(f"{records:>8} {world:>5} {name:>4} {run:>8} {seconds:>11.1f} "
                              f"{', '.join(f'{r:.2f}' for r in row['rank_peak_gib']):>24} "
                              f"{row['worker_peak_gib']:>12.2f}", flush=True)
            shutil.rmtree(data.parent)  # room on the disk for the next size
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
