"""CPMTrainer: the three places where MiniCPM-V differs from a plain causal LM.

1. Loss. The remote-code MiniCPM-V's ``forward(data=...)`` takes the whole batch dict (ids,
   images, image bounds) and ignores ``labels``, so the loss is computed here, and for the native
   models the same way (one token-weighted loss for every family). The model's family (families/)
   calls the model and aligns the labels with the positions that predict them (``dataset.py``
   stores them shifted already; the native family's ``loss_labels`` shifts theirs), so the cross-entropy compares
   outputs and labels position by position. The output head runs on the labelled positions only
   (``loss.py``); full logits are made only where metrics need them or the model cannot take
   that path.
2. Saving. A full fine-tune must be loadable on its own: for remote-code models the model's
   remote-code files (and processor files) travel with every saved folder (final model and
   checkpoints), with the repairs that published remote code needs on current transformers
   (``loading.write_repaired_classes``); native models need only their processor, which the
   Trainer saves as the processing class.
3. Checkpoints. A crash during a save must not leave an unusable "latest" checkpoint, and
   ``--resume_from_checkpoint`` must pick a complete one (``arguments.check_paths`` resolves it, see
   ``resilience.py``; ``train`` takes the folder it found).

Everything else (the loop, gradient accumulation, DeepSpeed, checkpoints, evaluation) is the
stock ``transformers.Trainer``.
"""

import logging
import os

import torch
import transformers
from peft import PeftModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.modeling_outputs import CausalLMOutput

import loading
import resilience
from data.errors import DataError
from families import family_for
from families.base import unwrap_peft
from loss import full_logits_reason, labelled_count, loss_on_labelled, token_loss

logger = logging.getLogger(__name__)

def register_zero3_external_parameters(model):
    """Let ZeRO-3 gather parameters that are used outside their own module's forward.

    ``nn.MultiheadAttention`` (the resampler's attention) reads ``out_proj.weight`` and
    ``out_proj.bias`` directly in ``F.multi_head_attention_forward``; ``out_proj.forward`` never
    runs, so ZeRO-3's module hooks would leave those partitioned (empty) during the forward.
    Registering them as external parameters of the attention module makes DeepSpeed gather
    them for that module's forward and backward.
    """
    import deepspeed

    registered = 0
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            for param in module.out_proj.parameters():
                deepspeed.zero.register_external_parameter(module, param)
                registered += 1
    return registered


def drop_unused_weight_conversions(model):
    """Make a ZeRO-3 save write the model's own parameter names.

    transformers (5.24) loading under ZeRO-3 keeps every weight renaming it knows for the model
    as the ones applied (its other loading path keeps only those that matched a checkpoint
    name), and saving reverts them: a native model's folder came out with
    ``model.language_model.model.language_model.*`` keys, which it cannot load. Kept: those used.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        # Older transformers (5.3) record no use: their conversions stay as they are.
        model._weight_conversions = [
            conversion for conversion in conversions if not hasattr(conversion, "was_used") or conversion.was_used()
        ]


class CPMTrainer(transformers.Trainer):
    def __init__(self, *args, family=None, model_source=None, earlier_checkpoints=(), train_lengths=None,
                 scored_evaluation=None, **kwargs):
        """``family``: the model's (families/; default: the registry's answer for its config).
        ``model_source``: folder of the base model, whose remote code full saves copy.
        ``earlier_checkpoints``: names of checkpoints an earlier run left in the output folder
        (run_folder.claim), which --save_total_limit must not delete. ``train_lengths``: each
        training sample's token count as preflight measured it (preflight.Checked.lengths, or a
        PackedDataset's rows'), which --group_by_length groups by. ``scored_evaluation``: --eval_generate's
        (evaluation/during_training.py), run at each evaluation."""
        super().__init__(*args, **kwargs)
        self.train_lengths = train_lengths
        self.scored_evaluation = scored_evaluation
        self.earlier_checkpoints = set(earlier_checkpoints)
        self.rotation_limit = self.args.save_total_limit  # applied by _save_checkpoint (see train)
        self.family = family = family or family_for(unwrap_peft(self.model).config)
        self.model_source = model_source
        self.loss_guard = resilience.NonFiniteLossGuard()
        self.add_callback(self.loss_guard)
        if is_deepspeed_zero3_enabled():
            count = register_zero3_external_parameters(self.model)
            logger.info("ZeRO-3: registered %d attention output parameters for gathering", count)
            drop_unused_weight_conversions(unwrap_peft(self.model))
            family.prepare_zero3(unwrap_peft(self.model))
        self.full_logits_reason = full_logits_reason(family.loss_module(unwrap_peft(self.model)))
        if self.full_logits_reason:
            logger.warning("Loss from full logits over every position: %s", self.full_logits_reason)

    token_loss = staticmethod(token_loss)

    def _get_train_sampler(self, train_dataset=None):
        # The stock Trainer reads lengths only from a `datasets` column and otherwise builds every
        # sample (images decoded, sliced, turned into tensors) to measure it; preflight has
        # already measured each record.
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length":
            if self.train_lengths is not None:
                return LengthGroupedSampler(
                    self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=self.train_lengths
                )
            logger.warning("Length grouping without preflight's lengths: every sample is built once to measure it")
        return super()._get_train_sampler(train_dataset)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # A record that fails to build now (an image deleted since preflight) stops every rank
        # together, naming the record, before any rank enters a collective of the step (the
        # Trainer's count of learned tokens is one): the step's batches are fetched first.
        fetched, failure = [], None
        try:
            for _ in range(num_batches):
                fetched.append(next(epoch_iterator))
        except StopIteration:
            pass  # the epoch's end: the Trainer sees it from the shorter list
        except DataError as e:
            failure = e
        if resilience.any_rank(failure is not None, self.args):
            if failure is not None:
                message = (
                    f"{failure}. It passed preflight before training: the file changed or vanished since. Restore it "
                    f"(or fix the record) and continue with --resume_from_checkpoint {self.args.output_dir}"
                )
            else:
                message = f"rank {self.args.process_index} stops: a record of another rank's batch failed to build"
            logger.error("%s", message)
            raise resilience.RecordFailed(message) from failure
        return super().get_batch_samples(iter(fetched), num_batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = self.family.loss_labels(inputs["labels"])
        # The Trainer counts the learned tokens of the whole accumulated batch (it does for models
        # whose forward takes **kwargs, as MiniCPM-V's does), so every token weighs the same
        # however the batch was split. Without that count, this micro-batch's own count is used
        # and the Trainer divides by the accumulation steps.
        num_items = labelled_count(labels) if num_items_in_batch is None else num_items_in_batch
        base = unwrap_peft(self.accelerator.unwrap_model(model))
        # A PeftModel forwards keyword arguments to the base model inside its LoRA hooks.
        if self.full_logits_reason or (return_outputs and self.compute_metrics is not None):
            # Logits leave compute_loss only for compute_metrics (see prediction_step).
            outputs = self.family.forward(model, inputs, base)
            loss = self.token_loss(outputs.logits, labels, num_items)
        else:
            with loss_on_labelled(self.family.loss_module(base), labels) as head:
                self.family.forward(model, inputs, base)
            loss = head.loss_sum / num_items
            outputs = CausalLMOutput(loss=loss)
        if model.training:
            self.loss_guard.note(loss, inputs["records"])
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # That count is summed over processes, and DDP averages gradients over them.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Logits are only of use to compute_metrics. Without it, the reference launchers'
        # --prediction_loss_only false would gather [batch, length, vocab] logits of the whole
        # eval set into memory (hundreds of GB for a 150k vocabulary).
        if self.compute_metrics is None:
            prediction_loss_only = True
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # The scores join the loss in the metrics that evaluate() logs (trainer_state.json's log_history,
        # TensorBoard) and hands to the callbacks; predict() ("Prediction") gets none.
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.scored_evaluation is not None and description == "Evaluation":
            means = self.scored_evaluation.run(self.model, self.args, self.state.global_step)
            output.metrics.update({f"{metric_key_prefix}_{name}": mean for name, mean in means.items()})
        return output

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``resume_from_checkpoint``: a complete checkpoint folder (arguments.check_paths resolves the flag)."""
        # The rotation is resilience's (_save_checkpoint): it spares an earlier run's checkpoints and
        # deletes the commit record first. The Trainer sees no limit while it trains, so neither its
        # rotation nor its clean-up at the end (save_total_limit 1 with load_best_model_at_end deletes
        # every checkpoint-* but the best) takes a checkpoint this run did not write.
        self.rotation_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.args.save_total_limit = self.rotation_limit

    def _save_checkpoint(self, model, trial):
        folder = resilience.checkpoint_folder(self._get_output_dir(trial=trial), self.state.global_step)
        if self.args.should_save:
            resilience.remove_stale(folder)
        self.accelerator.wait_for_everyone()
        with resilience.explain_disk_full(folder):
            super()._save_checkpoint(model, trial)
        if self.args.should_save:
            resilience.rotate_checkpoints(
                os.path.dirname(folder), self.rotation_limit, keep=self.earlier_checkpoints,
                best=self.state.best_model_checkpoint,
            )

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        # The last files every rank writes to a checkpoint.
        self._files_written(output_dir)

    def _files_written(self, output_dir):
        """Once every rank's files of a checkpoint are on disk, the main process lists them; then
        the Trainer writes trainer_state.json, which marks the checkpoint complete
        (resilience.is_complete)."""
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            resilience.write_manifest(output_dir)

    def save_model(self, output_dir=None, _internal_call=False):
        output_dir = output_dir or self.args.output_dir
        with resilience.explain_disk_full(output_dir):
            super().save_model(output_dir, _internal_call=_internal_call)
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and self.model_source is not None and not isinstance(model, PeftModel):
            self.family.save_extras(self.model_source, output_dir)
        elif self.args.should_save and self.model_source is not None:
            # An adapter folder: the saved tokenizer's auto_map may name files only the model folder holds.
            loading.copy_named_files(self.model_source, output_dir)
        if _internal_call and self.args.save_only_model:
            # A model-only checkpoint: no optimizer or RNG files follow (the Trainer skips
            # _save_rng_state), so its files are all written now.
            self._files_written(output_dir)


class StopAtEvalLoss(transformers.TrainerCallback):
    """--stop_at_eval_loss: end training at the first evaluation whose loss is below the threshold (every
    rank sees the same gathered loss, so all stop at the same step); the final model is saved as usual."""

    def __init__(self, threshold):
        self.threshold = threshold

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and loss < self.threshold:
            logger.info("Eval loss %.5f < %g at step %d: training stops (--stop_at_eval_loss)",
                        loss, self.threshold, state.global_step)
            control.should_training_stop = True
        return control
