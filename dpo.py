"""Preference tuning (DPO): the trainer hook that turns pairs of answers into a loss.

A batch holds B pairs as 2B rows (``dataset.PreferenceCollator``: chosen rows, then rejected).
Each row's log-probability counts only its answer tokens and the end-of-turn token (its
labels), through the same labelled-positions-only output head as the SFT loss (``loss.py``):
no full-vocabulary logits for image and prompt positions. Chosen and rejected share the
prompt and its images, so the vision tower runs once per pair: the remote-code models'
``get_vllm_embedding`` returns the vision features it computed, and takes them back through
``data["vision_hidden_states"]`` (the published models' own way of reusing them in
``generate``), so the 2B-row forward reuses the B pairs' features.

The reference policy: with LoRA, the same model with its adapters switched off (peft's
``disable_adapter``: no second copy); a full fine-tune, or ``--dpo_ref_model``, uses a frozen
model, under ZeRO-3 wrapped in its own DeepSpeed engine so it is sharded like the policy.
Everything else (saving, checkpoints, SIGTERM, resume, length grouping) is CPMTrainer's.
"""

import copy
import logging
from collections import defaultdict

import torch
from peft import PeftModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutput

from loss import IGNORE_INDEX, labelled_row_sums, loss_on_labelled, preference_loss
from trainer import CPMTrainer, register_zero3_external_parameters

logger = logging.getLogger(__name__)

# What is logged next to the loss at every logging step (and with an eval_ prefix at evaluation).
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def unsupported_reason(config):
    """Why --stage dpo cannot train the model of ``config``, or None."""
    if not getattr(config, "auto_map", None):
        return (
            f"{getattr(config, 'model_type', type(config).__name__)} is a natively supported checkpoint; preference "
            "tuning reuses vision features through the remote-code models' forward(data=...) "
            "(data['vision_hidden_states']), which native models do not have: --stage dpo supports the "
            "remote-code MiniCPM-V 2.0, Llama3-V 2.5, 2.6, o-2.6 and 4.x for now"
        )
    return None


class PreferenceTrainer(CPMTrainer):
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
        self.ref_model = None if ref_model is None else self._prepare_reference(ref_model)
        self.stored_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _prepare_reference(self, model):
        model.requires_grad_(False)
        model.eval()
        if not (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()):
            # Not sharded (ZeRO-2 shards only gradients and optimizer states, which it has none of).
            return model.to(self.args.device)
        import deepspeed

        # Loaded partitioned (from_pretrained under ZeRO-3); an inference engine gathers each
        # layer's weights for its forward, as the policy's engine does.
        register_zero3_external_parameters(model)
        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
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
        logger.info("DPO reference model: a ZeRO-3 inference engine, sharded like the policy")
        return engine

    def sequence_logps(self, model, inputs):
        """``(chosen, rejected)``: per pair, the summed log-probability of each answer's labelled
        tokens (averaged per token for the ipo loss), in fp32."""
        labels = inputs["labels"]
        pairs = len(inputs["pixel_values"])
        network = self.accelerator.unwrap_model(model)
        network = network.get_base_model() if isinstance(network, PeftModel) else network
        prompt = {key: inputs[key][:pairs] for key in ("input_ids", "position_ids", "image_bound", "image_bounds", "tgt_sizes")}
        prompt["pixel_values"] = self.backend.model_pixels(inputs["pixel_values"], network)
        _, vision = network.get_vllm_embedding(prompt)  # the vision tower, once per pair
        data = {**inputs, "vision_hidden_states": list(vision) * 2}
        if self.full_logits_reason:
            logits = model(data=data, use_cache=False).logits
            losses = labelled_row_sums(torch.nn.Identity(), logits, labels, logits.size(-1))
        else:
            with loss_on_labelled(network.llm, labels, per_row=True) as head:
                model(data=data, use_cache=False)
            losses = head.row_sums
        logps = -losses
        if self.loss_type == "ipo":
            logps = logps / labels.ne(IGNORE_INDEX).sum(dim=1).to(logps.device)
        return logps[:pairs], logps[pairs:]

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
            # The NaN/inf stop of SFT (resilience.NonFiniteLossGuard); the first B of the 2B rows'
            # records name the B pairs.
            self.loss_guard.note(loss, inputs["records"][: len(inputs["records"]) // 2])
        stored = self.stored_metrics["train" if model.training else "eval"]
        for name in METRICS:
            stored[name].append(self.accelerator.gather(values[name]).mean().item())
        return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss

    def log(self, logs, start_time=None):
        # The means of what compute_loss stored since the last log: every step's for a training
        # log, the whole evaluation's (eval_ prefix) for an evaluation's.
        split = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if split is not None:
            prefix = "" if split == "train" else "eval_"
            for name, values in self.stored_metrics[split].items():
                logs[prefix + name] = sum(values) / len(values)
            self.stored_metrics[split].clear()
        super().log(logs, start_time)
