"""The training stages: what --stage names (stages/base.py says what a stage declares).

To add a stage (e.g. grpo): write one file here with a Stage subclass (its name, the capabilities it
requires of the family, its sample kind, its own flags (a dataclass: ``arguments``) and their checks, its trainer and that
trainer's keyword arguments), then add one ``register(...)`` line below. A test may ``register`` a
toy stage at run time. finetune.py runs the stage --stage names; arguments.py checks its flags.
"""

from stages import dpo, grpo, sft
from usage import UsageError

STAGES = {}


def register(stage_class):
    """Add a stage (a Stage subclass) under its name; returns it."""
    STAGES[stage_class.name] = stage_class
    return stage_class


register(sft.SFT)
register(dpo.DPO)
register(grpo.GRPO)


def names():
    return tuple(STAGES)


def get(name):
    """The stage called ``name`` (UsageError naming the registered ones if none is)."""
    if name not in STAGES:
        raise UsageError(f"--stage {name!r} is not one of {', '.join(STAGES)}")
    return STAGES[name]()


def check_arguments(training_args):
    """Parse-time checks of --stage and the stages' flags: flags of another stage refused (they would
    do nothing), then what the chosen stage refuses and checks itself."""
    stage = get(training_args.stage)
    for other in STAGES.values():
        given = [f"--{flag.name}" for flag in other.own_flags() if getattr(training_args, flag.name) != flag.default]
        if other.name != stage.name and given:
            raise UsageError(f"{', '.join(given)} given without --stage {other.name}, where they do nothing")
    stage.refuse(training_args)
    stage.check_arguments(training_args)
    return stage
