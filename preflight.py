"""Preflight: check every record of the train and eval files before any model weights load.

Each record is built through its dataset's ``check`` (SupervisedDataset, PreferenceDataset, NativeDataset),
the very code path training runs
(structure checks, every image opened and fully decoded once, slicing layout, chat template,
tokenisation, truncation to ``model_max_length``), minus the image tensors. All problems are
gathered, not only the first: the console gets a table (reason -> count, first records) and
``<output_dir>/preflight_report.json`` gets every one. Then the run stops before the weights
load, or, with ``--skip_bad_samples``, trains without exactly the reported records.

Every rank checks its share of the records, with a pool of worker processes (default: its share
of the node's cores), and the results are gathered: every rank then holds all of them and drops
the same records, and the report, the bad records and the lengths are the same whatever the
number of ranks and workers. ``python finetune.py --preflight_only true ...`` runs the check alone (it needs the
model's config and tokenizer, not its weights), e.g. on a laptop.

The reasons, the table and the report are data/preflight_report.py's; the cache that lets a
restart reuse a check is data/preflight_cache.py's.
"""

import datetime
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import forkserver

import numpy as np
import torch.distributed as dist
from torch.utils.data import Subset
from tqdm import tqdm

from data.errors import DataError
from data.preflight_cache import CACHE_NAME, cache_key, load_cache, save_cache
from data.preflight_report import Problem, bad_indices, file_problem, report
from data.ranks import gather, world
from resilience import StopRun

logger = logging.getLogger(__name__)

REPORT_NAME = "preflight_report.json"
# What checking one record can raise besides DataError: a record is arbitrary JSON, and validation,
# image decoding, the tokenizer or the processor may fail on a value nothing foresaw (a RecursionError
# is a RuntimeError, a UnicodeError a ValueError). Each becomes that record's problem (check_failed),
# so one odd record never ends the check of the others with a traceback.
RECORD_ERRORS = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError, RuntimeError, OSError)
# Ranks wait this long for the others to finish their shares (default collectives time out
# after 10-30 minutes, less than a large dataset may need).
WAIT_FOR_CHECK = datetime.timedelta(hours=12)


class PreflightFailed(StopRun):
    """Bad records were found and the run must stop (exit status 1) before weights load."""


@dataclass
class Checked:
    """What preflight.run returns: ``datasets``, ``{split: dataset}`` as training should see them (a
    Subset without the bad records where they are skipped; None for a split not given), and
    ``lengths``, ``{split: each sample's token count as trained}``, aligned with that dataset's
    indices: what packing (data.packing.PackedDataset) and --group_by_length (CPMTrainer's
    ``train_lengths``) read instead of building every sample to measure it."""

    datasets: dict
    lengths: dict = field(default_factory=dict)


def check_range(dataset, split, start, stop):
    """Check records ``start`` to ``stop - 1`` of ``dataset``: a Share of them."""
    lengths = np.full(stop - start, -1, dtype=np.int32)
    problems, truncated, longest = [], [], 0
    for index in range(start, stop):
        try:
            info = dataset.check(index)
        except DataError as e:
            problems.append(Problem.from_error(split, e))
            continue
        except RECORD_ERRORS as e:
            logger.debug("checking %s record %d failed", split, index, exc_info=True)
            problems.append(Problem.from_error(split, unforeseen(dataset, index, e)))
            continue
        longest = max(longest, info["tokens"])
        lengths[index - start] = info["length"]
        if info["truncated"]:
            truncated.append(index)
    return Share(lengths, problems, truncated, longest)


@dataclass
class Share:
    """The check of consecutive records: each one's length as trained (-1: bad), the problems,
    the truncated records' indices and the longest token count before truncation."""

    lengths: np.ndarray
    problems: list
    truncated: list
    longest: int

    @classmethod
    def join(cls, shares):
        """The Share of consecutive shares, in their order."""
        shares = list(shares)
        return cls(
            np.concatenate([s.lengths for s in shares]) if shares else np.zeros(0, dtype=np.int32),
            [p for s in shares for p in s.problems],
            [i for s in shares for i in s.truncated],
            max((s.longest for s in shares), default=0),
        )


# A pool worker's datasets, set once as it starts (sent to it pickled, once): each task then names
# only a split and a range of records.
_worker_datasets = None


def _start_worker(datasets):
    global _worker_datasets
    _worker_datasets = datasets


def _check_task(task):
    split, start, stop = task
    return check_range(_worker_datasets[split], split, start, stop)


# A worker (worker_context) unpickles the datasets before it checks anything, and the first check of a
# process waits for the fork server to import torch and transformers: several seconds. At about 3 ms
# a record, a worker pays for that only with thousands of records, so the default gives each at
# least this many.
MIN_RECORDS_PER_WORKER = 2000


def default_workers(records):
    """Worker processes per rank for a share of ``records``: the cores this process may use, divided
    among the node's ranks, and no more than give each worker MIN_RECORDS_PER_WORKER records."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), records // MIN_RECORDS_PER_WORKER))


def script_module():
    """The name under which the running script (``finetune.py``) imports as a module, or None. A
    worker runs the script's top level again (its imports, as ``__mp_main__``); with the module
    imported in the fork server first, what it imports is there already. (Python 3.11's own preload
    of ``__main__`` never takes effect: the fork server is not told the script's path.)"""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is not None or not path:
        return None  # run as ``python -m NAME`` or interactively: a worker does not run it again
    folder, name = os.path.split(os.path.abspath(path))
    stem, suffix = os.path.splitext(name)
    if suffix != ".py" or not stem.isidentifier() or os.path.abspath(sys.path[0] or os.curdir) != folder:
        return None
    return stem


def worker_context():
    """The multiprocessing context the check's workers start from: a fork server. Not a fork of this
    process: a fork copies the locks of its threads (OpenMP's pool once torch has computed, logging,
    tokenizers) as they are, and a worker that needs one held at the fork waits forever (it did, in a
    process that had trained before: train() called twice, a notebook). Not a spawn either: every
    spawned worker imports torch, transformers and the script's modules again (about 8 CPU s each
    here). The fork server is a fresh, single-threaded interpreter that imports them once (this
    module and the script's, see script_module); each worker is a fork of it, and it stays for later
    checks. Where the fork server cannot start (its socket's path under a TMPDIR of over ~100
    characters is too long), the workers are spawned, and the log says why."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([name for name in (__name__, script_module()) if name])
    try:
        forkserver.ensure_running()
    except OSError as error:
        logger.warning("Preflight workers are spawned (each imports torch and transformers itself): the "
                       "fork server could not start: %s", error)
        return multiprocessing.get_context("spawn")
    return context


def rank_range(count, rank, world_size):
    """The records ``[start, stop)`` of ``count`` that rank ``rank`` checks: consecutive, sizes
    differing by at most one."""
    return count * rank // world_size, count * (rank + 1) // world_size


def check_shares(datasets, ranges, workers, *, progress=True):
    """``{split: Share}`` of the records ``ranges[split] = (start, stop)`` of each dataset, checked
    by ``workers`` processes (1: in this process). The records go to the workers in consecutive
    chunks, and their results come back in order."""
    total = sum(stop - start for start, stop in ranges.values())
    bar = tqdm(total=total, desc="preflight", unit="rec", disable=not progress, mininterval=1)
    chunk = max(1, min(256, total // (4 * workers) or 1))
    tasks = [
        (split, at, min(at + chunk, stop))
        for split, (start, stop) in ranges.items()
        for at in range(start, stop, chunk)
    ]
    results = {split: [] for split in ranges}
    if workers > 1 and len(tasks) > 1:
        context = worker_context()
        with context.Pool(min(workers, len(tasks)), initializer=_start_worker, initargs=(datasets,)) as pool:
            for task, share in zip(tasks, pool.imap(_check_task, tasks)):
                results[task[0]].append(share)
                bar.update(task[2] - task[1])
    else:
        for split, start, stop in tasks:
            results[split].append(check_range(datasets[split], split, start, stop))
            bar.update(stop - start)
    bar.close()
    return {split: Share.join(shares) for split, shares in results.items()}


def check_dataset(dataset, split, *, progress=True, workers=1):
    """Run ``dataset.check`` over every record (with ``workers`` processes, and every rank its
    share where a process group runs); return ``(problems, stats, lengths)``, where ``lengths[i]``
    is record i's token count as trained (None for a bad record).

    ``dataset`` may also be the DataError raised while reading its file: that is its one problem.
    """
    return check_everywhere({split: dataset}, progress=progress, workers=workers)[split]


def finish(dataset, split, share, seconds):
    """``(problems, stats, lengths)`` of a dataset's whole Share, as check_dataset returns them."""
    stats = dict(
        split=split,
        file=dataset.data_path,
        records=len(dataset),
        bad=len(share.problems),
        truncated=share.truncated,
        longest_tokens=share.longest,
        max_length=dataset.max_length,
        seconds=round(seconds, 3),
    )
    lengths = [None if length < 0 else length for length in share.lengths.tolist()]
    return share.problems, stats, lengths


def unforeseen(dataset, index, error):
    """The DataError (check_failed) naming record ``index`` of ``dataset`` for an ``error`` of RECORD_ERRORS."""
    record = dataset.records[index]
    return DataError(
        f"checking it raised {type(error).__name__}: {error}",
        index=index,
        record_id=record.get("id") if isinstance(record, dict) else None,
        data_path=dataset.data_path,
        code="check_failed",
    )


def check_everywhere(datasets, *, progress=True, workers=None):
    """Check every record of ``{split: dataset or DataError}``, each rank its share with a pool of
    ``workers`` processes (default_workers), and gather the shares: ``{split: (problems, stats,
    lengths)}`` as check_dataset returns them, the same on every rank and whatever the number of
    ranks. No record is checked twice; a rank reads only the records of its share."""
    rank, world_size = world()
    checked = {split: file_problem(split, dataset) for split, dataset in datasets.items() if isinstance(dataset, DataError)}
    checked |= {
        split: file_problem(split, DataError("the file holds no records", data_path=dataset.data_path, code="no_records"))
        for split, dataset in datasets.items()
        if split not in checked and not len(dataset)
    }
    todo = {split: dataset for split, dataset in datasets.items() if split not in checked}
    ranges = {split: rank_range(len(dataset), rank, world_size) for split, dataset in todo.items()}
    start = time.perf_counter()
    share_size = sum(stop - start for start, stop in ranges.values())
    mine = check_shares(todo, ranges, workers or default_workers(share_size), progress=progress)
    shares = gather((mine, time.perf_counter() - start), WAIT_FOR_CHECK)
    seconds = max(took for _, took in shares)  # the pass takes as long as its slowest rank
    for split, dataset in todo.items():
        checked[split] = finish(dataset, split, Share.join(share[split] for share, _ in shares), seconds)
    return {split: checked[split] for split in datasets}


def from_main(value):
    """The main process's ``value`` on every rank (``value`` without a process group)."""
    _, world_size = world()
    if world_size == 1:
        return value
    group = dist.new_group(backend="gloo", timeout=WAIT_FOR_CHECK)
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    return box[0]


def check_all(datasets, output_dir, *, skip_bad, preflight_only, progress=True, is_main=True, workers=None,
              cache=True, record_checks=()):
    """Check every dataset (every rank its share, see check_everywhere); on the main process log the
    table and write the report; return ``(bad_indices, {split: lengths})``, the same on every rank.

    ``record_checks``: each ``(datasets, bad) -> [Problem]``, more problems a run's settings find in
    records the per-record check passed (reference answers the metrics of --eval_generate or of
    --stage grpo's rewards cannot score); ``datasets`` are the splits whose file could be read,
    ``bad`` ``{split: indices of records already reported}``. Cheap, so never cached; every rank
    runs them and finds the same.

    With ``cache``, the result is also kept in ``<output_dir>/preflight_cache.json`` under
    cache_key, and a later call with the same key (a restart or a resume of the run) reuses it
    instead of checking again, and says so.
    """
    key = checked = None
    if cache:  # the main process alone reads (and later writes) the cache; the others get what it found
        key = cache_key(datasets) if is_main else None
        checked = from_main(load_cache(output_dir, key) if key else None)
    if checked is not None:
        if is_main:
            logger.info(
                "Preflight: the data files and settings are those an earlier check saw; its results are reused "
                "(%s; pass --preflight_cache false to check again)", os.path.join(output_dir, CACHE_NAME),
            )
    else:
        checked = check_everywhere(datasets, progress=progress and is_main, workers=workers)
        if key and is_main:
            save_cache(output_dir, key, checked)
    problems, stats, lengths = [], [], {}
    for split, (found, numbers, lengths[split]) in checked.items():
        problems += found
        stats.append(dict(numbers))
    bad = {split: {p.index for p in problems if p.split == split} for split in checked}
    readable = {split: datasets[split] for split in checked if None not in bad[split]}
    for check in record_checks:
        found = [p for p in check(readable, bad) if p.index not in bad[p.split]]
        problems += found
        for problem in found:
            bad[problem.split].add(problem.index)
            next(s for s in stats if s["split"] == problem.split)["bad"] += 1
    if is_main:
        report(problems, stats, os.path.join(output_dir, REPORT_NAME), skip_bad=skip_bad, preflight_only=preflight_only)
    return bad_indices(problems, datasets), lengths


def run(datasets, output_dir, *, skip_bad=False, preflight_only=False, is_main=True, workers=None, cache=True,
        record_checks=()):
    """Check ``{split: SupervisedDataset or None}``; return a Checked: the datasets as training should
    see them and their samples' lengths.

    A split's value may also be the DataError its file raised when read (``data.sources.load``):
    it is reported like a bad record, and always stops the run. Raises PreflightFailed (exit
    status 1) on every rank if any record is bad, unless ``skip_bad``: then each dataset comes
    back as a Subset without exactly the bad records (original indices still name records in
    later errors). ``preflight_only`` always stops after the check: with status 1 if anything
    is bad, else PreflightFailed is not raised and the caller should return. ``record_checks``: see check_all.
    """
    present = {split: dataset for split, dataset in datasets.items() if dataset is not None}
    bad, lengths = check_all(present, output_dir, skip_bad=skip_bad, preflight_only=preflight_only, is_main=is_main,
                             workers=workers, cache=cache, record_checks=record_checks)
    report = os.path.join(output_dir, REPORT_NAME)
    unusable = [split for split, indices in bad.items() if indices is None]
    if unusable:
        message = f"Preflight: the {' and '.join(unusable)} data file cannot be used (see {report})"
        logger.error("%s", message)
        raise PreflightFailed(message)
    count = sum(len(indices) for indices in bad.values())
    if count and (preflight_only or not skip_bad):
        hint = "" if preflight_only else "; fix them, or pass --skip_bad_samples true to train without them"
        message = f"Preflight: {count} unusable records (see {report}){hint}"
        logger.error("%s", message)
        raise PreflightFailed(message)
    checked = Checked(dict(datasets), {split: lengths[split] for split in present})
    for split, indices in bad.items():
        if indices:
            dataset = present[split]
            dropped = set(indices)
            kept = [i for i in range(len(dataset)) if i not in dropped]
            checked.datasets[split] = Subset(dataset, kept)
            checked.lengths[split] = [lengths[split][i] for i in kept]
            if not kept:
                message = f"--skip_bad_samples: all {len(dataset)} {split} records are unusable; nothing is left"
                logger.error("%s", message)
                raise PreflightFailed(message)
            logger.warning(
                "--skip_bad_samples: dropping %d of %d %s records flagged by preflight; training on %d",
                len(dropped), len(dataset), split, len(kept),
            )
    return checked
