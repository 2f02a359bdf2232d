"""Scored evaluation during training (--eval_generate N --eval_metrics em,f1).

At each evaluation the model answers the first question of the first N eval records (as trained:
records preflight dropped with --skip_bad_samples are not among them), laid out as in training and
infer.py (evaluation/answers.py); the answers are scored against each record's first assistant
message (evaluation/report.py), the means are logged as ``eval_<metric>`` beside ``eval_loss``, and
the main process writes ``OUTPUT_DIR/eval_answers/step-K.jsonl``.

Every process answers an equal share (the last padded with repeats of the last record, whose answers
are dropped), --per_device_eval_batch_size prompts per generate call where the family batches them
(families' generate_batch: the remote-code 2.6, o-2.6 and 4.x; the others one at a time). Under
DeepSpeed ZeRO-3 each forward gathers the layers' weights in a collective, so every process must run
the same number of generate calls (transformers' generate then keeps the
processes in step token by token, ``synced_gpus``). The answers are gathered to every process, so all
log the same means.

Before any weights load, preflight asks ``unscorable_problems`` which of those records a metric
cannot score (reason ``unscorable_reference``), so a run does not stop at its first evaluation.
"""

import logging
import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import Subset

from data.errors import DataError
from data.preflight_report import Problem
from evaluation.answers import answered, generate_answers, question_dataset, reference
from evaluation.report import score, unscorable, write_jsonl

logger = logging.getLogger(__name__)

ANSWERS_FOLDER = "eval_answers"  # in --output_dir: step-K.jsonl per evaluation


def answers_path(output_dir, step):
    return os.path.join(output_dir, ANSWERS_FOLDER, f"step-{step}.jsonl")


def unscorable_problems(dataset, bad, count, metric_names, split="eval"):
    """The preflight Problems (``unscorable_reference``) of the records --eval_generate would answer:
    walking the records of ``dataset`` in order, those not in ``bad`` (already reported), until
    ``count`` records with a reference every metric can score are found. With --skip_bad_samples the
    reported ones are dropped, and the first ``count`` kept records are exactly those found.
    ``metric_names``: a list, or "em,f1"."""
    problems, scorable = [], 0
    for index in range(len(dataset)):
        if scorable == count:
            break
        if index in bad:
            continue
        record = dataset.records[index]
        reasons = [f"metric {name!r} cannot score it: {reason}"
                   for _, name, reason in unscorable([(index, reference(record))], metric_names)]
        if not reasons:
            scorable += 1
            continue
        error = DataError(
            f"--eval_generate: its first assistant message is the reference answer, and {'; '.join(reasons)} "
            "(fix the reference or choose other --eval_metrics)",
            index=index, record_id=record.get("id"), data_path=dataset.data_path, code="unscorable_reference",
        )
        problems.append(Problem.from_error(split, error))
    return problems


def trained_records(dataset, count):
    """``[(index in the eval file, record)]`` of the first ``count`` records of the eval set as trained
    (a Subset without preflight's dropped records, or the whole dataset)."""
    if isinstance(dataset, Subset):
        return [(index, dataset.dataset.records[index]) for index in dataset.indices[:count]]
    return [(index, dataset.records[index]) for index in range(min(count, len(dataset)))]


def share(count, rank, world_size):
    """``[(position, padded)]``: the positions of ``count`` items this process answers, consecutive,
    every process as many (the last padded with repeats of the last item, ``padded`` True)."""
    size = math.ceil(count / world_size)
    return [(min(position, count - 1), position >= count) for position in range(rank * size, (rank + 1) * size)]


class ScoredEvaluation:
    """--eval_generate: what CPMTrainer runs at each evaluation (``run``)."""

    def __init__(self, family, processing, config, eval_dataset, settings, *, count, metric_names, max_new_tokens,
                 output_dir, batch_size=1):
        """``eval_dataset``: the eval set as trained (preflight.Checked); ``settings``: the keywords the
        family's make_dataset got for it (stages/prepare.dataset_settings); ``batch_size``: prompts per
        generate call (--per_device_eval_batch_size), where the family batches them."""
        self.family, self.processing = family, processing
        self.records = trained_records(eval_dataset, count)
        if len(self.records) < count:
            logger.warning("--eval_generate %d: the eval set has %d records; all are answered", count,
                           len(self.records))
        self.dataset = question_dataset(family, [record for _, record in self.records], processing, config, **settings)
        self.metric_names, self.max_new_tokens, self.output_dir = metric_names, max_new_tokens, output_dir
        self.batch_size = batch_size

    def answer_share(self, model, device, rank, world_size):
        """``[(position, answer)]`` of this process's share (padding left out), the model in eval mode
        without gradients (its training mode restored after)."""
        positions = share(len(self.records), rank, world_size)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                answers = generate_answers(self.family, model, self.processing, self.dataset,
                                           [position for position, _ in positions], device, self.max_new_tokens,
                                           self.batch_size)
        finally:
            model.train(was_training)
        return [(position, answer) for (position, padded), answer in zip(positions, answers, strict=True) if not padded]

    def run(self, model, args, step):
        """Answer, gather, score; the main process writes the report. Returns ``{metric: mean}``."""
        mine = self.answer_share(model, args.device, args.process_index, args.world_size)
        if args.world_size > 1:
            shares = [None] * args.world_size
            dist.all_gather_object(shares, mine)
            mine = [item for part in shares for item in part]
        answers = dict(mine)
        rows = [answered(record, index, answers[position]) for position, (index, record) in enumerate(self.records)]
        report = score(rows, self.metric_names)
        if args.should_save:
            path = answers_path(self.output_dir, step)
            write_jsonl(report, path)
            logger.info("Scored answers at step %d (%s): %s", step, path,
                        ", ".join(f"{name} {mean:.4f}" for name, mean in report.means.items()))
        return report.means
