"""Shared behaviour of the native families (4.6, 4.7, MiniCPM-OCR): classes that ship in transformers.

Loaded with ``AutoModelForImageTextToText`` and ``AutoProcessor``; records laid out by the processor
itself (``data/native.py``); ``forward(**batch)``; standard causal-LM labels (the model shifts). Each
model_type has a small descriptor (families/minicpmv4_6.py, minicpmv4_7.py, minicpm_ocr.py).
"""

import functools

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling

from data.records import IGNORE_INDEX
from families.base import Family, Parts, answers_until_stop, unwrap_peft
from data.native import (
    ENCODED_SIZES, NativeCollator, NativeDataset, NativePreferenceCollator, NativePreferenceDataset, prompt_length,
)

# The lowest transformers the native models train on here: the first release with all three
# (4.6 came in 5.8, 4.7 in 5.18, OCR in 5.21) and with the model argument NativeFamily.forward hands
# the vision features through (mm_encoder_outputs, from 5.18). The native tests pass on it.
NATIVE_TRANSFORMERS_FLOOR = "5.21.0"

# Their llm_type: the chat template is the checkpoint's own (its processor's), not a dataset.py layout.
NATIVE_LLM_TYPE = "native"

# The projections of both attention kinds of the Qwen3.5 language model, linear attention (Gated
# DeltaNet) and full attention; the vision tower's are left out by the prefix.
NATIVE_LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\."
    r"(linear_attn\.(in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj)|self_attn\.(q_proj|k_proj|v_proj|o_proj))"
)

PACKING_PROBLEM = (
    "--packing is not supported for the native MiniCPM-V models (4.6, 4.7, MiniCPM-OCR): the linear-attention "
    "(Gated DeltaNet) layers of their Qwen3.5 language model carry their state along the whole row, and "
    "transformers gives them no sample boundaries from position ids (4.7 also computes its M-RoPE positions "
    "over the whole row), so packed samples would see each other; train without --packing "
    "(--group_by_length true also cuts padding)"
)
# The model's pixel inputs and their patch grids: images, then video frames (NaViT-packed, as the
# collator lays them out).
PIXEL_INPUTS = (("pixel_values", "target_sizes", "image"), ("pixel_values_videos", "target_sizes_videos", "video"))


def _encode_vision(model, args, kwargs, group=1):
    """A forward pre-hook of a native model: its keyword arguments with the images and video frames
    encoded in one call of the vision tower and merger, handed over as ``mm_encoder_outputs``.
    Without either, a dummy image is encoded and handed over as zero image features (its
    features cut to none: they reach the loss with a zero gradient). ``group`` > 1: the rows come
    in runs of ``group`` sharing the images of the run's first row, the only row that carries
    them (NativeFamily.answered_batch; no video), the others their images' grids (ENCODED_SIZES): each
    run's features are repeated for its rows."""
    inner = model.model
    tower_dtype = inner.vision_tower.dtype
    kwargs = dict(kwargs)
    # The grids of the pixels given, where the batch's later rows of a group carry theirs too (ENCODED_SIZES).
    encoded = {"image": kwargs.pop(ENCODED_SIZES, None)}
    present = [(kind, kwargs.pop(pixels)[:1], kwargs[sizes] if encoded.get(kind) is None else encoded[kind])
               for pixels, sizes, kind in PIXEL_INPUTS if pixels in kwargs]
    if present:
        # The model's own path, once for both: each image, slice or frame is encoded on its own
        # (the tower's attention, the window merger and the merger work per target size).
        pixels = torch.cat([unit_pixels.to(tower_dtype) for _, unit_pixels, _ in present], dim=-1)
        sizes = torch.cat([unit_sizes for _, _, unit_sizes in present])
    else:
        side = 4  # patches a side: the window merger and the merger each halve it
        patch = inner.config.vision_config.patch_size
        device = kwargs["input_ids"].device
        pixels = torch.zeros(1, 3, patch, patch * side * side, dtype=tower_dtype, device=device)
        sizes = torch.tensor([[side, side]], device=device)
        present = [("image", None, None)]
    features = torch.cat(inner.get_image_features(pixels, sizes).pooler_output)
    # Images first, then the video: split where the images' placeholders end.
    image_tokens = (kwargs["input_ids"][::group] == inner.config.image_token_id).sum(dim=1)
    image_count = int(image_tokens.sum()) if present[0][0] == "image" else 0
    parts = {"image": features[:image_count], "video": features[image_count:]}
    if group > 1 and image_count:
        parts["image"] = torch.cat([run for run in parts["image"].split(image_tokens.tolist()) for _ in range(group)])
    kwargs["mm_encoder_outputs"] = {kind: BaseModelOutputWithPooling(pooler_output=[parts[kind]]) for kind, _, _ in present}
    return args, kwargs


# The config fields naming the tokens that stand for an image's or a video's features.
MEDIA_TOKEN_IDS = ("image_token_id", "video_token_id")


class NativeFamily(Family):
    """Checkpoints whose classes ship in transformers (see the module docstring). A descriptor sets
    ``name`` and ``model_type``."""

    llm_type = NATIVE_LLM_TYPE
    # --tune_vision: the vision tower with its window-attention merger (vit_merger); the merger into the
    # language model trains always, as the remote-code models' resampler; --tune_llm: the language model
    # and the output head (at the model's top); the loss swaps the head of the model itself, whose
    # forward applies lm_head to the language model's output.
    parts = Parts(vision="model.vision_tower", projector="model.merger", llm=("model.language_model", "lm_head"),
                  loss_module="")
    lora_targets = NATIVE_LORA_TARGETS
    # peft matches these as name suffixes: "merger" alone would catch the vision tower's vit_merger.
    modules_to_save = ("embed_tokens", "model.merger")
    unquantized_modules = ("vision_tower", "merger", "lm_head")
    transformers_floor = NATIVE_TRANSFORMERS_FLOOR
    reasons = {"packing": PACKING_PROBLEM}

    @classmethod
    def matches(cls, config):
        return getattr(config, "model_type", None) == cls.model_type

    def load_processing(self, path, cache_dir=None):
        """The checkpoint's processor (image and video processor, tokenizer, chat template)."""
        return transformers.AutoProcessor.from_pretrained(path, cache_dir=cache_dir)

    def load_model(self, path, config, *, dtype, cache_dir=None, device_map=None, quantization_config=None):
        kwargs = {} if quantization_config is None else {"quantization_config": quantization_config}
        return transformers.AutoModelForImageTextToText.from_pretrained(
            path, config=config, dtype=dtype, cache_dir=cache_dir, device_map=device_map, **kwargs
        )

    def make_dataset(self, records, processing, config, *, max_length, image_root, data_path=None, max_slice_nums,
                     max_num_frames=None, stack_frames=None, sample_kind="sft"):
        """SFT samples, or preference pairs (``sample_kind`` "preference": NativePreferenceDataset)."""
        dataset_class = NativePreferenceDataset if sample_kind == "preference" else NativeDataset
        return dataset_class(records, processing, max_length=max_length, image_root=image_root, data_path=data_path,
                             max_slice_nums=max_slice_nums, max_num_frames=max_num_frames, stack_frames=stack_frames)

    def collator(self, sample_kind, processing, max_length):
        """SFT rows; preference pairs as 2B rows, each pair's chosen row then its rejected row, only the
        chosen one with pixels: what ``forward(..., group=2)`` takes (stages/dpo.py)."""
        collator_class = NativePreferenceCollator if sample_kind == "preference" else NativeCollator
        return collator_class(processing.tokenizer.pad_token_id)

    def tokenizer(self, processing):
        return processing.tokenizer

    def prepare_zero3(self, model):
        """Make the vision modules' ZeRO-3 gathering the same on every process, before the engine
        hooks the model.

        ZeRO-3 gathers parameters module call by module call; every process must call the same
        modules in the same order (each gather is a collective, and DeepSpeed checks the order it
        recorded across processes). The merger calls its MLPs once per image or slice, so it
        becomes a leaf module: gathered whole, once per call. A leaf's gradients are reduced by a
        backward hook that torch runs only for a module returning a tensor or a tuple of tensors,
        and ZeRO-3 gathers a module again in the backward pass once per tensor it returned: its
        per-image features are handed on as one tensor in a tuple (the model concatenates them
        anyway). ``forward`` calls the vision modules exactly once per batch, whatever it holds.
        """
        from deepspeed.utils import set_z3_leaf_module

        merger = model.model.merger
        set_z3_leaf_module(merger, True)
        # Registered before the engine's hooks, so those see the tuple.
        merger.register_forward_hook(lambda module, args, features: (torch.cat(features),))

    def forward(self, model, batch, base=None, group=1):
        """The model's output for a batch of this family's collator (labels left out: the trainer
        computes the loss). ``model`` may be wrapped (peft, DDP, DeepSpeed); ``base`` is the model
        under the wrappers (default: ``model`` without its peft wrapper).

        The vision tower and merger run exactly once per batch, at the start of the model's
        forward, on the images and the video frames together (the model itself would run them once
        for each), or on a dummy image, whose features reach the loss with a zero gradient, when the
        batch has neither: every process calls the same modules in the same order, as ZeRO-3
        needs (see prepare_zero3), and every trainable parameter gets a gradient on every
        process, as DeepSpeed and DDP need (they reduce gradients bucket by bucket). ``group``: see
        Family.forward (the features of each run's images are repeated, see _encode_vision).
        """
        # The model takes neither the labels nor the records' names (the loss guard's).
        inputs = {key: value for key, value in batch.items() if key not in ("labels", "records")}
        base = unwrap_peft(model) if base is None else base
        # Inside the forward (after DeepSpeed's own hooks on the model, registered earlier), so the
        # vision calls belong to this forward's ZeRO-3 step and run under the engine's autocast.
        hook = base.register_forward_pre_hook(functools.partial(_encode_vision, group=group), with_kwargs=True)
        try:
            return model(**inputs, use_cache=False)
        finally:
            hook.remove()

    def loss_labels(self, labels):
        """The model's own loss shifts: here the label of position i is the token at i + 1."""
        return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)

    def save_extras(self, source_dir, output_dir):
        """Nothing: the Trainer saves the processor (its processing class) with the model."""

    prompt_length = staticmethod(prompt_length)  # data/native.py's: where a sample's answer starts

    def prompt_inputs(self, sample, device):
        """A training sample cut just before its first learned token: the prompt the model answers."""
        cut = self.prompt_length(sample)
        tokens = ("input_ids", "attention_mask", "mm_token_type_ids")
        return {
            key: (value[:cut].unsqueeze(0) if key in tokens else value).to(device)
            for key, value in sample.items()
            if key not in ("labels", "record")
        }

    def generate(self, model, processing, inputs, max_new_tokens):
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processing.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def sample(self, model, processing, samples, num_samples, temperature, max_new_tokens, synced=False):
        """transformers' ``generate`` with sampling: it encodes the prompt's images once and repeats
        their features for the ``num_samples`` copies (docs/GRPO.md). It stops on the generation
        config's end tokens. The image and video placeholders are never sampled: the forward finds a
        row's media by its placeholders (_encode_vision), and one in an answer would take features
        the prompt does not have."""
        stops = model.generation_config.eos_token_id
        stops = [stops] if isinstance(stops, int) else list(stops)
        config = unwrap_peft(model).config
        placeholders = [token for token in (getattr(config, name, None) for name in MEDIA_TOKEN_IDS) if token is not None]
        answers = []
        for sample in samples:
            inputs = self.prompt_inputs(sample, sample["input_ids"].device)
            rows = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                num_return_sequences=num_samples, synced_gpus=synced, suppress_tokens=placeholders,
            )
            answers += answers_until_stop(rows[:, inputs["input_ids"].shape[1]:], stops, num_samples)
        return answers

    def answered_batch(self, processing, samples, answers, max_length):
        """Only each group's first row carries the prompt's pixels (forward repeats their features)."""
        rows = []
        for sample, group in zip(samples, answers, strict=True):
            if "pixel_values_videos" in sample:
                raise ValueError(f"record {sample['record']}: sampled answers to a video are not supported")
            cut = self.prompt_length(sample)
            for n, answer in enumerate(group):
                answer = torch.tensor(answer, dtype=sample["input_ids"].dtype, device=sample["input_ids"].device)
                row = {"record": sample["record"], "input_ids": torch.cat([sample["input_ids"][:cut], answer])}
                row["labels"] = torch.cat([torch.full_like(sample["input_ids"][:cut], IGNORE_INDEX), answer])
                row["attention_mask"] = torch.ones_like(row["input_ids"])
                if "mm_token_type_ids" in sample:
                    row["mm_token_type_ids"] = torch.cat([sample["mm_token_type_ids"][:cut], torch.zeros_like(answer)])
                if "pixel_values" in sample:  # every row its images' grids, the first the pixels (ENCODED_SIZES)
                    row["target_sizes"] = sample["target_sizes"]
                    if n == 0:
                        row["pixel_values"] = sample["pixel_values"]
                rows.append(row)
        return self.collator("sft", processing, max_length)(rows)
