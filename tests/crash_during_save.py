"""Run finetune.py with a crash injected in the middle of one checkpoint save (for tests).

    CRASH_AT_STEP=N python tests/crash_during_save.py FINETUNE_ARGS...

When the Trainer saves the checkpoint of step N, the process SIGKILLs itself after the model
weights are written and before the optimizer, RNG states and trainer_state.json: the state a
machine dying mid-save leaves behind.
"""

import os
import signal
import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import finetune  # noqa: E402

save_optimizer = transformers.Trainer._save_optimizer_and_scheduler


def crash_mid_save(self, output_dir):
    if self.state.global_step == int(os.environ["CRASH_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_optimizer(self, output_dir)


transformers.Trainer._save_optimizer_and_scheduler = crash_mid_save

if __name__ == "__main__":
    finetune.main(sys.argv[1:])
