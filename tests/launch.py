"""Helpers for tests that launch the real entry points as subprocesses."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Keep the launched runs short and cheap; each test adds what it is about.
FAST_ARGS = [
    "--report_to", "none",
    "--max_slice_nums", "2",
    "--model_max_length", "512",
    "--dataloader_num_workers", "0",
    "--seed", "0",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**overrides):
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("ACCELERATE_USE_CPU", None)
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def run(cmd, *, env=None, timeout=420, expect_ok=True, cwd=None):
    result = subprocess.run(
        [str(c) for c in cmd], env=env or subprocess_env(), cwd=cwd or REPO,
        capture_output=True, text=True, timeout=timeout,
    )
    output = result.stdout + result.stderr
    if expect_ok:
        assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{output[-6000:]}"
    return result.returncode, output


class Launched:
    """A process whose merged output is collected line by line while it runs. ``new_session``: it
    leads a process group of its own, as a command run from a terminal does (signal it with killpg)."""

    def __init__(self, cmd, env, cwd=None, new_session=False):
        self.lines = []
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], env=env, cwd=cwd or REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=new_session,
        )
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, predicate, timeout=120, what="the condition"):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output[-4000:]}"
            time.sleep(0.05)

    def finish(self, timeout=120):
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return self.proc.returncode

    @property
    def output(self):
        return "".join(self.lines)


def logged_steps(launched):
    """How many training losses ``launched`` has logged so far."""
    return sum("'loss'" in line for line in launched.lines)


def finetune_args(model, data, output_dir, *extra, llm_type=None, use_cpu=True):
    """The flags every run of finetune.py names (model, data, output folder, CPU processes; the template
    if given: by default the checkpoint's), then ``extra``."""
    return [
        "--model_name_or_path", model, "--data_path", data, *(["--llm_type", llm_type] if llm_type else []),
        "--output_dir", output_dir, *(["--use_cpu", "true"] if use_cpu else []), *extra,
    ]


# LoRA on the LLM, which itself stays frozen (the launchers' LoRA setting).
LORA_ARGS = ["--use_lora", "true", "--tune_llm", "false"]


def torchrun_finetune(env, nproc=2):
    """The command that starts finetune.py on ``nproc`` processes through torchrun, at ``env``'s address and port."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", env["MASTER_ADDR"], "--master_port", env["MASTER_PORT"], REPO / "finetune.py", *FAST_ARGS,
    ]


def run_script(script, args=(), timeout=420, expect_ok=True, **env):
    return run(["bash", REPO / script, *FAST_ARGS, *args], env=subprocess_env(**env), timeout=timeout,
               expect_ok=expect_ok)


def killed_at_checkpoint(script, args, out, step, **env):
    """Run ``script`` in its own session and kill -9 it (bash, torchrun and every worker at once, as a
    lost node would) as soon as ``out``'s checkpoint-``step`` is complete; asserts the run had not
    finished."""
    import resilience

    killed = subprocess.Popen(
        ["bash", REPO / script, *FAST_ARGS, *args], env=subprocess_env(OUTPUT_DIR=out, **env),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not resilience.is_complete(Path(out) / f"checkpoint-{step}"):
            assert killed.poll() is None and time.monotonic() < deadline, f"no checkpoint-{step} before the run ended"
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    assert not (Path(out) / "trainer_state.json").exists(), "the run finished before it was killed"


def finetune_command(*args):
    """``python finetune.py`` with the fast arguments, then ``args``."""
    return [sys.executable, REPO / "finetune.py", *FAST_ARGS, *args]


def run_finetune(args, timeout=420, expect_ok=True, **env):
    return run(finetune_command(*args), env=subprocess_env(**env), timeout=timeout, expect_ok=expect_ok)


def trainer_state(output_dir):
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())


def train_losses(output_dir):
    return [(h["step"], h["loss"]) for h in trainer_state(output_dir)["log_history"] if "loss" in h]


def assert_falls(losses):
    """The ``(step, loss)`` series is finite and its last three average under 80% of its first three."""
    values = [loss for _, loss in losses]
    assert all(torch.isfinite(torch.tensor(values))), values
    head, tail = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert tail < 0.8 * head, f"loss did not fall: {values}"


def eval_losses(output_dir):
    return [(h["step"], h["eval_loss"]) for h in trainer_state(output_dir)["log_history"] if "eval_loss" in h]


def load_state_dict(folder):
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def dataset_as_trained(model_dir, data_path, *argv):
    """The dataset finetune.train() builds from ``--data_path`` with these arguments, and its collator."""
    import arguments
    import families
    import loading
    import stages
    from stages import prepare

    _, data_args, training_args, _ = arguments.parse_args(
        [str(arg) for arg in finetune_args(model_dir, data_path, "unused", *FAST_ARGS, *argv)]
    )
    config = loading.load_config(model_dir)
    family = families.family_for(config, training_args.llm_type)
    processing = family.load_processing(model_dir)
    kind = stages.get(training_args.stage).sample_kind
    dataset, _ = prepare.build_datasets(family, data_args, training_args, processing, config, kind)
    return dataset, family.collator(kind, processing, training_args.model_max_length)


def eval_loss(model, dataset, collator):
    """Summed cross-entropy over all learned tokens of ``dataset``, divided by their count, and the
    largest |logit| it was computed from.

    That is the Trainer's eval_loss when the whole eval set is one evaluation step (one sample
    per process): with ``average_tokens_across_devices`` it weighs every token alike. The loss another
    process reported differs by the rounding of logits of that size: compare with
    ``numerics.approx(reported, scale=largest_logit)``.
    """
    import families
    from trainer import CPMTrainer

    family = families.family_for(model.config)  # remote code or native, as its config says
    total, count, largest_logit = 0.0, 0, 0.0
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = collator([dataset[i]])
            labels = family.loss_labels(batch["labels"])
            logits = family.forward(model, batch).logits
            total += CPMTrainer.token_loss(logits, labels, num_items=1).item()
            count += int(labels.ne(-100).sum())
            largest_logit = max(largest_logit, logits.abs().max().item())
    return total / count, largest_logit
