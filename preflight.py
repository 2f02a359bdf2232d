"""Preflight: check every record of the train and eval files before any model weights load.

Each record is built through ``SupervisedDataset.check``, the very code path training runs
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
"""

import datetime
import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch.distributed as dist
from torch.utils.data import Subset
from tqdm import tqdm

from dataset import DataError

logger = logging.getLogger(__name__)

REPORT_NAME = "preflight_report.json"
# Stable reason codes (DataError.code) and what each means; the table and report use them.
REASONS = {
    "unreadable_file": "the data file cannot be read (missing, a folder, no permission)",
    "bad_encoding": "the data file is not UTF-8 text (with or without a byte-order mark)",
    "invalid_json": "the data file or a line of it is not valid JSON of the expected shape",
    "no_records": "the data file holds no records",
    "not_an_object": "the record is not a JSON object",
    "bad_id": "'id' is not a string or an integer, or holds a lone surrogate that UTF-8 cannot write",
    "duplicate_key": "a record, message or 'image' dict holds a key twice (JSON would keep only the last)",
    "unknown_key": "the record or a message has a key that is not read (named, with the mapping of a known "
    "foreign layout: ShareGPT/LLaVA 'from'/'value', OpenAI 'messages', 'images')",
    "bad_conversations": "'conversations' is missing, not a list, or has fewer than two messages",
    "bad_message": "a message is not an object with role 'user' or 'assistant' (or 'system' first)",
    "bad_content": "a message has no text 'content' (or a list of parts), or text UTF-8 cannot encode",
    "system_message": "a system message after the first message, or where the chat template has none (minicpm)",
    "empty_answer": "an assistant message is empty or white space only: nothing to learn",
    "first_not_user": "the first message does not come from 'user'",
    "roles_not_alternating": "two messages in a row come from the same role (roles must alternate)",
    "bad_image_field": "'image' is not a path or a dict of <image_NN> -> path",
    "reserved_token": "message text contains one of the tokenizer's image tokens",
    "special_token": "message text contains a special token of the tokenizer (chat control, bos, eos)",
    "image_tag_count": "<image> appears more often than the record has images",
    "image_in_assistant": "an image tag sits in an assistant (or system) message",
    "unknown_image_tag": "an image tag in the text has no image in the record",
    "unused_image": "an image of the record is never referenced in the text",
    "repeated_image_tag": "an <image_NN> tag is used more than once",
    "missing_image": "an image file does not exist",
    "image_is_folder": "an image path is a folder",
    "symlink_loop": "an image or video path is a loop of symbolic links",
    "not_a_file": "an image or video path is a FIFO, socket or device, not a regular file (never opened)",
    "empty_image": "an image file is empty (0 bytes)",
    "not_an_image": "an image file is not an image PIL can read",
    "truncated_image": "an image file is truncated or corrupt",
    "image_too_large": "an image has more pixels than the decompression-bomb limit",
    "image_mode": "a 16-bit, 32-bit or float image whose values are not whole numbers in 0..255: the model's "
    "processor would clip them to 8 bits",
    "video_unsupported": "the record has a video, which the model (remote code) cannot take",
    "bad_video_field": "'video' is not a path",
    "video_tag_count": "<video> appears more than once",
    "video_in_assistant": "the <video> tag sits in an assistant message",
    "unknown_video_tag": "<video> appears but the record has no video",
    "missing_video": "a video file does not exist",
    "video_is_folder": "a video path is a folder",
    "empty_video": "a video file is empty (0 bytes)",
    "unreadable_video": "a video file cannot be decoded (not a video, corrupt or truncated)",
    "no_video_frames": "a video has no video stream or no frames",
    "too_long": "model_max_length would cut through an image or video placeholder",
    "no_learnable_tokens": "no assistant token is left to learn (after truncation)",
    "prompt_not_user_last": "a preference record's conversation does not end with a user message",
    "missing_answer": "a preference record's 'chosen' or 'rejected' answer is missing, not a string, or empty",
    "identical_answers": "a preference record's 'chosen' and 'rejected' answers are the same",
    "pair_too_long": "a preference pair does not fit model_max_length with its answer intact",
    "build_failed": "building the sample failed for another reason",
    "check_failed": "checking the record raised an error no other reason covers (its type and message are given)",
    "invalid_record": "the record is unusable",
}
EXAMPLES_PER_REASON = 3
# What checking one record can raise besides DataError: a record is arbitrary JSON, and validation,
# image decoding, the tokenizer or the processor may fail on a value nothing foresaw (a RecursionError
# is a RuntimeError, a UnicodeError a ValueError). Each becomes that record's problem (check_failed),
# so one odd record never ends the check of the others with a traceback.
RECORD_ERRORS = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError, RuntimeError, OSError)
# Ranks wait this long for the others to finish their shares (default collectives time out
# after 10-30 minutes, less than a large dataset may need).
WAIT_FOR_CHECK = datetime.timedelta(hours=12)


class PreflightFailed(SystemExit):
    """Bad records were found and the run must stop (exit status 1) before weights load."""

    def __init__(self, message):
        super().__init__(1)
        self.message = message

    def __str__(self):
        return self.message


@dataclass
class Problem:
    split: str
    file: str
    index: int
    record_id: object
    reason: str
    message: str
    path: str

    @classmethod
    def from_error(cls, split, error):
        return cls(split, error.data_path, error.index, error.record_id, error.code, str(error), error.path)

    def where(self):
        if self.index is None:
            return f"{self.split} file"
        return f"{self.split}#{self.index}" + ("" if self.record_id is None else f" ({self.record_id!r})")


def file_problem(split, error):
    """The ``(problems, stats)`` of a data file that could not be read at all (``error``: its DataError)."""
    stats = dict(split=split, file=error.data_path, records=0, bad=0, truncated=[], longest_tokens=0,
                 max_length=None, seconds=0.0)
    return [Problem.from_error(split, error)], stats, []


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


# A worker is a fresh interpreter (spawned, see check_shares) that imports torch and transformers and
# unpickles the datasets before it checks anything: several seconds. At about 3 ms a record, a worker
# pays for that only with thousands of records, so the default gives each at least this many.
MIN_RECORDS_PER_WORKER = 2000


def default_workers(records):
    """Worker processes per rank for a share of ``records``: the cores this process may use, divided
    among the node's ranks, and no more than give each worker MIN_RECORDS_PER_WORKER records."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), records // MIN_RECORDS_PER_WORKER))


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
        # Spawned, not forked: a fork copies the locks of the parent's threads (OpenMP's pool once torch
        # has computed, logging, tokenizers) as they are, and a worker that needs one held at the fork
        # waits forever (it did, in a process that had trained before: train() called twice, a notebook).
        context = multiprocessing.get_context("spawn")
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


def summary_table(problems, stats):
    """The console summary: one row per reason, with its count and first records."""
    total = sum(s["records"] for s in stats)
    files = "; ".join(f"{s['split']}: {s['bad']} of {s['records']} in {s['file']}" for s in stats)
    unusable = [p.file for p in problems if p.index is None]
    lines = [f"Preflight: {len(problems) - len(unusable)} of {total} records are unusable ({files})"]
    if unusable:
        lines[0] += f"; unusable data files: {', '.join(unusable)}"
    by_reason = {}
    for problem in problems:
        by_reason.setdefault(problem.reason, []).append(problem)
    if by_reason:
        width = max(len("reason"), *(len(reason) for reason in by_reason))
        lines.append(f"  {'reason':<{width}}  {'count':>6}  first records (split#index (id))")
        for reason, group in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
            first = ", ".join(p.where() for p in group[:EXAMPLES_PER_REASON])
            more = f", ... {len(group) - EXAMPLES_PER_REASON} more" if len(group) > EXAMPLES_PER_REASON else ""
            lines.append(f"  {reason:<{width}}  {len(group):>6}  {first}{more}")
            lines.append(f"  {'':<{width}}  {'':>6}  e.g. {group[0].message}")
    for s in stats:
        if s["truncated"]:
            lines.append(
                f"  note: {len(s['truncated'])} {s['split']} records are longer than model_max_length "
                f"{s['max_length']} and will be truncated (first: {s['truncated'][:EXAMPLES_PER_REASON]})"
            )
    return "\n".join(lines)


def write_report(path, problems, stats, action):
    records = sum(s["records"] for s in stats)
    seconds = sum(s["seconds"] for s in stats)
    report = dict(
        ok=not problems,
        action=action,
        records=records,
        bad_records=len(problems),
        seconds=round(seconds, 3),
        seconds_per_1000_records=round(1000 * seconds / max(records, 1), 3),
        reasons=dict(Counter(p.reason for p in problems).most_common()),
        files=stats,
        dropped=bad_indices(problems, [s["split"] for s in stats]) if action == "skipped" else {},
        problems=[asdict(p) for p in problems],
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(report, indent=1, ensure_ascii=False, default=str)
    # Written whole, then renamed: a failure cannot leave a truncated report. A lone surrogate (an id
    # or text with an unpaired \u escape, itself a reported problem) is written as that \u escape,
    # which is valid JSON, instead of failing UTF-8 encoding half-way.
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)
    os.replace(partial, path)
    return report


def bad_indices(problems, splits):
    """``{split: sorted bad record indices}``, or ``{split: None}`` where the file itself is unusable."""
    bad = {}
    for split in splits:
        found = [p.index for p in problems if p.split == split]
        bad[split] = None if None in found else sorted(found)
    return bad


def world():
    """``(rank, world_size)`` of this process ((0, 1) without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    shares = gather((mine, time.perf_counter() - start), world_size)
    seconds = max(took for _, took in shares)  # the pass takes as long as its slowest rank
    for split, dataset in todo.items():
        checked[split] = finish(dataset, split, Share.join(share[split] for share, _ in shares), seconds)
    return {split: checked[split] for split in datasets}


def gather(mine, world_size):
    """Every rank's ``mine``, in rank order, on every rank (``[mine]`` without a process group)."""
    if world_size == 1:
        return [mine]
    # A CPU (gloo) group with a long timeout: a rank that finishes its share first waits for the
    # others, and an object gathered over NCCL would need the device set up first.
    group = dist.new_group(backend="gloo", timeout=WAIT_FOR_CHECK)
    shares = [None] * world_size
    dist.all_gather_object(shares, mine, group=group)
    dist.destroy_process_group(group)
    return shares


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


# --------------------------------------------------------------------------------------------
# The cache: a restart or a resume with the same data and settings reuses the check


CACHE_NAME = "preflight_cache.json"
HASHED_WHOLE = 16 << 20  # a data file up to this size is hashed whole; a larger one by its first and last MiB
EDGE = 1 << 20


def file_identity(path):
    """What identifies a data file's content: path, size, modification time and a SHA-256 (see
    HASHED_WHOLE); of a folder (a table's files), those of every file in it."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
        return dict(path=os.path.abspath(path), files=[file_identity(name) for name in files])
    info = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if info.st_size <= HASHED_WHOLE:
            for block in iter(lambda: f.read(EDGE), b""):
                digest.update(block)
        else:
            digest.update(f.read(EDGE))
            f.seek(-EDGE, os.SEEK_END)
            digest.update(f.read(EDGE))
    return dict(path=os.path.abspath(path), size=info.st_size, mtime_ns=info.st_mtime_ns, sha256=digest.hexdigest())


def code_identity(dataset):
    """A hash of the source files of the dataset's classes and of this module: new checks, new results."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = {inspect.getfile(cls) for cls in type(dataset).__mro__ if cls.__module__ != "builtins"}
    files = sorted(f for f in files | {os.path.abspath(__file__)} if os.path.dirname(os.path.abspath(f)) == here)
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def cache_key(datasets):
    """The key of a check of ``{split: dataset}``: each data file's identity, each dataset's
    check_settings (tokenizer, family, slicing, model_max_length, ...) and the checking code. None
    where a split has no data file (records built in memory) or its file could not be read."""
    if any(isinstance(d, DataError) or d.data_path is None for d in datasets.values()):
        return None
    identity = {
        split: dict(file=file_identity(d.data_path), settings=d.check_settings(), code=code_identity(d))
        for split, d in datasets.items()
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def load_cache(output_dir, key):
    """The check cached under ``key`` in ``output_dir`` (as check_everywhere returns it), or None."""
    path = os.path.join(output_dir, CACHE_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable (a run stopped while writing it): check afresh
        return None
    if cached.get("key") != key:
        return None
    return {
        split: ([Problem(**p) for p in entry["problems"]], entry["stats"], entry["lengths"])
        for split, entry in cached["checked"].items()
    }


def save_cache(output_dir, key, checked):
    path = os.path.join(output_dir, CACHE_NAME)
    os.makedirs(output_dir, exist_ok=True)
    entries = {
        split: dict(problems=[asdict(p) for p in problems], stats=stats, lengths=lengths)
        for split, (problems, stats, lengths) in checked.items()
    }
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        # ASCII escapes: a lone surrogate (a bad_id record's id) has no UTF-8 form, and its \u escape
        # reads back as the same string, so a cached problem is the one checked.
        json.dump(dict(key=key, checked=entries), f, default=str)
    os.replace(path + ".tmp", path)  # whole or not at all


def check_all(datasets, output_dir, *, skip_bad, preflight_only, progress=True, is_main=True, workers=None,
              cache=True):
    """Check every dataset (every rank its share, see check_everywhere); on the main process log the
    table and write the report; return ``(bad_indices, {split: lengths})``, the same on every rank.

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
        stats.append(numbers)
    if is_main:
        report(problems, stats, output_dir, skip_bad=skip_bad, preflight_only=preflight_only)
    return bad_indices(problems, datasets), lengths


def report(problems, stats, output_dir, *, skip_bad, preflight_only):
    """Write the report and log the table of a finished check."""
    skippable = all(p.index is not None for p in problems)  # a whole unusable file cannot be skipped
    action = "passed" if not problems else ("skipped" if skip_bad and skippable and not preflight_only else "stopped")
    report_path = os.path.join(output_dir, REPORT_NAME)
    written = write_report(report_path, problems, stats, action)
    table = summary_table(problems, stats)
    records = written["records"]
    timing = f"{records} records in {written['seconds']:.1f} s ({written['seconds_per_1000_records']:.2f} s per 1,000)"
    if problems:
        (logger.warning if action == "skipped" else logger.error)("%s\nFull report: %s", table, report_path)
    else:
        logger.info("%s\nReport: %s", table, report_path)
    logger.info("Preflight checked %s", timing)


def run(datasets, output_dir, *, skip_bad=False, preflight_only=False, is_main=True, workers=None, cache=True):
    """Check ``{split: SupervisedDataset or None}`` and return them as training should see them.

    A split's value may also be the DataError its file raised when read (``load_records``):
    it is reported like a bad record, and always stops the run. Raises PreflightFailed (exit
    status 1) on every rank if any record is bad, unless ``skip_bad``: then each dataset comes
    back as a Subset without exactly the bad records (original indices still name records in
    later errors). ``preflight_only`` always stops after the check: with status 1 if anything
    is bad, else PreflightFailed is not raised and the caller should return.
    """
    present = {split: dataset for split, dataset in datasets.items() if dataset is not None}
    bad, lengths = check_all(present, output_dir, skip_bad=skip_bad, preflight_only=preflight_only, is_main=is_main,
                             workers=workers, cache=cache)
    report = os.path.join(output_dir, REPORT_NAME)
    unusable = [split for split, indices in bad.items() if indices is None]
    if unusable:
        message = f"Preflight: the {' and '.join(unusable)} data file cannot be used (see {report})"
        logger.error("%s", message)
        raise PreflightFailed(message)
    for split, dataset in present.items():
        dataset.lengths = lengths[split]
    count = sum(len(indices) for indices in bad.values())
    if count and (preflight_only or not skip_bad):
        hint = "" if preflight_only else "; fix them, or pass --skip_bad_samples true to train without them"
        message = f"Preflight: {count} unusable records (see {report}){hint}"
        logger.error("%s", message)
        raise PreflightFailed(message)
    result = dict(datasets)
    for split, indices in bad.items():
        if indices:
            dataset = present[split]
            dropped = set(indices)
            result[split] = Subset(dataset, [i for i in range(len(dataset)) if i not in dropped])
            if not len(result[split]):
                message = f"--skip_bad_samples: all {len(dataset)} {split} records are unusable; nothing is left"
                logger.error("%s", message)
                raise PreflightFailed(message)
            logger.warning(
                "--skip_bad_samples: dropping %d of %d %s records flagged by preflight; training on %d",
                len(dropped), len(dataset), split, len(result[split]),
            )
    return result

