"""evaluation: each metric on hand-made answers, the registry, users' metric files, the report."""

import functools
import json
import math
import os

import pytest

from evaluation import metrics, report
from evaluation.metrics import Unscorable, get_metrics, load_user_metrics, metric, register
from usage import UsageError


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Each test registers into a copy of the registry: the built-ins, and nothing a test added."""
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))


def scored(name, answer, reference):
    return get_metrics([name])[name](answer, reference)


@pytest.mark.parametrize("answer, reference, expected", [
    ("Paris", "paris", 1.0),
    ("  The   Eiffel Tower! ", "eiffel tower", 1.0),  # case, article, punctuation, white space
    ("an apple.", "Apple", 1.0),
    ("don't", "dont", 1.0),  # SQuAD deletes punctuation
    ("你好，世界。", "你好世界", 1.0),  # Unicode punctuation
    ("Paris, France", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("the", "a", 1.0),  # both normalise to nothing
])
def test_exact_match(answer, reference, expected):
    assert scored("em", answer, reference) == expected


@pytest.mark.parametrize("answer, reference, expected", [
    ("the cat sat", "A cat sat on the mat", 2 * (2 / 2) * (2 / 4) / (2 / 2 + 2 / 4)),  # cat sat | cat sat on mat
    ("cat cat", "cat", 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # a repeated token counts once per occurrence
    ("Red.", "red", 1.0),
    ("blue", "red", 0.0),
    ("", "red", 0.0),
    ("红色的球", "红球", 2 * (2 / 4) * 1 / (2 / 4 + 1)),  # CJK characters are tokens
])
def test_token_f1(answer, reference, expected):
    assert scored("f1", answer, reference) == pytest.approx(expected)


@pytest.mark.parametrize("answer, reference, expected", [
    ("3000", "3,000", 1.0),
    ("The total is 3,000 dollars.", "3000", 1.0),
    ("1.5e3", "1500", 1.0),
    ("42%", "42", 1.0),
    ("42%", "0.42", 1.0),  # a percentage also matches as a fraction
    ("0.42", "42%", 1.0),
    ("4.2%", "42%", 0.0),
    ("2 apples and 3 pears: 5 fruits", "5", 1.0),  # the last number
    ("5 fruits from 2 apples and 3 pears", "5", 0.0),
    ("2024", "2023", 0.0),  # years stay apart
    ("3.14159", "3.14159265", 1.0),  # within the relative tolerance
    ("0.0000001", "0", 1.0),  # within the absolute tolerance
    ("-2.5", "−2.5 is not minus", 0.0),  # a Unicode minus is not a sign: 2.5
    ("no idea", "7", 0.0),  # no number
    ("", "7", 0.0),
    ("MiniCPM-V v2 runs on x86", "2", 0.0),  # digits inside words are not numbers
])
def test_numeric(answer, reference, expected):
    assert scored("numeric", answer, reference) == expected


def test_numeric_tolerances_are_arguments():
    assert metrics.numeric("101", "100") == 0.0
    assert metrics.numeric("101", "100", rel_tol=0.02) == 1.0
    assert metrics.numeric("0.3", "0.25", abs_tol=0.1) == 1.0


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), (" B\n", "B"),
    ("The answer is B", "B"), ("The answer is (C).", "C"), ("Answer: D", "D"),
    ("B. Paris", "B"), ("(B) Paris", "B"),
    ("I think it is (C), the red one", "C"),
    ("I would pick option E", "E"),
    ("It is B because the ball is red.", "B"),
    ("I think it is A.", "A"),
    ("A cat sits on a mat", None),  # "A" the article, "I" the pronoun: no letter
    ("A or B", None),  # two letters: no answer
    ("(A) or (B)", None),
    ("the answer is c", None),  # option letters are capitals
    ("", None),
])
def test_choice_letter_in_a_sentence(answer, letter):
    assert metrics.choice_letter(answer) == letter
    assert scored("choice", answer, "(B) Paris") == float(letter == "B")


BOX_A = "<ref>cat</ref><box>0 0 100 100</box>"
BOX_B = "<ref>dog</ref><box>500 500 700 600</box>"


@pytest.mark.parametrize("answer, reference, expected", [
    (BOX_A, BOX_A, 1.0),
    ("<box>0 0 100 200</box>", BOX_A, 0.5),  # overlap 100x100 over union 100x200
    ("<box>50 0 150 100</box>", BOX_A, 50 * 100 / (2 * 100 * 100 - 50 * 100)),
    ("<box>100 0 0 100</box>", BOX_A, 1.0),  # corners in the other order
    ("<box>200 200 300 300</box>", BOX_A, 0.0),  # apart
    ("It is here: <box> 0 0 100 100 </box>.", BOX_A, 1.0),  # text around, spaces inside
    ("the cat is at the top left", BOX_A, 0.0),  # no box
    ("<box>0 0 100</box>", BOX_A, 0.0),  # three numbers: not a box
    ("", BOX_A, 0.0),
    # Several boxes: greedy matching, best IoU first, each box once; sum over the larger count.
    (BOX_B + BOX_A, BOX_A + BOX_B, 1.0),  # order does not matter
    (BOX_A, BOX_A + BOX_B, 0.5),  # a missed box counts 0
    (BOX_A + BOX_B, BOX_A, 0.5),  # an extra box counts 0
    ("<box>0 0 100 200</box>" + BOX_B, BOX_A + BOX_B, (0.5 + 1.0) / 2),
    (BOX_A + BOX_A, BOX_A, 0.5),  # the same box twice is matched once
])
def test_grounding_iou(answer, reference, expected):
    assert scored("iou", answer, reference) == pytest.approx(expected)


@pytest.mark.parametrize("name, reference, reason", [
    ("em", "  ", "empty"),
    ("f1", "", "empty"),
    ("numeric", "seven", "no number"),
    ("choice", "Paris", "no single option letter"),
    ("choice", "A or B", "no single option letter"),
    ("iou", "<ref>cat</ref> top left", "no <box>"),
])
def test_a_reference_a_metric_cannot_score_raises_unscorable(name, reference, reason):
    with pytest.raises(Unscorable, match=reason):
        scored(name, "anything", reference)


def test_one_function_and_one_line_register_a_metric():
    @metric("starts_alike")
    def starts_alike(answer, reference):
        return float(answer[:1] == reference[:1])

    register("numeric_1pct", functools.partial(metrics.numeric, rel_tol=0.01))
    assert get_metrics("starts_alike, numeric_1pct") == {"starts_alike": starts_alike,
                                                          "numeric_1pct": metrics.METRICS["numeric_1pct"]}
    assert scored("starts_alike", "Blue", "Black") == 1.0
    assert scored("numeric_1pct", "101", "100") == 1.0
    with pytest.raises(metrics.RegistrationError, match="'em' is already registered"):
        register("em", starts_alike)


@pytest.mark.parametrize("name, function, message", [
    ("em,f1", lambda answer, reference: 1.0, "a metric name is letters, digits"),
    ("", lambda answer, reference: 1.0, "a metric name is letters, digits"),
    ("one_argument", lambda answer: 1.0, "metric 'one_argument' must take \\(answer, reference\\)"),
    ("three", lambda answer, reference, record: 1.0, "metric 'three' must take \\(answer, reference\\)"),
])
def test_a_metric_that_cannot_be_selected_or_called_is_refused(name, function, message):
    with pytest.raises(metrics.RegistrationError, match=message):
        register(name, function)
    assert name not in metrics.METRICS


def test_an_unknown_metric_is_a_usage_error_listing_the_known_ones():
    with pytest.raises(UsageError) as error:
        get_metrics("em,bleu")
    assert str(error.value) == f"--eval_metrics: no metric named 'bleu'; the known ones are {', '.join(sorted(metrics.METRICS))}"
    assert "choice, em, f1, iou, numeric" in str(error.value)
    with pytest.raises(UsageError, match="--eval_metrics names no metric; the known ones are choice, em"):
        get_metrics(" , ")


def test_a_users_file_registers_its_metrics(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text(
        "from evaluation import metric\n\n"
        "@metric('says_yes')\n"
        "def says_yes(answer, reference):\n"
        "    return float('yes' in answer.lower())\n"
    )
    assert load_user_metrics(path) == ["says_yes"]
    assert scored("says_yes", "Yes, it is.", "") == 1.0


@pytest.mark.parametrize("content, message", [
    (None, "--eval_metrics_file {path}: no such file"),
    ("", "--eval_metrics_file {path} registers no metric"),
    ("def unregistered(answer, reference):\n    return 1.0\n", "--eval_metrics_file {path} registers no metric"),
    ("from evaluation import metric\nmetric('em')(lambda answer, reference: 1.0)\n",
     "--eval_metrics_file {path}: a metric named 'em' is already registered"),
])
def test_a_users_file_that_registers_nothing_usable_is_named(tmp_path, content, message):
    path = tmp_path / "their_metrics.py"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as error:
        load_user_metrics(path)
    assert str(error.value).startswith(message.format(path=path))


def test_a_users_file_must_be_python(tmp_path):
    path = tmp_path / "metrics.txt"
    path.write_text("from evaluation import metric\n")
    with pytest.raises(UsageError, match=f"--eval_metrics_file {path}: not a Python file"):
        load_user_metrics(path)


def test_a_mistake_in_a_users_code_keeps_its_traceback(tmp_path):
    path = tmp_path / "broken_metrics.py"
    path.write_text("import no_such_module_here\n")
    with pytest.raises(ModuleNotFoundError):
        load_user_metrics(path)


ANSWERED = [
    report.Answered("q1", "What colour?", "Red.", "red"),
    report.Answered("q2", "How many?", "There are 3,000.", "3000"),
    report.Answered("q3", "Which?", "The answer is B", "B"),
]


def test_report_scores_each_record_and_the_means():
    scored_report = report.score(ANSWERED, "em,f1")
    assert [row["id"] for row in scored_report.rows] == ["q1", "q2", "q3"]
    assert scored_report.rows[0] == {"id": "q1", "prompt": "What colour?", "answer": "Red.", "reference": "red",
                                     "scores": {"em": 1.0, "f1": 1.0}}
    assert [row["scores"]["em"] for row in scored_report.rows] == [1.0, 0.0, 0.0]
    assert scored_report.means["em"] == pytest.approx(1 / 3)
    # "there are 3000" and "answer is b" against one token each: precision 1/3, recall 1, F1 1/2.
    assert scored_report.means["f1"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert math.isnan(report.score([], ["em"]).means["em"])


def test_report_names_the_record_a_metric_cannot_score():
    with pytest.raises(Unscorable, match="record 'q1': metric 'numeric' cannot score it: .*'red' has no number"):
        report.score(ANSWERED, ["numeric"])
    assert report.unscorable([(r.id, r.reference) for r in ANSWERED], ["numeric", "choice"]) == [
        ("q1", "numeric", "the reference answer 'red' has no number"),
        ("q1", "choice", "the reference answer 'red' names no single option letter"),
        ("q2", "choice", "the reference answer '3000' names no single option letter"),
        ("q3", "numeric", "the reference answer 'B' has no number"),
    ]


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), "1", None, True])
def test_a_metric_scoring_outside_0_1_is_named(value):
    register("broken", lambda answer, reference: value)
    with pytest.raises(ValueError, match=r"metric 'broken' scored record 'q1' .*a number in \[0, 1\]"):
        report.score(ANSWERED, ["broken"])


def test_report_jsonl_is_one_row_per_record_and_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "eval_answers" / "step-10.jsonl"
    scored_report = report.score([*ANSWERED, report.Answered("q4", "颜色？", "红色", "红色")], ["em"])
    report.write_jsonl(scored_report, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == scored_report.rows
    assert "红色" in lines[-1]  # written as text, not \u escapes

    # A write that fails midway leaves the previous report whole and no temporary file behind.
    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        report.write_jsonl(report.score(ANSWERED[:1], ["em"]), path)
    assert path.read_text(encoding="utf-8").splitlines() == lines
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-10.jsonl"]


def test_table_has_a_line_per_record_and_the_means():
    long = report.Answered("a-very-long-record-identifier-indeed", "Q", "word " * 30, "word")
    text = report.table(report.score([*ANSWERED, long], ["em", "f1"]), answer_width=20)
    lines = text.splitlines()
    assert lines[0].split() == ["id", "em", "f1", "answer"]
    assert lines[1].split() == ["q1", "1.000", "1.000", "Red."]
    assert lines[-1].split() == ["mean", "0.250", f"{report.score([*ANSWERED, long], ['f1']).means['f1']:.3f}",
                                 "(4", "records)"]
    assert lines[4].startswith("a-very-long-record-iden…  0.000") and lines[4].endswith("word word word word…")
    assert len(lines) == 1 + 4 + 1
