"""torchrun as the launchers start it, with the exit status a stopped job should have.

    python torchrun_exit.py TORCHRUN_ARGS...    # exactly like: torchrun TORCHRUN_ARGS...

On SIGTERM (a scheduler or a container stop) or SIGINT (Ctrl-C), torchrun forwards the signal
to its workers and waits for them (they save a checkpoint and exit 143 or 130, see
resilience.py), then raises SignalException, which ends it with status 1 and a traceback. A
stop is not a crash: this ends it with 128 + the signal's number (143 for SIGTERM, 130 for
SIGINT), as a process killed by the signal
reports, and one line instead of the traceback. Likewise when a worker fails (a mistake on
the command line: status 2): the worker has said why, and the script exits with its status.
"""

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name}; its workers were passed the signal and have exited",
              file=sys.stderr)
        sys.exit(128 + e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        # A negative exit code is a worker killed by that signal: report it as the shell would.
        status = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(f"torchrun: worker {rank} exited with status {status} (its output above says why)", file=sys.stderr)
        sys.exit(status)
