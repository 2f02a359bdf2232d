"""Cross-entropy on the labelled positions only: the output head never sees the others.

In vision-language fine-tuning most positions are image placeholders and prompt (label -100),
yet a plain causal-LM forward turns every position into ``vocab`` logits (151,936 for
MiniCPM-V 2.6), and the loss then upcasts them all to fp32: gigabytes for nothing. Here the
language model's output head is swapped, for one forward, for a stand-in that receives exactly
what the head would (the last hidden states after whatever the LLM does before its head; the
MiniCPM LLM of 2.0 divides them by ``hidden_size / dim_model_base``), keeps the labelled
positions, and applies the real head to those alone, in chunks, each recomputed in the backward
pass, so the peak stays bounded whatever their number. The loss is computed inside the model's
forward, so autocast, DDP and DeepSpeed see the head used where they expect it; the head is
called as a module, so LoRA on it and ZeRO-3's gathering of its weight work as in a plain
forward.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Logits computed at once per chunk of labelled positions (elements, fp32: 4 bytes each).
# 2**26 is 256 MiB: 441 positions at a 151,936 vocabulary.
CHUNK_ELEMENTS = 2**26


def token_loss(logits, labels, num_items=None):
    """Cross-entropy over full ``[B, L, vocab]`` logits, summed over learned tokens, divided by
    ``num_items`` (default: their count).

    Labels are already shifted (``labels[i]`` follows position ``i``): no shift here.
    """
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / (labelled_count(labels) if num_items is None else num_items)


def labelled_count(labels):
    """How many positions are learned (at least 1, so that a loss over none is 0, not NaN)."""
    return labels.ne(IGNORE_INDEX).sum().clamp(min=1)


def _chunk_loss(head, hidden, targets, reduction, temperature):
    logits = head(hidden).float()
    if temperature != 1.0:  # a division by 1 would still make a second chunk of logits
        logits = logits / temperature
    return F.cross_entropy(logits, targets, reduction=reduction)


def _unused_head(head, hidden):
    """A zero that keeps the head in the graph (zero gradient), as full logits would: DDP and
    ZeRO expect a gradient for every trainable parameter even where nothing is labelled."""
    return head(hidden.reshape(-1, hidden.size(-1))[:1]).float().sum() * 0.0


def _labelled_chunks(head, hidden, labels, vocab_size, chunk_elements, reduction, temperature=1.0):
    """``(mask, parts)``: the labelled positions and their cross-entropies (``reduction`` per
    chunk; of the logits divided by ``temperature``), ``chunk_elements`` logits at a time;
    ``parts`` is empty when nothing is labelled."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    labels = labels.to(hidden.device)
    mask = labels.ne(IGNORE_INDEX)
    picked, targets = hidden[mask], labels[mask]
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab_size)
    # Recomputed in the backward pass, so only one chunk's logits exist at any time; except for a
    # head whose weight ZeRO-3 partitions: the recomputation sees the weight as ZeRO-3 left it
    # after the forward, and torch's checkpoint refuses the mismatch (CheckpointError). Such a
    # head keeps each chunk's logits for the backward: those of the labelled positions alone.
    recompute = torch.is_grad_enabled() and not any(hasattr(p, "ds_id") for p in head.parameters())
    parts = []
    for start in range(0, len(targets), step):
        chunk = (head, picked[start : start + step], targets[start : start + step], reduction, temperature)
        parts.append(checkpoint(_chunk_loss, *chunk, use_reentrant=False) if recompute else _chunk_loss(*chunk))
    return mask, parts


def labelled_loss_sum(head, hidden, labels, vocab_size, chunk_elements=None):
    """Summed fp32 cross-entropy of ``head(hidden)`` at the positions whose label is not -100,
    computed ``chunk_elements`` logits at a time (default ``CHUNK_ELEMENTS``)."""
    _, parts = _labelled_chunks(head, hidden, labels, vocab_size, chunk_elements, "sum")
    if not parts:
        return _unused_head(head, hidden)
    return sum(parts[1:], parts[0])


def labelled_row_sums(head, hidden, labels, vocab_size, chunk_elements=None):
    """Per row of ``hidden [B, L, H]``, the summed fp32 cross-entropy at its labelled positions
    (``[B]``): minus the log-probability of the row's labelled tokens (a sequence's log-probability
    for preference tuning), by the same chunked head as ``labelled_loss_sum``."""
    mask, parts = _labelled_chunks(head, hidden, labels, vocab_size, chunk_elements, "none")
    sums = torch.zeros(hidden.size(0), dtype=torch.float32, device=hidden.device)
    if not parts:
        return sums + _unused_head(head, hidden)
    rows = mask.nonzero()[:, 0]
    return sums.index_add(0, rows, torch.cat(parts))


def labelled_token_logps(head, hidden, labels, vocab_size, chunk_elements=None, temperature=1.0):
    """``[B, L]``: the fp32 log-probability under ``head(hidden) / temperature`` of each labelled
    token (0 where the label is -100), by the same chunked head as ``labelled_loss_sum``: the
    per-token values a policy ratio needs (GRPO), without a ``[B, L, vocab]`` tensor. A
    ``temperature`` other than 1 gives the distribution answers were sampled from."""
    mask, parts = _labelled_chunks(head, hidden, labels, vocab_size, chunk_elements, "none", temperature)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    if not parts:
        return logps + _unused_head(head, hidden)
    # Row-major order, as hidden[mask] picked them.
    return logps.masked_scatter(mask, -torch.cat(parts))


# What the stand-in head keeps of one forward: the batch's summed loss (SFT), each row's summed
# loss (DPO's sequence log-probabilities) or each labelled token's log-probability (GRPO's ratios).
LABELLED_VALUES = ("sum", "rows", "tokens")


class LabelledLossHead(torch.nn.Module):
    """Stands in for an LLM's output head for one forward: returns the summed labelled loss, and
    keeps what ``values`` names at ``.loss_sum``, ``.row_sums`` or ``.token_logps``."""

    def __init__(self, head, labels, vocab_size, values="sum", temperature=1.0):
        super().__init__()
        if values not in LABELLED_VALUES:
            raise ValueError(f"unknown labelled values {values!r}; one of {', '.join(LABELLED_VALUES)}")
        # Not registered as a submodule: the real head stays where it is in the module tree.
        self.__dict__["head"] = head
        self.labels = labels
        self.vocab_size = vocab_size
        self.values = values
        self.temperature = temperature
        self.loss_sum = None
        self.row_sums = None
        self.token_logps = None

    def forward(self, hidden):
        if self.values == "rows":
            self.row_sums = labelled_row_sums(self.head, hidden, self.labels, self.vocab_size)
            self.loss_sum = self.row_sums.sum()
        elif self.values == "tokens":
            self.token_logps = labelled_token_logps(self.head, hidden, self.labels, self.vocab_size,
                                                    temperature=self.temperature)
            self.loss_sum = -self.token_logps.sum()
        else:
            self.loss_sum = labelled_loss_sum(self.head, hidden, self.labels, self.vocab_size)
        return self.loss_sum


def full_logits_reason(llm):
    """Why the loss must come from full logits with this LLM, or None when the lean path applies."""
    if not isinstance(llm.get_output_embeddings(), torch.nn.Module):
        return f"{type(llm).__name__} has no output head module"
    if getattr(llm.config, "pretraining_tp", 1) > 1:
        # MiniCPM's LLM then splits lm_head.weight itself instead of calling the head.
        return f"{type(llm).__name__} with pretraining_tp > 1 reads its head's weight directly"
    return None


@contextmanager
def loss_on_labelled(llm, labels, values="sum", temperature=1.0):
    """While active, the LLM's forward returns, as its logits, the summed labelled loss (also at
    ``.loss_sum`` of the yielded stand-in); ``values="rows"`` keeps each row's sum at ``.row_sums``,
    ``values="tokens"`` each labelled token's log-probability at ``.token_logps`` (``[B, L]``; of
    the logits divided by ``temperature``)."""
    head = llm.get_output_embeddings()
    # A native model's config holds the vocabulary size in its text config.
    stand_in = LabelledLossHead(head, labels, llm.config.get_text_config().vocab_size, values=values,
                                temperature=temperature)
    llm.set_output_embeddings(stand_in)
    try:
        yield stand_in
    finally:
        llm.set_output_embeddings(head)


# Preference (DPO) losses, over sequence log-probabilities of chosen and rejected answers.
# sigmoid: DPO (Rafailov et al. 2023); hinge: SLiC's hinge on the same margin (Zhao et al. 2023);
# ipo: IPO (Azar et al. 2023), on log-probabilities averaged per answer token.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid"):
    """``(loss, chosen_rewards, rejected_rewards)`` of a batch of pairs: the loss averaged over
    pairs; the rewards ``beta * (policy - reference)`` per pair, detached (for logging)."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    margin = chosen - rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; one of {', '.join(DPO_LOSS_TYPES)}")
    return losses.mean(), beta * chosen.detach(), beta * rejected.detach()


# Policy-gradient (GRPO) losses, over per-token log-probabilities of sampled answers.
# grpo: each answer's tokens averaged, then the answers (Shao et al. 2024, DeepSeekMath); dapo: one
# mean over every answer token of the batch, so long answers weigh by their length (Yu et al. 2025).
GRPO_LOSS_TYPES = ("grpo", "dapo")
# Added to a group's standard deviation, as TRL does: a group whose rewards barely differ gets
# large but finite advantages.
ADVANTAGE_EPS = 1e-4


def group_advantages(rewards, group_size, scale=True):
    """Advantages of ``rewards [N * group_size]`` (each prompt's answers contiguous): each reward
    minus its group's mean, divided by the group's standard deviation (+ ``ADVANTAGE_EPS``) when
    ``scale`` (GRPO; Dr. GRPO, Liu et al. 2025, leaves it out). A group whose rewards are all equal
    teaches nothing: its advantages are exactly 0."""
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 answers to compare, not {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} are not groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    # Exactly 0: a mean computed in floating point can differ from the equal values by rounding.
    uniform = groups.eq(groups[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(uniform, 0.0).flatten()


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, clip_eps=0.2, beta=0.04, loss_type="grpo",
              num_items=None):
    """``(loss, metrics)`` of sampled answers: ``logps``, ``old_logps`` (the policy that sampled them)
    and ``ref_logps`` (the reference; None when ``beta`` is 0) are ``[B, L]`` per-token
    log-probabilities, ``advantages`` ``[B]``, ``mask`` ``[B, L]`` the answer tokens.

    The loss is minus the objective, per token: the clipped surrogate
    ``min(r * A, clip(r, 1 - clip_eps, 1 + clip_eps) * A)`` with ``r = exp(logps - old_logps)``,
    minus ``beta`` times the k3 estimate of the KL divergence to the reference,
    ``exp(ref - logp) - (ref - logp) - 1`` (Schulman 2020: unbiased and never negative). "dapo"
    divides the sum over answer tokens by ``num_items`` (default: this batch's answer tokens; the
    stage passes their count over processes and accumulated batches, as the Trainer's
    ``num_items_in_batch``). ``metrics``, detached 0-d tensors (for the stage to gather across
    processes), means over answer tokens: ``clip_fraction`` (tokens whose clip stops their
    gradient), ``ratio``, and ``kl`` when there is a reference.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss type {loss_type!r}; one of {', '.join(GRPO_LOSS_TYPES)}")
    if beta and ref_logps is None:
        raise ValueError(f"a KL term (beta={beta}) needs the reference's log-probabilities")
    outside = ~mask.bool()
    mask = mask.to(logps.dtype)
    advantages = advantages.to(logps.dtype).unsqueeze(1)
    # Differences are 0 outside the answers: whatever padding holds, no inf * 0 = NaN reaches the sums.
    ratio = torch.exp((logps - old_logps).masked_fill(outside, 0.0))
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logps is not None:
        delta = (ref_logps - logps).masked_fill(outside, 0.0)
        kl = torch.exp(delta) - delta - 1
        if beta:
            per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)

    def token_mean(values):
        return (values.detach() * mask).sum() / mask.sum().clamp(min=1)

    # The clip stops a token's gradient where it caps the objective: a ratio above 1 + eps on a
    # positive advantage, below 1 - eps on a negative one.
    stopped = ((ratio > 1 + clip_eps) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))
    metrics = {"clip_fraction": token_mean(stopped.to(logps.dtype)), "ratio": token_mean(ratio)}
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    return loss, metrics
