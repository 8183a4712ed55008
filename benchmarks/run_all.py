"""`make bench`: run every benchmark script in this folder, one after the other.

Each script is resumable (finished arms are skipped) and writes its tables under benchmarks/results/, so a killed
`make bench` continues where it stopped. Pass script names to run a subset: `python benchmarks/run_all.py throughput`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all", "fusion_tuning"}  # fusion_tuning tunes on other phantom seeds: not a benchmark


def main(argv: list[str]) -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.stem not in SKIP)
    if argv:
        scripts = [p for p in scripts if p.stem in argv]
    failed = []
    for script in scripts:
        print(f"\n=== {script.name}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode
        print(f"=== {script.name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
