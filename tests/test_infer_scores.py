"""infer.py --questions with scores (--metrics, --report), --compare BASE and --plot, in this process."""

import functools
import json
import math
import re

import pytest
from PIL import Image

import arguments
import finetune
import infer
from evaluation import metrics
from evaluation.answers import reference
from launch import FAST_ARGS, LORA_ARGS, finetune_args


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))


@pytest.fixture(scope="module")
def questions(shapes):
    """Three records of the shapes set: two images and the text-only one."""
    records = json.loads(shapes.read_text())
    chosen = records[:2] + [r for r in records if "image" not in r][:1]
    path = shapes.parent / "three_questions.json"
    path.write_text(json.dumps(chosen))
    return path, chosen


@pytest.fixture(scope="module")
def tuned_run(tiny_checkpoint, shapes, tmp_path_factory):
    """A LoRA run of the tiny 2.6 that scored its answers at steps 2 and 4: its folder holds the
    adapter and trainer_state.json."""
    out = tmp_path_factory.mktemp("tuned") / "run"
    finetune.train(*arguments.parse_args([str(arg) for arg in finetune_args(
        tiny_checkpoint("minicpmv2_6"), shapes, out, *FAST_ARGS, *LORA_ARGS, "--max_steps", "4",
        "--learning_rate", "1e-2", "--eval_data_path", shapes, "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_strategy", "no", "--eval_generate", "2", "--eval_max_new_tokens", "4",
    )]))
    return out


def ask(argv, capsys):
    infer.main([str(arg) for arg in argv])
    return capsys.readouterr().out


def test_questions_print_the_scores_table_and_write_the_report(tiny_checkpoint, questions, tmp_path, capsys):
    path, records = questions
    report = tmp_path / "report.jsonl"
    output = ask(["--model", tiny_checkpoint("minicpmv2_6"), "--questions", path, "--metrics", "em,f1",
                  "--report", report, "--max_slice_nums", "2", "--max_new_tokens", "4"], capsys)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert [row["id"] for row in rows] == [record["id"] for record in records]
    assert [row["reference"] for row in rows] == [reference(record) for record in records]
    generated = re.findall(r"^    generated: (.*)$", output, flags=re.M)
    assert [row["answer"] for row in rows] == generated
    assert re.search(r"^id\s+em\s+f1\s+answer$", output, flags=re.M)
    mean_f1 = math.fsum(row["scores"]["f1"] for row in rows) / len(rows)
    assert re.search(rf"^mean\s+\S+\s+{mean_f1:.3f}\s+\(3 records\)$", output, flags=re.M), output


def test_compare_shows_base_and_tuned_side_by_side_and_plot_reads_the_adapters_run(
        tiny_checkpoint, questions, tuned_run, tmp_path, capsys):
    path, records = questions
    png = tmp_path / "scores.png"
    output = ask(["--model", tiny_checkpoint("minicpmv2_6"), "--adapter", tuned_run, "--questions", path,
                  "--compare", tiny_checkpoint("minicpmv2_6"), "--plot", png, "--max_slice_nums", "2",
                  "--max_new_tokens", "4"], capsys)
    base = re.findall(r"^    base:      (.*?)\s+em (\S+)  f1 (\S+)$", output, flags=re.M)
    tuned = re.findall(r"^    tuned:     (.*?)\s+em (\S+)  f1 (\S+)$", output, flags=re.M)
    assert len(base) == len(tuned) == len(records)
    assert [answer for answer, _, _ in base] != [answer for answer, _, _ in tuned]  # the adapter changed them
    assert re.findall(r"^    reference: (.*)$", output, flags=re.M) == [reference(record) for record in records]
    assert re.search(r"^mean over 3 records:  base: em \S+  f1 \S+   tuned: em \S+  f1 \S+$", output, flags=re.M)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 0
    assert f"Scores over training steps ({tuned_run / 'trainer_state.json'})" in output


def test_plot_alone_draws_the_scores_of_a_written_trainer_state(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # in requirements.txt; skipped only where it is absent
    run = tmp_path / "run"
    run.mkdir()
    history = [{"loss": 2.0, "step": 1}] + [
        {"eval_loss": 1.0 / step, "eval_em": step / 10, "eval_f1": step / 8, "step": step} for step in (2, 4, 6)]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 6}))
    png = tmp_path / "plot.png"
    ask(["--plot", png, "--run", run], capsys)
    assert png.stat().st_size > 0
    with Image.open(png) as image:
        image.verify()


INFER_MISTAKES = {
    "unknown metric": (["--questions", "{questions}", "--metrics", "em,bleu"],
                       r"--metrics: no metric named 'bleu'; the known ones are"),
    "unscorable reference": (["--questions", "{questions}", "--metrics", "numeric"],
                             r"record 'shape-00': metric 'numeric' cannot score it: the reference answer"),
    "missing metric file": (["--questions", "{questions}", "--metrics_file", "{tmp}/none.py"],
                            r"--metrics_file \S+none\.py: no such file"),
    "compare without questions": (["--image", "{tmp}/a.png", "--question", "Hi?", "--compare", "{model}"],
                                  "--compare score the answers to --questions"),
    "plot without a run": (["--plot", "{tmp}/x.png", "--run", "{tmp}"], r"--plot: no trainer_state\.json in"),
}


@pytest.mark.parametrize("case", list(INFER_MISTAKES))
def test_infer_mistakes_stop_before_weights_load(case, tiny_checkpoint, questions, tmp_path, capsys, monkeypatch):
    import families.inference

    monkeypatch.setattr(families.inference.loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    extra, message = INFER_MISTAKES[case]
    model = tiny_checkpoint("minicpmv2_6")
    argv = ["--model", str(model)] + [arg.format(tmp=tmp_path, model=model, questions=questions[0]) for arg in extra]
    with pytest.raises(SystemExit) as stop:
        infer.main(argv)
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.numerics  # padding changes the shapes the kernels see: the answers could differ by rounding
@pytest.mark.parametrize("family, calls", [("minicpmv2_6", 3), ("minicpmv2_0", 10)])
def test_batched_answers_equal_one_at_a_time(family, calls, tiny_checkpoint, shapes, monkeypatch):
    """--batch_size 4 over the shapes records (one and two images, wide ones sliced, text only): 2.6's
    generate takes the left-padded prompts in ceil(10 / 4) calls, 2.0's (no attention mask) one each,
    and the answers are those of one prompt at a time."""
    from evaluation.answers import Answerer
    from families.inference import load_for_inference

    records = json.loads(shapes.read_text())
    loaded = load_for_inference(tiny_checkpoint(family))
    alone = Answerer(*loaded, max_slice_nums=2).answer(records, shapes.parent, max_new_tokens=8)
    model = loaded[0]
    counted = []

    @functools.wraps(model.generate)  # its signature, which the family reads, stays the model's
    def generate(*args, **kwargs):
        counted.append(1)
        return generate.__wrapped__(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    batched = Answerer(*loaded, max_slice_nums=2, batch_size=4).answer(records, shapes.parent, max_new_tokens=8)
    assert len(records) == 10 and len(counted) == calls
    assert batched == alone
