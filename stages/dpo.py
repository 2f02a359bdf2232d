"""Preference tuning (DPO): the stage, and the trainer hook that turns pairs of answers into a loss.

The stage needs the family's "preference" capability (every family has it), preference records
(``chosen`` and ``rejected`` answers), and refuses --packing. A batch holds B pairs as 2B rows,
each pair's chosen row then its rejected row (the family's preference collator): a group of 2
answers to one prompt, as GRPO's groups of G. Each row's log-probability counts only its answer
tokens and the end-of-turn token (its labels), through the same labelled-positions-only output
head as the SFT loss (``loss.py``): no full-vocabulary logits for image and prompt positions.
Chosen and rejected share the prompt and its images, so the vision tower runs once per pair: the
family's ``forward(..., group=2)`` encodes each pair's first row's images and hands the features
to both rows (remote code: through ``data["vision_hidden_states"]``, the published models' own way
of reusing them in ``generate``; native: as ``mm_encoder_outputs``, see families/native.py).

The reference policy: with LoRA, the same model with its adapters switched off (peft's
``disable_adapter``: no second copy); a full fine-tune, or ``--dpo_ref_model``, uses a frozen
model, under ZeRO-3 wrapped in its own DeepSpeed engine so it is sharded like the policy.
Everything else (saving, checkpoints, SIGTERM, resume, length grouping) is CPMTrainer's.
"""

import copy
import logging
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutput

import families
from families.base import unwrap_peft
from loss import DPO_LOSS_TYPES, IGNORE_INDEX, labelled_row_sums, loss_on_labelled, preference_loss
from stages import prepare
from stages.base import Stage, StoredMetrics
from trainer import CPMTrainer, register_zero3_external_parameters
from usage import UsageError

logger = logging.getLogger(__name__)

# What is logged next to the loss at every logging step (and with an eval_ prefix at evaluation).
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def prepare_reference(trainer, model, stage="DPO"):
    """A frozen reference ``model`` ready for ``trainer``'s forwards: on its device, or under ZeRO-3
    an inference engine sharded like the policy (``stage``'s: DPO's, GRPO's)."""
    model.requires_grad_(False)
    model.eval()
    if not (trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled()):
        # Not sharded (ZeRO-2 shards only gradients and optimizer states, which it has none of).
        return model.to(trainer.args.device)
    import deepspeed

    # Loaded partitioned (from_pretrained under ZeRO-3); an inference engine gathers each
    # layer's weights for its forward, as the policy's engine does.
    register_zero3_external_parameters(model)
    config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    hidden = model.config.hidden_size
    # The values transformers fills in for "auto" when it starts the policy's engine.
    automatic = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    zero = config["zero_optimization"]
    for key, value in automatic.items():
        if zero.get(key) == "auto":
            zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    logger.info("%s reference model: a ZeRO-3 inference engine, sharded like the policy", stage)
    return engine


class PreferenceTrainer(StoredMetrics, CPMTrainer):
    def __init__(self, *args, beta, loss_type, ref_model=None, **kwargs):
        """``ref_model``: a frozen reference model; None with LoRA (the policy without its adapters)."""
        super().__init__(*args, **kwargs)
        if ref_model is None and not isinstance(self.model, PeftModel):
            raise ValueError("a full fine-tune needs a reference model (a frozen copy of the starting weights)")
        # The loss is a mean over pairs, not over tokens: the Trainer scales it for gradient
        # accumulation itself (it does not when it believes the model normalised by token count).
        self.model_accepts_loss_kwargs = False
        self.beta = beta
        self.loss_type = loss_type
        self.ref_model = None if ref_model is None else prepare_reference(self, ref_model)

    def sequence_logps(self, model, inputs):
        """``(chosen, rejected)``: per pair, the summed log-probability of each answer's labelled
        tokens (averaged per token for the ipo loss), in fp32. The rows come in pairs, chosen then
        rejected (the family's preference collator); the family's forward encodes each pair's images
        once (``group=2``)."""
        labels = self.family.loss_labels(inputs["labels"])
        base = unwrap_peft(self.accelerator.unwrap_model(model))
        if self.full_logits_reason:
            logits = self.family.forward(model, inputs, base, group=2).logits
            losses = labelled_row_sums(torch.nn.Identity(), logits, labels, logits.size(-1))
        else:
            with loss_on_labelled(self.family.loss_module(base), labels, values="rows") as head:
                self.family.forward(model, inputs, base, group=2)
            losses = head.row_sums
        logps = -losses
        if self.loss_type == "ipo":
            logps = logps / labels.ne(IGNORE_INDEX).sum(dim=1).to(logps.device)
        return logps[0::2], logps[1::2]

    def reference_logps(self, model, inputs):
        with torch.no_grad():
            if self.ref_model is not None:
                return self.sequence_logps(self.ref_model, inputs)
            # The policy itself, adapters (and modules_to_save copies) switched off: the base model.
            peft_model = self.accelerator.unwrap_model(model)
            with peft_model.disable_adapter():
                return self.sequence_logps(peft_model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ref_chosen, ref_rejected = self.reference_logps(model, inputs)
        policy_chosen, policy_rejected = self.sequence_logps(model, inputs)
        loss, chosen, rejected = preference_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.loss_type
        )
        values = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float(),
        }
        if model.training:
            # The NaN/inf stop of SFT (resilience.NonFiniteLossGuard); the chosen rows' records name the pairs.
            self.loss_guard.note(loss, inputs["records"][0::2])
        self.store_metrics(model.training, {name: values[name] for name in METRICS})
        return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss


def load_reference(family, model_args, training_args, lora_args, config):
    """The DPO reference model (of ``family``): --dpo_ref_model, else a copy of the starting weights
    (None with LoRA: the policy with its adapters off is the reference)."""
    if training_args.dpo_ref_model:
        path = training_args.dpo_ref_model
        config = families.load_config(path, training_args.cache_dir)
    elif training_args.use_lora:
        return None
    else:
        path = model_args.model_name_or_path
    logger.info("DPO reference model: %s (frozen)", path)
    return prepare.load_model(family, path, training_args, lora_args, config)


@dataclass
class DPOArguments:
    """--stage dpo's own flags (stages/base.py: a stage's ``arguments``)."""

    dpo_beta: float = field(
        default=0.1, metadata={"help": "DPO: strength of the pull towards the reference model (beta)."}
    )
    dpo_loss_type: str = field(default="sigmoid", metadata={"help": f"DPO loss: one of {', '.join(DPO_LOSS_TYPES)}."})
    dpo_ref_model: str = field(
        default=None,
        metadata={"help": "DPO: folder or hub id of the reference model (default: the starting model itself, "
                  "with LoRA its adapters switched off)."},
    )


class DPO(Stage):
    name = "dpo"
    help = "preference tuning on records with 'chosen' and 'rejected' answers; see the README"
    requires = ("preference",)
    sample_kind = "preference"
    trainer_class = PreferenceTrainer
    arguments = DPOArguments
    folder_flags = {"dpo_ref_model": "the folder of the reference model (its config.json), or a hub id"}
    refuses = {
        "packing": "--packing applies to --stage sft: DPO scores each answer of a pair as a row of its own",
        "generate": "--eval_generate scores answers against an SFT record's assistant message; --stage dpo's eval "
        "records are preference pairs (its eval logs rewards/accuracies instead)",
    }

    def check_arguments(self, training_args):
        if training_args.dpo_beta <= 0:
            raise UsageError(f"--dpo_beta must be positive, not {training_args.dpo_beta}")
        if training_args.dpo_loss_type not in DPO_LOSS_TYPES:
            raise UsageError(
                f"--dpo_loss_type {training_args.dpo_loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}"
            )

    def check_lora(self, training_args, lora_args):
        if lora_args.lora_weight_path and not training_args.dpo_ref_model:
            raise UsageError(
                "--stage dpo with --lora_weight_path: the reference would be the base model without that adapter, "
                "not the model it makes; merge the adapter first (merge.py) and start from the merged model, or "
                "name the reference with --dpo_ref_model"
            )

    def trainer_kwargs(self, family, config, model_args, training_args, lora_args):
        return dict(
            beta=training_args.dpo_beta,
            loss_type=training_args.dpo_loss_type,
            ref_model=load_reference(family, model_args, training_args, lora_args, config),
        )
