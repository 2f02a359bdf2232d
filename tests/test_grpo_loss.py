"""GRPO's advantages and loss against hand computations, and the per-token log-probabilities of the
labelled positions against full logits."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loss
import numerics

# A group of two answers to one prompt: the first scored 1, the second 0.
REWARDS = torch.tensor([1.0, 0.0])
# Mean 0.5; the unbiased standard deviation of two values 0.5 apart from their mean: sqrt(0.5).
A = 0.5 / (math.sqrt(0.5) + loss.ADVANTAGE_EPS)

# The first answer has 2 tokens, the second 1 (its second position is padding).
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
LOGPS = [[-1.0, -2.0], [-0.5, -9.0]]
OLD_LOGPS = [[-1.1, -2.0], [-0.5, -3.0]]  # ratios e^0.1, 1, 1 (the padding's is never read)
REF_LOGPS = [[-1.2, -1.8], [-0.7, -1.0]]  # ref - logp: -0.2, 0.2, -0.2


def k3(delta):
    """The k3 KL estimate at ref - logp = delta."""
    return math.exp(delta) - delta - 1


def tensors(logps=LOGPS, old=OLD_LOGPS, ref=REF_LOGPS):
    return torch.tensor(logps, requires_grad=True), torch.tensor(old), None if ref is None else torch.tensor(ref)


def test_advantages_of_a_two_answer_group():
    advantages = loss.group_advantages(REWARDS, group_size=2)
    numerics.assert_close(advantages, torch.tensor([A, -A]))
    # Dr. GRPO: not divided by the standard deviation.
    numerics.assert_close(loss.group_advantages(REWARDS, group_size=2, scale=False), torch.tensor([0.5, -0.5]))


def test_advantages_per_group():
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0, 0.1, 0.1, 0.1])
    advantages = loss.group_advantages(rewards, group_size=3)
    # Mean 1, unbiased standard deviation 1.
    numerics.assert_close(advantages[:3], torch.tensor([-1.0, 0.0, 1.0]) / (1 + loss.ADVANTAGE_EPS))
    # Equal rewards: exactly 0, also where their mean (0.1 * 3 / 3 in fp32) rounds away from them.
    assert advantages[3:].eq(0).all()
    assert loss.group_advantages(rewards, group_size=3, scale=False)[6:].eq(0).all()


@pytest.mark.parametrize("rewards, group_size", [(torch.ones(5), 2), (torch.ones(4), 1), (torch.ones(2, 2), 2)])
def test_advantages_refuse_what_is_not_groups(rewards, group_size):
    with pytest.raises(ValueError):
        loss.group_advantages(rewards, group_size)


def test_loss_of_a_two_answer_group_by_hand():
    beta = 0.04
    logps, old, ref = tensors()
    advantages = loss.group_advantages(REWARDS, group_size=2)
    # Per token: -(clipped surrogate) + beta * k3; e^0.1 lies inside [0.8, 1.2], so nothing is clipped.
    tokens = [
        -math.exp(0.1) * A + beta * k3(-0.2),
        -1.0 * A + beta * k3(0.2),
        A + beta * k3(-0.2),
    ]
    got, metrics = loss.grpo_loss(logps, old, ref, advantages, MASK, beta=beta)
    # grpo: each answer's token mean, then the mean over answers.
    assert got.item() == numerics.approx(((tokens[0] + tokens[1]) / 2 + tokens[2]) / 2)
    assert metrics["ratio"].item() == numerics.approx((math.exp(0.1) + 1 + 1) / 3)
    assert metrics["kl"].item() == numerics.approx((k3(-0.2) + k3(0.2) + k3(-0.2)) / 3)
    assert metrics["clip_fraction"].item() == 0
    # dapo: one mean over the batch's three answer tokens.
    got, _ = loss.grpo_loss(logps, old, ref, advantages, MASK, beta=beta, loss_type="dapo")
    assert got.item() == numerics.approx(sum(tokens) / 3)
    # Over several processes or accumulated batches: their count of answer tokens.
    got, _ = loss.grpo_loss(logps, old, ref, advantages, MASK, beta=beta, loss_type="dapo", num_items=12)
    assert got.item() == numerics.approx(sum(tokens) / 12)


def test_padding_values_do_not_reach_the_loss():
    logps, old, ref = tensors()
    advantages = loss.group_advantages(REWARDS, group_size=2)
    expected, _ = loss.grpo_loss(logps, old, ref, advantages, MASK)
    # What a padded position holds is arbitrary: exp(1e4 - (-inf)) would be inf, and inf * 0 NaN.
    old[1, 1], ref[1, 1] = -math.inf, 1e4
    got, metrics = loss.grpo_loss(logps, old, ref, advantages, MASK)
    assert got.item() == expected.item()
    got.backward()
    assert logps.grad.isfinite().all() and all(value.isfinite() for value in metrics.values())


def test_a_positive_advantage_pushes_its_answer_up():
    logps, _, _ = tensors()
    advantages = loss.group_advantages(REWARDS, group_size=2)
    # One optimisation step per batch: the sampling policy is the policy, every ratio is 1.
    got, metrics = loss.grpo_loss(logps, logps.detach(), None, advantages, MASK, beta=0.0)
    got.backward()
    assert metrics["ratio"].item() == 1.0
    assert (logps.grad[0] < 0).all()  # gradient descent raises the rewarded answer's tokens
    assert logps.grad[1, 0] > 0  # and lowers the other's
    assert logps.grad[1, 1] == 0  # padding learns nothing


def test_the_kl_term_pulls_towards_the_reference():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])  # below the first token's logp, above the second's
    got, metrics = loss.grpo_loss(logps, logps.detach(), ref, torch.zeros(1), torch.ones(1, 2), beta=0.1)
    got.backward()
    assert logps.grad[0, 0] > 0 and logps.grad[0, 1] < 0
    assert metrics["kl"].item() == numerics.approx((k3(-0.5) + k3(1.0)) / 2)


@pytest.mark.parametrize(
    "ratio, advantage, clipped",
    [
        (1.5, 1.0, True),  # above 1 + eps and rewarded: capped at 1.2 * A, no gradient
        (1.5, -1.0, False),  # above 1 + eps but penalised: min() keeps the unclipped term
        (0.5, -1.0, True),  # below 1 - eps and penalised: capped at 0.8 * A
        (0.5, 1.0, False),  # below 1 - eps but rewarded: unclipped
        (1.1, 1.0, False),  # inside the clip range
    ],
)
def test_clipping(ratio, advantage, clipped):
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    got, metrics = loss.grpo_loss(logps, torch.zeros(1, 1), None, torch.tensor([advantage]), torch.ones(1, 1),
                                  clip_eps=0.2, beta=0.0)
    got.backward()
    bounded = min(max(ratio, 0.8), 1.2)
    assert got.item() == numerics.approx(-min(ratio * advantage, bounded * advantage))
    assert metrics["clip_fraction"].item() == float(clipped)
    assert (logps.grad.item() == 0) == clipped


def test_beta_zero_needs_no_reference_and_beta_needs_one():
    logps, old, _ = tensors()
    advantages = loss.group_advantages(REWARDS, group_size=2)
    got, metrics = loss.grpo_loss(logps, old, None, advantages, MASK, beta=0.0)
    assert "kl" not in metrics
    assert got.item() == numerics.approx(((-math.exp(0.1) * A - A) / 2 + A) / 2)
    with pytest.raises(ValueError, match="reference"):
        loss.grpo_loss(logps, old, None, advantages, MASK, beta=0.04)
    with pytest.raises(ValueError, match="grpo, dapo"):
        loss.grpo_loss(logps, old, None, advantages, MASK, beta=0.0, loss_type="sum")


def full_token_logps(head, hidden, labels, temperature=1.0):
    mask = labels.ne(loss.IGNORE_INDEX)
    logps = torch.log_softmax(head(hidden).float() / temperature, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask


def grads(value, *tensors):
    return torch.autograd.grad(value, tensors)


@pytest.mark.numerics
@pytest.mark.parametrize("temperature", [1.0, 0.7])  # 0.7: the distribution answers were sampled from
def test_labelled_token_logps_equal_full_logits_with_the_same_gradients(temperature):
    torch.manual_seed(0)
    hidden_size, vocab = 16, 64
    head = torch.nn.Linear(hidden_size, vocab)
    hidden = torch.randn(3, 7, hidden_size, requires_grad=True)
    labels = torch.randint(vocab, (3, 7))
    labels[0, :3] = labels[2, 5:] = loss.IGNORE_INDEX
    labels[1] = loss.IGNORE_INDEX  # a row with no labelled token
    weights = torch.randn(3, 7)  # what a loss does with each token's log-probability
    # Chunks of 2 positions: the 9 labelled ones run through 5 chunks.
    got = loss.labelled_token_logps(head, hidden, labels, vocab, chunk_elements=2 * vocab, temperature=temperature)
    expected = full_token_logps(head, hidden, labels, temperature)
    numerics.assert_close(got, expected)
    assert got[labels.eq(loss.IGNORE_INDEX)].eq(0).all()
    parameters = (hidden, head.weight, head.bias)
    for actual, wanted in zip(grads((got * weights).sum(), *parameters), grads((expected * weights).sum(), *parameters)):
        numerics.assert_close(actual, wanted)


def test_labelled_token_logps_with_nothing_labelled_keep_the_head_in_the_graph():
    head = torch.nn.Linear(4, 8)
    hidden = torch.randn(2, 3, 4)
    got = loss.labelled_token_logps(head, hidden, torch.full((2, 3), loss.IGNORE_INDEX), 8)
    assert got.shape == (2, 3) and got.eq(0).all()
    got.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.eq(0).all()


@pytest.mark.numerics
def test_loss_on_labelled_keeps_token_logps():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    llm = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(64, (2, 6))
    labels = torch.randint(64, (2, 6))
    labels[:, :2] = loss.IGNORE_INDEX
    with torch.no_grad():
        logits = llm(input_ids=input_ids).logits
        with loss.loss_on_labelled(llm, labels, values="tokens", temperature=0.5) as head:
            llm(input_ids=input_ids)
    expected = torch.log_softmax(logits / 0.5, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    numerics.assert_close(head.token_logps, expected * labels.ne(loss.IGNORE_INDEX))
    assert head.loss_sum.item() == numerics.approx(-expected[:, 2:].sum().item(), scale=expected.abs().sum().item())
    assert llm.get_output_embeddings() is llm.lm_head
    with pytest.raises(ValueError, match="sum, rows, tokens"):
        with loss.loss_on_labelled(llm, labels, values="row"):
            pass
