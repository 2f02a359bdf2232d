"""Tiny MiniCPM-Llama3-V 2.5: the 2.6-style stand-in with the interfaces of the published 2.5
(theonlyengine/VQA_Model@4520826:modeling_minicpmv.py, as tiny_models/published_remote_code.json
records them): `generate(model_inputs, tokenizer, vision_hidden_states, stream, **kwargs)` takes the
inputs as one dict first; the modules the published files import at their top are imported here too.
"""

# Imported at the top as the published files do (resampler.py: numpy; modeling_minicpmv.py: torchvision).
import numpy  # noqa: F401
import torchvision  # noqa: F401

from .modeling_minicpmv import MiniCPMV as MiniCPMVBase


class MiniCPMV(MiniCPMVBase):
    def generate(self, model_inputs, tokenizer=None, vision_hidden_states=None, stream=False, **kwargs):
        """The published 2.5 signature: `model_inputs` holds input_ids, pixel_values, tgt_sizes and
        image_bound; with decode_text=True it returns the texts."""
        return super().generate(**model_inputs, tokenizer=tokenizer, vision_hidden_states=vision_hidden_states,
                                stream=stream, **kwargs)
