"""Supervised fine-tuning: learn the assistant turns of conversations (CPMTrainer's token-weighted loss)."""

from stages.base import Stage


class SFT(Stage):
    name = "sft"
    help = "learn the assistant turns of conversations"
