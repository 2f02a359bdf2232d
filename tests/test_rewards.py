"""GRPO's rewards from the metrics: weights, the think block's format reward, unscorable references."""

import pytest
import torch

from evaluation.metrics import Unscorable
from evaluation.rewards import final_answer, reward_function
from usage import UsageError


def test_weighted_sum_of_metrics():
    reward = reward_function("em,f1", weights=[2.0, 0.5])
    got = reward(["Paris", "the cat sat", "Rome"], ["paris", "a cat sat on the mat", "Paris"])
    # em: 1, 0, 0; f1: 1, 2 * 1 * 0.5 / 1.5 (cat sat | cat sat on mat), 0.
    torch.testing.assert_close(got, torch.tensor([2.0 + 0.5, 0.5 * (2 / 3), 0.0]))
    assert got.dtype == torch.float32
    # Default weights: 1 each.
    torch.testing.assert_close(reward_function(["em", "f1"])(["Paris"], ["paris"]), torch.tensor([2.0]))


@pytest.mark.parametrize("text, answer", [
    ("<think>\n2 + 2 is 4\n</think>\n\n4", "4"),
    ("2 + 2 is 4</think>4", "4"),  # the template opened the block in the prompt
    ("<think></think> Paris ", "Paris"),
    ("<think>\nstill reasoning", None),  # cut off: no answer
    ("<think>done</think>\n\n", None),  # nothing after the block
    ("4", None),  # no block at all
    ("<think>a</think>b<think>c</think>d", None),  # two blocks
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_thinking_scores_the_answer_after_the_block_and_rewards_its_format():
    reward = reward_function(["numeric"], format_reward=0.5, thinking=True)
    answers = [
        "<think>3 apples and 1 more: 4</think>4",  # right, well formed
        "<think>3 apples and 1 more: 4</think>5",  # wrong (the reasoning's 4 is not read), well formed
        "<think>3 apples and 1 more: 4",  # cut off: the metric scores nothing
    ]
    # The reference's own think block is not the answer either.
    references = ["4", "4", "<think>count them</think>4"]
    scores = reward.scores(answers, references)
    torch.testing.assert_close(scores["numeric"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(scores["format"], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(reward(answers, references), torch.tensor([1.5, 0.5, 0.0]))


def test_without_thinking_the_whole_answer_is_scored():
    reward = reward_function(["em"])
    assert "format" not in reward.scores(["<think>x</think>Paris"], ["Paris"])
    assert reward(["<think>x</think>Paris"], ["Paris"]).item() == 0.0


def test_an_unscorable_reference_names_its_record():
    reward = reward_function(["numeric"])
    with pytest.raises(Unscorable, match="record 'chart-7': metric 'numeric' cannot score it"):
        reward(["4", "5"], ["4", "about five"], ids=["chart-6", "chart-7"])
    # The same reason, for a preflight, before any answer exists.
    assert reward.unscorable([("chart-6", "4"), ("chart-7", "about five")]) == [
        ("chart-7", "numeric", "the reference answer 'about five' has no number")]
    # A malformed answer does not hide an unscorable reference.
    with pytest.raises(Unscorable, match="record '0'"):
        reward_function(["iou"], thinking=True)(["<think>"], ["the cat"])


def test_bad_settings_are_refused():
    with pytest.raises(UsageError, match="no metric named 'bleu'"):
        reward_function("em,bleu")
    with pytest.raises(ValueError, match="one finite number for each"):
        reward_function("em,f1", weights=[1.0])
    with pytest.raises(ValueError, match="one finite number for each"):
        reward_function("em", weights=[float("nan")])
    with pytest.raises(ValueError, match="think block"):
        reward_function("em", format_reward=0.5)
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        reward_function("em")(["a", "b"], ["a"])
