"""The output folder: one run at a time writes into it, never over what a user has.

``claim`` runs on the main process before the weights load (before preflight writes its report
into the folder), and every rank gets its verdict (``preflight.from_main``), so all stop together:
- ``--output_dir`` must be a folder or a path that can become one (not a file, not under a file),
  and never the folder of a model the run reads (``--model_name_or_path``, ``--dpo_ref_model``,
  ``--lora_weight_path``), a folder inside it or one that contains it, symlinks resolved,
  whatever flags are given: the final save would overwrite the published weights.
- A lock file (``LOCK_NAME``), held for the run's life, refuses a second run on the folder and
  names its holder (pid, host, start time). A lock whose process is gone (same host; the pid is
  not running, or runs another program since) is taken over with a warning.
- A folder that holds a model or an earlier run's results is written into only when the user
  says so: ``--resume_from_checkpoint`` of a checkpoint in it, or ``--overwrite_output_dir``.
- The run records what defines its batch order (``RECORD_NAME``: the training file's size,
  modification time and SHA-256, packing, lengths, sampler, seeds, world size, batch sizes);
  a resume whose settings differ stops naming what changed, unless ``--ignore_data_change``.
  The record also lists the checkpoints an earlier run left in the folder, which
  ``--save_total_limit`` never rotates away (``resilience.rotate_checkpoints``).
"""

import contextlib
import datetime
import json
import logging
import os
import socket
import uuid

import preflight
import resilience
from data.preflight_cache import CACHE_NAME, file_identity

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
RECORD_NAME = "run_record.json"
# What a new run may write over without asking: what a run writes before it has trained anything
# (preflight's report and its cache, the record, the lock) and TensorBoard's logs (one new subfolder per run).
HARMLESS = {preflight.REPORT_NAME, CACHE_NAME, RECORD_NAME, LOCK_NAME, "runs"}
# The training arguments that, with the training file's content, fix which samples make which batch.
BATCH_ORDER_ARGS = (
    "packing", "model_max_length", "train_sampling_strategy", "seed", "data_seed", "world_size",
    "per_device_train_batch_size", "gradient_accumulation_steps", "dataloader_drop_last",
)


class Refused(resilience.StopRun):
    """The run may not write into its output folder; every rank raises it, the main process says why.

    Status 2 (a command-line mistake: another folder or flag fixes it), or 1 when another run
    holds the folder.
    """

    def __init__(self, message, status=2, *, report=True):
        self.status = status
        self.report = report  # the main process reports it; the others stop in silence
        super().__init__(message)


def refuse(message, status=2):
    return {"refused": message, "status": status}


# --------------------------------------------------------------------------------------------
# Where the output may go


def path_problem(output_dir):
    """Why ``output_dir`` cannot be a folder (it or a parent is a file), or None."""
    path = os.path.abspath(os.path.expanduser(output_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--output_dir {output_dir} is a file, not a folder; pass a folder (it is created if missing)"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--output_dir {output_dir} lies under {parent}, which is a file, not a folder; pass another folder"
    return None


def model_folder_problem(output_dir, model_folders):
    """Why ``output_dir`` may not be written, as it overlaps one of ``{flag: folder}``, or None."""
    out = os.path.realpath(os.path.expanduser(output_dir))
    for flag, folder in model_folders.items():
        if not folder or not os.path.isdir(os.path.expanduser(folder)):
            continue  # a hub id: its files live in the cache, not here
        model = os.path.realpath(os.path.expanduser(folder))
        if out == model:
            relation = "the folder"
        elif out.startswith(model + os.sep):
            relation = "inside the folder"
        elif model.startswith(out + os.sep):
            relation = "a folder that contains the folder"
        else:
            continue
        resolved = "" if model == os.path.abspath(os.path.expanduser(folder)) else f" ({model})"
        return (
            f"--output_dir {output_dir} is {relation} of the model the run reads (--{flag} {folder}{resolved}): "
            "saving there would overwrite or mix with its files. Pass another --output_dir (no flag allows this one)"
        )
    return None


def results_in(folder):
    """The entries of ``folder`` that a run would write over (all but ``HARMLESS``), sorted."""
    if not os.path.isdir(folder):
        return []
    # (The lock's and the record's names start their temporary files, which a crash may leave.)
    return sorted(
        name for name in os.listdir(folder) if name not in HARMLESS and not name.startswith((LOCK_NAME, RECORD_NAME))
    )


def listing(names, most=4):
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def describe(entries):
    """What the folder entries ``entries`` are, in words: checkpoints, a model, an adapter, other files."""
    checkpoints = [name for name in entries if resilience.CHECKPOINT_NAME.match(name)]
    checkpoints.sort(key=lambda name: int(resilience.CHECKPOINT_NAME.match(name).group(1)))
    adapter = [name for name in entries if name.startswith("adapter_")]
    model = [name for name in entries
             if name == "config.json" or (name.endswith((".safetensors", ".bin")) and name not in adapter)]
    other = [name for name in entries if name not in (*checkpoints, *adapter, *model)]
    parts = []
    if checkpoints:
        parts.append(f"{len(checkpoints)} checkpoint(s) ({listing(checkpoints, 3)})")
    if adapter:
        parts.append(f"a LoRA adapter ({listing(adapter)})")
    if model:
        parts.append(f"a saved model ({listing(model)})")
    if other:
        parts.append(f"{len(other)} other file(s) or folder(s) ({listing(other)})")
    return "; ".join(parts)


def occupied_problem(output_dir, entries):
    """The refusal for a folder that holds a model or an earlier run's results: what, and the ways on."""
    ways = []
    if resilience.complete_checkpoints(output_dir):
        ways.append(f"continue that run with --resume_from_checkpoint {output_dir}")
    ways += [
        "train into it anyway with --overwrite_output_dir true (files of the same name are replaced; its "
        "checkpoints are never rotated away by --save_total_limit)",
        "pass another --output_dir",
    ]
    return (
        f"--output_dir {output_dir} already holds {describe(entries)}, which this run would overwrite. "
        f"To go on: {'; or '.join(ways)}"
    )


# --------------------------------------------------------------------------------------------
# The lock


def process_start(pid):
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where unknown:
    tells a live holder from another program that got its pid later."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def holder_alive(holder):
    """Whether the process that wrote lock content ``holder`` may still run (always, on another host)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = holder.get("process_start")
    return started is None or process_start(holder["pid"]) in (None, started)


def read_lock(path):
    """The lock's content, or None if it vanished; a lock that is not ours to parse is a holder unknown."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started": "unknown (unreadable lock file)"}


class Lock:
    """This process's hold on ``folder``: a file written whole, then linked into place (atomic, and
    refused where a lock exists); released only if it is still ours."""

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK_NAME)
        self.content = dict(
            pid=os.getpid(), host=socket.gethostname(), process_start=process_start(os.getpid()),
            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), token=uuid.uuid4().hex,
        )

    def acquire(self):
        """Take the lock; the refusal (see ``refuse``) if a live run holds it, else None."""
        partial = f"{self.path}.{self.content['token']}"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(self.content, f)
        try:
            for _ in range(2):  # a stale lock is removed once, then the link is tried again
                try:
                    self._place(partial)
                    return None
                except FileExistsError:
                    holder = read_lock(self.path)
                if holder is None:
                    continue
                if holder.get("pid") is None or holder_alive(holder):
                    return refuse(
                        f"--output_dir {os.path.dirname(self.path)} is in use by another run: process "
                        f"{holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} (lock "
                        f"file {self.path}). Wait for it to finish or stop it, or pass another --output_dir; if that "
                        "run is gone (its machine was lost), delete the lock file",
                        status=1,
                    )
                logger.warning(
                    "Taking over %s: left by process %s on %s (started %s), which is no longer running",
                    self.path, holder["pid"], holder["host"], holder.get("started"),
                )
                if read_lock(self.path) == holder:  # not taken over by another starter meanwhile
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
            return refuse(f"--output_dir {os.path.dirname(self.path)}: could not take its lock {self.path}", status=1)
        finally:
            os.remove(partial)

    def _place(self, partial):
        """Put the lock in place, or raise FileExistsError."""
        try:
            os.link(partial, self.path)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: exclusive creation, then the content
            with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w", encoding="utf-8") as f:
                json.dump(self.content, f)

    def release(self):
        if read_lock(self.path) == self.content:
            os.remove(self.path)


# --------------------------------------------------------------------------------------------
# The batch-order record


def batch_order(data_args, training_args):
    """What decides which samples make which batch, as JSON values."""
    settings = {name: getattr(training_args, name) for name in BATCH_ORDER_ARGS}
    settings["train_sampling_strategy"] = str(settings["train_sampling_strategy"])
    settings["skip_bad_samples"] = data_args.skip_bad_samples
    # A file that cannot be read is preflight's to report.
    readable = data_args.data_path and os.path.exists(data_args.data_path) and os.access(data_args.data_path, os.R_OK)
    settings["data"] = file_identity(data_args.data_path) if readable else None
    return settings


def content_of(identity):
    """What of a data file's identity is its content (a touched or moved file is the same data)."""
    if "files" in identity:
        return [content_of(f) for f in identity["files"]]
    return identity["size"], identity["sha256"]


def describe_data(identity):
    """A data file's identity (data/preflight_cache.file_identity) in a phrase; a folder by its file count."""
    if "files" in identity:
        return f"{identity['path']} ({len(identity['files'])} files)"
    modified = datetime.datetime.fromtimestamp(identity["mtime_ns"] / 1e9, datetime.timezone.utc)
    return (f"{identity['path']} ({identity['size']} bytes, modified {modified.isoformat(timespec='seconds')}, "
            f"sha256 {identity['sha256'][:12]})")


def changes(recorded, current):
    """The differences between two ``batch_order`` results, one phrase each ([] if none matter)."""
    found = []
    old, new = recorded.get("data"), current.get("data")
    if old and new and content_of(old) != content_of(new):
        found.append(f"the training data: {describe_data(old)} is now {describe_data(new)}")
    for name in sorted(set(recorded) | set(current)):
        if name != "data" and recorded.get(name) != current.get(name):
            label = "the number of processes (world size)" if name == "world_size" else f"--{name}"
            found.append(f"{label} {recorded.get(name)} -> {current.get(name)}")
    return found


def read_record(folder):
    try:
        with open(os.path.join(folder, RECORD_NAME), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_record(folder, record):
    partial = os.path.join(folder, RECORD_NAME + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(partial, os.path.join(folder, RECORD_NAME))


# --------------------------------------------------------------------------------------------
# The claim


def same_folder(a, b):
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def inspect(model_args, data_args, training_args, lora_args, resume_from, lock):
    """The main process's verdict on the output folder (see the module's docstring): the refusal, or
    ``{"earlier_checkpoints": [...]}``. Takes ``lock`` on the way; releases it again on a refusal."""
    output_dir = training_args.output_dir
    problem = path_problem(output_dir) or model_folder_problem(output_dir, {
        "model_name_or_path": model_args.model_name_or_path,
        "dpo_ref_model": training_args.dpo_ref_model,
        "lora_weight_path": lora_args.lora_weight_path,
    })
    if problem:
        return refuse(problem)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        return refuse(f"--output_dir {output_dir}: cannot create the folder ({e.strerror or e})")
    refused = lock.acquire()
    if refused:
        return refused
    verdict = check_contents(data_args, training_args, resume_from)
    if "refused" in verdict:
        lock.release()
    return verdict


def check_contents(data_args, training_args, resume_from):
    """The verdict on what the folder holds and, on resume, on the batch order; writes the record."""
    output_dir = training_args.output_dir
    if data_args.preflight_only:
        return {"earlier_checkpoints": []}  # it writes only its report
    continuing = resume_from is not None and same_folder(os.path.dirname(os.path.normpath(resume_from)), output_dir)
    entries = results_in(output_dir)
    if entries and not continuing and not training_args.overwrite_output_dir:
        return refuse(occupied_problem(output_dir, entries))
    current = batch_order(data_args, training_args)
    earlier = []
    if resume_from is not None:
        run_dir = os.path.dirname(os.path.normpath(resume_from))
        record = read_record(run_dir)
        if record is None:
            logger.warning(
                "%s has no %s (a run of an older version): the batch order of the resumed run cannot be checked",
                run_dir, RECORD_NAME,
            )
        else:
            changed = changes(record["batch_order"], current)
            if changed and not training_args.ignore_data_change:
                return refuse(
                    f"--resume_from_checkpoint {resume_from}: what defines the batch order changed since that run "
                    f"started: {'; '.join(changed)}. Resuming would skip steps of another batch list and train on "
                    "what the step count no longer means. Restore the settings and data, start a new run in "
                    "another --output_dir, or pass --ignore_data_change true to resume anyway"
                )
            if changed:
                logger.warning("--ignore_data_change: resuming although %s", "; ".join(changed))
            if continuing:
                earlier = record.get("earlier_checkpoints", [])
    if not continuing:
        earlier = [name for name in entries if resilience.CHECKPOINT_NAME.match(name)]
    if earlier:
        logger.warning(
            "%s holds %d checkpoint(s) of an earlier run (%s); --save_total_limit never "
            "deletes them", output_dir, len(earlier), ", ".join(earlier),
        )
    write_record(output_dir, dict(batch_order=current, earlier_checkpoints=earlier))
    return {"earlier_checkpoints": earlier}


@contextlib.contextmanager
def claim(model_args, data_args, training_args, lora_args, resume_from):
    """Hold the output folder for the run inside the ``with`` block; yields the checkpoint names of an
    earlier run in it (to keep). Raises Refused on every rank, together, if the run may not write there."""
    is_main = training_args.process_index == 0
    lock = Lock(training_args.output_dir) if is_main else None
    verdict = None
    if is_main:
        try:
            verdict = inspect(model_args, data_args, training_args, lora_args, resume_from, lock)
        except OSError as e:  # the others wait for a verdict: this is one
            lock.release()
            verdict = refuse(f"--output_dir {training_args.output_dir}: {e}", status=1)
    verdict = preflight.from_main(verdict)
    if "refused" in verdict:
        raise Refused(verdict["refused"], verdict["status"], report=is_main)
    try:
        yield verdict["earlier_checkpoints"]
    finally:
        if is_main:
            lock.release()
