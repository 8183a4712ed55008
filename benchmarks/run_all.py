"""`make bench`: run every benchmark script in this folder, one after the other.

Each script is resumable (finished arms are skipped) and writes its tables under benchmarks/results/, so a killed
`make bench` continues where it stopped. Pass script names to run a subset: `python benchmarks/run_all.py throughput`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

if __package__:  # imported as benchmarks.run_all (the tests)
    from benchmarks import common
else:  # run as python benchmarks/run_all.py: common.py lies beside it, on sys.path
    import common

# fusion_tuning tunes on other phantom seeds: not a benchmark; common (and the package's __init__) is their library
SKIP = {"run_all", "fusion_tuning", "common", "__init__"}


def scripts(names: list[str]) -> list[Path]:
    """The benchmark scripts to run: every one in this folder, or those named."""
    found = sorted(p for p in common.BENCHMARKS.glob("*.py") if p.stem not in SKIP)
    return [p for p in found if p.stem in names] if names else found


def main(argv: list[str]) -> int:
    failed = []
    for script in scripts(argv):
        print(f"\n=== {script.name}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(script)], cwd=common.REPO).returncode
        print(f"=== {script.name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
