"""``make demo``: the main job on the embedded phantom, step by step, with the real command-line entry points.

Each step is printed as the command a user would type, then run, so the demo doubles as a tutorial:
1. generate the phantom (frozen spec, default seed) and print its data check table;
2. pre-train SimSiam on MDA cross-phase pairs and export ``encoder.pt``.
Outputs go under ``logs/`` (runs) and ``data/phantom`` (the phantom) in the current directory.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

STEPS = {
    "check": ["-m", "liverfusion.data.check", "data=phantom"],
    "pretrain": ["-m", "liverfusion.train", "+experiment=simsiam_pretrain", "extras.print_config=false"],
}


def run_step(name: str, extra: list[str]) -> float:
    cmd = [sys.executable, *STEPS[name], *extra]
    shown = "python " + " ".join(shlex.quote(c) for c in cmd[1:])
    print(f"\n=== {name}: {shown}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        sys.exit(f"demo step {name!r} failed with exit code {result.returncode}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {list(STEPS)}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to the training steps")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
    timings = {}
    for name in steps:
        timings[name] = run_step(name, args.overrides if name != "check" else [])
    print("\n=== demo finished")
    for name, seconds in timings.items():
        print(f"  {name:<10} {seconds:7.1f} s")
    encoders = sorted(Path("logs").glob("simsiam_pretrain/runs/*/checkpoints/encoder.pt"), key=os.path.getmtime)
    if encoders:
        print(f"  encoder:   {encoders[-1]}")
    print("  phantom:   data/phantom (LLD-MMRI layout: images/<case>/<Phase>.nii.gz, labels.txt)")


if __name__ == "__main__":
    main()
