"""Start-up that does not wait on a quantiser it will not use.

transformers' ``TrainingArguments`` imports peft whenever peft is installed, and peft imports
bitsandbytes whenever that is installed; bitsandbytes compiles kernels with ``torch.compile`` as
it is imported, which brings in torch._dynamo and torch._inductor: about 5 s of a start-up that
needs none of it unless the LLM is loaded in 4 bit (``--q_lora``) or the optimizer is one of
bitsandbytes'. ``finetune.py``, run as a script, calls ``keep_bitsandbytes_out`` before anything
imports transformers: when its command line asks for neither, bitsandbytes is marked absent for
this process (``sys.modules[name] = None``: ``import`` raises ImportError, ``find_spec`` says
not installed), and peft and transformers go on as they do where it is not installed.

The check is conservative: any ``--q_lora`` flag (even ``false``), any ``--optim`` other than
the torch ones below, or arguments from a file keep bitsandbytes importable as before.
"""

import sys

QUANTISER = "bitsandbytes"
# Optimizers (--optim) implemented by torch or transformers, without bitsandbytes.
TORCH_OPTIMIZERS = frozenset({"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"})


def needs_bitsandbytes(argv):
    """Whether the command line ``argv`` may need bitsandbytes (see the module docstring)."""
    if any(arg.endswith((".json", ".yaml", ".yml")) for arg in argv[:1]):  # HfArgumentParser's file form
        return True
    for n, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name == "--q_lora":
            return True
        if name == "--optim":
            value = value or (argv[n + 1] if n + 1 < len(argv) else "")
            if value not in TORCH_OPTIMIZERS:
                return True
    return False


def keep_bitsandbytes_out(argv):
    """Mark bitsandbytes absent for this process unless ``argv`` may need it; True if it did.
    Call before transformers is imported (later, modules that imported it keep it)."""
    if needs_bitsandbytes(argv) or QUANTISER in sys.modules:
        return False
    sys.modules[QUANTISER] = None
    return True
