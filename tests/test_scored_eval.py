"""Scored evaluation during training (--eval_generate): answers of the eval records scored at each
evaluation, logged beside eval_loss and written to OUTPUT_DIR/eval_answers/step-K.jsonl."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

import arguments
import finetune
import loading
import preflight
from data.preflight_report import REASONS
from evaluation import metrics
from evaluation.answers import reference
from evaluation.during_training import ANSWERS_FOLDER, answers_path, share
from launch import FAST_ARGS, LORA_ARGS, finetune_args, run_script, trainer_state

USER_METRICS = '''
from evaluation import metric

@metric("short")
def short(answer, reference):
    """1 if the answer has at most as many words as the reference."""
    return float(len(answer.split()) <= len(reference.split()))
'''


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """A user's metric file registers into a copy of the registry, so each test can load it again."""
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))


def scored_args(model, data, output_dir, *extra):
    """A LoRA run of 2 steps on ``data`` that evaluates on it after each, into ``output_dir``."""
    return [str(arg) for arg in finetune_args(
        model, data, output_dir, *FAST_ARGS, *LORA_ARGS, "--max_steps", "2", "--eval_data_path", data,
        "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no", "--logging_steps", "1",
        "--eval_max_new_tokens", "6", *extra,
    )]


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_scored_at_each_evaluation(output_dir, records, count, names):
    evaluations = [entry for entry in trainer_state(output_dir)["log_history"] if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [1, 2]
    for entry in evaluations:
        rows = rows_of(output_dir / ANSWERS_FOLDER / f"step-{entry['step']}.jsonl")
        assert [row["id"] for row in rows] == [record["id"] for record in records[:count]]
        assert [row["reference"] for row in rows] == [reference(record) for record in records[:count]]
        assert all(isinstance(row["answer"], str) and set(row["scores"]) == set(names) for row in rows)
        for name in names:  # the logged mean is the mean of the file's rows
            assert entry[f"eval_{name}"] == math.fsum(row["scores"][name] for row in rows) / count


@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv4_6"])
def test_scores_are_logged_beside_eval_loss_and_written_per_evaluation(family, tiny_checkpoint, shapes, tmp_path):
    metric_file = tmp_path / "my_metrics.py"
    metric_file.write_text(USER_METRICS)
    # Gradient checkpointing on: generation runs in eval mode, with the cache, and training goes on after.
    trainer = finetune.train(*arguments.parse_args(scored_args(
        tiny_checkpoint(family), shapes, tmp_path / "out", "--eval_generate", "2", "--eval_metrics", "em,f1,short",
        "--eval_metrics_file", metric_file, "--gradient_checkpointing", "true", "--report_to", "tensorboard",
    )))
    assert trainer.state.global_step == 2
    records = json.loads(shapes.read_text())
    assert_scored_at_each_evaluation(tmp_path / "out", records, 2, ["em", "f1", "short"])
    # TensorBoard got them through the Trainer's log, as eval_loss.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = {path.parent for path in (tmp_path / "out").rglob("events.out.tfevents.*")}
    logged = EventAccumulator(str(events)).Reload()
    for name in ("loss", "em", "f1", "short"):
        assert [event.step for event in logged.Scalars(f"eval/{name}")] == [1, 2]


def test_scores_follow_the_answers_and_generation_runs_in_eval_mode_without_gradients(tiny_checkpoint, shapes,
                                                                                        tmp_path, monkeypatch):
    import evaluation.during_training as during_training

    seen = []

    def answers(family, model, processing, dataset, indices, device, max_new_tokens, batch_size):
        seen.append((model.training, torch.is_grad_enabled()))
        return ["A RED square!" if i == 0 else "nothing" for i in indices]

    monkeypatch.setattr(during_training, "generate_answers", answers)
    trainer = finetune.train(*arguments.parse_args(scored_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out",
                                                               "--eval_generate", "2")))
    rows = rows_of(Path(answers_path(tmp_path / "out", 2)))
    assert [row["scores"]["em"] for row in rows] == [1.0, 0.0]  # "a red square", normalised
    history = trainer_state(tmp_path / "out")["log_history"]
    assert [entry["eval_em"] for entry in history if "eval_em" in entry] == [0.5, 0.5]
    trainer.model.train()
    trainer.scored_evaluation.answer_share(trainer.model, "cpu", 0, 1)
    assert trainer.model.training  # restored
    assert seen == [(False, False)] * 3


@pytest.mark.parametrize("count, world_size", [(5, 2), (4, 2), (1, 3), (7, 4)])
def test_every_process_answers_an_equal_share_and_every_record_once(count, world_size):
    shares = [share(count, rank, world_size) for rank in range(world_size)]
    assert len({len(part) for part in shares}) == 1  # ZeRO-3: every process calls generate as often
    kept = [position for part in shares for position, padded in part if not padded]
    assert kept == list(range(count))
    assert all(position == count - 1 for part in shares for position, padded in part if padded)


SCORED_MISTAKES = {
    "unknown metric": (["--eval_generate", "2", "--eval_metrics", "em,bleu"],
                       r"--eval_metrics: no metric named 'bleu'; the known ones are choice, em, f1, iou, numeric"),
    "no eval data": (["--eval_generate", "2", "--eval_strategy", "steps"], "--eval_generate answers eval records"),
    "no evaluations": (["--eval_generate", "2", "--eval_data_path", "{data}"], "--eval_generate answers eval records"),
    "negative count": (["--eval_generate", "-1"], "--eval_generate is -1"),
    "metric flags alone": (["--eval_metrics", "f1"], "--eval_metrics given without --eval_generate N"),
    "missing metric file": (["--eval_generate", "2", "--eval_metrics_file", "{tmp}/none.py"],
                            r"--eval_metrics_file \S+none\.py: no such file"),
    "metric file not named": (["--eval_generate", "2", "--eval_metrics_file", "{metric_file}"],
                              r"--eval_metrics_file \S+ registers short, which --eval_metrics em,f1 does not name"),
    "dpo stage": (["--eval_generate", "2", "--stage", "dpo"], "--eval_generate scores answers against an SFT record"),
}


@pytest.mark.parametrize("case", list(SCORED_MISTAKES))
def test_scored_evaluation_mistakes_are_one_line_usage_errors(case, tiny_checkpoint, shapes, tmp_path, capsys,
                                                              monkeypatch):
    metric_file = tmp_path / "my_metrics.py"
    metric_file.write_text(USER_METRICS)
    argv, message = SCORED_MISTAKES[case]
    argv = [arg.format(data=shapes, tmp=tmp_path, metric_file=metric_file) for arg in argv]
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    base = finetune_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out", "--max_steps", "1",
                         "--report_to", "none")
    with pytest.raises(SystemExit) as stop:
        finetune.main([str(arg) for arg in base] + argv)
    assert stop.value.code == finetune.EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert re.search(f"^finetune.py: error: {message}", error) and "\n" not in error, error[-2000:]


def test_a_family_without_generation_is_refused_before_weights_load(tiny_checkpoint, shapes, tmp_path, monkeypatch):
    """The stage asks the family's "generate" capability, as for packing or video."""
    import families.native

    reason = "{model_type} cannot generate here"
    monkeypatch.setattr(families.native.NativeFamily, "reasons", {"generate": reason})
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(finetune.UsageError, match="minicpmv4_6 cannot generate here"):
        finetune.train(*arguments.parse_args(scored_args(tiny_checkpoint("minicpmv4_6"), shapes, tmp_path / "out",
                                                         "--eval_generate", "2")))


def unscorable_eval_file(shapes):
    """The shapes records with answers that hold no number, but the second, which says "2 shapes"."""
    records = json.loads(shapes.read_text())
    records[1]["conversations"][1]["content"] = "2 shapes"
    path = shapes.parent / "numeric_eval.json"
    path.write_text(json.dumps(records))
    return path, records


def test_references_a_metric_cannot_score_are_named_before_weights_load(tiny_checkpoint, shapes, tmp_path,
                                                                        monkeypatch):
    eval_file, records = unscorable_eval_file(shapes)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    argv = scored_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out", "--eval_generate", "2",
                       "--eval_metrics", "numeric,em")
    argv[argv.index("--eval_data_path") + 1] = str(eval_file)
    with pytest.raises(preflight.PreflightFailed):
        finetune.train(*arguments.parse_args(argv))
    report = json.loads((tmp_path / "out" / preflight.REPORT_NAME).read_text())
    assert "unscorable_reference" in REASONS
    # Records are walked until 2 scorable ones are found: record 1, then none after the last.
    bad = [(p["split"], p["index"], p["record_id"]) for p in report["problems"]]
    expected = [("eval", i, r["id"]) for i, r in enumerate(records) if i != 1]
    assert bad == expected
    assert all(p["reason"] == "unscorable_reference" for p in report["problems"])
    assert "metric 'numeric' cannot score it: the reference answer 'a red square' has no number" in (
        report["problems"][0]["message"])


def test_skip_bad_samples_answers_the_first_scorable_records(tiny_checkpoint, shapes, tmp_path):
    eval_file, records = unscorable_eval_file(shapes)
    records[3]["conversations"][1]["content"] = "3 sides"
    eval_file.write_text(json.dumps(records))
    argv = scored_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out", "--eval_generate", "2",
                       "--eval_metrics", "numeric", "--skip_bad_samples", "true")
    argv[argv.index("--eval_data_path") + 1] = str(eval_file)
    finetune.train(*arguments.parse_args(argv))
    rows = rows_of(Path(answers_path(tmp_path / "out", 2)))
    assert [row["id"] for row in rows] == [records[1]["id"], records[3]["id"]]


@pytest.mark.launch
@pytest.mark.parametrize("script", ["finetune_lora.sh", "finetune_ds.sh"])
def test_two_processes_answer_every_record_exactly_once(script, tiny_checkpoint, shapes, tmp_path):
    """The launchers on 2 processes, LoRA under ZeRO-2 and a full fine-tune under ZeRO-3 (where every
    process must call generate as often): 3 records, so the second process's share is padded, and
    each process answers its 2 in one batched generate call.
    The eval records all have images: under ZeRO-3 a text-only eval record on one process and an
    image record on the other desynchronise the eval loss's own forward (before any generation)."""
    records = json.loads(shapes.read_text())[:3]
    eval_file = shapes.parent / "eval_three.json"
    eval_file.write_text(json.dumps(records))
    out = tmp_path / "run"
    run_script(
        script,
        ["--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--eval_generate", "3",
         "--eval_metrics", "em,f1", "--eval_max_new_tokens", "4", "--per_device_eval_batch_size", "2"],
        GPUS_PER_NODE=2, MODEL=tiny_checkpoint("minicpmv2_6"), DATA=shapes, EVAL_DATA=eval_file, OUTPUT_DIR=out,
    )
    evaluations = [entry for entry in trainer_state(out)["log_history"] if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2] and "eval_f1" in evaluations[0]
    rows = rows_of(out / ANSWERS_FOLDER / "step-2.jsonl")
    assert [row["id"] for row in rows] == [record["id"] for record in records]
    assert evaluations[0]["eval_em"] == math.fsum(row["scores"]["em"] for row in rows) / 3
