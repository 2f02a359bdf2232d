"""GRPO (--stage grpo): learn from rewards of sampled answers (docs/GRPO.md is the design).

Data: SFT records whose last assistant message is the reference answer. Each step, every prompt
of the batch gets G answers sampled at --grpo_temperature by the family's ``sample`` (the
prompt's images encoded once), scored against the reference by evaluation/rewards.py (the
metrics of --grpo_rewards, plus --grpo_format_reward for a closed think block on a family whose
template thinks, when the references think), turned into group-normalised advantages
(loss.group_advantages), and learned through grpo_loss over the answers' per-token
log-probabilities at the sampling temperature: one forward of the G x B answered rows, the
vision features of each prompt computed once and reused for its G rows (the family's
``forward(..., group=G)``). One optimisation step per sampled batch: the sampler is the policy,
the old log-probabilities are the current ones detached (every ratio 1; the clip acts only on
reused batches, which this stage does not make). The KL term to the reference (--grpo_beta > 0):
with LoRA the policy with its adapters off, in a full fine-tune a frozen copy (as DPO's).

Sampling is seeded from (--seed, the global step, the micro-batch within it, the process), in
a random state of its own: a run resumed from a checkpoint samples the same answers.
"""

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutput

from data.errors import DataError
from data.layouts import wants_thinking
from data.preflight_report import Problem
from evaluation.metrics import METRICS as METRIC_REGISTRY, load_user_metrics
from evaluation.rewards import reward_function
from families.base import unwrap_peft
from loss import GRPO_LOSS_TYPES, IGNORE_INDEX, group_advantages, grpo_loss, labelled_token_logps, loss_on_labelled
from stages import prepare
from stages.base import Stage, StoredMetrics
from stages.dpo import prepare_reference
from trainer import CPMTrainer
from usage import UsageError

logger = logging.getLogger(__name__)


def keep_samples(samples):
    """The GRPO collator: the dataset's samples as they are (the trainer samples answers to their
    prompts and collates the answered rows itself)."""
    return {"samples": samples}


def parse_rewards(text):
    """``(names, weights)`` of --grpo_rewards: "em,f1" or with weights "em:1,f1:0.5"."""
    names, weights = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition(":")
        if name.strip() not in METRIC_REGISTRY:
            raise UsageError(f"--grpo_rewards: no metric named {name.strip()!r}; the known ones are "
                             f"{', '.join(sorted(METRIC_REGISTRY))}")
        try:
            weights.append(float(weight) if weight else 1.0)
        except ValueError:
            raise UsageError(f"--grpo_rewards: {item!r}: the weight after ':' is not a number") from None
        names.append(name.strip())
    if not names:
        raise UsageError("--grpo_rewards names no metric (e.g. em,f1 or em:1,f1:0.5)")
    return names, weights


def reference_answers(dataset, skip=()):
    """Per record index of ``dataset`` (preflight's: a Subset where bad records are skipped), its
    last assistant message: the reference answer. ``skip``: indices left out."""
    indices = getattr(dataset, "indices", None)
    dataset = getattr(dataset, "dataset", dataset)
    indices = range(len(dataset.records)) if indices is None else indices
    return {index: [m for m in dataset.records[index]["conversations"] if m["role"] == "assistant"][-1]["content"]
            for index in indices if index not in skip}


def thinks_in(family, processing, references):
    """Whether the rewards score answers as thoughts then an answer: the family's template thinks and
    some reference (``{index: answer}`` of the training data) has a think block."""
    return family.thinks(processing) and any(wants_thinking([answer]) for answer in references.values())


def sampling_seed(*parts):
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class GRPOTrainer(StoredMetrics, CPMTrainer):
    def __init__(self, *args, reward, references, num_generations, temperature, max_new_tokens, beta, clip_eps,
                 loss_type, ref_model=None, **kwargs):
        """``reward``: a RewardFunction; ``references``: record index -> reference answer;
        (``{"train": ..., "eval": ...}``); ``ref_model``: a frozen reference model, only with ``beta`` > 0 in a full fine-tune."""
        super().__init__(*args, **kwargs)
        self.data_collator = keep_samples
        if beta and ref_model is None and not isinstance(self.model, PeftModel):
            raise ValueError("a KL term in a full fine-tune needs a reference model (a frozen copy of the starting weights)")
        # "grpo" is a mean over answers: the Trainer scales it for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        self.reward, self.references = reward, references
        self.num_generations, self.temperature, self.max_new_tokens = num_generations, temperature, max_new_tokens
        self.beta, self.clip_eps, self.loss_type = beta, clip_eps, loss_type
        self.ref_model = None if ref_model is None else prepare_reference(self, ref_model, "GRPO")
        self._sampled_at = (None, 0)  # (global step, micro-batches sampled in it)

    @contextmanager
    def seeded_sampling(self, training):
        """A random state of its own for sampling, seeded from the seed, the step, the micro-batch in
        the step and the process: the same answers after a resume."""
        step, count = self._sampled_at
        count = count + 1 if step == self.state.global_step else 0
        self._sampled_at = (self.state.global_step, count)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sampling_seed(self.args.seed, training, step, count, self.args.process_index))
            yield

    def sample_answers(self, model, samples):
        network = self.accelerator.unwrap_model(model)
        training = network.training
        network.eval()
        try:
            with self.seeded_sampling(training), torch.no_grad():
                return self.family.sample(network, self.processing_class, samples, self.num_generations,
                                          self.temperature, self.max_new_tokens, synced=is_deepspeed_zero3_enabled())
        finally:
            network.train(training)

    def token_logps(self, model, batch, labels, base):
        """``[rows, length]``: each labelled token's log-probability at the sampling temperature."""
        group = self.num_generations
        if self.full_logits_reason:
            logits = self.family.forward(model, batch, base, group=group).logits
            return labelled_token_logps(torch.nn.Identity(), logits, labels, logits.size(-1), temperature=self.temperature)
        with loss_on_labelled(self.family.loss_module(base), labels, values="tokens", temperature=self.temperature) as head:
            self.family.forward(model, batch, base, group=group)
        return head.token_logps

    def reference_logps(self, model, batch, labels):
        with torch.no_grad():
            if self.ref_model is not None:
                base = unwrap_peft(self.accelerator.unwrap_model(self.ref_model))
                return self.token_logps(self.ref_model, batch, labels, base)
            peft_model = self.accelerator.unwrap_model(model)
            with peft_model.disable_adapter():
                return self.token_logps(peft_model, batch, labels, peft_model.get_base_model())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """An evaluation step: the loss and metrics (eval_reward, ...) of answers sampled to the eval
        prompts. The Trainer's own step would call the model on the batch, which holds samples and
        no labels."""
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        samples, group = inputs["samples"], self.num_generations
        answers = self.sample_answers(model, samples)
        tokenizer = self.family.tokenizer(self.processing_class)
        texts = [tokenizer.decode(answer, skip_special_tokens=True).strip() for answers_of in answers for answer in answers_of]
        records = [sample["record"] for sample in samples for _ in range(group)]
        references = [self.references["train" if model.training else "eval"][record["index"]] for record in records]
        rewards = self.reward(texts, references,
                              [record["id"] if record["id"] is not None else record["index"] for record in records])
        advantages = group_advantages(rewards, group)
        batch = self._prepare_inputs(self.family.answered_batch(self.processing_class, samples, answers,
                                                                self.args.model_max_length))
        labels = self.family.loss_labels(batch["labels"])
        mask = labels != IGNORE_INDEX
        base = unwrap_peft(self.accelerator.unwrap_model(model))
        logps = self.token_logps(model, batch, labels, base)
        ref_logps = self.reference_logps(model, batch, labels) if self.beta else None
        num_items = None
        if self.loss_type == "dapo":
            # This micro-batch's answer tokens over all processes, per process (DDP averages gradients).
            num_items = self.accelerator.gather(mask.sum().reshape(1)).sum() / self.accelerator.num_processes
        loss, metrics = grpo_loss(logps, logps.detach(), ref_logps, advantages.to(logps.device), mask,
                                  clip_eps=self.clip_eps, beta=self.beta, loss_type=self.loss_type, num_items=num_items)
        if model.training:
            self.loss_guard.note(loss, [sample["record"] for sample in samples])
        groups = rewards.view(-1, group)
        values = {"reward": rewards, "reward_std": groups.std(dim=1), "answer_length": mask.sum(dim=1).float(), **metrics}
        values.update({f"rewards/{name}": scores for name, scores in self.reward.scores(texts, references).items()})
        self.store_metrics(model.training, {name: value.to(self.args.device) for name, value in values.items()})
        return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss


def load_reference(family, model_args, training_args, lora_args, config):
    """GRPO's frozen reference: a copy of the starting weights in a full fine-tune with --grpo_beta > 0;
    None otherwise (no KL term, or LoRA: the policy with its adapters off)."""
    if not training_args.grpo_beta or training_args.use_lora:
        return None
    logger.info("GRPO reference model: %s (frozen)", model_args.model_name_or_path)
    return prepare.load_model(family, model_args.model_name_or_path, training_args, lora_args, config)


@dataclass
class GRPOArguments:
    """--stage grpo's own flags (stages/base.py: a stage's ``arguments``)."""

    grpo_num_generations: int = field(default=4, metadata={"help": "GRPO: answers sampled per prompt (G)."})
    grpo_temperature: float = field(default=1.0, metadata={"help": "GRPO: sampling temperature."})
    grpo_max_new_tokens: int = field(default=256, metadata={"help": "GRPO: most tokens of a sampled answer."})
    grpo_beta: float = field(
        default=0.0, metadata={"help": "GRPO: weight of the KL term to the reference model (0: no reference)."}
    )
    grpo_clip_eps: float = field(default=0.2, metadata={"help": "GRPO: clip range of the policy ratio."})
    grpo_loss_type: str = field(default="grpo", metadata={"help": f"GRPO loss: one of {', '.join(GRPO_LOSS_TYPES)}."})
    grpo_rewards: str = field(
        default="em", metadata={"help": "GRPO: the metrics the reward sums, with optional weights: em,f1 or em:1,f1:0.5."}
    )
    grpo_rewards_file: str = field(
        default=None,
        metadata={"help": "GRPO: a Python file of your own metrics, each a function (answer, reference) -> [0, 1] under "
                  "@metric('name') (from evaluation import metric), that --grpo_rewards may then name."},
    )
    grpo_format_reward: float = field(
        default=0.0, metadata={"help": "GRPO: reward for a closed <think>...</think> block (thinking models)."}
    )


class GRPO(Stage):
    name = "grpo"
    help = "learn from rewards of sampled answers to SFT records (their last answer the reference); see docs/GRPO.md"
    requires = ("generate",)
    trainer_class = GRPOTrainer
    arguments = GRPOArguments
    refuses = {
        "packing": "--packing applies to --stage sft: GRPO scores each sampled answer as a row of its own",
        "video": "--stage grpo samples answers to images and text; video is not supported",
    }

    def check_arguments(self, training_args):
        args = training_args
        if args.grpo_num_generations < 2:
            raise UsageError(f"--grpo_num_generations must be at least 2 (answers compared per prompt), not {args.grpo_num_generations}")
        for flag, value in (("grpo_temperature", args.grpo_temperature), ("grpo_max_new_tokens", args.grpo_max_new_tokens),
                            ("grpo_clip_eps", args.grpo_clip_eps)):
            if not value > 0:
                raise UsageError(f"--{flag} must be positive, not {value}")
        for flag, value in (("grpo_beta", args.grpo_beta), ("grpo_format_reward", args.grpo_format_reward)):
            if value < 0:
                raise UsageError(f"--{flag} must not be negative, not {value}")
        if args.grpo_loss_type not in GRPO_LOSS_TYPES:
            raise UsageError(f"--grpo_loss_type {args.grpo_loss_type!r} is not one of {', '.join(GRPO_LOSS_TYPES)}")
        if args.grpo_rewards_file:
            # --eval_metrics_file has loaded the same file already (arguments.py): its metrics are registered.
            loaded = args.eval_generate and args.eval_metrics_file and os.path.isfile(args.grpo_rewards_file) \
                and os.path.samefile(args.grpo_rewards_file, args.eval_metrics_file)
            if not loaded:
                load_user_metrics(args.grpo_rewards_file, flag="--grpo_rewards_file")
        parse_rewards(args.grpo_rewards)

    def check_lora(self, training_args, lora_args):
        if lora_args.lora_weight_path and training_args.grpo_beta:
            raise UsageError(
                "--stage grpo with --lora_weight_path and --grpo_beta > 0: the reference would be the base model "
                "without that adapter; merge the adapter first (merge.py) and start from the merged model"
            )

    def record_checks(self, family, processing, training_args):
        """Preflight's ``unscorable_reference``: a record whose reference (its last assistant message) a
        metric of --grpo_rewards cannot score (RewardFunction.unscorable), before any sampling."""
        names, weights = parse_rewards(training_args.grpo_rewards)

        def check(datasets, bad):
            references = {split: reference_answers(dataset, bad[split]) for split, dataset in datasets.items()}
            thinks = thinks_in(family, processing, references.get("train", {}))
            reward = reward_function(names, weights, 0.0, thinks)
            problems = []
            for split, answers in references.items():
                records = datasets[split].records
                for index, metric, reason in reward.unscorable(list(answers.items())):
                    error = DataError(
                        f"--stage grpo: its last assistant message is the reference answer, and metric {metric!r} "
                        f"cannot score it: {reason} (fix the reference or choose other --grpo_rewards)",
                        index=index, record_id=records[index].get("id"), data_path=datasets[split].data_path,
                        code="unscorable_reference",
                    )
                    problems.append(Problem.from_error(split, error))
            return problems

        return [check]

    def check_data(self, family, processing, checked, training_args):
        """On a family whose template thinks, the references think all or none; --grpo_format_reward
        needs them to. (Preflight has reported the references the rewards cannot score: record_checks.)"""
        references = {split: reference_answers(dataset) for split, dataset in checked.datasets.items() if dataset is not None}
        thinking = {index: wants_thinking([answer]) for index, answer in references["train"].items()}
        thinks = thinks_in(family, processing, references["train"])
        if thinks and not all(thinking.values()):
            plain = next(index for index, value in thinking.items() if not value)
            raise UsageError(f"--stage grpo: record {plain} of the training data answers without a think block where "
                             "others have one; the rewards score all answers one way: give every reference a "
                             "<think>...</think> block or none")
        names, weights = parse_rewards(training_args.grpo_rewards)
        if training_args.grpo_format_reward and not thinks:
            raise UsageError("--grpo_format_reward scores a <think>...</think> block: it needs a model whose chat "
                             "template thinks and references that think")
        self.reward = reward_function(names, weights, training_args.grpo_format_reward, thinks)
        self.references = references

    def trainer_kwargs(self, family, config, model_args, training_args, lora_args):
        return dict(
            reward=self.reward, references=self.references,
            num_generations=training_args.grpo_num_generations, temperature=training_args.grpo_temperature,
            max_new_tokens=training_args.grpo_max_new_tokens, beta=training_args.grpo_beta,
            clip_eps=training_args.grpo_clip_eps, loss_type=training_args.grpo_loss_type,
            ref_model=load_reference(family, model_args, training_args, lora_args, config),
        )
