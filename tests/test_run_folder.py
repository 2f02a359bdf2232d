"""The output folder: never written over unless asked, one run at a time, resumed only into the same
batch order and adapter layout; Ctrl-C and a file deleted mid-run stop cleanly."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from peft import LoraConfig

import demo_data
import finetune
from stages import prepare
import preflight
import resilience
import run_folder
from arguments import parse_args
from data.preflight_cache import CACHE_NAME
from launch import LORA_ARGS, FAST_ARGS, REPO, Launched, finetune_args, finetune_command, logged_steps, run, subprocess_env


def folder_hashes(folder):
    """``{relative path: sha256}`` of every file under ``folder``: any changed, added or removed byte shows."""
    hashes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            hashes[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


class WeightsLoaded(Exception):
    """Raised in place of loading the weights: the run got past every check before them."""


def call_main(argv, monkeypatch, capsys):
    """``finetune.main(argv)`` in this process, stopped where the weights would load; ``(exit status, stderr)``,
    the status None when it got as far as the weights."""

    def no_weights(*args, **kwargs):
        raise WeightsLoaded

    monkeypatch.setattr(prepare, "load_model", no_weights)
    try:
        finetune.main([str(arg) for arg in argv])
        code = "returned"
    except SystemExit as stop:
        code = stop.code
    except WeightsLoaded:
        code = None
    return code, capsys.readouterr().err


def error_lines(output):
    return [line for line in output.splitlines() if "error" in line.lower() or "Traceback" in line]


def complete_checkpoint(folder, step, files=None):
    """A checkpoint folder that resilience counts as complete, holding ``files`` (name -> bytes)."""
    folder.mkdir(parents=True)
    for name, content in (files or {"model.safetensors": os.urandom(256)}).items():
        (folder / name).write_bytes(content)
    resilience.write_manifest(folder)
    (folder / resilience.STATE_FILE).write_text(json.dumps({"global_step": step}))
    return folder


def finished_run(out):
    """What a finished LoRA run leaves: its adapter, two checkpoints, its state."""
    out.mkdir(parents=True)
    LoraConfig(r=8, lora_alpha=16, target_modules=".*q_proj").save_pretrained(out)
    (out / "adapter_model.safetensors").write_bytes(os.urandom(512))
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    for step in (1, 2):
        complete_checkpoint(out / f"checkpoint-{step}", step)
    return out


def test_output_dir_that_is_a_file_or_under_a_file_is_one_line_exit_2(tiny_checkpoint, shapes, tmp_path, monkeypatch, capsys):
    model = tiny_checkpoint("minicpmv2_6")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, expected in ((a_file, "is a file, not a folder"), (a_file / "run", f"lies under {a_file}, which is a file")):
        code, err = call_main(finetune_args(model, shapes, out), monkeypatch, capsys)
        assert code == finetune.EXIT_USAGE, err
        [line] = error_lines(err)
        assert line.startswith(f"finetune.py: error: --output_dir {out} {expected}"), err
    assert a_file.read_text() == "mine"


def test_the_model_folder_is_never_an_output_whatever_the_flags(tiny_checkpoint, shapes, tmp_path, monkeypatch, capsys):
    model = shutil.copytree(tiny_checkpoint("minicpmv2_6"), tmp_path / "models" / "base")
    link = tmp_path / "link"
    link.symlink_to(model)
    before = folder_hashes(tmp_path / "models")
    for out, relation in ((model, "the folder"), (model / "out", "inside the folder"), (link, "the folder"),
                          (link / "out", "inside the folder"), (tmp_path / "models", "a folder that contains the folder")):
        code, err = call_main(finetune_args(model, shapes, out, "--overwrite_output_dir", "true"), monkeypatch, capsys)
        assert code == finetune.EXIT_USAGE, err
        assert f"--output_dir {out} is {relation} of the model the run reads (--model_name_or_path {model}" in err
        assert "no flag allows this one" in err and "Traceback" not in err
    # The adapter a LoRA run starts from is a model it reads too.
    adapter = finished_run(tmp_path / "adapter")
    code, err = call_main(finetune_args(model, shapes, adapter, *LORA_ARGS, "--lora_weight_path", adapter,
                                        "--overwrite_output_dir", "true"), monkeypatch, capsys)
    assert code == finetune.EXIT_USAGE and f"(--lora_weight_path {adapter})" in err, err
    assert folder_hashes(tmp_path / "models") == before
    assert not (model / run_folder.LOCK_NAME).exists() and not (model / "out").exists()


def test_a_folder_holding_an_earlier_run_is_refused_byte_for_byte_unchanged(tiny_checkpoint, shapes, tmp_path, monkeypatch, capsys):
    model, out = tiny_checkpoint("minicpmv2_6"), finished_run(tmp_path / "out")
    before = folder_hashes(out)
    code, err = call_main(finetune_args(model, shapes, out, *LORA_ARGS), monkeypatch, capsys)
    assert code == finetune.EXIT_USAGE, err
    [line] = error_lines(err)
    assert line.startswith(f"finetune.py: error: --output_dir {out} already holds 2 checkpoint(s) (checkpoint-1, checkpoint-2)")
    assert "a LoRA adapter (adapter_config.json, adapter_model.safetensors)" in line
    assert f"continue that run with --resume_from_checkpoint {out}" in line
    assert "--overwrite_output_dir true" in line and "another --output_dir" in line
    assert folder_hashes(out) == before  # no lock, record or report left behind either

    # What a run writes before it trains (preflight's report and cache, the record) does not make a folder taken.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / preflight.REPORT_NAME).write_text("{}")
    (fresh / CACHE_NAME).write_text("{}")
    code, err = call_main(finetune_args(model, shapes, fresh), monkeypatch, capsys)
    assert code is None, err
    assert not (fresh / run_folder.LOCK_NAME).exists()  # released when the run stopped


def lock_of(pid, host=None, started="2026-12-01T10:00:00+00:00"):
    """What run_folder.Lock writes for process ``pid``."""
    return dict(pid=pid, host=host or socket.gethostname(), process_start=run_folder.process_start(pid), started=started,
                token="x")


def test_lock_refuses_a_second_run_and_names_the_holder_a_dead_holder_is_taken_over(tiny_checkpoint, shapes, tmp_path,
                                                                                     monkeypatch, capsys):
    model, out = tiny_checkpoint("minicpmv2_6"), tmp_path / "out"
    out.mkdir()
    lock = out / run_folder.LOCK_NAME
    holder = subprocess.Popen(["sleep", "120"])
    try:
        for content in (lock_of(holder.pid), lock_of(1, host="node-7")):  # alive here; on another host: never judged
            lock.write_text(json.dumps(content))
            code, err = call_main(finetune_args(model, shapes, out, "--overwrite_output_dir", "true"), monkeypatch, capsys)
            assert code == 1, err
            assert (f"--output_dir {out} is in use by another run: process {content['pid']} on host {content['host']}, "
                    f"started {content['started']}") in err
            assert json.loads(lock.read_text()) == content  # obeyed, untouched
    finally:
        holder.kill()
        holder.wait()
    # Its process has ended (and its pid is no longer that process): the lock is stale.
    assert not run_folder.holder_alive(lock_of(holder.pid))
    assert not run_folder.holder_alive(dict(lock_of(os.getpid()), process_start=1))  # the pid now runs another program
    lock.write_text(json.dumps(lock_of(holder.pid)))
    code, err = call_main(finetune_args(model, shapes, out), monkeypatch, capsys)
    assert code is None, err
    assert f"Taking over {lock}: left by process {holder.pid} on {socket.gethostname()}" in err
    assert not lock.exists()


def test_resume_stops_when_what_defines_the_batch_order_changed(tiny_checkpoint, shapes, tmp_path, monkeypatch, capsys):
    model, out = tiny_checkpoint("minicpmv2_6"), tmp_path / "out"
    data = Path(shutil.copy(shapes, tmp_path / "train.json"))
    shutil.copytree(shapes.parent / "images", tmp_path / "images")
    base = finetune_args(model, data, out, *FAST_ARGS)
    # The first run's folder: the record it wrote at its start, one checkpoint.
    out.mkdir()
    model_args, data_args, training_args, lora_args = parse_args([str(arg) for arg in base])
    run_folder.write_record(out, dict(batch_order=run_folder.batch_order(data_args, training_args),
                                      earlier_checkpoints=["checkpoint-900"]))
    complete_checkpoint(out / "checkpoint-2", 2)
    resume = [*base, "--resume_from_checkpoint", out]
    before = folder_hashes(out)
    for extra, named in ((["--model_max_length", "256"], "--model_max_length 512 -> 256"),
                         (["--packing", "true"], "--packing False -> True"),
                         (["--per_device_train_batch_size", "2"], "--per_device_train_batch_size 8 -> 2"),
                         (["--seed", "1"], "--seed 0 -> 1")):
        code, err = call_main([*resume, *extra], monkeypatch, capsys)
        assert code == finetune.EXIT_USAGE, err
        assert f"--resume_from_checkpoint {out / 'checkpoint-2'}: what defines the batch order changed" in err
        assert named in err and "--ignore_data_change true" in err
        assert folder_hashes(out) == before
    # The same records in another order: same size, another content hash.
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[::-1], indent=1, ensure_ascii=False))
    code, err = call_main(resume, monkeypatch, capsys)
    assert code == finetune.EXIT_USAGE, err
    assert f"the training data: {data} (" in err and "sha256" in err
    assert folder_hashes(out) == before
    # On purpose: resumed (as far as the weights), said so, and the new settings recorded.
    code, err = call_main([*resume, "--ignore_data_change", "true"], monkeypatch, capsys)
    assert code is None, err
    assert "--ignore_data_change: resuming although the training data" in err
    record = run_folder.read_record(out)
    assert record["batch_order"]["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["earlier_checkpoints"] == ["checkpoint-900"]  # still the earlier run's, still kept


def test_resume_into_another_lora_rank_is_a_usage_error_naming_both(tiny_checkpoint, shapes, tmp_path, monkeypatch, capsys):
    model, out = tiny_checkpoint("minicpmv2_6"), tmp_path / "out"
    checkpoint = complete_checkpoint(out / "checkpoint-2", 2)
    LoraConfig(r=8, lora_alpha=16, target_modules=".*q_proj").save_pretrained(checkpoint)
    resilience.write_manifest(checkpoint)
    code, err = call_main(finetune_args(model, shapes, out, *LORA_ARGS, "--lora_r", "16", "--lora_alpha", "16",
                                        "--resume_from_checkpoint", out), monkeypatch, capsys)
    assert code == finetune.EXIT_USAGE, err
    assert (f"--resume_from_checkpoint {checkpoint}: this run asks for LoRA rank 16 (--lora_r), the checkpoint's "
            "adapter has 8") in err
    assert "(--lora_r 8)" in err
    code, err = call_main(finetune_args(model, shapes, out, "--resume_from_checkpoint", out), monkeypatch, capsys)
    assert code == finetune.EXIT_USAGE and "holds a LoRA adapter (rank 8): resume it with --use_lora true" in err, err


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    earlier = {name: complete_checkpoint(tmp_path / name, int(name.split("-")[1])) for name in ("checkpoint-100", "checkpoint-200")}
    before = {name: folder_hashes(folder) for name, folder in earlier.items()}
    for step in (1, 2, 3, 4):
        complete_checkpoint(tmp_path / f"checkpoint-{step}", step)
    resilience.rotate_checkpoints(str(tmp_path), 2, keep=set(earlier), best=str(tmp_path / "checkpoint-1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-100", "checkpoint-200", "checkpoint-4"]
    assert {name: folder_hashes(folder) for name, folder in earlier.items()} == before


def test_best_model_clean_up_at_the_end_spares_an_earlier_runs_checkpoint(tiny_checkpoint, tmp_path):
    """--save_total_limit 1 with --load_best_model_at_end: the Trainer's clean-up after training
    deletes every checkpoint-* but the best; an earlier run's checkpoint in the folder must stay."""
    data = demo_data.generate(tmp_path / "data", count=2)
    out = tmp_path / "out"
    earlier = complete_checkpoint(out / "checkpoint-100", 100)
    before = folder_hashes(earlier)
    argv = finetune_args(
        tiny_checkpoint("minicpmv2_6"), data, out, *FAST_ARGS, *LORA_ARGS, "--overwrite_output_dir", "true",
        "--eval_data_path", data, "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1",
        "--max_steps", "3", "--save_total_limit", "1", "--load_best_model_at_end", "true", "--learning_rate", "1e-3",
    )
    finetune.main([str(arg) for arg in argv])
    assert folder_hashes(earlier) == before
    mine = sorted(p.name for p in out.glob("checkpoint-*") if p.name != "checkpoint-100")
    assert mine and len(mine) <= 2, mine  # the best (and the last, if another) of this run's three


def test_image_deleted_after_preflight_stops_naming_the_record(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    data = demo_data.generate(tmp_path / "data", count=2)
    log_sample = prepare.log_sample

    def delete_after_checks(*args, **kwargs):  # the last use of the data before training
        log_sample(*args, **kwargs)
        for image in (tmp_path / "data" / "images").iterdir():
            image.unlink()

    monkeypatch.setattr(prepare, "log_sample", delete_after_checks)
    out = tmp_path / "out"
    argv = finetune_args(tiny_checkpoint("minicpmv2_6"), data, out, *FAST_ARGS, *LORA_ARGS, "--max_steps", "2",
                         "--per_device_train_batch_size", "4")
    with pytest.raises(SystemExit) as stop:
        finetune.main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 1, err
    records = json.loads(data.read_text())
    named = [(i, r["id"]) for i, r in enumerate(records) if f"record {i} (id {r['id']!r}) of {data}" in err]
    assert named and "It passed preflight before training: the file changed or vanished since" in err, err[-3000:]
    assert "images/shape_" in err and "no such file" in err, err[-3000:]
    assert not (out / run_folder.LOCK_NAME).exists()


@pytest.mark.launch
def test_launcher_twice_lock_ctrl_c_and_overwrite(tiny_checkpoint, shapes, tmp_path):
    """finetune_lora.sh as a user runs it, in a folder of their own, with its default OUTPUT_DIR:
    a second run while the first trains is refused naming it; Ctrl-C to the terminal's process group
    saves a checkpoint and stops in one line; running the script again is refused, leaving every
    byte; --overwrite_output_dir trains there, its rotation sparing the first run's checkpoint."""
    env = subprocess_env(GPUS_PER_NODE=2, MODEL=tiny_checkpoint("minicpmv2_6"), DATA=shapes, EVAL_DATA="", LLM_TYPE="qwen")
    env.pop("OUTPUT_DIR", None)
    script = ["bash", REPO / "finetune_lora.sh", *FAST_ARGS, "--logging_steps", "1", "--warmup_steps", "0"]
    out = tmp_path / "output" / "output_lora"  # the script's default, under the folder it runs in
    first = Launched([*script, "--max_steps", "5000", "--save_steps", "5000"], env, cwd=tmp_path, new_session=True)
    first.wait_for(lambda: logged_steps(first) >= 4, timeout=300, what="four logged steps")
    holder = json.loads((out / run_folder.LOCK_NAME).read_text())

    code, output = run(finetune_command(*finetune_args(env["MODEL"], shapes, out, "--overwrite_output_dir", "true")),
                       expect_ok=False)
    assert code == 1, output[-3000:]
    assert (f"--output_dir {out} is in use by another run: process {holder['pid']} on host {holder['host']}, "
            f"started {holder['started']}") in output
    assert "Traceback" not in output, output[-3000:]

    os.killpg(first.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals torchrun and every worker
    assert first.finish(timeout=180) == resilience.EXIT_INTERRUPTED, first.output[-3000:]
    assert "Traceback" not in first.output and "KeyboardInterrupt" not in first.output, first.output[-5000:]
    assert "torchrun: stopped by SIGINT" in first.output
    [checkpoint] = list(out.glob("checkpoint-*"))
    assert resilience.is_complete(checkpoint) and int(checkpoint.name.split("-")[1]) >= 4
    for rank in (0, 1):
        assert f"SIGINT: rank {rank} saved step" in first.output, first.output[-3000:]
    assert not (out / run_folder.LOCK_NAME).exists()

    before = folder_hashes(out)
    code, output = run(script, env=env, cwd=tmp_path, expect_ok=False)
    assert code == finetune.EXIT_USAGE, output[-3000:]
    assert [line for line in output.splitlines() if "finetune.py: error:" in line] == [
        f"finetune.py: error: --output_dir output/output_lora already holds 1 checkpoint(s) ({checkpoint.name}), which "
        f"this run would overwrite. To go on: continue that run with --resume_from_checkpoint output/output_lora; or "
        "train into it anyway with --overwrite_output_dir true (files of the same name are replaced; its checkpoints "
        "are never rotated away by --save_total_limit); or pass another --output_dir"
    ]
    assert "Traceback" not in output, output[-3000:]
    assert folder_hashes(out) == before

    taken = dict(env, GPUS_PER_NODE="1")
    run([*script, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "1", "--overwrite_output_dir", "true"],
        env=taken, cwd=tmp_path)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted([checkpoint.name, "checkpoint-3"])
    assert {k: v for k, v in folder_hashes(out).items() if k.startswith(checkpoint.name + "/")} == {
        k: v for k, v in before.items() if k.startswith(checkpoint.name + "/")
    }
