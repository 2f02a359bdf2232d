"""Tiny MiniCPM-V 2.0: plain `[3, H, W]` images, one vision pass per image, a Llama-like LLM.

Like the real 2.0 remote code, the model class defines no `get_input_embeddings` of its own
(fine-tuners add one returning `llm.get_input_embeddings()`).
"""

import torch

from .modeling_minicpmv import MiniCPMV as MiniCPMVBase


class _NotDefined:
    """Hides an inherited method: `hasattr(model, name)` is False until an instance sets its own."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        raise AttributeError(f"{objtype.__name__} defines no {self.name}")


class MiniCPMV(MiniCPMVBase):
    get_input_embeddings = _NotDefined()

    def encode_plain_images(self, images):
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        device = self.vpm.embeddings.patch_embedding.weight.device
        patch = self.config.patch_size
        features = []
        for image in images:
            tgt_sizes = torch.tensor([[image.shape[1] // patch, image.shape[2] // patch]], dtype=torch.int32)
            hidden = self.vpm(image.unsqueeze(0).to(device=device, dtype=dtype), tgt_sizes=tgt_sizes).last_hidden_state
            features.append(self.resampler(hidden, tgt_sizes))
        return torch.cat(features)

    def get_vision_hidden_states(self, data):
        counts = [len(images) for images in data["pixel_values"]]
        images = [image for sample in data["pixel_values"] for image in sample]
        if not images:
            return [None] * len(counts)
        return list(torch.split(self.encode_plain_images(images), counts))

    def dummy_vision_feature(self):
        patch = self.config.patch_size
        return self.encode_plain_images([torch.zeros(3, 2 * patch, 2 * patch)])
