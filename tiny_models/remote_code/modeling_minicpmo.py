"""Tiny MiniCPM-o 2.6: the 2.6 vision-language model plus the omni `init_*` switches.

The real model builds vision, audio (Whisper) and TTS towers on request. The tiny one has the
vision tower only, so it accepts `init_vision=True, init_audio=False, init_tts=False` (the
fine-tuner's setting) and refuses to pretend to build the others. Its __init__ takes the config
alone, as the real one does: a `config=` object plus the switches as keywords is a TypeError.
"""

from .modeling_minicpmv import MiniCPMV


class MiniCPMO(MiniCPMV):
    # Like the real MiniCPM-o 2.6, __init__ takes the config alone and reads the switches from it;
    # from_pretrained(path, init_vision=..., ...) without an explicit config sets them there.
    def __init__(self, config):
        if not config.init_vision or config.init_audio or config.init_tts:
            raise ValueError(
                "the tiny MiniCPM-o has a vision tower only: load it with "
                "init_vision=True, init_audio=False, init_tts=False"
            )
        super().__init__(config)
