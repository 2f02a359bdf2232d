"""The whole job on a laptop: from a JSON file to a fine-tuned model that answers.

    make demo        # or: python demo.py [--family minicpmv4_6] [--out demo_out] [--steps 240]

1. builds a tiny, randomly initialised MiniCPM-V (2.6 by default; --family takes any of
   tiny_models' families, the native 4.6, 4.7 and MiniCPM-OCR included) in OUT/model;
2. writes a small dataset of coloured shapes, one two-image record and one text-only record;
3. runs finetune_lora.sh (torchrun, 2 CPU processes over gloo, DeepSpeed ZeRO-2);
4. plots the loss curve to OUT/lora/loss.png;
5. loads the adapter and asks every question of the dataset, printing expected and generated
   answers side by side. Exits non-zero if fewer than 90% are reproduced exactly.
"""

import argparse
import json
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


def train(model_dir, data, output_dir, steps, processes, seed):
    env = dict(
        os.environ,
        GPUS_PER_NODE=str(processes),
        MODEL=str(model_dir),
        DATA=str(data),
        EVAL_DATA="",
        OUTPUT_DIR=str(output_dir),
        MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
        PYTHON=sys.executable,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        # CPU processes even where there is a GPU: the demo is the same everywhere.
        DEVICE_ARGS="--use_cpu true --ddp_backend gloo",
    )
    args = [
        "--max_steps", str(steps), "--learning_rate", "3e-3", "--warmup_steps", "0",
        "--save_steps", str(steps), "--logging_steps", "5", "--report_to", "none",
        "--max_slice_nums", "2", "--model_max_length", "512", "--log_level", "warning",
        "--disable_tqdm", "false", "--seed", str(seed),
    ]
    subprocess.run(["bash", str(HERE / "finetune_lora.sh"), *args], env=env, check=True)


def plot_losses(output_dir, family):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker=".")
    ax.set(xlabel="step", ylabel="training loss", title=f"Tiny {family}, LoRA on coloured shapes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = output_dir / "loss.png"
    fig.savefig(path, dpi=100)
    return path, losses


def ask(model_dir, adapter, data):
    import backends
    import infer

    answerer = infer.Answerer(*backends.load_for_inference(model_dir, adapter), max_slice_nums=2)
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
    parser.add_argument("--steps", type=int, default=600, help="training steps")
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
    print(f"[3/4] finetune_lora.sh: {args.processes} processes, {args.steps} steps", flush=True)
    train(model_dir, data, output_dir, args.steps, args.processes, args.seed)
    plot, losses = plot_losses(output_dir, args.family)
    print(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f}; curve in {plot}", flush=True)
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
