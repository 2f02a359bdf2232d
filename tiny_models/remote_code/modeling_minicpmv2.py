"""Tiny MiniCPM-V 2.0: plain `[3, H, W]` images, one vision pass per image, a Llama-like LLM.

With the interfaces of the published 2.0 (HwwwwwwwH/MiniCPM-V-2@84ce9b0:modeling_minicpmv.py, as
tiny_models/published_remote_code.json records them): `forward(data)` reads the bounds from
`data["image_bounds"]`; `generate(input_ids, pixel_values, image_sizes, image_bounds, tgt_sizes,
tokenizer, vision_hidden_states, **kwargs)` returns token ids; `get_input_embeddings` returns
`self.llm.embed_tokens`, which the LLM does not have (repairs/embeddings.py, defect 8, repairs it at
load); the modules the published files import at their top are imported here too. Its LLM
(MiniCPM-2B, `MiniCPMForCausalLM`) prepares its generation inputs the way transformers 4.36 did.
"""

# Imported at the top as the published files do (resampler.py: requests; modeling_minicpmv.py: timm,
# torchvision): an install without them fails on this stand-in too.
import numpy  # noqa: F401
import requests  # noqa: F401
import timm  # noqa: F401
import torch
import torchvision  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache

from .modeling_minicpmv import LLM_CLASSES
from .modeling_minicpmv import MiniCPMV as MiniCPMVBase


class MiniCPMForCausalLM(LlamaForCausalLM):
    """Llama with the published MiniCPM-2B `prepare_inputs_for_generation`: the cache arrives as
    `past_key_values` and is a running one (anything given means tokens were already seen), and
    `inputs_embeds` are used only while there is none."""

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      **kwargs):
        if past_key_values is not None:
            if isinstance(past_key_values, Cache):
                cached = past_key_values.get_seq_length()
                seen = past_key_values.seen_tokens
                limit = past_key_values.get_max_length()
            else:  # per-layer (key, value) tuples
                cached = seen = past_key_values[0][0].shape[2]
                limit = None
            # Keep only the tokens the cache has not seen.
            if attention_mask is not None and attention_mask.shape[1] > input_ids.shape[1]:
                input_ids = input_ids[:, -(attention_mask.shape[1] - seen):]
            elif seen < input_ids.shape[1]:
                input_ids = input_ids[:, seen:]
            if limit is not None and attention_mask is not None and cached + input_ids.shape[1] > limit:
                attention_mask = attention_mask[:, -limit:]
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -input_ids.shape[1]:]
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update(position_ids=position_ids, past_key_values=past_key_values,
                            use_cache=kwargs.get("use_cache"), attention_mask=attention_mask)
        return model_inputs


class MiniCPMV(MiniCPMVBase):
    llm_classes = {**LLM_CLASSES, "llama": (LlamaConfig, MiniCPMForCausalLM)}
    bounds_key = "image_bounds"

    def get_input_embeddings(self):
        return self.llm.embed_tokens  # as published: the LLM keeps them under .model (AttributeError)

    def generate(self, input_ids, pixel_values=None, image_sizes=[], image_bounds=[], tgt_sizes=[],  # noqa: B006
                 tokenizer=None, vision_hidden_states=None, **kwargs):
        """The published 2.0 signature; returns the new token ids (its chat() decodes them)."""
        return super().generate(input_ids=input_ids, pixel_values=pixel_values, tgt_sizes=tgt_sizes,
                                image_bound=image_bounds, tokenizer=tokenizer,
                                vision_hidden_states=vision_hidden_states, **kwargs)

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
