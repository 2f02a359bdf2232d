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


def _chunk_loss(head, hidden, targets, reduction):
    return F.cross_entropy(head(hidden).float(), targets, reduction=reduction)


def _unused_head(head, hidden):
    """A zero that keeps the head in the graph (zero gradient), as full logits would: DDP and
    ZeRO expect a gradient for every trainable parameter even where nothing is labelled."""
    return head(hidden.reshape(-1, hidden.size(-1))[:1]).float().sum() * 0.0


def _labelled_chunks(head, hidden, labels, vocab_size, chunk_elements, reduction):
    """``(mask, parts)``: the labelled positions and their cross-entropies (``reduction`` per
    chunk), ``chunk_elements`` logits at a time; ``parts`` is empty when nothing is labelled."""
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
        chunk = (head, picked[start : start + step], targets[start : start + step], reduction)
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


class LabelledLossHead(torch.nn.Module):
    """Stands in for an LLM's output head for one forward: returns the summed labelled loss."""

    def __init__(self, head, labels, vocab_size, per_row=False):
        super().__init__()
        # Not registered as a submodule: the real head stays where it is in the module tree.
        self.__dict__["head"] = head
        self.labels = labels
        self.vocab_size = vocab_size
        self.per_row = per_row
        self.loss_sum = None
        self.row_sums = None

    def forward(self, hidden):
        if self.per_row:
            self.row_sums = labelled_row_sums(self.head, hidden, self.labels, self.vocab_size)
            self.loss_sum = self.row_sums.sum()
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
def loss_on_labelled(llm, labels, per_row=False):
    """While active, the LLM's forward returns, as its logits, the summed labelled loss
    (also at ``.loss_sum`` of the yielded stand-in; with ``per_row``, each row's sum at ``.row_sums``)."""
    head = llm.get_output_embeddings()
    # A native model's config holds the vocabulary size in its text config.
    stand_in = LabelledLossHead(head, labels, llm.config.get_text_config().vocab_size, per_row=per_row)
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
