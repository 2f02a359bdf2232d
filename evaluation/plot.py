"""PNG plots of a training run's logs (trainer_state.json): the scores of --eval_generate over the
steps (infer.py --plot), the training loss (demo.py). matplotlib is imported when a plot is drawn."""

import json
from pathlib import Path

from evaluation.metrics import METRICS

STATE_NAME = "trainer_state.json"


def find_state(*folders):
    """The trainer_state.json of the first of ``folders`` (None skipped) that holds one, or None."""
    for folder in folders:
        if folder is not None and (Path(folder) / STATE_NAME).is_file():
            return Path(folder) / STATE_NAME
    return None


def read_history(state_path):
    return json.loads(Path(state_path).read_text())["log_history"]


def score_series(history):
    """``{metric: [(step, mean)]}`` of every registered metric logged as eval_<metric>."""
    series = {}
    for entry in history:
        for name in METRICS:
            if f"eval_{name}" in entry:
                series.setdefault(name, []).append((entry["step"], entry[f"eval_{name}"]))
    return series


def plot_series(series, path, *, ylabel, title, ylim=None):
    """Draws ``{label: [(step, value)]}`` as lines over the steps into the PNG ``path`` (``ylim``: the
    value axis's ``(bottom, top)``, default: matplotlib's); returns it."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("drawing a plot needs matplotlib: pip install -r requirements.txt") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        ax.plot([step for step, _ in points], [value for _, value in points], marker=".", label=label)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_scores(state_path, path):
    """The eval_<metric> means of a run over its steps, as a PNG at ``path``. ValueError if the run
    logged none (it ran without --eval_generate)."""
    series = score_series(read_history(state_path))
    if not series:
        raise ValueError(f"{state_path} holds no eval_<metric> scores: the run was trained without --eval_generate "
                         f"(known metrics: {', '.join(sorted(METRICS))}; a metric of your own needs --metrics_file)")
    return plot_series(series, path, ylabel="mean score of the eval answers", ylim=(-0.02, 1.02),
                       title=f"Scored answers: {Path(state_path).parent.name}")
