"""Never lose a run: SIGTERM, kill -9 and a crash mid-save, each with real finetune.py processes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

import resilience
from launch import (
    FAST_ARGS,
    REPO,
    Launched,
    finetune_args,
    finetune_command,
    logged_steps,
    run_finetune,
    subprocess_env,
    torchrun_finetune,
    train_losses,
    trainer_state,
)

pytestmark = pytest.mark.launch
STEPS, SAVE_EVERY = "30", "5"


def train_args(model, data, output_dir, *extra):
    # Full fine-tune in fp32 on CPU, seeded: resumed losses must equal uninterrupted ones exactly.
    return finetune_args(
        model, data, output_dir, "--per_device_train_batch_size", "1", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--max_steps", STEPS, "--save_steps", SAVE_EVERY, *extra,
    )


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_checkpoint, shapes, tmp_path_factory):
    """The output folder of a run of STEPS steps, saved every SAVE_EVERY. Read only."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_finetune(train_args(tiny_checkpoint("minicpmv2_6"), shapes, out))
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    losses = train_losses(uninterrupted_run)
    assert [step for step, _ in losses] == list(range(1, int(STEPS) + 1))
    return dict(losses)


def test_sigterm_saves_the_current_step_on_every_rank(tiny_checkpoint, shapes, tmp_path):
    out = tmp_path / "run"
    env = subprocess_env()
    args = train_args(tiny_checkpoint("minicpmv2_6"), shapes, out, "--max_steps", "5000", "--save_steps", "5000")
    run = Launched([*torchrun_finetune(env), *args], env)
    run.wait_for(lambda: logged_steps(run) >= 3, what="three logged steps")
    seen = logged_steps(run)
    run.proc.send_signal(signal.SIGTERM)  # to torchrun, as a preempted node's agent would
    returncode = run.finish()
    assert returncode != 0, run.output[-3000:]

    [folder] = list(out.glob("checkpoint-*"))
    step = int(folder.name.split("-")[1])
    assert seen <= step < 5000
    assert resilience.is_complete(folder)
    state = trainer_state(folder)
    assert state["global_step"] == step and state["log_history"][-1]["step"] == step
    # Both ranks stopped after the same step and wrote their part of that checkpoint.
    assert (folder / "rng_state_0.pth").is_file() and (folder / "rng_state_1.pth").is_file()
    for rank in (0, 1):
        assert f"SIGTERM: rank {rank} saved step {step} to {folder}" in run.output, run.output[-3000:]
    assert "exiting with status 143" in run.output


def test_kill_9_then_resume_continues_with_identical_losses(tiny_checkpoint, shapes, uninterrupted, tmp_path):
    model, out = tiny_checkpoint("minicpmv2_6"), tmp_path / "run"
    run = Launched(finetune_command(*train_args(model, shapes, out)), subprocess_env())
    run.wait_for(lambda: resilience.is_complete(out / "checkpoint-10"), what="checkpoint-10")
    run.proc.kill()  # SIGKILL: no handler, no cleanup
    assert run.finish() == -signal.SIGKILL
    assert not (out / "trainer_state.json").exists(), "the run finished before it was killed"

    _, output = run_finetune(train_args(model, shapes, out, "--resume_from_checkpoint", out))
    resumed_from = int(re.search(r"Resuming from \S+checkpoint-(\d+) \(step", output).group(1))
    assert resumed_from >= 10
    assert trainer_state(out)["global_step"] == int(STEPS)
    losses = dict(train_losses(out))
    after = range(resumed_from + 1, int(STEPS) + 1)
    assert {step: losses[step] for step in after} == {step: uninterrupted[step] for step in after}


def test_checkpoint_whose_deletion_was_cut_short_is_not_resumed_from(uninterrupted_run, tmp_path):
    run = tmp_path / "run"
    for step in (25, 30):
        shutil.copytree(uninterrupted_run / f"checkpoint-{step}", run / f"checkpoint-{step}")
    assert resilience.complete_checkpoints(run)[-1] == (30, str(run / "checkpoint-30"))
    # What rmtree leaves when stopped after its first file, if that is not trainer_state.json.
    newest = run / "checkpoint-30"
    first = next(e for e in os.scandir(newest) if e.is_file() and e.name != resilience.STATE_FILE)
    os.remove(first.path)
    assert (newest / resilience.STATE_FILE).is_file() and not resilience.is_complete(newest)
    assert resilience.resolve_checkpoint(str(run), str(run)) == str(run / "checkpoint-25")
    with pytest.raises(ValueError, match="checkpoint-30: the checkpoint is incomplete"):
        resilience.resolve_checkpoint(str(newest), str(run))
    # Our own deletion removes the commit record before anything else.
    older = run / "checkpoint-25"
    order = []
    real_remove = os.remove
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resilience.os, "remove", lambda path: order.append(os.path.basename(path)) or real_remove(path))
        patch.setattr(resilience.shutil, "rmtree", lambda path: order.append("rmtree"))
        resilience.remove_checkpoint(str(older))
    assert order == [resilience.STATE_FILE, "rmtree"] and not resilience.is_complete(older)


def test_crash_during_save_leaves_previous_checkpoint_usable(tiny_checkpoint, shapes, uninterrupted, tmp_path):
    model, out = tiny_checkpoint("minicpmv2_6"), tmp_path / "run"
    args = train_args(model, shapes, out, "--save_total_limit", "1")
    crashed = subprocess.run(
        [sys.executable, REPO / "tests" / "crash_during_save.py", *FAST_ARGS, *args],
        env=subprocess_env(CRASH_AT_STEP=10), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert crashed.returncode == -signal.SIGKILL, (crashed.stdout + crashed.stderr)[-3000:]
    # The half-written checkpoint-10 is recognised as such; checkpoint-5 survived the rotation.
    assert (out / "checkpoint-10").is_dir() and not resilience.is_complete(out / "checkpoint-10")
    assert resilience.complete_checkpoints(out) == [(5, str(out / "checkpoint-5"))]
    with pytest.raises(ValueError, match=r"checkpoint-10: the checkpoint is incomplete.*resume from .*checkpoint-5"):
        resilience.resolve_checkpoint(str(out / "checkpoint-10"), str(out))

    _, output = run_finetune(train_args(model, shapes, out, "--resume_from_checkpoint", out, "--save_total_limit", "1"))
    assert f"Resuming from {out / 'checkpoint-5'} (step 5)" in output
    losses = dict(train_losses(out))
    assert {step: losses[step] for step in range(6, int(STEPS) + 1)} == {
        step: uninterrupted[step] for step in range(6, int(STEPS) + 1)
    }
    assert resilience.complete_checkpoints(out) == [(int(STEPS), str(out / f"checkpoint-{STEPS}"))]


def descendants(pid):
    """Process ids of every live descendant of ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while we looked
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_to_the_launcher_script_checkpoints_and_exits_143(tiny_checkpoint, shapes, tmp_path):
    """What a scheduler or `docker stop` does: SIGTERM to the script's process, nothing else."""
    out = tmp_path / "run"
    args = ["--max_steps", "5000", "--save_steps", "5000", "--logging_steps", "1", "--warmup_steps", "0"]
    env = subprocess_env(GPUS_PER_NODE=1, MODEL=tiny_checkpoint("minicpmv2_6"), DATA=shapes, EVAL_DATA="",
                         LLM_TYPE="qwen", OUTPUT_DIR=out)
    run = Launched(["bash", REPO / "finetune_lora.sh", *FAST_ARGS, *args], env)
    run.wait_for(lambda: logged_steps(run) >= 2, what="two logged steps")
    workers = descendants(run.proc.pid)
    assert workers, "torchrun started no worker"
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == resilience.EXIT_PREEMPTED, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    assert "torchrun: stopped by SIGTERM" in run.output
    [folder] = list(out.glob("checkpoint-*"))
    assert resilience.is_complete(folder) and (folder / "adapter_model.safetensors").is_file()
    assert not [pid for pid in workers if alive(pid)], "processes of the run outlived the script"


def test_disk_full_while_saving_names_the_folder_and_keeps_earlier_checkpoints(tiny_checkpoint, shapes, tmp_path):
    """A real full disk: the run writes into a small tmpfs mounted in its own user and mount namespace
    (``unshare``, no privileges needed), sized to hold one checkpoint and a half."""
    model, out, kept = tiny_checkpoint("minicpmv2_6"), tmp_path / "out", tmp_path / "kept"
    out.mkdir()
    checkpoint_bytes = 3 * (model / "model.safetensors").stat().st_size + 2**18  # weights, Adam's two moments, the rest
    args = train_args(model, shapes, out, "--max_steps", "3", "--save_steps", "1")
    # The tmpfs vanishes with the namespace: what the run left is copied out before.
    script = f'mount -t tmpfs -o size={int(1.5 * checkpoint_bytes)} tmpfs "{out}" && "$@"; code=$?; cp -a "{out}/." "{kept}"; exit $code'
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
         sys.executable, REPO / "finetune.py", *FAST_ARGS, *args],
        env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    folder = out / "checkpoint-2"
    assert f"Saving {folder} failed: the disk is full" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert resilience.complete_checkpoints(kept) == [(1, str(kept / "checkpoint-1"))]
    assert not resilience.is_complete(kept / "checkpoint-2")


def test_loss_turning_nan_stops_after_that_step_saving_nothing(tiny_checkpoint, shapes, tmp_path):
    # A learning rate of 1e30 wrecks the weights in the first step: the second step's loss is NaN.
    out = tmp_path / "run"
    args = train_args(tiny_checkpoint("minicpmv2_6"), shapes, out, "--max_steps", "4", "--save_steps", "1",
                      "--learning_rate", "1e30", "--per_device_train_batch_size", "2")
    code, output = run_finetune(args, expect_ok=False)
    assert code == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    message = re.search(r"The loss became nan at step 2 \(rank 0's records in that batch: (.*?)\); stopping", output)
    assert message, output[-3000:]
    named = re.findall(r"#(\d+) \(id '([^']*)'\)", message.group(1))
    records = json.loads(shapes.read_text())
    assert len(named) == 2 and all(records[int(index)]["id"] == record_id for index, record_id in named)
    # Nothing was saved after the bad step: the last good checkpoint is the newest, and no final model.
    assert resilience.complete_checkpoints(out) == [(1, str(out / "checkpoint-1"))]
    assert not (out / "checkpoint-2").exists() and not (out / "model.safetensors").exists()
