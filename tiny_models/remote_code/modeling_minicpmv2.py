"""Tiny MiniCPM-V 2.0: plain `[3, H, W]` images, one vision pass per image, a Llama-like LLM.

Like the real 2.0 remote code, the model class defines no `get_input_embeddings` of its own
(fine-tuners add one returning `llm.get_input_embeddings()`), and its LLM (MiniCPM-2B,
`MiniCPMForCausalLM`) prepares its generation inputs the way transformers 4.36 did.
"""

import torch
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


class _NotDefined:
    """Hides an inherited method: `hasattr(model, name)` is False until an instance sets its own."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        raise AttributeError(f"{objtype.__name__} defines no {self.name}")


class MiniCPMV(MiniCPMVBase):
    llm_classes = {**LLM_CLASSES, "llama": (LlamaConfig, MiniCPMForCausalLM)}
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
