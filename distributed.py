"""Distributed start-up: DeepSpeed configs reconciled with the command line, launch and engine checks.

The Trainer (through accelerate) runs DDP or DeepSpeed itself; this module makes sure that
what runs is what was asked for, and that nothing is compiled with g++ on a machine without CUDA.
"""

import atexit
import json
import logging
import os
import shutil
import tempfile

import torch

from usage import UsageError

logger = logging.getLogger(__name__)


def last_flag_value(argv, flag):
    """The value of the last ``--flag value`` / ``--flag=value`` in argv (argparse's winner), and its index."""
    found = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            found = (i + 1, argv[i + 1])
        elif arg.startswith(flag + "="):
            found = (i, arg.split("=", 1)[1])
    return found


def adapt_deepspeed_argv(argv):
    """Reconcile a DeepSpeed JSON config with the command line, without editing the file.

    - An explicit ``--lr_scheduler_type`` wins over the config's ``scheduler`` section: with
      one, transformers would run DeepSpeed's WarmupLR and silently ignore the flag (the
      reference launchers ask for cosine and got a constant rate). Likewise ``--optim`` over
      its ``optimizer`` section.
    - Without CUDA, DeepSpeed's fused CPU Adam would be compiled with g++ on first use
      (minutes); torch's AdamW (``torch_adam``) does the same job.
    The adapted copy goes to a private temporary folder, removed at exit, and the argument
    points to it.
    """
    found = last_flag_value(argv, "--deepspeed")
    if found is None or not found[1].endswith(".json"):
        return argv
    index, path = found
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise UsageError(f"--deepspeed {path}: cannot read the file ({e.strerror or e})") from e
    except ValueError as e:
        raise UsageError(f"--deepspeed {path}: not a valid JSON DeepSpeed config: {e}") from e
    changes = []
    scheduler = last_flag_value(argv, "--lr_scheduler_type")
    if scheduler is not None and "scheduler" in config:
        changes.append(f"its {config.pop('scheduler').get('type', '')} scheduler replaced by --lr_scheduler_type {scheduler[1]}")
    optim = last_flag_value(argv, "--optim")
    if optim is not None and "optimizer" in config:
        changes.append(f"its {config.pop('optimizer').get('type', '')} optimizer replaced by --optim {optim[1]}")
    optimizer = config.get("optimizer")
    if not torch.cuda.is_available() and optimizer and not optimizer.get("params", {}).get("torch_adam"):
        optimizer.setdefault("params", {})["torch_adam"] = True
        changes.append("torch's AdamW, as there is no CUDA")
    if not changes:
        return argv
    # A private folder per process (mode 0700: another user on the machine can neither read it
    # nor collide with it), removed when the process exits.
    folder = tempfile.mkdtemp(prefix="finetune_ds_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    adapted = os.path.join(folder, os.path.basename(path))
    with open(adapted, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    argv = list(argv)
    argv[index] = adapted if argv[index] == path else f"--deepspeed={adapted}"
    logger.warning("DeepSpeed config %s used as %s: %s", path, adapted, "; ".join(changes))
    return argv


def check_world_size(training_args):
    """Refuse a launch in which each rank would train alone, unaware of the others."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and training_args.world_size != world_size:
        hint = " On a machine without GPUs add --use_cpu True (the launchers do)." if not torch.cuda.is_available() else ""
        raise UsageError(
            f"WORLD_SIZE={world_size} processes were launched, but the Trainer runs {training_args.world_size} "
            f"process(es): each rank would train alone.{hint}"
        )


def start(training_args):
    """Check the launch and start what the engine needs before the model loads."""
    check_world_size(training_args)
    if training_args.deepspeed and not torch.cuda.is_available():
        init_cpu_deepspeed()


def init_cpu_deepspeed():
    """Start DeepSpeed's process group on a machine without CUDA.

    ZeRO-3 partitions weights while from_pretrained loads them, so the group must exist
    before the model loads. DeepSpeed would also compile its shared-memory all-reduce with g++
    on first use (minutes, and only a speed-up): plain gloo collectives are used instead.
    """
    import deepspeed
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="gloo")


def check_engine(trainer, training_args):
    """Fail unless the engine the user asked for is the one the Trainer runs; log which it is."""
    if training_args.deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(
            "--deepspeed was given but the Trainer is not running DeepSpeed (is ACCELERATE_USE_CPU set?); "
            "refusing to train with another engine"
        )
    if trainer.is_deepspeed_enabled:
        engine = f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    elif training_args.world_size > 1:
        engine = "DDP"
    else:
        engine = "a single process"
    logger.info("Training with %s on %d process(es), device %s", engine, training_args.world_size, training_args.device)


def finish():
    """Tear down the process group once every rank is done with it.

    Exiting with a gloo group still alive lets its C++ worker threads be destroyed during
    interpreter shutdown, which aborts the process ("terminate called without an active
    exception", exit -6) at random after a run that otherwise succeeded. Called only where all
    ranks arrive together (the end of training, a coordinated SIGTERM stop): after a failure on
    one rank, a barrier here would hang the others.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
