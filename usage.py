"""A mistake on the command line, whichever module finds it (arguments.py at parse time,
distributed.py at start-up, lora.py once the model's module names are known): ``finetune.main``
prints its message alone and exits with EXIT_USAGE, no traceback. Tracebacks stay for real bugs.

Its own module because arguments.py imports distributed.py and lora.py, which raise it too.
"""

EXIT_USAGE = 2  # argparse's status for a bad command line


class UsageError(ValueError):
    """Which flag, what is wrong with it, and how to fix it, in one message."""
