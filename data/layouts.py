"""Chat layouts: how a conversation becomes token ids and which tokens are learned, one ChatLayout
per layout in LAYOUTS (the remote-code families' ``llm_type``: minicpm, llama3, qwen). A layout is
data: whether its template takes a system message, its image placeholder schema, its end-of-turn
token and its tokenize function. The native models' processors render ChatML themselves
(data/native.py), with the same learned spans (chatml_assistant_spans)."""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
# What a Qwen3-style template writes into the last assistant turn when it has no think block.
EMPTY_THINK = "<think>\n\n</think>\n\n"
# Ends every Llama-3 turn; learned after the last assistant token.
LLAMA3_END_OF_TURN = "<|eot_id|>"


def render_llama3(messages, tokenizer):
    """Llama-3 layout: ``(text, learned character spans)``; assistant content through <|eot_id|>."""
    text = tokenizer.bos_token
    spans = []
    for message in messages:
        text += f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        start = len(text)
        text += message["content"].strip() + LLAMA3_END_OF_TURN
        if message["role"] == "assistant":
            spans.append((start, len(text)))
    return text, spans


def render_qwen(messages, tokenizer):
    """The tokenizer's own ChatML template: ``(text, learned character spans)``.

    Learned: after each ``<|im_start|>assistant\\n`` through its ``<|im_end|>``, except an empty
    think block the template writes into a turn whose message had none.
    """
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, enable_thinking=wants_thinking(assistants)
    )
    return text, chatml_assistant_spans(text, assistants)


def wants_thinking(assistants):
    """``enable_thinking`` for a Qwen3-style template: whether the last answer holds a think block."""
    return bool(THINK_BLOCK.search(assistants[-1]))


def chatml_assistant_spans(text, assistants):
    """The learned character spans of a rendered ChatML conversation (see render_qwen);
    ``assistants`` are the assistant messages' texts, in order."""
    header, end = "<|im_start|>assistant\n", "<|im_end|>"
    spans = []
    position = 0
    for content in assistants:
        found = text.find(header, position)
        if found < 0:
            raise ValueError("the chat template output lacks an assistant turn")
        start = found + len(header)
        if text.startswith(EMPTY_THINK, start) and "<think>" not in content:
            start += len(EMPTY_THINK)
        stop = text.find(end, start)
        if stop < 0:
            raise ValueError("an assistant turn in the chat template output has no <|im_end|>")
        position = stop + len(end)
        spans.append((start, position))
    return spans


def tokenize_with_spans(tokenizer, text, spans):
    """Ids of ``text`` and a context flag per token (1: not learned): learned tokens start in a span."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    return ids, context_flags(encoding["offset_mapping"], spans)


def context_flags(offset_mapping, spans):
    """Per token (by its character offsets), 0 if it starts inside a learned span, else 1."""
    token_starts = torch.tensor([start for start, _ in offset_mapping], dtype=torch.long)
    context = torch.ones(len(token_starts), dtype=torch.int8)
    for start, stop in spans:
        context[(token_starts >= start) & (token_starts < stop)] = 0
    return context


def tokenize_minicpm(messages, tokenizer):
    """MiniCPM layout: ``<用户>``/``<AI>`` prefixes, eos after the last message, pieces encoded alone."""
    ids, context = [], []
    for n, message in enumerate(messages):
        prefix = "<用户>" if message["role"] == "user" else "<AI>"
        content = message["content"] + (tokenizer.eos_token if n == len(messages) - 1 else "")
        prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
        content_ids = tokenizer.encode(content, add_special_tokens=False)
        ids += prefix_ids + content_ids
        context += [1] * len(prefix_ids) + [int(message["role"] != "assistant")] * len(content_ids)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(context, dtype=torch.int8)


def special_token_id(tokenizer, token, needed_for):
    """The id of ``token`` in the tokenizer's vocabulary, as one token; ValueError naming it if absent.

    ``needed_for`` says what the pipeline uses it for (the error names it, with the tokenizer).
    """
    where = f"the tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path or 'built in memory'})"
    if token is None:
        raise ValueError(f"{where} defines no end-of-sequence token, which {needed_for} needs")
    token_id = tokenizer.convert_tokens_to_ids(token)
    # convert_tokens_to_ids answers the unk id (or None) for a token the vocabulary lacks.
    missing = token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token)
    if missing or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        raise ValueError(
            f"{where} has no single token {token!r}, which {needed_for} needs; "
            "is the checkpoint a MiniCPM-V model of that family?"
        )
    return token_id


def tokenize_llama3(messages, tokenizer):
    """Llama-3 layout: ``(ids, context flags)`` of render_llama3's text."""
    return tokenize_with_spans(tokenizer, *render_llama3(messages, tokenizer))


def tokenize_qwen(messages, tokenizer):
    """ChatML layout: ``(ids, context flags)`` of render_qwen's text."""
    return tokenize_with_spans(tokenizer, *render_qwen(messages, tokenizer))


@dataclass(frozen=True)
class ChatLayout:
    """One chat layout, as data (see the module docstring)."""

    name: str
    # Whether the template takes a system message, as the first message (where each model's chat()
    # puts its system_prompt): Llama-3's template writes any role's header, ChatML writes
    # <|im_start|>system. MiniCPM-V 2.0's has none: its tokenizer's apply_chat_template asserts
    # user/assistant roles and its chat() takes no system prompt.
    takes_system: bool
    # The placeholder schema of image_placeholder: each slice its own <slice> query run (2.6, o-2.6,
    # 4.x) rather than the slices as <image> runs inside one <slice>...</slice> (2.0, 2.5).
    new_schema: bool
    # ``(messages, tokenizer) -> (ids, context flags)``, flag 0 where a token is learned.
    tokenize: Callable
    # Learned after the last assistant token; None: the tokenizer's eos token.
    end_of_turn_token: str | None = None

    def end_of_turn(self, tokenizer):
        return self.end_of_turn_token or tokenizer.eos_token


LAYOUTS = {
    layout.name: layout
    for layout in (
        ChatLayout("minicpm", takes_system=False, new_schema=False, tokenize=tokenize_minicpm),
        ChatLayout("llama3", takes_system=True, new_schema=False, tokenize=tokenize_llama3,
                   end_of_turn_token=LLAMA3_END_OF_TURN),
        ChatLayout("qwen", takes_system=True, new_schema=True, tokenize=tokenize_qwen),
    )
}


def layout_named(name):
    """The ChatLayout called ``name`` (an ``llm_type``); ValueError naming the layouts if there is none."""
    if name not in LAYOUTS:
        raise ValueError(f"llm_type must be one of {tuple(LAYOUTS)}, got {name!r}")
    return LAYOUTS[name]
