"""Scoring generated answers against records' reference answers (issue 27).

To add a metric: write one function ``(answer, reference) -> float in [0, 1]`` in metrics.py (or
in a file of your own, loaded with ``load_user_metrics(path)``) and put ``@metric("name")`` above
it; ``get_metrics("name,em")`` then finds it. A reference the metric cannot score raises
``Unscorable``; an answer it cannot read scores 0. report.py scores records and writes the report.
"""

from evaluation.metrics import METRICS, Unscorable, get_metrics, load_user_metrics, metric, register

__all__ = ["METRICS", "Unscorable", "get_metrics", "load_user_metrics", "metric", "register"]
