"""Rewards for GRPO from the metrics registry: a weighted sum of metric scores, plus a format
reward for a thinking family's ``<think>…</think>`` block.

How the GRPO stage samples, scores and takes its log-probabilities: docs/GRPO.md.
"""

import math
import re
from dataclasses import dataclass

import torch

from evaluation.metrics import get_metrics
from evaluation.report import Answered, score, unscorable

# A thinking family's answer: its reasoning in a think block, then the answer. The opening tag is
# optional because a template may write it into the prompt; no other think tag may appear.
THOUGHT_THEN_ANSWER = re.compile(r"\A\s*(?:<think>)?(?:(?!</?think>).)*</think>(?P<answer>(?:(?!</?think>).)*)\Z",
                                 re.DOTALL)
THINK_END = "</think>"


def final_answer(text):
    """The answer after ``text``'s think block, or None when ``text`` is not a closed think block
    followed by a non-empty answer (reasoning cut off by the length limit, a second block)."""
    found = THOUGHT_THEN_ANSWER.match(text)
    if found is None or not found["answer"].strip():
        return None
    return found["answer"].strip()


def reference_answer(reference, thinking):
    """What the metrics compare with: on a thinking family, a reference's text after its think
    block (the part the template keeps as the answer), else the whole reference."""
    return reference.split(THINK_END)[-1].strip() if thinking else reference


@dataclass(frozen=True)
class RewardFunction:
    """``(answers, references, ids=None) -> rewards [N]`` (fp32): the sum of each metric's score
    times its weight, plus ``format_reward`` for each well-formed answer of a thinking family."""

    names: tuple  # metric names
    weights: tuple  # one per name
    format_reward: float
    thinking: bool

    def scores(self, answers, references, ids=None):
        """``{name: scores [N]}`` for each metric, and ``"format"`` (1 or 0) on a thinking family. On a
        thinking family a malformed answer scores 0 by every metric. A reference a metric cannot
        score raises Unscorable naming its record (``ids``, default the answers' indices)."""
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers for {len(references)} references")
        ids = list(range(len(answers))) if ids is None else ids
        finals = [final_answer(answer) if self.thinking else answer for answer in answers]
        answered = [Answered(str(record_id), "", final or "", reference_answer(reference, self.thinking))
                    for record_id, final, reference in zip(ids, finals, references)]
        rows = score(answered, list(self.names)).rows
        formed = torch.tensor([float(final is not None) for final in finals])
        result = {name: torch.tensor([row["scores"][name] for row in rows]) * formed for name in self.names}
        if self.thinking:
            result["format"] = formed
        return result

    def __call__(self, answers, references, ids=None):
        scores = self.scores(answers, references, ids)
        rewards = torch.zeros(len(answers))
        for name, weight in zip(self.names, self.weights):
            rewards += weight * scores[name]
        if self.thinking:
            rewards += self.format_reward * scores["format"]
        return rewards

    def unscorable(self, references):
        """``[(record id, metric, reason)]`` for each ``(record id, reference)`` a metric cannot score:
        for a preflight, before any sampling."""
        return unscorable([(record_id, reference_answer(reference, self.thinking)) for record_id, reference in references],
                          list(self.names))


def reward_function(names, weights=None, format_reward=0.0, thinking=False):
    """The RewardFunction of the metrics ``names`` (a list, or "em,f1" as on the command line), each
    weighted by ``weights`` (in the same order; default 1 each, as TRL sums its reward functions).
    ``thinking``: the family answers in a think block, which the metrics do not see;
    ``format_reward`` is then added to a well-formed answer's reward."""
    names = tuple(get_metrics(names))
    weights = (1.0,) * len(names) if weights is None else tuple(float(weight) for weight in weights)
    if len(weights) != len(names) or not all(map(math.isfinite, weights)):
        raise ValueError(f"reward weights {weights} are not one finite number for each of the metrics {', '.join(names)}")
    if format_reward and not thinking:
        raise ValueError(f"a format reward ({format_reward}) scores a think block: it needs a family that thinks")
    return RewardFunction(names, weights, float(format_reward), thinking)
