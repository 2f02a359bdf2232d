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


def _chunk_loss(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def labelled_loss_sum(head, hidden, labels, vocab_size, chunk_elements=None):
    """Summed fp32 cross-entropy of ``head(hidden)`` at the positions whose label is not -100,
    computed ``chunk_elements`` logits at a time (default ``CHUNK_ELEMENTS``)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    labels = labels.to(hidden.device)
    mask = labels.ne(IGNORE_INDEX)
    picked, targets = hidden[mask], labels[mask]
    if len(targets) == 0:
        # Nothing to learn here, but the head stays in the graph (zero gradient), as with full
        # logits: DDP and ZeRO expect a gradient for every trainable parameter.
        return head(hidden.reshape(-1, hidden.size(-1))[:1]).float().sum() * 0.0
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab_size)
    total = None
    for start in range(0, len(targets), step):
        chunk = (head, picked[start : start + step], targets[start : start + step])
        # Recomputed in the backward pass: only one chunk's logits exist at any time.
        part = checkpoint(_chunk_loss, *chunk, use_reentrant=False) if torch.is_grad_enabled() else _chunk_loss(*chunk)
        total = part if total is None else total + part
    return total


class LabelledLossHead(torch.nn.Module):
    """Stands in for an LLM's output head for one forward: returns the summed labelled loss."""

    def __init__(self, head, labels, vocab_size):
        super().__init__()
        # Not registered as a submodule: the real head stays where it is in the module tree.
        self.__dict__["head"] = head
        self.labels = labels
        self.vocab_size = vocab_size
        self.loss_sum = None

    def forward(self, hidden):
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
def loss_on_labelled(llm, labels):
    """While active, the LLM's forward returns, as its logits, the summed labelled loss
    (also at ``.loss_sum`` of the yielded stand-in)."""
    head = llm.get_output_embeddings()
    # A native model's config holds the vocabulary size in its text config.
    stand_in = LabelledLossHead(head, labels, llm.config.get_text_config().vocab_size)
    llm.set_output_embeddings(stand_in)
    try:
        yield stand_in
    finally:
        llm.set_output_embeddings(head)
