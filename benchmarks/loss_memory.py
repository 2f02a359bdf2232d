"""Peak memory of the loss: full logits (the old path) vs the output head on labelled positions only.

    python benchmarks/loss_memory.py [--hidden 256] [--batch 1] [--budget-gib 12]
                                     [--vocabs ...] [--lengths ...] [--fractions ...] [--dtypes ...]

Each case runs in a fresh process: hidden states ``[batch, L, hidden]`` that need a gradient (as
the LLM's do), a frozen output head ``hidden -> vocab`` (LoRA's case), labels at a given fraction
of positions; forward and backward. Peak memory is measured above what the inputs and the head
already take: on CPU the process's peak resident set (ru_maxrss), on CUDA max_memory_allocated.
The logits' size does not depend on ``hidden``, which is kept small so the CPU run is quick.
Where the old path would need more than ``--budget-gib``, only the new one is measured (the row
says so).
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loss  # noqa: E402

VOCABS = (151_936, 248_000)
LENGTHS = (2048, 4096)
FRACTIONS = (0.05, 0.2, 1.0)
DTYPES = ("float32", "bfloat16")
GIB = 2**30


def peak_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def warm_up(head, hidden, labels, vocab):
    """Both paths, forward and backward, on two positions: what a library sets up on first use is
    not the loss's. Training has it in place before its first loss: torch's first checkpointed
    call alone imports torch._dynamo and its dependencies (about 185 MiB resident on CPU), which
    the model's own gradient checkpointing has done already."""
    few = hidden[:, :2].detach().requires_grad_(True)
    some = labels[:, :2].clone()
    some[:, 0] = 0
    loss.token_loss(head(few), some).backward()
    loss.labelled_loss_sum(head, few, some, vocab).backward()


def one_case(path, vocab, length, fraction, dtype, hidden_size, batch):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)  # the head's initial weights
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    hidden = torch.randn(batch, length, hidden_size, generator=generator).to(device=device, dtype=dtype)
    hidden.requires_grad_(True)
    labels = torch.full((batch, length), loss.IGNORE_INDEX)
    positions = torch.randperm(batch * length, generator=generator)[: max(1, int(fraction * batch * length))]
    labels.view(-1)[positions] = torch.randint(vocab, (len(positions),), generator=generator)
    labels = labels.to(device)
    warm_up(head, hidden, labels, vocab)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_bytes(device)
    if path == "old":
        value = loss.token_loss(head(hidden), labels)
    else:
        value = loss.labelled_loss_sum(head, hidden, labels, vocab) / loss.labelled_count(labels)
    value.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"peak_gib": (peak_bytes(device) - baseline) / GIB, "loss": value.item(), "device": device.type}


def old_path_estimate_gib(vocab, length, batch, dtype):
    # Measured (this script, vocab 151,936 and 248,000, L 2048 and 4096): 12 bytes per logit in
    # fp32 and in bf16 (fp32 logits, their log-softmax and its gradient; bf16 logits are freed
    # once upcast).
    return batch * length * vocab * 12 / GIB


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget-gib", type=float, default=12.0)
    parser.add_argument("--vocabs", type=int, nargs="+", default=VOCABS)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=DTYPES)
    parser.add_argument("--one", nargs=5, metavar=("PATH", "VOCAB", "LENGTH", "FRACTION", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, vocab, length, fraction, dtype = args.one
        print(json.dumps(one_case(path, int(vocab), int(length), float(fraction), dtype, args.hidden, args.batch)))
        return

    print(f"batch {args.batch}, hidden {args.hidden}, frozen head; peak GiB above inputs and weights")
    print(f"{'vocab':>8} {'L':>5} {'labelled':>8} {'dtype':>9} {'old':>8} {'new':>8} {'old/new':>8} {'loss rel diff':>13}")
    for vocab in args.vocabs:
        for length in args.lengths:
            for fraction in args.fractions:
                for dtype in args.dtypes:
                    row = f"{vocab:>8} {length:>5} {fraction:>8.0%} {dtype:>9}"
                    need = old_path_estimate_gib(vocab, length, args.batch, dtype)
                    paths = ("old", "new") if need <= args.budget_gib else ("new",)
                    results = {}
                    for path in paths:
                        command = [sys.executable, __file__, "--hidden", str(args.hidden), "--batch", str(args.batch),
                                   "--one", path, str(vocab), str(length), str(fraction), dtype]
                        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                        results[path] = json.loads(output.splitlines()[-1])
                    new = results["new"]
                    if "old" not in results:
                        print(f"{row} {'-':>8} {new['peak_gib']:8.2f}  old not measured: it needs about {need:.1f} GiB "
                              f"(--budget-gib {args.budget_gib})", flush=True)
                        continue
                    old = results["old"]
                    diff = abs(new["loss"] - old["loss"]) / abs(old["loss"])
                    ratio = old["peak_gib"] / max(new["peak_gib"], 1e-3)
                    print(f"{row} {old['peak_gib']:8.2f} {new['peak_gib']:8.2f} {ratio:8.1f} {diff:13.1e}", flush=True)


if __name__ == "__main__":
    main()
