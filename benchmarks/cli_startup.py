"""Command-line start-up: how long ``--help`` takes, and how long a command takes before it does any work.

Arms (each a fresh process, timed from outside, from start to exit; median of ``--repeats`` after one warm-up):

- ``help_<command>``: ``liverfusion-<command> --help`` for every console script (answered by ``liverfusion.help``,
  which imports neither torch nor Lightning nor MONAI), with the modules each run left imported;
- ``help_python_m_train``: ``python -m liverfusion.train --help`` (the module imports torch first: the same page,
  slower), the figure the issue measured at 12-17 s before;
- ``compose_train``: ``python -m liverfusion.train +experiment=simsiam_pretrain --cfg job`` (imports, the config
  search path, composition: everything a training run does before it touches data);
- ``import_train``: ``python -c "import liverfusion.train"`` (the import floor of any training command).

The machine this runs on may be shared: the load average at the start and end is recorded beside the figures, and
min/max show the spread. Resumable: finished arms are kept (delete their entry in the JSON to redo one).

    python benchmarks/cli_startup.py                   # all arms, 5 repeats
    python benchmarks/cli_startup.py --arms help_train compose_train --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__:  # imported as benchmarks.cli_startup (the tests)
    from benchmarks import common
else:  # run as python benchmarks/cli_startup.py: common.py lies beside it, on sys.path
    import common

sys.path.insert(0, str(common.REPO))  # the repository's package, installed or not
from liverfusion.help import COMMANDS  # noqa: E402  (light: no torch)

HEAVY = ("torch", "lightning", "monai", "hydra")
PROBE = (
    "import sys, runpy; sys.argv = [{script!r}, '--help']\n"
    "from liverfusion import help as h\n"
    "import contextlib, io\n"
    "with contextlib.redirect_stdout(io.StringIO()): h.run({name!r})\n"
    f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
)


def arms() -> dict[str, list[str]]:
    py = sys.executable
    scripts = Path(py).parent
    out: dict[str, list[str]] = {}
    for name, cmd in COMMANDS.items():
        exe = scripts / cmd.script
        out[f"help_{name}"] = (
            [str(exe), "--help"]
            if exe.is_file()
            else [py, "-c", f"from liverfusion.help import run; run({name!r}, ['--help'])"]
        )
    out["help_python_m_train"] = [py, "-m", "liverfusion.train", "--help"]
    out["compose_train"] = [py, "-m", "liverfusion.train", "+experiment=simsiam_pretrain", "--cfg", "job"]
    out["import_train"] = [py, "-c", "import liverfusion.train"]
    return out


def time_command(cmd: list[str], repeats: int, cwd: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    walls = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            raise RuntimeError(f"{cmd}: exit {run.returncode}: {run.stderr[-500:]}")
        if i:  # the first run warms the file cache
            walls.append(wall)
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "runs": len(walls),
    }


def heavy_modules(name: str, cwd: Path) -> list[str]:
    code = PROBE.format(script=COMMANDS[name].script, name=name)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    return [m for m in out.stdout.strip().split(",") if m]


def table(results: dict[str, Any]) -> str:
    rows = ["| arm | median s | min s | max s | heavy modules imported |", "|---|---|---|---|---|"]
    for name, r in results.get("arms", {}).items():
        heavy = r.get("heavy")
        shown = "-" if heavy is None else (", ".join(heavy) or "none")
        rows.append(f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {shown} |")
    cross = results.get("farm_bench")
    if cross:  # recorded by hand: `farm-bench -n 5 --vs "python -m liverfusion.train --help" -- liverfusion-train --help`
        rows.append(
            f"\nCross-check with `farm-bench` ({cross['command']}): A wall median {cross['a_wall_s']} s, cpu "
            f"{cross['a_cpu_s']} s, peak {cross['a_peak_mib']} MiB; B wall median {cross['b_wall_s']} s, cpu "
            f"{cross['b_cpu_s']} s, peak {cross['b_peak_mib']} MiB; A/B wall {cross['ab_wall']} (paired)."
        )
    load = results.get("load_average", {})
    note = (
        f"\n\n{results.get('machine', '')}; load average at start {load.get('start')}, at end {load.get('end')} "
        "(a shared machine: other jobs ran beside these processes, so the figures are upper bounds)."
    )
    return "\n".join(rows) + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--results", type=Path, default=common.RESULTS / "cli_startup.json")
    args = p.parse_args(argv)
    all_arms = arms()
    chosen = args.arms or list(all_arms)
    results = common.read_json(args.results)
    results.setdefault("arms", {})
    results["machine"] = f"{os.cpu_count()} CPU cores, Python {sys.version.split()[0]}"
    load_start = round(os.getloadavg()[0], 2)
    measured = False
    cwd = Path(os.environ.get("TMPDIR", "/tmp"))
    for name in chosen:
        if name in results["arms"]:
            print(f"{name}: kept ({results['arms'][name]['median_s']:.2f} s)")
            continue
        r = time_command(all_arms[name], args.repeats, cwd)
        if name.startswith("help_") and name.removeprefix("help_") in COMMANDS:
            r["heavy"] = heavy_modules(name.removeprefix("help_"), cwd)
        results["arms"][name] = r
        if not measured:  # the load beside the arms measured now
            measured = True
            results["load_average"] = {"start": load_start}
        print(f"{name}: {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f})", flush=True)
        common.write_json(args.results, results)
    if measured:
        results["load_average"]["end"] = round(os.getloadavg()[0], 2)
    common.write_results(
        args.results,
        results,
        "# Command-line start-up (`benchmarks/cli_startup.py`)\n\n"
        "Wall seconds from process start to exit, median of the repeats after one warm-up run.\n\n"
        + table(results)
        + "\n",
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
