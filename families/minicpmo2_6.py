"""MiniCPM-o 2.6 (openbmb/MiniCPM-o-2_6): 2.6's vision stack, with audio and TTS towers it builds when asked."""

from families.remote_code import RemoteCodeFamily

# Its __init__ builds the vision, audio and TTS towers as these config fields say; the fine-tuner
# wants vision alone. Other families' __init__ raises TypeError on these keywords.
OMNI_INIT_KWARGS = {"init_vision": True, "init_audio": False, "init_tts": False}


class MiniCPMO2_6(RemoteCodeFamily):
    name = "minicpmo2_6"
    llm_type = "qwen"
    model_type = "minicpmo"
    versions = (2.6,)
    published = ("minicpmo2_6",)
    init_kwargs = OMNI_INIT_KWARGS

    @classmethod
    def matches(cls, config):
        return super().matches(config) and all(hasattr(config, key) for key in OMNI_INIT_KWARGS)
