"""Speed of GRPO steps (--stage grpo): sampled answers per second, and the share of a step spent
generating them (the rest: scoring, the answered rows' forward and backward, the optimizer).

    python benchmarks/grpo_speed.py [--family minicpmv2_6] [--steps 6] [--batch 2] [--generations 4]
                                    [--max-new-tokens 16] [--device cpu|cuda] [--json result.json]

A tiny random checkpoint of ``--family`` (tiny_models) is built in a temporary folder and trained
with LoRA on the shapes data (demo_data) in this process, through finetune.train; the first step
is left out of the timings (warm-up). Each step samples ``--batch`` prompts x ``--generations``
answers of ``--max-new-tokens`` at most (the random model rarely stops early).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import arguments  # noqa: E402
import demo_data  # noqa: E402
import finetune  # noqa: E402
from stages import grpo  # noqa: E402
from tiny_models.build import build_checkpoint  # noqa: E402


class StepTimes(transformers.TrainerCallback):
    """Each training step's wall time, and the time sample_answers took within it."""

    def __init__(self):
        self.steps, self.generating, self._start, self._generated = [], [], None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._generated = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self._start)
        self.generating.append(self._generated)

    def timed(self, sample_answers):
        def wrapper(trainer, model, samples):
            start = time.perf_counter()
            try:
                return sample_answers(trainer, model, samples)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._generated += time.perf_counter() - start
        return wrapper


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="minicpmv2_6")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is warm-up)")

    times = StepTimes()
    grpo.GRPOTrainer.sample_answers = times.timed(grpo.GRPOTrainer.sample_answers)
    init = grpo.GRPOTrainer.__init__

    def timed_init(trainer, *init_args, **kwargs):
        init(trainer, *init_args, **kwargs)
        trainer.add_callback(times)

    grpo.GRPOTrainer.__init__ = timed_init
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_checkpoint(args.family, tmp / "model", seed=0)
        data = demo_data.generate(tmp / "data", count=8)
        parsed = arguments.parse_args([str(a) for a in [
            "--model_name_or_path", model, "--data_path", data, "--output_dir", tmp / "out", "--stage", "grpo",
            "--use_lora", "true", "--tune_llm", "false", "--tune_vision", "false", "--max_slice_nums", "2",
            "--model_max_length", "512", "--report_to", "none", "--save_strategy", "no", "--seed", "0",
            "--max_steps", args.steps, "--per_device_train_batch_size", args.batch, "--learning_rate", "1e-3",
            "--grpo_num_generations", args.generations, "--grpo_max_new_tokens", args.max_new_tokens,
            "--grpo_rewards", "f1", "--dataloader_num_workers", "0", *(["--use_cpu", "true"] if args.device == "cpu" else []),
        ]])
        finetune.train(*parsed)
    steps, generating = times.steps[1:], times.generating[1:]
    answers = args.batch * args.generations * len(steps)
    result = {
        "family": args.family, "device": args.device, "batch": args.batch, "generations": args.generations,
        "max_new_tokens": args.max_new_tokens, "timed_steps": len(steps),
        "answers_per_second": answers / sum(steps), "prompts_per_second": args.batch * len(steps) / sum(steps),
        "generation_share": sum(generating) / sum(steps), "seconds_per_step": sum(steps) / len(steps),
    }
    print(f"GRPO on tiny {args.family} ({args.device}), {args.batch} prompts x {args.generations} answers of at most "
          f"{args.max_new_tokens} tokens a step: {result['answers_per_second']:.2f} answers/s "
          f"({result['prompts_per_second']:.2f} prompts/s, {result['seconds_per_step']:.3f} s/step), "
          f"{100 * result['generation_share']:.1f}% of the step generating")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
