"""The two kinds of MiniCPM-V checkpoint, chosen once from the checkpoint's config.

- Remote code (2.0, Llama3-V 2.5, 2.6, o-2.6, 4.x up to 4.5): the model's own Python files, loaded with
  ``trust_remote_code``; the tokenizer; records laid out by ``dataset.py`` in one of three chat
  layouts (``llm_type``); ``forward(data=batch)``; labels stored shifted by one.
- Native (4.6, 4.7, MiniCPM-OCR): classes that ship in transformers, loaded with
  ``AutoModelForImageTextToText`` and ``AutoProcessor``; records laid out by the processor itself
  (``native_data.py``); ``forward(**batch)``; standard causal-LM labels (the model shifts).

Everything that differs between the two lives here, as two classes with the same methods;
``backend_for(config, llm_type)`` picks one. finetune.py, trainer.py, infer.py and merge.py call
its methods and never ask which kind they hold.
"""

import inspect
import logging
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

import loading
from dataset import IGNORE_INDEX, LLM_TYPES, DataCollator, data_settings, make_dataset, model_pixels
from native_data import NativeCollator, NativeDataset

logger = logging.getLogger(__name__)

NATIVE_MODEL_TYPES = loading.NATIVE_MODEL_TYPES
# Their llm_type: the chat template is the checkpoint's own (its processor's), not one of LLM_TYPES.
NATIVE_LLM_TYPE = "native"
ALL_LLM_TYPES = LLM_TYPES + (NATIVE_LLM_TYPE,)

# Remote code: the LLM's attention projections, as the reference launcher set them (the vision tower
# has self_attn.q_proj too: the llm. prefix keeps it out).
REMOTE_CODE_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
# Native: the projections of both attention kinds of the Qwen3.5 language model, linear attention
# (Gated DeltaNet) and full attention; the vision tower's are left out by the prefix.
NATIVE_LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\."
    r"(linear_attn\.(in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj)|self_attn\.(q_proj|k_proj|v_proj|o_proj))"
)


# The attention implementations with which the LLM keeps packed samples apart from position ids
# alone (masking_utils builds the block-diagonal mask; tests/test_packing.py checks both). Flash
# attention finds packed samples from position ids only in a batch of one row.
PACKING_ATTENTION = ("sdpa", "eager")
# Why MiniCPM-V 2.0 cannot pack (its published modeling_minicpm.py).
MINICPM_PACKING_PROBLEM = (
    "--packing is not supported for MiniCPM-V 2.0: its MiniCPM language model builds one causal mask over the "
    "whole row and ignores where position ids restart, so packed samples would attend to each other; "
    "train without --packing (--group_by_length true also cuts padding)"
)


def packing_attention_problem(llm):
    """Why packed samples would see each other in this loaded LLM, or None (see PACKING_ATTENTION)."""
    attention = llm.config._attn_implementation
    if attention in PACKING_ATTENTION:
        return None
    return (
        f"--packing keeps samples apart through the mask transformers builds from restarting position ids, with "
        f"attention {' or '.join(PACKING_ATTENTION)}; this model's language model uses {attention!r}: set "
        "attn_implementation to sdpa in its config.json, or train without --packing"
    )


def llm_type_of(config):
    """The chat layout a checkpoint's config implies: its ``version`` for remote code (none: 2.0)."""
    if config.model_type in NATIVE_MODEL_TYPES:
        return NATIVE_LLM_TYPE
    version = getattr(config, "version", None)
    if version is None or float(version) == 2.0:
        return "minicpm"
    if float(version) == 2.5:
        return "llama3"
    return "qwen"  # 2.6, o-2.6 and 4.x


def backend_for(config, llm_type=None):
    """The backend of the checkpoint whose config this is; ``llm_type`` (from the command line)
    must agree with the config, or be None (then the config's is used)."""
    expected = llm_type_of(config)
    if llm_type is not None and llm_type != expected:
        version = getattr(config, "version", None)
        raise ValueError(
            f"--llm_type {llm_type} contradicts the checkpoint: its config (model_type {config.model_type!r}, "
            f"version {version!r}) says {expected}; omit --llm_type or pass --llm_type {expected}"
        )
    return NativeBackend() if expected == NATIVE_LLM_TYPE else RemoteCodeBackend(expected)


def unwrap_peft(model):
    """The model under a peft wrapper (the caller unwraps DDP / DeepSpeed)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def load_for_inference(model_path, adapter=None, dtype=torch.float32, device="cpu", llm_type=None):
    """``(model, processing, config, backend)``: the model (with the adapter applied, if any) in eval
    mode on ``device``, its tokenizer or processor, its config and backend (``llm_type`` as in
    backend_for)."""
    config = loading.load_config(model_path)
    backend = backend_for(config, llm_type)
    # The adapter folder carries the tokenizer (and processor) the run trained with, unless it was saved
    # without them, or (saved before copy_named_files) names files it lacks: then the base model's.
    trained_with = adapter and (Path(adapter) / "tokenizer_config.json").exists()
    if trained_with and loading.named_files_missing(adapter):
        logger.warning("%s names files it lacks (%s): taking the tokenizer and processor from %s", adapter,
                       ", ".join(name for _, name in loading.named_files_missing(adapter)), model_path)
        trained_with = False
    processing = backend.load_processing(adapter if trained_with else model_path)
    model = backend.load_model(model_path, config, dtype=dtype)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval(), processing, config, backend


# The model's pixel inputs and their patch grids: images, then video frames (NaViT-packed, as the
# collator lays them out).
PIXEL_INPUTS = (("pixel_values", "target_sizes", "image"), ("pixel_values_videos", "target_sizes_videos", "video"))


def _encode_vision(model, args, kwargs):
    """A forward pre-hook of a native model: its keyword arguments with the images and video frames
    encoded in one call of the vision tower and merger, handed over as ``mm_encoder_outputs``.
    Without either, a dummy image is encoded and handed over as zero image features (its
    features cut to none: they reach the loss with a zero gradient)."""
    inner = model.model
    tower_dtype = inner.vision_tower.dtype
    kwargs = dict(kwargs)
    present = [(kind, kwargs.pop(pixels)[:1], kwargs[sizes]) for pixels, sizes, kind in PIXEL_INPUTS if pixels in kwargs]
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
    image_count = int((kwargs["input_ids"] == inner.config.image_token_id).sum()) if present[0][0] == "image" else 0
    parts = {"image": features[:image_count], "video": features[image_count:]}
    kwargs["mm_encoder_outputs"] = {kind: BaseModelOutputWithPooling(pooler_output=[parts[kind]]) for kind, _, _ in present}
    return args, kwargs


def generate_call(generate, inputs):
    """``(args, kwargs)`` for a published MiniCPM-V ``generate`` given prompt_inputs' ``inputs``.

    The families' signatures differ: Llama3-V 2.5 takes one ``model_inputs`` dict first; MiniCPM-V
    2.0 takes ``image_bounds`` and returns token ids; 2.6 and later take keywords and decode with
    ``decode_text=True``. Read from the signature, not from the version: a revision decides.
    """
    parameters = inspect.signature(generate).parameters
    decode = {"decode_text": True} if "decode_text" in parameters or "model_inputs" in parameters else {}
    if "model_inputs" in parameters:
        return (dict(inputs),), decode
    if "image_bounds" in parameters:
        inputs = {**inputs, "image_bounds": inputs["image_bound"]}
        del inputs["image_bound"]
    return (), {**inputs, **decode}


class RemoteCodeBackend:
    """Checkpoints with their own model code (see the module docstring)."""

    takes_video = False
    lora_targets = REMOTE_CODE_LORA_TARGETS
    # Kept out of 4-bit quantization with --q_lora: all but the LLM's layers.
    unquantized_modules = ["vpm", "resampler", "lm_head"]
    vision_module_name = "vpm"

    def __init__(self, llm_type):
        self.llm_type = llm_type
        # The other families' LLMs are transformers' own Llama, Qwen2 and Qwen3 classes, to which the
        # published forward(data) passes position ids and no attention mask: they pack exactly.
        self.packing_problem = MINICPM_PACKING_PROBLEM if llm_type == "minicpm" else None

    def load_processing(self, path, cache_dir=None):
        """What turns records into ids (and what the Trainer saves with the model): the tokenizer."""
        return loading.load_tokenizer(path, cache_dir)

    def load_model(self, path, config, **kwargs):
        return loading.load_model(path, config, **kwargs)

    def make_dataset(self, records, processing, config, *, max_length, image_root, data_path=None, max_slice_nums,
                     max_num_frames=None, stack_frames=None, preference=False):
        """The dataset of ``records`` (a record with a video is refused: these models take none, and
        the frame settings are unused); with ``preference``, of preference records (DPO)."""
        settings = data_settings(config, max_slice_nums)
        return make_dataset(records, processing, settings, llm_type=self.llm_type, max_length=max_length,
                            image_root=image_root, data_path=data_path, preference=preference)

    def collator(self, processing, max_length):
        return DataCollator(max_length)

    def vision(self, model):
        """What --tune_vision trains: the vision tower (the resampler always trains)."""
        return [model.vpm]

    def language_model(self, model):
        """What --tune_llm trains, output head included."""
        return [model.llm]

    def loss_module(self, model):
        """The module whose output head the loss swaps (loss.py): the LLM."""
        return model.llm

    def tokenizer(self, processing):
        return processing

    def default_modules_to_save(self, tune_vision):
        return ["embed_tokens", "resampler"] + (["vpm"] if tune_vision else [])

    def prepare_zero3(self, model):
        """Beyond what every model gets before the ZeRO-3 engine hooks it
        (trainer.register_zero3_external_parameters): a timm vision tower's ``forward_features`` goes
        through the module call. The published MiniCPM-V 2.0 calls ``vpm.forward_features`` directly, so
        ZeRO-3's module hooks, which gather a module's own parameters for its forward and backward, never
        run for the tower: ``pos_embed`` and ``cls_token`` stay partitioned (backward: "size of tensor a
        (0) must match"). With ``forward`` set to the tower's ``forward_features`` and ``forward_features``
        to the module call, the published call runs the same code under the hooks."""
        tower = model.vpm
        if hasattr(tower, "forward_features") and not getattr(tower, "_features_through_call", False):
            tower.forward = tower.forward_features
            tower.forward_features = tower.__call__
            tower._features_through_call = True

    def forward(self, model, batch, base=None):
        """The model's output for a batch of this backend's collator. ``model`` may be wrapped (peft,
        DDP, DeepSpeed); ``base`` is the model under the wrappers (default: ``model``).
        In training, the remote code itself runs a dummy image through the vision tower and
        resampler of a batch without images (see NativeBackend.forward)."""
        pixels = self.model_pixels(batch["pixel_values"], model if base is None else base)
        return model(data={**batch, "pixel_values": pixels}, use_cache=False)

    def model_pixels(self, pixel_values, model):
        """The collator's uint8 pixels as ``model`` takes them (dataset.model_pixels), in the dtype of its
        vision tower's weights. The model is loaded in one dtype (with --q_lora, the modules left
        unquantized too), so these are the values its own cast of float32 pixels would give.
        ``model``: the model, or a peft wrapper of it (not DDP or DeepSpeed)."""
        weight = next(self.vision(model)[0].parameters())
        return model_pixels(pixel_values, weight.dtype)

    def loss_labels(self, labels):
        """Labels aligned with the positions whose output predicts them: stored that way already."""
        return labels


    def save_extras(self, source_dir, output_dir):
        """Make a full save load on its own: the remote code with its repairs."""
        copied = loading.copy_remote_code(source_dir, output_dir)
        if copied:
            logger.info("Copied remote code into %s: %s", output_dir, ", ".join(copied))
        loading.write_repaired_classes(output_dir)
        loading.write_repaired_tokenizer(output_dir)

    def prompt_inputs(self, sample, device):
        """A training sample cut just before its first learned token: the prompt the model answers."""
        learned = (sample["labels"] != IGNORE_INDEX).nonzero()
        cut = int(learned[0]) + 1  # labels are shifted: labels[i] is the token at i + 1
        bounds = sample["image_bound"]
        return dict(
            input_ids=sample["input_ids"][:cut].unsqueeze(0).to(device),
            # float32, as the model's processor gives them: the model casts them to its dtype itself.
            pixel_values=model_pixels([[image.to(device) for image in sample["pixel_values"]]], torch.float32),
            tgt_sizes=[sample["tgt_sizes"].to(device)],
            image_bound=[bounds[bounds[:, 1] <= cut] if len(bounds) else bounds],
        )

    def generate(self, model, processing, inputs, max_new_tokens):
        """The answer of the model's own ``generate`` to ``inputs`` (prompt_inputs), in the form that
        family's published ``generate`` takes (see generate_call)."""
        args, kwargs = generate_call(unwrap_peft(model).generate, inputs)
        output = model.generate(*args, tokenizer=processing, max_new_tokens=max_new_tokens, **kwargs)
        if isinstance(output, torch.Tensor):  # token ids: 2.0 decodes in chat(), not in generate
            ids = output[0].tolist()
            if processing.eos_token_id in ids:  # where its generate stopped, as its chat() cuts
                ids = ids[: ids.index(processing.eos_token_id)]
            return processing.decode(ids).strip()
        return output[0].strip()


class NativeBackend:
    """Checkpoints whose classes ship in transformers (see the module docstring)."""

    packing_problem = (
        "--packing is not supported for the native MiniCPM-V models (4.6, 4.7, MiniCPM-OCR): the linear-attention "
        "(Gated DeltaNet) layers of their Qwen3.5 language model carry their state along the whole row, and "
        "transformers gives them no sample boundaries from position ids (4.7 also computes its M-RoPE positions "
        "over the whole row), so packed samples would see each other; train without --packing "
        "(--group_by_length true also cuts padding)"
    )
    llm_type = NATIVE_LLM_TYPE
    takes_video = True
    lora_targets = NATIVE_LORA_TARGETS
    unquantized_modules = ["vision_tower", "merger", "lm_head"]
    vision_module_name = "vision_tower"

    def load_processing(self, path, cache_dir=None):
        """The checkpoint's processor (image and video processor, tokenizer, chat template)."""
        return transformers.AutoProcessor.from_pretrained(path, cache_dir=cache_dir)

    def load_model(self, path, config, *, dtype, cache_dir=None, device_map=None, quantization_config=None):
        kwargs = {} if quantization_config is None else {"quantization_config": quantization_config}
        return transformers.AutoModelForImageTextToText.from_pretrained(
            path, config=config, dtype=dtype, cache_dir=cache_dir, device_map=device_map, **kwargs
        )

    def make_dataset(self, records, processing, config, *, max_length, image_root, data_path=None, max_slice_nums,
                     max_num_frames=None, stack_frames=None, preference=False):
        if preference:
            # finetune.py refuses --stage dpo for these first (dpo.unsupported_reason says why).
            raise ValueError("preference records need a remote-code checkpoint")
        return NativeDataset(records, processing, max_length=max_length, image_root=image_root, data_path=data_path,
                             max_slice_nums=max_slice_nums, max_num_frames=max_num_frames, stack_frames=stack_frames)

    def collator(self, processing, max_length):
        return NativeCollator(processing.tokenizer.pad_token_id)

    def vision(self, model):
        """What --tune_vision trains: the vision tower with its window-attention merger (vit_merger).
        The merger into the language model trains always, as the remote-code models' resampler."""
        return [model.model.vision_tower]

    def language_model(self, model):
        """What --tune_llm trains: the language model and the output head (at the model's top)."""
        return [model.model.language_model, model.lm_head]

    def loss_module(self, model):
        """The module whose output head the loss swaps (loss.py): the model itself, whose forward
        applies lm_head to the language model's output."""
        return model

    def tokenizer(self, processing):
        return processing.tokenizer

    def default_modules_to_save(self, tune_vision):
        # peft matches these as name suffixes: "merger" alone would catch the vision tower's vit_merger.
        return ["embed_tokens", "model.merger"] + (["vision_tower"] if tune_vision else [])

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

    def forward(self, model, batch, base=None):
        """The model's output for a batch of this backend's collator (labels left out: the trainer
        computes the loss). ``model`` may be wrapped (peft, DDP, DeepSpeed); ``base`` is the model
        under the wrappers (default: ``model`` without its peft wrapper).

        The vision tower and merger run exactly once per batch, at the start of the model's
        forward, on the images and the video frames together (the model itself would run them once
        for each), or on a dummy image, whose features reach the loss with a zero gradient, when the
        batch has neither: every process calls the same modules in the same order, as ZeRO-3
        needs (see prepare_zero3), and every trainable parameter gets a gradient on every
        process, as DeepSpeed and DDP need (they reduce gradients bucket by bucket).
        """
        # The model takes neither the labels nor the records' names (the loss guard's).
        inputs = {key: value for key, value in batch.items() if key not in ("labels", "records")}
        base = unwrap_peft(model) if base is None else base
        # Inside the forward (after DeepSpeed's own hooks on the model, registered earlier), so the
        # vision calls belong to this forward's ZeRO-3 step and run under the engine's autocast.
        hook = base.register_forward_pre_hook(_encode_vision, with_kwargs=True)
        try:
            return model(**inputs, use_cache=False)
        finally:
            hook.remove()

    def loss_labels(self, labels):
        """The model's own loss shifts: here the label of position i is the token at i + 1."""
        return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)

    def save_extras(self, source_dir, output_dir):
        """Nothing: the Trainer saves the processor (its processing class) with the model."""

    def prompt_inputs(self, sample, device):
        """A training sample cut just before its first learned token: the prompt the model answers
        (labels are not shifted: the first learned position is the first answer token)."""
        cut = int((sample["labels"] != IGNORE_INDEX).nonzero()[0])
        tokens = ("input_ids", "attention_mask", "mm_token_type_ids")
        return {
            key: (value[:cut].unsqueeze(0) if key in tokens else value).to(device)
            for key, value in sample.items()
            if key not in ("labels", "record")
        }

    def generate(self, model, processing, inputs, max_new_tokens):
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processing.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
