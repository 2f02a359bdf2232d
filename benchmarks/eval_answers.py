"""Answers per second of scored evaluation (--eval_generate, infer.py --questions) by prompts per
generate call, on a tiny MiniCPM-V 2.6 (remote code: its generate takes left-padded batches).

    python benchmarks/eval_answers.py [--records 32] [--batches 1 4 8] [--new_tokens 16] [--device cpu]

Writes the demo's coloured-shapes records (one or two images, some wide and sliced, one text-only),
builds the tiny checkpoint, answers every record's first question at each batch size (greedy, with
``evaluation.answers.Answerer`` as infer.py and training do) and prints the answers per second and
whether the answers equal those of one prompt per call. The tiny model's compute is small, so the
numbers mostly measure what batching saves per call (the vision tower, generate's set-up and its
per-token loop); a real model on a GPU gains more.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import demo_data  # noqa: E402
from evaluation.answers import Answerer  # noqa: E402
from families.inference import load_for_inference  # noqa: E402
from tiny_models.build import build_checkpoint  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint("minicpmv2_6", Path(tmp) / "model", seed=0)
        data = demo_data.generate(Path(tmp) / "data", count=args.records)
        records = json.loads(data.read_text())
        loaded = load_for_inference(model_dir, device=args.device)
        print(f"{len(records)} records, {args.new_tokens} new tokens at most, tiny minicpmv2_6 on {args.device}")
        first = None
        for batch in args.batches:
            answerer = Answerer(*loaded, max_slice_nums=9, batch_size=batch)
            answerer.answer(records[:batch], data.parent, args.new_tokens)  # warm-up
            start = time.perf_counter()
            answers = answerer.answer(records, data.parent, args.new_tokens)
            seconds = time.perf_counter() - start
            first = answers if first is None else first
            same = "same answers as the first" if answers == first else "ANSWERS DIFFER from the first"
            print(f"  batch {batch:>3}: {len(records) / seconds:8.2f} answers/s ({seconds:.2f} s), {same}")


if __name__ == "__main__":
    main()
