"""Shared behaviour of the remote-code families (2.0, Llama3-V 2.5, 2.6, o-2.6, 4.x up to 4.5).

Their checkpoints carry their own Python files, loaded with ``trust_remote_code`` (loading.py, with
the repairs published code needs); the tokenizer is the processing class; records are laid out by
``dataset.py`` in the family's chat layout (``llm_type``); the model takes ``forward(data=batch)``;
labels are stored shifted by one. A version's descriptor (families/minicpmv*.py, minicpmo2_6.py)
states what differs: the versions it matches, its layout, where its config keeps the slicing, the
capabilities it lacks, the published interface record it is held to.
"""

import inspect
import logging

import torch

import loading
from data.layouts import layout_named
from data.preference import PreferenceCollator
from data.records import IGNORE_INDEX
from data.slicing import model_pixels
from dataset import DataCollator, DataSettings, make_dataset
from families.base import Family, Parts, answers_until_stop, unwrap_peft

logger = logging.getLogger(__name__)

# The LLM's attention projections, as the reference launcher set them (the vision tower has
# self_attn.q_proj too: the llm. prefix keeps it out).
REMOTE_CODE_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

VIDEO_PROBLEM = "--max_num_frames and --stack_frames apply to video, which only the native models (model_type {able}) take"


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


class RemoteCodeFamily(Family):
    """Checkpoints with their own model code (see the module docstring). A descriptor sets ``versions``."""

    model_type = "minicpmv"
    versions = ()  # the config's ``version`` values it matches (None: a config without one)
    parts = Parts(vision="vpm", projector="resampler", llm=("llm",), loss_module="llm")
    lora_targets = REMOTE_CODE_LORA_TARGETS
    modules_to_save = ("embed_tokens", "resampler")
    # Kept out of 4-bit quantization with --q_lora: all but the LLM's layers.
    unquantized_modules = ("vpm", "resampler", "lm_head")
    # The other families' LLMs are transformers' own Llama, Qwen2 and Qwen3 classes, to which the
    # published forward(data) passes position ids and no attention mask: they pack exactly.
    reasons = {"video": VIDEO_PROBLEM}
    # Data settings: where the config keeps its slicing fields ("slice_config": a sub-config;
    # "config": flat on the config itself, under slice_mode), and the image layout flags a family
    # fixes (None: the config's field says).
    slicing = "slice_config"
    batch_vision = None
    use_image_id = None
    init_kwargs = {}  # keywords the model's __init__ takes from its config (MiniCPM-o's towers)

    @classmethod
    def matches(cls, config):
        version = getattr(config, "version", None)
        return (None if version is None else float(version)) in cls.versions

    def data_settings(self, config, max_slice_nums):
        """What the dataset needs from ``config``, slicing images into at most ``max_slice_nums``.

        ``max_slice_nums`` applies to the data only: the model config is left as it is, so a saved
        model keeps the slicing its processor (preprocessor_config.json) and its own ``chat()`` agree
        on, and inference may use more slices than training did.
        """
        if self.slicing == "slice_config":
            slicing = {**config.slice_config.to_dict(), "max_slice_nums": max_slice_nums}
        elif config.slice_mode:
            slicing = {**config.to_dict(), "max_slice_nums": max_slice_nums}
        else:
            slicing = None
        return DataSettings(
            slice_config=slicing,
            query_num=config.query_num,
            patch_size=config.patch_size,
            batch_vision=config.batch_vision_input if self.batch_vision is None else self.batch_vision,
            use_image_id=config.use_image_id if self.use_image_id is None else self.use_image_id,
        )

    def load_processing(self, path, cache_dir=None):
        """What turns records into ids (and what the Trainer saves with the model): the tokenizer."""
        return loading.load_tokenizer(path, cache_dir)

    def load_model(self, path, config, **kwargs):
        return loading.load_model(path, config, init_kwargs=self.init_kwargs, **kwargs)

    def make_dataset(self, records, processing, config, *, max_length, image_root, data_path=None, max_slice_nums,
                     max_num_frames=None, stack_frames=None, sample_kind="sft"):
        """The dataset of ``records`` (a record with a video is refused: these models take none, and
        the frame settings are unused)."""
        return make_dataset(records, processing, self.data_settings(config, max_slice_nums),
                            layout=layout_named(self.llm_type),
                            max_length=max_length, image_root=image_root, data_path=data_path,
                            preference=sample_kind == "preference")

    def collator(self, sample_kind, processing, max_length):
        """SFT rows; preference pairs as 2B rows, chosen then rejected (stages/dpo.py)."""
        return (PreferenceCollator if sample_kind == "preference" else DataCollator)(max_length)

    def tokenizer(self, processing):
        return processing

    def prepare_zero3(self, model):
        """Beyond what every model gets before the ZeRO-3 engine hooks it
        (trainer.register_zero3_external_parameters): a timm vision tower's ``forward_features`` goes
        through the module call. The published MiniCPM-V 2.0 calls ``vpm.forward_features`` directly, so
        ZeRO-3's module hooks, which gather a module's own parameters for its forward and backward, never
        run for the tower: ``pos_embed`` and ``cls_token`` stay partitioned (backward: "size of tensor a
        (0) must match"). With ``forward`` set to the tower's ``forward_features`` and ``forward_features``
        to the module call, the published call runs the same code under the hooks."""
        tower = self.vision(model)[0]
        if hasattr(tower, "forward_features") and not getattr(tower, "_features_through_call", False):
            tower.forward = tower.forward_features
            tower.forward_features = tower.__call__
            tower._features_through_call = True

    def forward(self, model, batch, base=None, group=1):
        """The model's output for a batch of this family's collator. ``model`` may be wrapped (peft,
        DDP, DeepSpeed); ``base`` is the model under the wrappers (default: ``model``).
        In training, the remote code itself runs a dummy image through the vision tower and
        resampler of a batch without images (see NativeFamily.forward). With ``group`` > 1, the
        vision features of each run's first row come from ``get_vllm_embedding`` and go back in
        through ``data["vision_hidden_states"]``, as stages/dpo.py reuses them."""
        base = model if base is None else base
        if group == 1:
            pixels = self.model_pixels(batch["pixel_values"], base)
            return model(data={**batch, "pixel_values": pixels}, use_cache=False)
        leaders = {key: batch[key][::group] for key in ("input_ids", "position_ids", "image_bound", "image_bounds", "tgt_sizes")}
        leaders["pixel_values"] = self.model_pixels(batch["pixel_values"][::group], base)
        _, vision = unwrap_peft(base).get_vllm_embedding(leaders)
        # The other rows' pixels are not read: their features are given.
        shared = [features for features in vision for _ in range(group)]
        return model(data={**batch, "vision_hidden_states": shared}, use_cache=False)

    def model_pixels(self, pixel_values, model):
        """The collator's uint8 pixels as ``model`` takes them (data.slicing.model_pixels), in the dtype of its
        vision tower's weights. The model is loaded in one dtype (with --q_lora, the modules left
        unquantized too), so these are the values its own cast of float32 pixels would give.
        ``model``: the model, or a peft wrapper of it (not DDP or DeepSpeed)."""
        weight = next(self.vision(unwrap_peft(model))[0].parameters())
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

    @staticmethod
    def prompt_length(sample):
        """Where a training sample's answer starts: its prompt's token count."""
        return int((sample["labels"] != IGNORE_INDEX).nonzero()[0]) + 1  # labels[i] is the token at i + 1

    def prompt_inputs(self, sample, device):
        """A training sample cut just before its first learned token: the prompt the model answers."""
        cut = self.prompt_length(sample)
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
        return self.decoded(output, processing)[0]

    def generate_batch(self, model, processing, inputs, max_new_tokens):
        """Several prompts (prompt_inputs) in one call of the published ``generate``, left-padded with an
        attention mask as the published ``chat()`` batches them (its processor pads on the left), the
        image bounds shifted with the padding; the LLM's generate derives positions from the mask.
        Versions whose ``generate`` takes no ``attention_mask`` (2.0; 2.5's one ``model_inputs``) answer
        one prompt at a time."""
        takes_mask = "attention_mask" in inspect.signature(unwrap_peft(model).generate).parameters
        if len(inputs) == 1 or not takes_mask:
            return super().generate_batch(model, processing, inputs, max_new_tokens)
        longest = max(one["input_ids"].shape[1] for one in inputs)
        pad_id = processing.pad_token_id if processing.pad_token_id is not None else 0
        rows, masks, bounds = [], [], []
        for one in inputs:
            ids = one["input_ids"][0]
            shift = longest - len(ids)
            rows.append(torch.nn.functional.pad(ids, (shift, 0), value=pad_id))
            masks.append(torch.arange(longest, device=ids.device) >= shift)
            bounds.append(one["image_bound"][0] + shift)
        output = model.generate(
            input_ids=torch.stack(rows), attention_mask=torch.stack(masks).long(), image_bound=bounds,
            pixel_values=[one["pixel_values"][0] for one in inputs],
            tgt_sizes=[one["tgt_sizes"][0] for one in inputs], tokenizer=processing, max_new_tokens=max_new_tokens, decode_text=True,
        )
        return self.decoded(output, processing)

    @staticmethod
    def decoded(output, processing):
        """The texts of a published ``generate``'s output, one per prompt: its texts, or (2.0) its token
        ids decoded up to where it stopped."""
        if not isinstance(output, torch.Tensor):
            return [text.strip() for text in output]
        texts = []
        for ids in output.tolist():  # token ids: 2.0 decodes in chat(), not in generate
            if processing.eos_token_id in ids:  # where its generate stopped, as its chat() cuts
                ids = ids[: ids.index(processing.eos_token_id)]
            texts.append(processing.decode(ids).strip())
        return texts

    def sample(self, model, processing, samples, num_samples, temperature, max_new_tokens, synced=False):
        """What the published ``generate`` does, with sampling: ``get_vllm_embedding`` (the prompt's
        images encoded once), then the LLM's ``generate`` on the embeddings, repeated ``num_samples``
        times, stopping on the model's terminators (the tokenizer's end of text where it names none).
        Not the published ``generate`` itself: it runs under ``torch.inference_mode``, and under
        ZeRO-3 the layers it gathers would come back as inference tensors, which a later forward
        with gradients cannot use."""
        network = unwrap_peft(model)
        stops = [processing.convert_tokens_to_ids(token) for token in getattr(network, "terminators", ())]
        stops = stops or [processing.eos_token_id]
        answers = []
        for sample in samples:
            prompt = self.prompt_inputs(sample, sample["input_ids"].device)
            prompt["image_bounds"] = prompt["image_bound"]  # 2.0's name (see DataCollator)
            embeds, _ = network.get_vllm_embedding(prompt)
            rows = network.llm.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                num_return_sequences=num_samples, eos_token_id=stops, pad_token_id=stops[0], synced_gpus=synced,
            )
            answers += answers_until_stop(rows, stops, num_samples)
        return answers

    def answered_batch(self, processing, samples, answers, max_length):
        rows = []
        for sample, group in zip(samples, answers, strict=True):
            cut = self.prompt_length(sample)
            bounds = sample["image_bound"]
            for answer in group:
                answer = torch.tensor(answer, dtype=sample["input_ids"].dtype, device=sample["input_ids"].device)
                ids = torch.cat([sample["input_ids"][:cut], answer])
                labels = torch.full_like(ids, IGNORE_INDEX)
                labels[cut - 1 : cut - 1 + len(answer)] = answer  # shifted: position i predicts token i + 1
                rows.append(dict(
                    record=sample["record"], input_ids=ids, labels=labels,
                    position_ids=torch.arange(len(ids), device=ids.device),
                    attention_mask=torch.ones(len(ids), dtype=torch.bool, device=ids.device),
                    pixel_values=sample["pixel_values"], tgt_sizes=sample["tgt_sizes"],
                    image_bound=bounds[bounds[:, 1] <= cut] if len(bounds) else bounds,
                ))
        return self.collator("sft", processing, max_length)(rows)
