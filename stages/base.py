"""The Stage interface, and the run every stage shares: setup -> train -> cleanup.

A stage declares its name, the capabilities it requires of the family (families/base.CAPABILITIES),
the sample kind its data needs ("sft" records or "preference" pairs: the family lays them out and
gives their collator), its own command-line flags and their checks, what it cannot give a flag
(``refuses``), and its trainer. ``refusal`` is the one place a run is refused for what the stage or
the family cannot do: arguments.py asks it at parse time (no family yet), ``setup`` asks it again with
the family before anything loads, and once more with the loaded model (packing's attention).
"""

import dataclasses
import logging
from collections import defaultdict

import transformers

import distributed
import loading
import lora
import resilience
from families.base import packing_attention_problem
from stages import prepare
from trainer import CPMTrainer, StopAtEvalLoss
from usage import UsageError

logger = logging.getLogger(__name__)


class StoredMetrics:
    """A CPMTrainer mixin: what ``compute_loss`` stores (``store_metrics``) is logged next to the loss,
    the means since the last log: every step's for a training log, the whole evaluation's (with an
    eval_ prefix) for an evaluation's."""

    def store_metrics(self, training, values):
        """``values``: name -> tensor of this process, gathered over processes."""
        if not hasattr(self, "stored_metrics"):
            self.stored_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        stored = self.stored_metrics["train" if training else "eval"]
        for name, value in values.items():
            stored[name].append(self.accelerator.gather(value.detach().float().reshape(-1)).mean().item())

    def log(self, logs, start_time=None):
        split = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if split is not None and hasattr(self, "stored_metrics"):
            prefix = "" if split == "train" else "eval_"
            for name, values in self.stored_metrics[split].items():
                logs[prefix + name] = sum(values) / len(values)
            self.stored_metrics[split].clear()
        super().log(logs, start_time)


class Stage:
    name = None
    help = ""  # what it learns, for --stage's help
    requires = ()  # capabilities the family must have
    sample_kind = "sft"
    trainer_class = CPMTrainer
    # A dataclass of the flags only this stage reads (each field with its default and help), or None:
    # arguments.parse_args parses every registered stage's and sets them on TrainingArguments; other
    # stages refuse them.
    arguments = None
    folder_flags = {}  # own flags that name a model folder -> what it must hold (arguments.check_paths)
    refuses = {}  # capability -> why this stage cannot give it, whatever the family

    @classmethod
    def own_flags(cls):
        """This stage's own flags: its ``arguments`` dataclass's fields."""
        return dataclasses.fields(cls.arguments) if cls.arguments is not None else ()

    def check_arguments(self, training_args):
        """Parse-time checks of this stage's own flags (UsageError)."""

    def check_lora(self, training_args, lora_args):
        """Parse-time checks of the LoRA settings with this stage (UsageError)."""

    def record_checks(self, family, processing, training_args):
        """Checks of records that only this stage makes, run by preflight after its own (each
        ``(datasets, bad) -> [Problem]``, see preflight.check_all): reported and skipped like any
        bad record."""
        return []

    def check_data(self, family, processing, checked, training_args):
        """Checks of the data (preflight's ``checked``) that only this stage makes, before any weights
        load (UsageError naming the records)."""

    def needs(self, training_args, data_args=None):
        """The capabilities this run asks of the family: the stage's own, then those its flags ask for."""
        needed = list(self.requires)
        if training_args.packing:
            needed.append("packing")
        if training_args.eval_generate:
            needed.append("generate")
        if data_args is not None and (data_args.max_num_frames is not None or data_args.stack_frames is not None):
            needed.append("video")
        return needed

    def refusal(self, training_args, data_args=None, family=None, model=None):
        """Why this run cannot go on, or None: asked of the stage, then of ``family``, then of its
        loaded ``model``, as far as they are known."""
        for capability in self.needs(training_args, data_args):
            if capability in self.refuses:
                return self.refuses[capability]
            reason = family and family.refusal(capability)
            if reason:
                return f"--stage {self.name}: {reason}" if capability in self.requires else reason
        if model is not None and training_args.packing:
            return packing_attention_problem(family.loss_module(model))
        return None

    def refuse(self, training_args, data_args=None, family=None, model=None):
        reason = self.refusal(training_args, data_args, family, model)
        if reason:
            raise UsageError(reason)

    def trainer_kwargs(self, family, config, model_args, training_args, lora_args):
        """The keyword arguments this stage's trainer takes beyond CPMTrainer's."""
        return {}

    def run(self, family, config, model_args, data_args, training_args, lora_args, resume_from, earlier_checkpoints):
        """Train ``family``'s checkpoint as the arguments say and save the result; the trainer, or
        None with --preflight_only. ``resume_from``: the checkpoint arguments.check_paths resolved;
        ``earlier_checkpoints``: those an earlier run left in the folder (run_folder.claim)."""
        trainer = self.setup(family, config, model_args, data_args, training_args, lora_args, earlier_checkpoints)
        if trainer is None:
            return None
        self.train(trainer, training_args, resume_from)
        self.cleanup(trainer, training_args)
        return trainer

    def setup(self, family, config, model_args, data_args, training_args, lora_args, earlier_checkpoints):
        """Everything up to the trainer, failing fast: refusals, data and preflight, then the model."""
        # Before the model exists: LoRA's initial weights are drawn when the adapter is added, and
        # the Trainer seeds only later, when it is created.
        transformers.set_seed(training_args.seed)
        self.refuse(training_args, data_args, family)
        if training_args.use_lora:
            lora.modules_to_save(family, training_args, lora_args)  # refuses a list that leaves the tuned vision out
        processing = family.load_processing(model_args.model_name_or_path, training_args.cache_dir)
        checked = prepare.prepare_data(family, data_args, training_args, processing, config, self.sample_kind,
                                       self.record_checks(family, processing, training_args))
        self.check_data(family, processing, checked, training_args)
        if data_args.preflight_only:
            return None
        train_dataset, train_lengths = checked.datasets["train"], checked.lengths["train"]
        if training_args.packing:
            train_dataset = prepare.pack(train_dataset, train_lengths, training_args)
            train_lengths = train_dataset.lengths  # the rows' token counts, for --group_by_length
        model = prepare.load_model(family, model_args.model_name_or_path, training_args, lora_args, config)
        self.refuse(training_args, data_args, family, model)
        model = prepare.adapt_model(family, model, training_args, lora_args)
        callbacks = [resilience.PreemptionCallback()]
        if training_args.stop_at_eval_loss is not None:
            callbacks.append(StopAtEvalLoss(training_args.stop_at_eval_loss))
        trainer = self.trainer_class(
            model=model,
            args=training_args,
            family=family,
            train_dataset=train_dataset,
            train_lengths=train_lengths,
            eval_dataset=checked.datasets["eval"],
            processing_class=processing,
            data_collator=family.collator(self.sample_kind, processing, training_args.model_max_length),
            model_source=loading.model_source_dir(model_args.model_name_or_path, training_args.cache_dir),
            callbacks=callbacks,
            earlier_checkpoints=earlier_checkpoints,
            scored_evaluation=prepare.scored_evaluation(family, processing, config, checked, data_args, training_args),
            **self.trainer_kwargs(family, config, model_args, training_args, lora_args),
        )
        distributed.check_engine(trainer, training_args)
        return trainer

    def train(self, trainer, training_args, resume_from):
        trainer.train(resume_from_checkpoint=resume_from)

    def cleanup(self, trainer, training_args):
        """What a finished run leaves: the trainer state and the final model in --output_dir."""
        trainer.save_state()
        trainer.save_model(training_args.output_dir)
