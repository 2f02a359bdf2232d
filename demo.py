"""The whole job on a laptop: from a JSON file to a fine-tuned model that answers.

    make demo        # or: python demo.py [--family minicpmv4_6] [--out demo_out] [--max_steps 2000]

1. builds a tiny, randomly initialised MiniCPM-V (2.6 by default; --family takes any of
   tiny_models' families, the native 4.6, 4.7 and MiniCPM-OCR included) in OUT/model;
2. writes a small dataset of coloured shapes, one two-image record and one text-only record;
3. runs finetune_lora.sh (torchrun, 2 CPU processes over gloo, DeepSpeed ZeRO-2) until the answers
   are learned with a margin: it evaluates on the training records every EVAL_STEPS steps and stops
   once the eval loss says every answer token is the model's first choice by a wide margin
   (`stop_loss`), whatever machine runs it; --max_steps is the cap (the launcher's cosine schedule
   runs over it, so the learning rate falls as training goes on);
4. plots the loss curve to OUT/lora/loss.png;
5. loads the adapter and asks every question of the dataset, printing expected and generated
   answers side by side. Exits non-zero if fewer than 90% are reproduced exactly.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import demo_data
from tiny_models.build import ALL_FAMILIES, build_checkpoint

HERE = Path(__file__).resolve().parent
PASS_RATE = 0.9
EVAL_STEPS = 25
# Each answer token's probability at least this: then no other token can come first (they share the
# rest, 0.25 at most), and rounding by other CPU kernels or thread counts cannot swap them.
MIN_TOKEN_PROBABILITY = 0.75


def stop_loss(model_dir, data):
    """The eval loss below which every learned token of ``data`` has MIN_TOKEN_PROBABILITY.

    The eval loss is the mean cross-entropy over the N learned tokens (each answer and its end-of-turn
    token), so below ``-ln(p) / N`` even the worst token's cross-entropy is below ``-ln(p)``; greedy
    decoding then reproduces every answer exactly, as its prompt is laid out as in training.
    """
    import families
    import loading
    from data import sources
    from data.records import IGNORE_INDEX

    config = loading.load_config(model_dir)
    family = families.family_for(config)
    samples = family.make_dataset(sources.load(data), family.load_processing(model_dir), config, max_length=512,
                                   image_root=Path(data).parent, data_path=data, max_slice_nums=2)
    learned = sum(int(samples[i]["labels"].ne(IGNORE_INDEX).sum()) for i in range(len(samples)))
    return -math.log(MIN_TOKEN_PROBABILITY) / learned


def train(model_dir, data, output_dir, max_steps, threshold, processes, seed):
    env = dict(
        os.environ,
        GPUS_PER_NODE=str(processes),
        MODEL=str(model_dir),
        DATA=str(data),
        EVAL_DATA=str(data),  # the answers to learn
        OUTPUT_DIR=str(output_dir),
        MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
        PYTHON=sys.executable,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        # CPU processes even where there is a GPU: the demo is the same everywhere.
        DEVICE_ARGS="--use_cpu true --ddp_backend gloo",
    )
    args = [
        "--max_steps", str(max_steps), "--learning_rate", "3e-3", "--warmup_steps", "0",
        "--eval_strategy", "steps", "--eval_steps", str(EVAL_STEPS), "--stop_at_eval_loss", f"{threshold:.6g}",
        "--save_strategy", "no", "--logging_steps", "5", "--report_to", "none",
        "--max_slice_nums", "2", "--model_max_length", "512", "--log_level", "warning",
        "--disable_tqdm", "false", "--seed", str(seed),
    ]
    subprocess.run(["bash", str(HERE / "finetune_lora.sh"), *args], env=env, check=True)


def plot_losses(output_dir, family):
    from evaluation.plot import plot_series

    state = json.loads((output_dir / "trainer_state.json").read_text())
    history = state["log_history"]
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    path = plot_series({"training loss": points}, output_dir / "loss.png", ylabel="training loss",
                       title=f"Tiny {family}, LoRA on coloured shapes")
    eval_loss = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
    return path, [loss for _, loss in points], state["global_step"], eval_loss


def ask(model_dir, adapter, data):
    import infer
    from families.inference import load_for_inference

    answerer = infer.Answerer(*load_for_inference(model_dir, adapter), max_slice_nums=2)
    records = json.loads(Path(data).read_text())
    answers = answerer.answer(records, Path(data).parent, max_new_tokens=16)
    rows = []
    for record, answer in zip(records, answers, strict=True):
        question = record["conversations"][0]["content"].replace("\n", " ")
        expected = record["conversations"][1]["content"]
        rows.append((record["id"], question, expected, answer, answer == expected))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="minicpmv2_6", choices=ALL_FAMILIES, help="the tiny model to fine-tune")
    parser.add_argument("--out", type=Path, default=HERE / "demo_out", help="working folder (replaced)")
    parser.add_argument("--max_steps", type=int, default=1200,
                        help="most training steps (training stops earlier, once the answers are learned)")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the training run")
    args = parser.parse_args(argv)

    start = time.time()
    shutil.rmtree(args.out, ignore_errors=True)
    print(f"[1/4] Building a tiny {args.family} in {args.out / 'model'}", flush=True)
    model_dir = build_checkpoint(args.family, args.out / "model", seed=args.seed)
    data = demo_data.generate(args.out / "data", seed=args.seed)
    print(f"[2/4] Wrote {len(json.loads(data.read_text()))} records to {data}", flush=True)
    output_dir = args.out / "lora"
    threshold = stop_loss(model_dir, data)
    print(f"[3/4] finetune_lora.sh: {args.processes} processes, until the eval loss is below {threshold:.4g} "
          f"(at most {args.max_steps} steps)", flush=True)
    train(model_dir, data, output_dir, args.max_steps, threshold, args.processes, args.seed)
    plot, losses, steps, eval_loss = plot_losses(output_dir, args.family)
    verdict = "learned" if eval_loss < threshold else f"not learned within {args.max_steps} steps"
    print(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps, eval loss {eval_loss:.4g} ({verdict}); "
          f"curve in {plot}", flush=True)
    print(f"[4/4] Asking the fine-tuned model (base + adapter in {output_dir})", flush=True)
    rows = ask(model_dir, output_dir, data)

    width = max(len(row[2]) for row in rows) + 2
    print(f"\n{'id':<12}{'expected':<{width}}{'generated':<{width}}ok  question")
    for record_id, question, expected, answer, ok in rows:
        print(f"{record_id:<12}{expected:<{width}}{answer:<{width}}{'yes' if ok else 'NO':<4}{question}")
    correct = sum(row[4] for row in rows)
    print(f"\n{correct}/{len(rows)} answers reproduced exactly ({correct / len(rows):.0%}) "
          f"in {time.time() - start:.0f} s")
    if correct < PASS_RATE * len(rows):
        print(f"FAILED: fewer than {PASS_RATE:.0%} of the training answers were learned", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
