"""Training steps of MiniCPM-V 2.6 at full size, random weights: tokens/s and peak memory, old vs new loss.

    python benchmarks/gpu_train.py [--size full|reduced] [--device cuda] [--batch 1 4] [--steps 5]
                                   [--warmup 2] [--length 2048] [--json results.json]

The model is the published MiniCPM-V 2.6 architecture (PUBLISHED_2_6: Qwen2-7B LLM, SigLIP-400M
vision tower, 64-query resampler; about 8B parameters) built from its config with random weights,
nothing downloaded: the config and this project's stand-in remote code (tiny_models/remote_code)
are written to a temporary folder and loaded as a user's checkpoint is, through
``AutoConfig`` / ``AutoModel`` with ``trust_remote_code``; the weights are created directly in
bf16 on ``--device`` (no CPU copy of 8B parameters). LoRA, frozen parts and gradient checkpointing
are those of finetune_lora.sh (its flags go through arguments.parse_args and stages.prepare.adapt_model),
and each step is CPMTrainer.training_step with the optimizer CPMTrainer creates.

Synthetic samples: lengths drawn between a quarter of ``--length`` and ``--length``, one image
(one view of ``view_patches`` x ``view_patches`` patches, query_num placeholder tokens), 5-20% of
positions labelled (the answer at the end). For each batch size and each loss path: ``--warmup``
steps, then ``--steps`` timed steps; real tokens/s (padding excluded) and padded tokens/s, and on
CUDA the peak of torch.cuda.max_memory_allocated over the timed steps (on CPU no memory figure:
the process's peak RSS cannot be reset between cases). Loss paths: "old" is the loss from the
model's full [B, L, vocab] logits upcast to fp32 (CPMTrainer's full-logits path, forced), "new"
the output head on the labelled positions only (loss.py), as CPMTrainer uses it by default. Both
losses of the first batch are also computed on the same weights in eval mode (no dropout) and
compared. Each case runs without and with packing (``--packing``: data.packing.pack_lengths and
pack_samples, as --packing true packs rows); tokens/s counts real tokens, so packing's gain is
the padding it removes.

``--size reduced``: the same structure and vocabulary with 2 LLM and 2 vision layers and small
widths, for a CPU check (tests/test_benchmarks.py runs it).
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
import families  # noqa: E402
from families.base import packing_attention_problem  # noqa: E402
from stages import prepare  # noqa: E402
import loading  # noqa: E402
from arguments import parse_args  # noqa: E402
from data.packing import pack_lengths, pack_samples  # noqa: E402
from loss import IGNORE_INDEX  # noqa: E402
from tiny_models.build import auto_map, copy_remote_code, remote_module  # noqa: E402
from trainer import CPMTrainer  # noqa: E402

FAMILY = "minicpmv2_6"
GIB = 2**30

# openbmb/MiniCPM-V-2_6 config.json as published (the file itself is not in the searchable index;
# the values were checked against: OpenBMB/MiniCPM-V issue #699, "vocab_size of MiniCPM-V-2_6:
# 151666" (Qwen2's 151,643 tokens plus the model's added ones); llama.cpp's load log of the
# converted 2.6 model in ollama/ollama issue #9528 (n_vocab 151666, n_embd 3584, n_layer 28,
# n_head 28, n_head_kv 4, n_ctx_train 32768); Qwen2-7B's config.json (intermediate_size 18944,
# rms_norm_eps 1e-6); the 2.6 vision config (SigLIP so400m: 27 layers, hidden 1152, MLP 4304,
# 16 heads, patch 14, image_size 980) and this project's record of the 2.6 pipeline fields
# (tiny_models/published_remote_code.json: query_num 64, slice_config, version 2.6).
# rope_theta (1e6) is not a field the stand-in LLM takes: it changes no cost.
PUBLISHED_2_6 = {
    "llm_model_type": "qwen2",
    "vocab_size": 151_666,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "query_num": 64,
    "patch_size": 14,
    "image_size": 448,
    "drop_vision_last_layer": False,
    "vision_batch_size": 16,
    "version": 2.6,
    "slice_mode": True,
    "batch_vision_input": True,
    "use_image_id": True,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14},
    "terminators": ["<|im_end|>", "<|endoftext|>"],
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 980,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}
# Same vocabulary and structure, a few narrow layers: what a CPU runs in seconds.
REDUCED = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "query_num": 16,
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
# Patches a side of each sample's image: 448 px at full size, as one view of a 2.6 image.
VIEW_PATCHES = {"full": 32, "reduced": 8}
# The LoRA launcher's flags (finetune_lora.sh) that shape the model and its training.
LAUNCHER_FLAGS = [
    "--tune_vision", "true", "--tune_llm", "false", "--use_lora", "true", "--gradient_checkpointing", "true",
    "--learning_rate", "1e-6", "--weight_decay", "0.1", "--adam_beta2", "0.95", "--bf16", "true",
    "--max_slice_nums", "9", "--report_to", "none",
]
PATHS = ("old", "new")
PACKING = {"off": (False,), "on": (True,), "both": (False, True)}


def model_config_fields(size):
    fields = json.loads(json.dumps(PUBLISHED_2_6))
    if size == "reduced":
        vision = fields["vision_config"] | REDUCED["vision_config"]
        fields.update({key: value for key, value in REDUCED.items() if key != "vision_config"}, vision_config=vision)
    return fields


def write_model_folder(folder, size):
    """config.json and the stand-in remote code: a checkpoint folder without weights."""
    config_class = remote_module("configuration_minicpm").MiniCPMVConfig
    config = config_class(**model_config_fields(size))
    config.auto_map = auto_map(FAMILY)
    config.save_pretrained(folder)
    copy_remote_code(FAMILY, config, folder)


def build_model(folder, device):
    """The model of ``folder`` with random bf16 weights made on ``device``, loaded as finetune.py
    loads a checkpoint's config and classes (trust_remote_code)."""
    config = loading.load_config(folder)
    with torch.device(device):
        model = transformers.AutoModel.from_config(config, trust_remote_code=True, dtype=torch.bfloat16)
    # The resampler computes its position table on the CPU.
    return model.to(device), config


def synthetic_samples(config, count, length, view_patches, seed):
    """Dataset items as SupervisedDataset builds them (labels shifted), random tokens and pixels."""
    generator = torch.Generator().manual_seed(seed)
    query_num, patch = config.query_num, config.patch_size
    image_start = 4  # a few prompt tokens, then the image's placeholder
    shortest = max(length // 4, image_start + query_num + 16)
    samples = []
    for index in range(count):
        n = int(torch.randint(shortest, length + 1, (1,), generator=generator))
        ids = torch.randint(0, config.vocab_size, (n,), generator=generator)
        labels = torch.full((n,), IGNORE_INDEX)
        fraction = 0.05 + 0.15 * float(torch.rand((), generator=generator))
        answer = min(max(1, int(fraction * n)), n - (image_start + query_num + 2))
        labels[n - answer - 1 : n - 1] = ids[n - answer :]
        samples.append(
            dict(
                record={"index": index, "id": f"synthetic-{index}"},
                input_ids=ids,
                position_ids=torch.arange(n),
                labels=labels,
                attention_mask=torch.ones(n, dtype=torch.bool),
                pixel_values=[torch.randint(0, 256, (3, patch, view_patches * view_patches * patch), dtype=torch.uint8,
                                            generator=generator)],  # raw pixels, as the dataset gives them
                tgt_sizes=torch.tensor([[view_patches, view_patches]], dtype=torch.int32),
                image_bound=torch.tensor([[image_start, image_start + query_num]]),
            )
        )
    return samples


def batches_of(samples, batch_size, length, collator, packing):
    """Collated batches of ``batch_size`` rows: one sample per row, or with ``packing`` the rows
    --packing makes (whole samples side by side up to ``length``)."""
    if packing:
        rows = pack_lengths([len(sample["input_ids"]) for sample in samples], length)
        samples = [pack_samples([samples[index] for index in row]) for row in rows]
    return [collator(samples[start : start + batch_size]) for start in range(0, len(samples), batch_size)]


def token_counts(batch):
    """(real tokens, tokens including padding) of a collated batch."""
    return int(batch["attention_mask"].sum()), batch["input_ids"].numel()


def make_trainer(model, training_args, collator):
    trainer = CPMTrainer(model=model, args=training_args, data_collator=collator)
    trainer.create_optimizer()
    # Set by Trainer.train, which this loop does not run.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def use_path(trainer, path):
    """Force the full-logits loss ("old") or restore the labelled-positions one ("new")."""
    trainer.full_logits_reason = "benchmark: the old path" if path == "old" else None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_losses(trainer, model, batch):
    """Both paths' loss of one batch on the same weights, without dropout."""
    model.eval()
    losses = {}
    with torch.no_grad():
        for path in PATHS:
            use_path(trainer, path)
            losses[path] = trainer.compute_loss(model, trainer._prepare_inputs(batch)).item()
    model.train()
    return losses


def timed_steps(trainer, model, batches, warmup, steps, device):
    """Warm-up steps, then timed ones: tokens/s (real and padded) and, on CUDA, peak memory."""
    cycle = [batches[i % len(batches)] for i in range(warmup + steps)]
    for batch in cycle[:warmup]:
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    real = padded = 0
    losses = []
    start = time.perf_counter()
    for batch in cycle[warmup:]:
        losses.append(trainer.training_step(model, batch).item())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        counts = token_counts(batch)
        real, padded = real + counts[0], padded + counts[1]
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens_per_s": real / seconds,
        "padded_tokens_per_s": padded / seconds,
        "real_token_share": real / padded,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        "losses": losses,
    }


def lora_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def run(args):
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        write_model_folder(folder, args.size)
        flags = ["--model_name_or_path", folder, "--data_path", "synthetic", "--output_dir", str(Path(folder) / "out"),
                 "--model_max_length", str(args.length)] + LAUNCHER_FLAGS
        flags += ["--use_cpu", "true"] if device.type == "cpu" else []
        _, _, training_args, lora_args = parse_args(flags)
        transformers.set_seed(0)
        model, config = build_model(folder, device)
        family = families.family_for(config)
        problem = args.packing != "off" and packing_attention_problem(family.loss_module(model))
        if problem:
            raise SystemExit(problem)
        model = prepare.adapt_model(family, model, training_args, lora_args)
        checkpointing = training_args.activation_checkpointing_kwargs
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        total, trainable = prepare.count_parameters(model)
        collator = family.collator("sft", None, args.length)
        trainer = make_trainer(model, training_args, collator)
        before = lora_weights(model)
        samples = synthetic_samples(config, max(args.batch) * (args.warmup + args.steps), args.length,
                                    VIEW_PATCHES[args.size], seed=0)
        first = batches_of(samples, args.batch[0], args.length, collator, packing=False)[0]
        result = {
            "size": args.size, "device": str(device), "length": args.length, "parameters": total,
            "trainable_parameters": trainable, "vocab_size": config.vocab_size,
            "loss_check": compare_losses(trainer, model, first),
            "cases": [],
        }
        for packing in PACKING[args.packing]:
            for batch_size in args.batch:
                batches = batches_of(samples, batch_size, args.length, collator, packing)
                for path in PATHS:
                    use_path(trainer, path)
                    case = {"batch": batch_size, "path": path, "packing": packing}
                    case.update(timed_steps(trainer, model, batches, args.warmup, args.steps, device))
                    result["cases"].append(case)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        after = lora_weights(model)
        result["lora_changed"] = sum(not torch.equal(before[name], after[name]) for name in before)
        result["lora_tensors"] = len(before)
        return result


def report(result):
    check = result["loss_check"]
    print(f"MiniCPM-V 2.6 {result['size']} ({result['parameters']:,} parameters, {result['trainable_parameters']:,} "
          f"trainable), {result['device']}, length {result['length']}, bf16, LoRA, gradient checkpointing")
    print(f"first batch, eval mode: old loss {check['old']:.6f}, new loss {check['new']:.6f}")
    print(f"{'batch':>5} {'path':>4} {'packing':>7} {'tokens/s':>10} {'padded/s':>10} {'real':>6} {'peak GiB':>9}")
    for case in result["cases"]:
        peak = "-" if case["peak_memory_gib"] is None else f"{case['peak_memory_gib']:.2f}"
        print(f"{case['batch']:>5} {case['path']:>4} {str(case['packing']):>7} {case['tokens_per_s']:>10.1f} "
              f"{case['padded_tokens_per_s']:>10.1f} {case['real_token_share']:>6.1%} {peak:>9}")
    print(f"LoRA tensors changed by training: {result['lora_changed']} of {result['lora_tensors']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "reduced"), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--length", type=int, default=2048, help="model_max_length: the longest sample")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--packing", choices=tuple(PACKING), default="both",
                        help="rows of one sample each (off), packed as --packing true packs them (on), or both")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be at least 1, --warmup at least 0")
    result = run(args)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
