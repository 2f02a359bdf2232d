"""Does TRL's GRPOTrainer / DPOTrainer train the native MiniCPM-V 4.6, correctly, and faster than our stages?

Not a benchmark and not a test: trl is not a requirement. Run it in a scratch venv that has the
project's requirements and trl (docs/GRPO.md, last section):

    /work/venv-trl/bin/python tools/trl_check.py [--seed N]

It builds the tiny native 4.6 (tiny_models/build.py) in a temporary folder, loads it as TRL's VLM docs
say (AutoModelForImageTextToText, AutoProcessor; prompts as conversations, an "image" column) and runs
each trainer 2 steps on CPU in fp32, full fine-tune. Where a trainer runs it checks that the images
reach the model (vision-tower calls with gradient; log-probabilities change when the pixels are
negated), that each row of a batch gets its own image (DPO: a row's log-probability equals that of
its record collated alone), that the logged log-probabilities are the model's (DPO: step 1's
logps/chosen against the reference's plain forward), and times the steps. It also times our
--stage grpo and --stage dpo (finetune.py, in the project's .venv, --project_python) on the same
checkpoint and work (GRPO: 2 prompts x 2 answers of at most 4 tokens a step; DPO: 2 pairs a step).
One line per trainer, "GRPOTrainer: ran|failed: ...", and one for each of ours.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from tiny_models.build import build_checkpoint  # noqa: E402

COLOURS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 220, 0)}
QUESTION = "What colour is the square?"
STEPS, GROUP, PROMPTS = 2, 2, 2
SEED = 0  # --seed


def square(colour):
    """A coloured square on white; red and blue 112 x 112 (one slice), green and yellow 336 x 224 (the
    tiny processor cuts it into 7 slices), so a batch packs images of unequal lengths."""
    width, height = (112, 112) if colour in ("red", "blue") else (336, 224)
    image = Image.new("RGB", (width, height), "white")
    image.paste(COLOURS[colour], (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


class StepTimes(transformers.TrainerCallback):
    def __init__(self):
        self.seconds = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(round(time.perf_counter() - self.start, 3))


def load(checkpoint):
    model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    calls = []  # (gradient enabled) per vision-tower call
    model.model.vision_tower.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return model, processor, calls


def trl_origin(error):
    """The traceback's last frames within trl, as "file:line in function"."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/trl/" in f.filename]
    return "; ".join(f"{f.filename.split('/trl/')[-1]}:{f.lineno} in {f.name}" for f in frames[-2:]) or "not in trl"


def describe_failure(error):
    message = " ".join(str(error).split())[:400]
    return f"failed: {type(error).__name__}: {message} [trl: {trl_origin(error)}]"


def common_args(config_class, out, **extra):
    return config_class(
        output_dir=str(out), max_steps=STEPS, learning_rate=1e-4, use_cpu=True, bf16=False, fp16=False,
        report_to="none", logging_steps=1, save_strategy="no", seed=SEED, dataloader_num_workers=0, **extra,
    )


def image_sensitivity(logps_of, inputs):
    """Whether the loss's log-probabilities change when the pixels are negated (the image reaches the loss)."""
    with torch.no_grad():
        same = logps_of(inputs)
        negated = logps_of({**inputs, "pixel_values": -inputs["pixel_values"]})
    return (same - negated).abs().max().item()


def check_grpo(checkpoint, out):
    import datasets
    import trl

    class Probe(trl.GRPOTrainer):
        first_inputs = None

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.first_inputs is None:
                self.first_inputs = dict(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    records = [{"prompt": [{"role": "user", "content": QUESTION}], "image": square(c)} for c in list(COLOURS)]
    model, processor, calls = load(checkpoint)

    def reward(completions, **kwargs):  # trivial, but not constant within a group
        return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    timer = StepTimes()
    config = common_args(trl.GRPOConfig, out, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                         max_completion_length=4)
    trainer = Probe(model=model, reward_funcs=reward, args=config, train_dataset=datasets.Dataset.from_list(records),
                    processing_class=processor, callbacks=[timer])
    trainer.train()
    training_calls = list(calls)

    def logps_of(inputs):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        keys = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
        return trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, mask, inputs["completion_ids"].size(1),
            **{k: inputs[k] for k in keys if k in inputs})[0]

    keys = sorted(k for k in trainer.first_inputs if torch.is_tensor(trainer.first_inputs[k]))
    return timer.seconds, training_calls, image_sensitivity(logps_of, trainer.first_inputs), keys, ""


def check_dpo(checkpoint, out):
    import datasets
    import trl

    def records():  # fresh each time: TRL's vision collator pops "image"
        return [{"prompt": [{"role": "user", "content": QUESTION}], "image": square(c),
                 "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": "purple"}]} for c in COLOURS]

    class Probe(trl.DPOTrainer):
        first_inputs = None

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.first_inputs is None:
                self.first_inputs = dict(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    model, processor, calls = load(checkpoint)
    timer = StepTimes()
    config = common_args(trl.DPOConfig, out, per_device_train_batch_size=PROMPTS)
    trainer = Probe(model=model, args=config, train_dataset=datasets.Dataset.from_list(records()),
                             processing_class=processor, callbacks=[timer])
    trainer.train()
    training_calls = list(calls)

    def sequence_logps(batch, model=trainer.model):
        """Each row's summed log-probability of its completion, from TRL's collated batch, through the
        model's plain forward (not TRL's fused head)."""
        kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
        logits = model(**kwargs, use_cache=False).logits[:, :-1]
        labels, mask = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:]
        return (logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * mask).sum(1)

    # The first two records collated together (rows: chosen 0, chosen 1, rejected 0, rejected 1) against
    # each collated alone (chosen, rejected): each row must get its own image out of the packed pixels.
    batch = trainer.data_collator(records()[:PROMPTS])
    with torch.no_grad():
        together = sequence_logps(batch)
        alone = torch.stack([sequence_logps(trainer.data_collator([r])) for r in records()[:PROMPTS]])
        # Step 1's logged logps/chosen (the policy before any update) against the frozen reference's
        # plain forward on the same batch.
        first = sequence_logps(trainer.first_inputs, trainer.ref_model)[:PROMPTS].mean().item()
    logged = trainer.state.log_history[0]["logps/chosen"]
    rows_match = (together.view(2, PROMPTS).T - alone).abs().max().item()
    keys = sorted(k for k, v in batch.items() if torch.is_tensor(v))
    change = image_sensitivity(sequence_logps, batch)
    notes = (f"max |row logp - same record alone| {rows_match:.3g}; step 1 logps/chosen logged {logged:.4f}, "
             f"plain forward {first:.4f}")
    return timer.seconds, training_calls, change, keys, notes


def ours(python, checkpoint, folder, stage, records, *stage_args):
    """Our ``--stage`` on the same checkpoint and work, in the project's venv (full fine-tune, as TRL's
    runs); seconds per step from trainer_state.json's train_runtime (it keeps no per-step times, so
    the first step's warm-up is in it)."""
    for c in COLOURS:
        square(c).save(folder / f"{c}.png")
    data = folder / f"{stage}.json"
    data.write_text(json.dumps(records))
    out = folder / f"ours_{stage}"
    command = [
        python, str(REPO / "finetune.py"), "--model_name_or_path", str(checkpoint), "--data_path",
        str(data), "--output_dir", str(out), "--use_cpu", "true", "--report_to", "none",
        "--model_max_length", "512", "--dataloader_num_workers", "0", "--seed", str(SEED),
        "--stage", stage, "--tune_llm", "true", "--tune_vision", "true", "--max_steps", str(STEPS),
        "--per_device_train_batch_size", str(PROMPTS), "--learning_rate", "1e-4", "--logging_steps", "1",
        "--save_strategy", "no", *stage_args,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        errors = [line for line in result.stderr.splitlines() if "Error" in line.split(":")[0]] or ["(no error line)"]
        return f"failed (rc {result.returncode}): {errors[-1][:400]}"
    state = json.loads((out / "trainer_state.json").read_text())
    runtime = next(h["train_runtime"] for h in state["log_history"] if "train_runtime" in h)
    return f"{runtime / STEPS:.3f} s/step ({runtime:.3f} s for {STEPS} steps, train_runtime)"


def ours_grpo(python, checkpoint, folder):
    """Our --stage grpo: 2 prompts x 2 answers of at most 4 tokens a step (images cut into at most 2 slices)."""
    records = [{"image": str(folder / f"{c}.png"), "conversations": [
        {"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": c}]} for c in COLOURS]
    return ours(python, checkpoint, folder, "grpo", records, "--max_slice_nums", "2", "--grpo_rewards", "f1",
                "--grpo_num_generations", str(GROUP), "--grpo_max_new_tokens", "4")


def ours_dpo(python, checkpoint, folder):
    """Our --stage dpo on DPOTrainer's records (chosen the colour, rejected "purple"), 2 pairs a step,
    the images sliced as the processor does by default (as TRL's run; at most 9 slices, 7 here)."""
    prompt = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    records = [{"image": str(folder / f"{c}.png"), "conversations": prompt, "chosen": c, "rejected": "purple"}
               for c in COLOURS]
    return ours(python, checkpoint, folder, "dpo", records)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project_python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="the interpreter of the project's own venv, for our --stage grpo")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (TRL's and ours)")
    args = parser.parse_args(argv)
    global SEED
    SEED = args.seed
    import trl

    print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"seed {SEED}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = build_checkpoint("minicpmv4_6", folder / "tiny_minicpmv4_6", seed=0)
        for name, check in (("GRPOTrainer", check_grpo), ("DPOTrainer", check_dpo)):
            try:
                seconds, calls, change, keys, notes = check(checkpoint, folder / name)
            except Exception as error:  # noqa: BLE001 - the outcome is what this tool reports
                traceback.print_exc()
                print(f"{name}: {describe_failure(error)}", flush=True)
                continue
            print(f"{name}: ran: seconds per step {seconds}; vision-tower calls in training {len(calls)} "
                  f"({sum(calls)} with gradient); max |logp change| with negated pixels {change:.3g}; {notes}; "
                  f"batch tensors {keys}", flush=True)
        # Ours whatever TRL's outcome: the number a later TRL's run would be compared with.
        print(f"ours --stage grpo: {ours_grpo(args.project_python, checkpoint, folder)}", flush=True)
        print(f"ours --stage dpo: {ours_dpo(args.project_python, checkpoint, folder)}", flush=True)


if __name__ == "__main__":
    main()
