"""The Family interface: what one kind of MiniCPM-V checkpoint is, as data, and what it does, as hooks.

A family states:
- which configs are its own (``matches``), its chat layout (``llm_type``) and the transformers it needs;
- its parts as data (``Parts``: module paths from the model's top), its LoRA targets, the modules
  saved in full with an adapter by default, and those kept out of 4-bit quantization;
- its capabilities (CAPABILITIES): each one it lacks is in ``reasons``, with the sentence a user is
  told (``refusal``); stages/base.py asks, and refuses a run in one place;
- its hooks: processing and model loading, records to samples (``make_dataset``), the collator of a
  sample kind, the forward, label alignment, vision pixels, generation, and what a saved folder needs.

The two shared implementations are families/remote_code.py and families/native.py; each version or
model_type is a small descriptor over one of them.
"""

import functools
from dataclasses import dataclass

from peft import PeftModel

# What a stage or a flag may ask of a family. A family lacking one names it in ``reasons``.
CAPABILITIES = ("video", "packing", "preference", "generate")

# The attention implementations with which the LLM keeps packed samples apart from position ids
# alone (masking_utils builds the block-diagonal mask; tests/test_packing.py checks both). Flash
# attention finds packed samples from position ids only in a batch of one row.
PACKING_ATTENTION = ("sdpa", "eager")


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


def unwrap_peft(model):
    """The model under a peft wrapper (the caller unwraps DDP / DeepSpeed)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def answers_until_stop(rows, stop_ids, group):
    """Generated token ids ``rows`` ``[N * group, new]`` as ``N`` lists of ``group`` answers, each cut
    after its first token of ``stop_ids`` (what follows is generate's padding)."""
    answers = []
    for row in rows.tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        answers.append(row[:end])
    return [answers[start:start + group] for start in range(0, len(answers), group)]


@dataclass(frozen=True)
class Parts:
    """A model's parts, as dotted module paths from the model's top ("" is the model itself)."""

    vision: str  # what --tune_vision trains
    projector: str  # vision features into the LLM: trained always
    llm: tuple  # what --tune_llm trains, output head included
    loss_module: str  # whose output head the loss swaps (loss.py)


def module_at(model, path):
    """The submodule of ``model`` at a dotted ``path`` ("" : the model)."""
    return functools.reduce(getattr, path.split("."), model) if path else model


class Family:
    """One kind of checkpoint. Subclasses set the class attributes; the registry instantiates them."""

    name = None  # registry key (tiny_models' family name where one exists)
    llm_type = None  # the chat layout, as --llm_type names it
    model_type = None  # the config's model_type
    parts = None  # Parts
    lora_targets = None  # regex (full match) of the modules that get LoRA by default
    modules_to_save = ()  # trained in full and saved with an adapter (the vision tower joins with --tune_vision)
    unquantized_modules = ()  # kept in the training dtype with --q_lora
    transformers_floor = None  # the lowest transformers that trains it, where above requirements.txt's floor
    published = ()  # keys of tiny_models/published_remote_code.json that record its published interface
    fallback = False  # taken for a config no family matches (the newest remote-code line)
    reasons = {}  # capability -> why this family lacks it ({model_type}, {able}: those that have it)

    @classmethod
    def matches(cls, config):
        """Whether ``config`` (a config object, or a namespace of a raw config.json) is this family's."""
        raise NotImplementedError

    def refusal(self, capability):
        """Why this family cannot do ``capability`` (one of CAPABILITIES), or None."""
        reason = self.reasons.get(capability)
        if reason is None:
            return None
        from families import FAMILIES  # the registry, to name the families that can

        able = [family.model_type for family in FAMILIES if capability not in family.reasons]
        return reason.format(model_type=self.model_type, able=", ".join(dict.fromkeys(able)))

    # Parts, resolved on a model
    @property
    def vision_module_name(self):
        """The name --lora_modules_to_save gives the vision tower."""
        return self.parts.vision.rsplit(".", 1)[-1]

    def vision(self, model):
        return [module_at(model, self.parts.vision)]

    def language_model(self, model):
        return [module_at(model, path) for path in self.parts.llm]

    def loss_module(self, model):
        return module_at(model, self.parts.loss_module)

    def default_modules_to_save(self, tune_vision):
        return list(self.modules_to_save) + ([self.vision_module_name] if tune_vision else [])

    # Hooks (see families/remote_code.py and families/native.py)
    def load_processing(self, path, cache_dir=None):
        raise NotImplementedError

    def load_model(self, path, config, *, dtype, cache_dir=None, device_map=None, quantization_config=None):
        raise NotImplementedError

    def make_dataset(self, records, processing, config, *, max_length, image_root, data_path=None, max_slice_nums,
                     max_num_frames=None, stack_frames=None, sample_kind="sft"):
        """The dataset of ``records`` as ``sample_kind`` ("sft", or "preference": chosen/rejected pairs)."""
        raise NotImplementedError

    def collator(self, sample_kind, processing, max_length):
        raise NotImplementedError

    def tokenizer(self, processing):
        raise NotImplementedError

    def prepare_zero3(self, model):
        raise NotImplementedError

    def forward(self, model, batch, base=None, group=1):
        """The model's output for a batch of this family's collator. ``group`` > 1: the rows come in
        runs of ``group`` answers to one prompt (``answered_batch``), whose vision features are
        computed once, from the run's first row, and reused for the others."""
        raise NotImplementedError

    def loss_labels(self, labels):
        raise NotImplementedError

    def model_pixels(self, pixel_values, model):
        """The collator's pixels as ``model``'s vision tower takes them (a family whose ``forward`` or
        tests encode images themselves: the remote-code families)."""
        raise NotImplementedError

    def save_extras(self, source_dir, output_dir):
        raise NotImplementedError

    def prompt_inputs(self, sample, device):
        raise NotImplementedError

    def generate(self, model, processing, inputs, max_new_tokens):
        raise NotImplementedError

    def generate_batch(self, model, processing, inputs, max_new_tokens):
        """The answers to several prompts (a list of prompt_inputs), in order: one generate call each,
        where a family cannot batch them."""
        return [self.generate(model, processing, one, max_new_tokens) for one in inputs]

    # Sampling (--stage grpo, docs/GRPO.md)
    def thinks(self, processing):
        """Whether the chat template the data is laid out with writes a ``<think>`` block."""
        template = getattr(processing, "chat_template", None) or self.tokenizer(processing).chat_template
        return "<think>" in (template or "")

    def sample(self, model, processing, samples, num_samples, temperature, max_new_tokens, synced=False):
        """Per training sample (a dataset sample), ``num_samples`` answers to its prompt sampled at
        ``temperature`` in one ``generate`` (its images encoded once), each a list of token ids up
        to and including its first end-of-turn token (or ``max_new_tokens`` of them). ``model``:
        unwrapped of DDP / DeepSpeed; ``synced``: every process generates until all are done
        (ZeRO-3). The caller seeds the random state."""
        raise NotImplementedError

    def answered_batch(self, processing, samples, answers, max_length):
        """The collated batch of each sample's prompt followed by each of its ``answers``
        (``sample``'s form), group after group, the answer tokens labelled: what ``forward`` takes
        with ``group=len(answers[0])``."""
        raise NotImplementedError
