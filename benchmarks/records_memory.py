"""Memory and time of reading a data file: a .jsonl parsed whole (before) vs indexed by offset (now), and Parquet.

    python benchmarks/records_memory.py [--records 100000 1000000]

Writes ``--records`` one-image records, one per line (about 260 bytes each, as benchmarks/startup.py
writes them), and reads the file in a fresh process each way, reporting the growth of its peak
resident memory (ru_maxrss) and the seconds:

- ``parsed``: what load_records did before: the whole text decoded, cut into lines and every line
  parsed into a dict, all held;
- ``indexed``: what it does now (data.sources.json_lines.JsonLines): the file scanned once for line offsets, 16
  bytes a record held, each record parsed when asked for; then every record is read once, as
  preflight reads them;
- ``rank_of_2``: what one of 2 ranks reads now: the lines that start in the first half of the file's
  bytes indexed (data.sources.json_lines.index_lines; the ranks then gather the halves), and the
  first half of the records read once, as its preflight share reads them;
- ``parquet``: the same records in a Parquet file, read through data.sources (``datasets``, memory-
  mapped), every record read once; ``parquet_first`` the first read, which also converts the file into
  Arrow files in the ``datasets`` cache (a temporary HF_HOME), ``parquet`` a later read of it (a
  restart, or a rank after the first).

A process's peak is what one rank holds for its records (a rank reads the file the same way).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("parsed", "indexed", "rank_of_2", "parquet_first", "parquet")


def write(path, records):
    with open(path, "w") as f:
        for n in range(records):
            f.write(json.dumps({"id": f"r{n}", "image": f"images/{n % 10_000:06d}.jpg", "conversations": [
                {"role": "user", "content": "<image>\nWhat is in the image? Describe the colours and the shapes."},
                {"role": "assistant", "content": f"A red ellipse on a mottled background, number {n}."}]}) + "\n")


def one(way, path):
    """``{"peak_mib", "seconds", "records"}`` of reading ``path`` the given way, in this process."""
    sys.path.insert(0, str(ROOT))
    from data.json_text import read_text
    from data.sources import load

    if way.startswith("parquet"):
        import datasets  # noqa: F401 (imported before the baseline: its import is no record's memory)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if way == "parsed":
        records = [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
        count = len(records)
    elif way == "rank_of_2":
        from data.sources.json_lines import index_lines

        offsets, _, _ = index_lines(path, 0, os.path.getsize(path) // 2)
        with open(path, "rb") as f:
            count = 0
            for offset in offsets:
                f.seek(int(offset))
                count += isinstance(json.loads(f.readline()), dict)
    elif way.startswith("parquet"):
        records = load(Path(path).with_suffix(".parquet"))
        count = sum(1 for record in records if isinstance(record, dict))
    else:
        records = load(path)
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
    import datasets  # here: a measured process imports it only where it reads Parquet
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'records':>9} {'file MiB':>9} {'way':>13} {'peak growth MiB':>16} {'seconds':>8}")
        for records in args.records:
            path = Path(tmp) / f"{records}.jsonl"
            write(path, records)
            datasets.Dataset.from_json(str(path), cache_dir=str(Path(tmp) / "from_json")).to_parquet(
                str(path.with_suffix(".parquet")))
            for way in WAYS:
                env = dict(os.environ, HF_HOME=str(Path(tmp) / f"hf{records}"))
                output = subprocess.run([sys.executable, __file__, "--one", way, str(path)], capture_output=True,
                                        text=True, check=True, env=env).stdout
                result = json.loads(output.splitlines()[-1])
                # One rank of 2 reads about half of the records.
                assert (records // 3 < result["records"] < 2 * records // 3 if way == "rank_of_2"
                        else result["records"] == records), result
                results.append({"records": records, "way": way, **result})
                print(f"{records:>9} {path.stat().st_size / 2**20:>9.1f} {way:>13} {result['peak_mib']:>16.1f} "
                      f"{result['seconds']:>8.2f}", flush=True)
            path.unlink()
            path.with_suffix(".parquet").unlink()
    return results


if __name__ == "__main__":
    main()
