"""Tiny MiniCPM-o 2.6: the 2.6 vision-language model plus the omni `init_*` switches.

The real model builds vision, audio (Whisper) and TTS towers on request. The tiny one has the
vision tower only, so it accepts `init_vision=True, init_audio=False, init_tts=False` (the
fine-tuner's setting) and refuses to pretend to build the others.
"""

from .modeling_minicpmv import MiniCPMV


class MiniCPMO(MiniCPMV):
    def __init__(self, config, init_vision=None, init_audio=None, init_tts=None):
        for name, value in (("init_vision", init_vision), ("init_audio", init_audio), ("init_tts", init_tts)):
            if value is not None:
                setattr(config, name, value)
        if not config.init_vision or config.init_audio or config.init_tts:
            raise ValueError(
                "the tiny MiniCPM-o has a vision tower only: load it with "
                "init_vision=True, init_audio=False, init_tts=False"
            )
        super().__init__(config)
