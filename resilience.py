"""Never lose a run: a checkpoint on SIGTERM, and checkpoints that a crash cannot corrupt.

Preemption. A preempted node gets SIGTERM (torchrun forwards it to every worker, then waits
30 s before SIGKILL). ``PreemptionCallback`` only notes the signal; at the end of each
optimizer step the ranks agree, with one all-reduce, whether any of them got it, so all of
them stop after the same step, save ``checkpoint-N`` together and exit with status 143.

Crash-safe checkpoints. transformers 5.23's ``Trainer._save_checkpoint`` writes
``checkpoint-N`` in place (weights, optimizer, scheduler, one RNG file per rank, then
``trainer_state.json``, then it deletes checkpoints beyond ``save_total_limit``) and marks
nothing as finished; ``resume_from_checkpoint=True`` takes the highest step number, finished
or not; its rotation deletes old checkpoints with ``shutil.rmtree``, file by file in directory
order, so a deletion cut short can leave ``trainer_state.json`` beside missing weights. What is
added here (hooked in by ``CPMTrainer``):
- ``trainer_state.json`` is the commit record, written last: a checkpoint is complete when that
  file parses and names the folder's step, and every file that ``checkpoint_files.json`` lists
  (written just before it, once every rank has finished its files) is there at its size. A
  save cut short lacks the commit record; a deletion cut short lacks a listed file, whatever
  order it deleted in. Older checkpoints are rotated away only after the commit record.
- ``remove_checkpoint`` (used for a stale folder of the same step, left by an earlier crash,
  before a save writes into it) deletes the commit record first.
- ``resolve_checkpoint`` turns ``--resume_from_checkpoint`` (a checkpoint, a run folder, or
  ``true``/``last`` for the output dir) into the newest complete checkpoint.
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checkpoint_files.json"
EXIT_PREEMPTED = 128 + signal.SIGTERM  # the status a process killed by SIGTERM reports
EXIT_INTERRUPTED = 128 + signal.SIGINT  # and by SIGINT (Ctrl-C)
# The signals that stop a run after the current step, with a checkpoint: a scheduler's or a
# container's stop, and Ctrl-C (a terminal sends it to torchrun and every worker alike).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def checkpoint_folder(run_dir, step):
    return os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def folder_files(folder):
    """``{relative path: size}`` of every file under ``folder`` but the commit record and the list."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative not in (STATE_FILE, MANIFEST_FILE):
                files[relative] = os.path.getsize(path)
    return files


def write_manifest(folder):
    """List the checkpoint's files, once all are written and before the commit record."""
    files = folder_files(folder)
    partial = os.path.join(folder, MANIFEST_FILE + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(files, f, indent=1, sort_keys=True)
    os.replace(partial, os.path.join(folder, MANIFEST_FILE))


def is_complete(folder):
    """Whether ``folder`` is a checkpoint whose save finished and that no deletion has touched."""
    match = CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(folder)))
    try:
        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
            step = json.load(f).get("global_step")
        with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
            listed = json.load(f)
        sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in listed}
    except (OSError, ValueError):
        return False
    return sizes == listed and (match is None or int(match.group(1)) == step)


def complete_checkpoints(run_dir):
    """``[(step, folder)]`` of the complete checkpoints in ``run_dir``, oldest first."""
    found = []
    for name in os.listdir(run_dir):
        match = CHECKPOINT_NAME.match(name)
        folder = os.path.join(run_dir, name)
        if match and os.path.isdir(folder):
            if is_complete(folder):
                found.append((int(match.group(1)), folder))
            else:
                logger.warning(
                    "%s is incomplete (its save or its deletion was interrupted): not resuming from it", folder
                )
    return sorted(found)


def resolve_checkpoint(value, output_dir):
    """The checkpoint folder to resume from, for a ``--resume_from_checkpoint`` value.

    ``None``/``False``: none. ``True``, ``"true"``, ``"last"``: the newest complete checkpoint
    of ``output_dir``. A checkpoint folder: itself if complete, else an error naming the one to
    use. Any other folder: a run folder, whose newest complete checkpoint is taken.
    """
    if value is None or value is False:
        return None
    if value is True or str(value).lower() in ("true", "last", "latest"):
        run_dir = output_dir
    elif not os.path.isdir(value):
        raise ValueError(
            f"--resume_from_checkpoint {value}: no such folder; pass a checkpoint folder, the run folder "
            "(its newest complete checkpoint is taken), or true for the newest in --output_dir"
        )
    elif CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(value))):
        if is_complete(value):
            return value
        usable = complete_checkpoints(os.path.dirname(os.path.normpath(value)))
        hint = f"resume from {usable[-1][1]}" if usable else "no complete checkpoint is left beside it"
        raise ValueError(
            f"--resume_from_checkpoint {value}: the checkpoint is incomplete (its save did not finish, or its "
            f"deletion was cut short: {STATE_FILE} or a file that {MANIFEST_FILE} lists is missing); "
            f"{hint}, or pass the run folder to take the newest complete checkpoint"
        )
    else:
        run_dir = value
    if not os.path.isdir(run_dir):
        raise ValueError(f"--resume_from_checkpoint {value}: {run_dir} is not a folder")
    usable = complete_checkpoints(run_dir)
    if not usable:
        raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint in {run_dir}")
    step, folder = usable[-1]
    logger.info("Resuming from %s (step %d), the newest complete checkpoint of %s", folder, step, run_dir)
    return folder


def remove_checkpoint(folder):
    """Delete a checkpoint, its commit record first: cut short, it is never taken as complete."""
    try:
        os.remove(os.path.join(folder, STATE_FILE))
    except FileNotFoundError:
        pass  # an incomplete checkpoint: nothing marks it complete
    shutil.rmtree(folder)


def remove_stale(folder):
    """Delete a leftover folder the next save would write into, so it is never half old, half new."""
    if os.path.isdir(folder):
        logger.warning("Removing %s, left by an earlier run, before saving over it", folder)
        remove_checkpoint(folder)


class StopRun(SystemExit):
    """Ends the process with ``status`` and a message that is logged, not a traceback."""

    status = 1

    def __init__(self, message):
        super().__init__(self.status)
        self.message = message

    def __str__(self):
        return self.message


# torch.save's writer reports a full disk as "unexpected pos" or "iostream error", without the
# OS error: a save that fails while its filesystem has less than this left is taken as one.
DISK_NEARLY_FULL = 64 * 2**20


class DiskFull(StopRun):
    """A save ran out of disk space (exit status 1); the message names the folder."""


def out_of_space(error, folder):
    """Whether ``error``, raised while writing into ``folder``, means the disk is full."""
    cause = error
    while cause is not None:
        if getattr(cause, "errno", None) == errno.ENOSPC:
            return True
        cause = cause.__cause__ or cause.__context__
    return free_space(folder) < DISK_NEARLY_FULL


def free_space(folder):
    """Bytes free (to this user) on the filesystem that holds, or would hold, ``folder``."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


@contextlib.contextmanager
def explain_disk_full(folder):
    """Turn a write failure caused by a full disk into DiskFull, saying so and naming ``folder``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not out_of_space(e, folder):
            raise
        message = (
            f"Saving {folder} failed: the disk is full ({free_space(folder) / 2**20:.1f} MiB left on its filesystem; "
            f"{type(e).__name__}: {e}). Free some space or pass another --output_dir; checkpoints saved "
            "earlier are untouched, and this incomplete one is never resumed from."
        )
        logger.error("%s", message)
        raise DiskFull(message) from e


def any_rank(flag, args):
    """Whether ``flag`` is true on any rank, the same answer on every rank (one all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=args.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class NonFiniteLoss(StopRun):
    """The loss became NaN or inf: the run stops (exit status 1) without saving the damaged weights."""


class NonFiniteLossGuard(TrainerCallback):
    """Stops training after a step whose loss was NaN or inf on any rank, before anything is saved.

    A NaN loss makes NaN gradients and weights; training on would spend hours on garbage, and a
    checkpoint saved after it would replace a good one. The trainer calls ``note`` with every
    training loss; at the step's end the ranks agree (one all-reduce) and all of them stop, each
    naming the records of its batch whose loss was not finite.
    """

    def __init__(self):
        self.records = []
        self.values = set()

    def note(self, loss, records):
        value = loss.detach().float()
        if not torch.isfinite(value).item():
            self.records += records
            self.values.add(str(value.item()))

    def on_step_end(self, args, state, control, **kwargs):
        # Runs before the Trainer's save of this step (DefaultFlowCallback only asks for it).
        if not any_rank(bool(self.records), args):
            return control
        mine = ", ".join(f"#{r['index']} (id {r['id']!r})" for r in self.records) or "none on this rank"
        message = (
            f"The loss became {' and '.join(sorted(self.values)) or 'NaN or inf'} at step {state.global_step} "
            f"(rank {args.process_index}'s records in that batch: {mine}); stopping without saving this step. "
            "Resume from the last checkpoint with a lower --learning_rate, or bf16 instead of fp16, or check "
            "those records."
        )
        logger.error("%s", message)
        raise NonFiniteLoss(message)


class Preempted(StopRun):
    """Raised on every rank once the checkpoint of a SIGTERM or SIGINT stop is saved: exit status 128 + the signal."""

    def __init__(self, message, signum=signal.SIGTERM):
        self.status = 128 + signum
        super().__init__(message)


class PreemptionCallback(TrainerCallback):
    """On SIGTERM or SIGINT (Ctrl-C): finish the current step, save a checkpoint at it on every rank,
    exit 128 + the signal (143, 130)."""

    def __init__(self):
        self.signal = None  # the first stop signal this process got
        self.stopping = False
        self.previous_handlers = {}

    def _on_signal(self, signum, frame):
        # Only a flag: the step in progress finishes, and the ranks agree at its end. (Under
        # torchrun a Ctrl-C reaches each worker twice: from the terminal, then from torchrun.)
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self.previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopping and any_rank(self.signal is not None, args):
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
            logger.warning(
                "%s: rank %d stops after step %d and saves %s", self._name(), args.process_index,
                state.global_step, checkpoint_folder(args.output_dir, state.global_step),
            )
        return control

    def _name(self):
        # A rank that got no signal itself stops because another one did.
        return self.signal.name if self.signal is not None else "another rank's stop signal"

    def on_save(self, args, state, control, **kwargs):
        if not self.stopping:
            return control
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the main process has finished the checkpoint on every rank's exit
        folder = checkpoint_folder(args.output_dir, state.global_step)
        signum = self.signal or signal.SIGTERM
        logger.warning(
            "%s: rank %d saved step %d to %s; exiting with status %d. Continue with "
            "--resume_from_checkpoint %s",
            self._name(), args.process_index, state.global_step, folder, 128 + signum, args.output_dir,
        )
        self.on_train_end(args, state, control)
        raise Preempted(f"stopped by {self._name()} after step {state.global_step}; checkpoint saved to {folder}", signum)


class RecordFailed(StopRun):
    """A record failed to build during training (its file changed after preflight checked it): every
    rank stops before the step (exit status 1), the rank that built it naming the record
    (``CPMTrainer.get_batch_samples``)."""


def rotate_checkpoints(run_dir, limit, keep=(), best=None):
    """Delete this run's oldest checkpoints beyond ``limit`` (--save_total_limit), by step, commit record
    first (``remove_checkpoint``); never the newest, ``best``, nor those named in ``keep`` (an earlier
    run's, in the same folder: transformers' own rotation would take any ``checkpoint-*`` there)."""
    if not limit or limit <= 0:
        return
    mine = sorted(
        (int(match.group(1)), os.path.join(run_dir, name))
        for name in os.listdir(run_dir)
        if (match := CHECKPOINT_NAME.match(name)) and name not in keep and os.path.isdir(os.path.join(run_dir, name))
    )
    protected = {mine[-1][1]} if mine else set()
    if best is not None:
        protected.add(os.path.join(run_dir, os.path.basename(os.path.normpath(best))))
    surplus = len(mine) - max(limit, len(protected))
    for _, folder in mine:
        if surplus <= 0:
            break
        if folder not in protected:
            logger.info("Deleting older checkpoint %s (--save_total_limit %d)", folder, limit)
            remove_checkpoint(folder)
            surplus -= 1
