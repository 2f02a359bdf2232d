"""Seconds from launch to a parsed command line: finetune.py --help, with and without bitsandbytes.

    python benchmarks/import_time.py [--repeats 5]

Each case runs in a fresh process (``python -X importtime finetune.py ...``), the cases
interleaved, and the median wall and CPU times are reported, with whether bitsandbytes and
torch._inductor's compiler (torch._inductor.compile_fx, which bitsandbytes' import brings in)
were imported:

- ``--help``: what a --help or a --preflight_only run pays now (startup.py keeps bitsandbytes out);
- ``--help --q_lora true``: what they paid before, and what a QLoRA run still pays;
- ``import finetune`` as a library (tests, benchmarks): bitsandbytes stays importable there.
"""

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "--help": [str(ROOT / "finetune.py"), "--help"],
    "--help --q_lora true": [str(ROOT / "finetune.py"), "--help", "--q_lora", "true"],
    "import finetune": ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import finetune"],
}
WATCHED = ("bitsandbytes", "torch._inductor.compile_fx")


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(args):
    """``((wall seconds, CPU seconds), {watched module: imported?})`` of one fresh process."""
    start, cpu = time.perf_counter(), cpu_seconds()
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=ROOT)
    seconds = (time.perf_counter() - start, cpu_seconds() - cpu)
    if done.returncode:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-2000:]}")
    # importtime lines: "import time: self | cumulative | name"; a module marked absent is listed
    # with a few microseconds and no children, so count only the ones that took real time.
    imported = {}
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() in WATCHED:
            imported[parts[2].strip()] = int(parts[1]) > 1000
    return seconds, {name: imported.get(name, False) for name in WATCHED}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    seconds = {name: [] for name in CASES}
    imported = {}
    for _ in range(args.repeats):
        for name, case in CASES.items():  # interleaved: load on a shared machine hits every case alike
            took, imported[name] = run_case(case)
            seconds[name].append(took)
    # CPU seconds (user + system) vary less than wall seconds on a machine shared with other work.
    print(f"median of {args.repeats} fresh processes (wall seconds, CPU seconds):")
    for name, values in seconds.items():
        modules = ", ".join(f"{module}: {'yes' if imported[name][module] else 'no'}" for module in WATCHED)
        wall, cpu = (statistics.median(v[n] for v in values) for n in range(2))
        print(f"  {name:>22}: {wall:6.2f} {cpu:6.2f}   ({modules}; "
              f"CPU runs: {', '.join(f'{v[1]:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
