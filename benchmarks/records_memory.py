"""Memory and time of reading a .jsonl data file: records parsed whole (before) vs indexed by offset (now).

    python benchmarks/records_memory.py [--records 100000 1000000]

Writes ``--records`` one-image records, one per line (about 260 bytes each, as benchmarks/startup.py
writes them), and reads the file in a fresh process each way, reporting the growth of its peak
resident memory (ru_maxrss) and the seconds:

- ``parsed``: what load_records did before: the whole text decoded, cut into lines and every line
  parsed into a dict, all held;
- ``indexed``: what it does now (dataset.JsonLines): the file scanned once for line offsets, 16
  bytes a record held, each record parsed when asked for; then every record is read once, as
  preflight reads them.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write(path, records):
    with open(path, "w") as f:
        for n in range(records):
            f.write(json.dumps({"id": f"r{n}", "image": f"images/{n % 10_000:06d}.jpg", "conversations": [
                {"role": "user", "content": "<image>\nWhat is in the image? Describe the colours and the shapes."},
                {"role": "assistant", "content": f"A red ellipse on a mottled background, number {n}."}]}) + "\n")


def one(way, path):
    """``{"peak_mib", "seconds", "records"}`` of reading ``path`` the given way, in this process."""
    sys.path.insert(0, str(ROOT))
    import dataset

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if way == "parsed":
        records = [json.loads(line) for line in dataset.read_text(path).splitlines() if line.strip()]
        count = len(records)
    else:
        records = dataset.load_records(path)
        count = sum(1 for record in records if isinstance(record, dict))  # each read once
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"peak_mib": round(peak / 1024, 1), "seconds": round(seconds, 2), "records": count}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--one", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'records':>9} {'file MiB':>9} {'way':>8} {'peak growth MiB':>16} {'seconds':>8}")
        for records in args.records:
            path = Path(tmp) / f"{records}.jsonl"
            write(path, records)
            for way in ("parsed", "indexed"):
                output = subprocess.run([sys.executable, __file__, "--one", way, str(path)], capture_output=True,
                                        text=True, check=True).stdout
                result = json.loads(output.splitlines()[-1])
                assert result["records"] == records, result
                results.append({"records": records, "way": way, **result})
                print(f"{records:>9} {path.stat().st_size / 2**20:>9.1f} {way:>8} {result['peak_mib']:>16.1f} "
                      f"{result['seconds']:>8.2f}", flush=True)
            path.unlink()
    return results


if __name__ == "__main__":
    main()
