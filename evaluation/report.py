"""Scored answers: each record's answer scored by the chosen metrics, their means, the JSONL report
(``OUTPUT_DIR/eval_answers/step-K.jsonl`` during training, infer.py's ``--questions`` report) and
a table for the terminal."""

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from evaluation.metrics import Unscorable, get_metrics


class Answered(NamedTuple):
    """One record's question, the model's answer and the record's reference answer."""

    id: str
    prompt: str
    answer: str
    reference: str


@dataclass(frozen=True)
class Report:
    rows: list  # one dict per record: id, prompt, answer, reference, scores {metric: float}
    means: dict  # metric -> the mean of its scores over the rows


def check_score(value, name, record_id):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"metric {name!r} scored record {record_id!r} {value!r}: a metric returns a number in [0, 1]")
    return float(value)


def score(answered, metric_names):
    """The Report of ``answered`` (Answered items) under ``metric_names`` (a list, or "em,f1").
    A reference a metric cannot score raises Unscorable naming the record."""
    metrics = get_metrics(metric_names)
    rows = []
    for item in answered:
        scores = {}
        for name, function in metrics.items():
            try:
                scores[name] = check_score(function(item.answer, item.reference), name, item.id)
            except Unscorable as e:
                raise Unscorable(f"record {item.id!r}: metric {name!r} cannot score it: {e}") from e
        rows.append({**item._asdict(), "scores": scores})
    means = {name: math.fsum(row["scores"][name] for row in rows) / len(rows) if rows else math.nan
             for name in metrics}
    return Report(rows, means)


def unscorable(references, metric_names):
    """``[(record id, metric, reason)]`` for each ``(record id, reference)`` a metric cannot score:
    what a preflight reports before a run, instead of the run stopping at its first evaluation."""
    metrics, problems = get_metrics(metric_names), []
    for record_id, reference in references:
        for name, function in metrics.items():
            try:
                function(reference, reference)
            except Unscorable as e:
                problems.append((record_id, name, str(e)))
    return problems


def write_jsonl(report, path):
    """Writes one JSON line per record to ``path`` (its folder made if absent), atomically: a
    reader sees the previous file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     suffix=".tmp", delete=False) as out:
        try:
            for row in report.rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            os.unlink(out.name)
            raise
    os.replace(out.name, path)


def shorten(text, width):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(report, answer_width=40):
    """The report as a text table: a line per record (id, each metric's score, the answer), then the means."""
    names = list(report.means)
    id_width = max([len("id"), len("mean"), *(len(shorten(row["id"], 24)) for row in report.rows)])
    widths = [max(len(name), 5) for name in names]
    lines = ["  ".join(["id".ljust(id_width), *(n.rjust(w) for n, w in zip(names, widths)), "answer"])]
    for row in report.rows:
        cells = [f"{row['scores'][n]:.3f}".rjust(w) for n, w in zip(names, widths)]
        lines.append("  ".join([shorten(row["id"], 24).ljust(id_width), *cells, shorten(row["answer"], answer_width)]))
    means = [f"{report.means[n]:.3f}".rjust(w) for n, w in zip(names, widths)]
    count = len(report.rows)
    lines.append("  ".join(["mean".ljust(id_width), *means, f"({count} record{'' if count == 1 else 's'})"]))
    return "\n".join(lines)


def comparison(base, tuned, answer_width=60):
    """Two Reports of the same records (a base model's and a fine-tuned one's) side by side: per
    record its question, reference, both answers with each metric's score, then both means."""
    names = list(tuned.means)

    def scores(values):
        return "  ".join(f"{name} {values[name]:.3f}" for name in names)

    lines = []
    for before, after in zip(base.rows, tuned.rows, strict=True):
        lines += [
            f"[{after['id']}] Q: {shorten(after['prompt'], answer_width + 11)}",
            f"    reference: {shorten(after['reference'], answer_width)}",
            f"    base:      {shorten(before['answer'], answer_width).ljust(answer_width)}  {scores(before['scores'])}",
            f"    tuned:     {shorten(after['answer'], answer_width).ljust(answer_width)}  {scores(after['scores'])}",
        ]
    count = len(tuned.rows)
    lines.append(f"mean over {count} record{'' if count == 1 else 's'}:  base: {scores(base.means)}   "
                 f"tuned: {scores(tuned.means)}")
    return "\n".join(lines)
