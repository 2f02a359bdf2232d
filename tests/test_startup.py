"""startup.py: bitsandbytes stays out of a run that does not use it, and in one that may."""

import subprocess
import sys
from pathlib import Path

import pytest

import startup

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv, needed",
    [
        (["--help"], False),
        (["--model_name_or_path", "m", "--preflight_only", "true", "--optim", "adamw_torch"], False),
        (["--optim=adafactor", "--use_lora", "true"], False),
        (["--q_lora", "true"], True),
        (["--q_lora=false"], True),  # conservative: any --q_lora keeps it
        (["--q_lora"], True),
        (["--optim", "adamw_bnb_8bit"], True),
        (["--optim=paged_adamw_32bit"], True),
        (["--optim"], True),
        (["args.json"], True),  # arguments from a file: not read here
    ],
)
def test_needs_bitsandbytes(argv, needed):
    assert startup.needs_bitsandbytes(argv) is needed


def start_up(*args):
    """A fresh ``python finetune.py ARGS`` (exit status 0 asserted): the modules it imported, and then
    whether bitsandbytes can be imported there ("importable", "marked absent" or "missing")."""
    code = (
        "import importlib, runpy, sys; sys.argv = ['finetune.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_path('finetune.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "try:\n    importlib.import_module('bitsandbytes'); print('importable')\n"
        "except ImportError:\n    print('marked absent' if sys.modules.get('bitsandbytes', 0) is None else 'missing')\n"
    )
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = {line.split("|")[2].strip(): int(line.split("|")[1]) for line in done.stderr.splitlines()
               if line.startswith("import time:") and line.split("|")[1].strip().isdigit()}
    return modules, done.stdout.strip().splitlines()[-1]


@pytest.mark.launch
def test_help_does_not_import_the_quantiser():
    plain, quantiser = start_up("--help")
    # Listed at a few microseconds: the lookup that found it marked absent, nothing loaded.
    assert plain.get(startup.QUANTISER, 0) < 1000 and "bitsandbytes.functional" not in plain
    assert "torch._inductor.compile_fx" not in plain and "peft" in plain  # transformers still imports peft
    assert quantiser == "marked absent"
    # Whether peft imports bitsandbytes at start-up is peft's (0.22 no longer does): what is ours is
    # that a run that may quantise can import it.
    assert start_up("--help", "--q_lora", "true")[1] == "importable"


def test_a_module_already_imported_is_left_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, startup.QUANTISER, object())
    assert startup.keep_bitsandbytes_out(["--help"]) is False
