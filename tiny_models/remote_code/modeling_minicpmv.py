"""Tiny MiniCPM-V (2.5, 2.6, 4.5): an LLM, a NaViT vision transformer and a resampler.

`forward(data)` embeds the text, writes the resampled image features over the placeholder
tokens inside each `image_bound`, and runs the LLM; the caller computes the loss from
`.logits` (labels in `data` are ignored, as in the real remote code). `chat()` answers the way
the published 2.6 model card shows, through the folder's own `AutoProcessor`.
"""

import json
from copy import deepcopy

import torch
import torchvision  # noqa: F401  (imported at the top as the published 2.6 file does: a missing install fails here too)
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoProcessor, LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM
from transformers import initialization as init

from .configuration_minicpm import MiniCPMVConfig
from .modeling_navit_siglip import SiglipVisionTransformer
from .resampler import Resampler, default_num_heads

LLM_CLASSES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisionEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim**-0.5)
            # Not in the weights file: recomputed on every load.
            init.copy_(module.pos_embed, module.compute_pos_embed())


class MiniCPMV(MiniCPMVPreTrainedModel):
    llm_classes = LLM_CLASSES  # llm_model_type -> (config class, model class)
    bounds_key = "image_bound"  # the key of `data` holding the image bounds (2.0: image_bounds)

    def __init__(self, config):
        super().__init__(config)
        llm_config_class, llm_class = self.llm_classes[config.llm_model_type]
        self.llm = llm_class(llm_config_class(**config.llm_config_kwargs()))
        self.embed_dim = config.hidden_size
        self.vpm = SiglipVisionTransformer(config.vision_config)
        if config.drop_vision_last_layer:
            self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
        self.vision_dim = config.vision_config.hidden_size
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=self.embed_dim,
            num_heads=default_num_heads(self.embed_dim),
            kv_dim=self.vision_dim,
        )
        self.terminators = list(config.terminators)
        self.post_init()

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.llm.set_output_embeddings(new_embeddings)

    # ---- vision -------------------------------------------------------------------------------

    def encode_images(self, images, tgt_sizes):
        """Packed NaViT batch: images is a list of `[3, patch, n * patch]`, tgt_sizes `[n_img, 2]`."""
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        device = self.vpm.embeddings.patch_embedding.weight.device
        tgt_sizes = tgt_sizes.to(torch.int32)
        features = []
        step = self.config.vision_batch_size
        for start in range(0, len(images), step):
            chunk, sizes = images[start : start + step], tgt_sizes[start : start + step]
            # [3, patch, L * patch] -> [L * patch, 3 * patch] so that pad_sequence pads patches.
            flat = [image.flatten(end_dim=1).permute(1, 0) for image in chunk]
            packed = pad_sequence(flat, batch_first=True, padding_value=0.0)
            n, length, _ = packed.shape
            packed = packed.permute(0, 2, 1).reshape(n, 3, -1, length).to(device=device, dtype=dtype)
            patch_counts = (sizes[:, 0] * sizes[:, 1]).to(device)
            max_patches = length // self.config.patch_size
            mask = torch.arange(max_patches, device=device)[None, :] < patch_counts[:, None]
            hidden = self.vpm(packed, patch_attention_mask=mask.unsqueeze(1), tgt_sizes=sizes).last_hidden_state
            features.append(self.resampler(hidden, sizes))
        return torch.cat(features)

    def get_vision_hidden_states(self, data):
        """Per sample, a `[n_images, query_num, hidden]` tensor (`[0, ...]` for a text-only sample)."""
        counts = [len(images) for images in data["pixel_values"]]
        images = [image for sample in data["pixel_values"] for image in sample]
        if not images:
            return [None] * len(counts)
        tgt_sizes = torch.vstack([sizes for sizes in data["tgt_sizes"] if len(sizes) > 0])
        return list(torch.split(self.encode_images(images, tgt_sizes), counts))

    def dummy_vision_feature(self):
        """A vision pass on a blank 2x2-patch image, so every vision weight joins the graph (DDP)."""
        patch = self.config.patch_size
        image = torch.zeros(3, patch, 4 * patch)
        return self.encode_images([image], torch.tensor([[2, 2]], dtype=torch.int32))

    # ---- embedding ----------------------------------------------------------------------------

    def get_vllm_embedding(self, data):
        """Returns (inputs_embeds [B, L, hidden], vision_hidden_states per sample)."""
        if "vision_hidden_states" in data:
            vision_hidden_states = data["vision_hidden_states"]
        else:
            vision_hidden_states = self.get_vision_hidden_states(data)
        dummy = None
        if self.training and all(features is None for features in vision_hidden_states):
            # Run the vision tower before the token embeddings, in the same order as a batch
            # with images: under ZeRO-3 every rank must gather parameters in the same order.
            dummy = self.dummy_vision_feature()

        input_ids = data["input_ids"].to(torch.long)
        embeds = self.llm.get_input_embeddings()(input_ids)
        rows = []
        for i, features in enumerate(vision_hidden_states):
            row = embeds[i]
            bounds = data[self.bounds_key][i] if i < len(data[self.bounds_key]) else []
            bounds = torch.as_tensor(bounds, dtype=torch.long).reshape(-1, 2)
            n_images = 0 if features is None else len(features)
            if len(bounds) != n_images:
                raise ValueError(f"sample {i}: {len(bounds)} image bounds for {n_images} images")
            if n_images:
                if not bool(((bounds[:, 1] - bounds[:, 0]) == self.config.query_num).all()):
                    raise ValueError(f"sample {i}: every image bound must span query_num={self.config.query_num}")
                positions = torch.cat([torch.arange(start, end) for start, end in bounds.tolist()]).to(row.device)
                row = row.index_put((positions,), features.reshape(-1, row.shape[-1]).to(row.dtype))
            rows.append(row)
        embeds = torch.stack(rows)

        if dummy is not None:
            embeds = embeds + 0.0 * dummy.sum().to(embeds.dtype)
        return embeds, vision_hidden_states

    def forward(self, data, **kwargs):
        embeds, _ = self.get_vllm_embedding(data)
        position_ids = data["position_ids"].to(torch.long)
        return self.llm(input_ids=None, position_ids=position_ids, inputs_embeds=embeds, **kwargs)

    # ---- inference ----------------------------------------------------------------------------

    def generate(
        self,
        input_ids=None,
        pixel_values=None,
        tgt_sizes=None,
        image_bound=None,
        attention_mask=None,
        tokenizer=None,
        vision_hidden_states=None,
        return_vision_hidden_states=False,
        stream=False,
        decode_text=False,
        **kwargs,
    ):
        """Greedy decoding; returns new token ids, or their text with decode_text=True."""
        if input_ids is None or pixel_values is None or len(input_ids) != len(pixel_values):
            raise ValueError("generate needs input_ids and one pixel_values list per sample")
        if stream:
            raise NotImplementedError("the tiny model does not stream")
        data = {"input_ids": input_ids, self.bounds_key: image_bound}
        if vision_hidden_states is None:
            data["pixel_values"] = pixel_values
            data["tgt_sizes"] = tgt_sizes
        else:
            data["vision_hidden_states"] = vision_hidden_states
        with torch.inference_mode():
            embeds, vision_hidden_states = self.get_vllm_embedding(data)
            terminators = [tokenizer.convert_tokens_to_ids(token) for token in self.terminators]
            kwargs.setdefault("do_sample", False)
            output = self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                pad_token_id=0,
                eos_token_id=terminators,
                **kwargs,
            )
        result = self.decode_text(output, tokenizer, terminators) if decode_text else output
        if return_vision_hidden_states:
            return result, vision_hidden_states
        return result

    @staticmethod
    def decode_text(output, tokenizer, terminators):
        texts = []
        for row in output.tolist():
            kept = []
            for token in row:
                if token in terminators:
                    break
                kept.append(token)
            texts.append(tokenizer.decode(kept, skip_special_tokens=False))
        return texts

    def chat(self, image, msgs, tokenizer, processor=None, vision_hidden_states=None, max_new_tokens=2048,
             min_new_tokens=0, sampling=True, max_inp_length=8192, system_prompt="", stream=False,
             max_slice_nums=None, use_image_id=None, **kwargs):
        """Answer `msgs` (role/content dicts; content a string or a list of strings and PIL images),
        with `image` put before the first message's text, as the published 2.6 `chat()` does.

        The processor comes from the checkpoint's folder (`AutoProcessor`) unless given; like the
        published code, it stops when config.json and preprocessor_config.json disagree on the
        image layout. `max_slice_nums` / `use_image_id` override the processor's for this call.
        """
        if stream:
            raise NotImplementedError("the tiny model does not stream")
        batched = isinstance(msgs[0], list)
        if batched:
            if image is not None:
                raise ValueError("with batched msgs, put the images into the messages")
            images_list, msgs_list = [None] * len(msgs), msgs
        else:
            images_list, msgs_list = [image], [msgs]
        if processor is None:
            if getattr(self, "processor", None) is None:
                self.processor = AutoProcessor.from_pretrained(self.config._name_or_path, trust_remote_code=True)
            processor = self.processor
        self.check_processor_matches_config(processor.image_processor)

        prompts, images = [], []
        for sample_image, sample_msgs in zip(images_list, msgs_list, strict=True):
            sample_msgs = deepcopy(json.loads(sample_msgs) if isinstance(sample_msgs, str) else sample_msgs)
            if not sample_msgs or sample_msgs[0]["role"] != "user":
                raise ValueError("msgs must start with a user message")
            if sample_image is not None and isinstance(sample_msgs[0]["content"], str):
                sample_msgs[0]["content"] = [sample_image, sample_msgs[0]["content"]]
            sample_images = []
            for message in sample_msgs:
                if message["role"] not in ("user", "assistant"):
                    raise ValueError(f"unknown role {message['role']!r}")
                content = [message["content"]] if isinstance(message["content"], str) else message["content"]
                parts = []
                for part in content:
                    if isinstance(part, Image.Image):
                        sample_images.append(part)
                        parts.append("(<image>./</image>)")
                    else:
                        parts.append(part)
                message["content"] = "\n".join(parts)
            if system_prompt:
                sample_msgs = [{"role": "system", "content": system_prompt}] + sample_msgs
            prompts.append(processor.tokenizer.apply_chat_template(sample_msgs, tokenize=False,
                                                                   add_generation_prompt=True))
            images.append(sample_images)

        inputs = processor(prompts, images, max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                           return_tensors="pt", max_length=max_inp_length).to(self.device)
        if sampling:
            generation = {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True,
                          "repetition_penalty": 1.05}
        else:
            generation = {"num_beams": 3, "repetition_penalty": 1.2}
        if min_new_tokens > 0:
            generation["min_new_tokens"] = min_new_tokens
        generation.update((key, kwargs[key]) for key in generation.keys() & kwargs.keys())
        inputs.pop("image_sizes")
        answers = self.generate(**inputs, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                vision_hidden_states=vision_hidden_states, decode_text=True, **generation)
        return answers if batched else answers[0]

    def check_processor_matches_config(self, image_processor):
        """The published chat() asserts these: the processor must lay images out as the model expects."""
        config = self.config
        pairs = {
            "query_num / image_feature_size": (config.query_num, image_processor.image_feature_size),
            "patch_size": (config.patch_size, image_processor.patch_size),
            "use_image_id": (getattr(config, "use_image_id", False), image_processor.use_image_id),
            "slice_config.max_slice_nums / max_slice_nums": (config.slice_config.max_slice_nums,
                                                             image_processor.max_slice_nums),
            "slice_mode": (config.slice_mode, image_processor.slice_mode),
        }
        for name, (in_config, in_processor) in pairs.items():
            if in_config != in_processor:
                raise AssertionError(
                    f"{name}: {in_config} in config.json but {in_processor} in preprocessor_config.json; "
                    "these two values should be the same"
                )
