"""Time to the first step of a real training run: wall seconds from process start to the end of the first optimiser
step, for source trees side by side (this checkout, and e.g. a worktree of the commit before a change).

Each run is a fresh ``python -m liverfusion.train <arm> debug=fast`` with the tree first on ``PYTHONPATH``; a probe
registers a global optimiser-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) that prints the
time since the parent started the process. Per tree and arm: one warm-up run (it generates the phantom and fills the
preprocessing cache, shared by every tree: the entries are keyed by content), then ``--repeats`` timed runs,
alternating the trees so that a busy machine slows them alike. Beside the runs: ``import_train``
(``python -c "import liverfusion.train"``, the import floor), and for the first tree the ``-X importtime`` self time
per top-level package of one run (what is imported before the step).

    python benchmarks/first_step.py                                    # this checkout
    python benchmarks/first_step.py --trees before=/path/to/old/worktree after=.   # before / after a change

Writes ``benchmarks/results/first_step.{md,json}``; resumable (finished (tree, arm) pairs are kept; ``--fresh``
redoes them). The load average at start and end is recorded: on a shared machine the figures are upper bounds,
and the ratio between trees measured in one run is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__:
    from benchmarks import common
else:
    import common

PROBE = (
    "import os, sys, time, runpy\n"
    "t0 = float(os.environ['LF_FIRST_STEP_T0'])\n"
    "from torch.optim.optimizer import register_optimizer_step_post_hook\n"
    "def _first(opt, args, kwargs):\n"
    "    print(f'LF_FIRST_STEP {time.time() - t0:.3f}', file=sys.stderr, flush=True)\n"
    "    handle.remove()\n"
    "handle = register_optimizer_step_post_hook(_first)\n"
    "sys.argv = ['liverfusion.train', *sys.argv[1:]]\n"
    "runpy.run_module('liverfusion.train', run_name='__main__', alter_sys=True)\n"
)
MARK = re.compile(r"LF_FIRST_STEP (\d+\.\d+)")
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")


def _env(tree: Path, t0: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {
        **env,
        "PYTHONPATH": str(tree),
        "WANDB_MODE": "disabled",
        "PYTHONWARNINGS": "ignore",
        "LF_FIRST_STEP_T0": repr(t0),
    }


def time_run(tree: Path, overrides: list[str], run_dir: Path, importtime: bool = False) -> dict[str, Any]:
    """One training process: seconds to the first optimiser step and to exit (and its import log, if asked)."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", PROBE, *overrides]
    cmd.append(f"hydra.run.dir={run_dir}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = subprocess.run(cmd, cwd=run_dir.parent, env=_env(tree, t0), capture_output=True, text=True)
    total = time.time() - t0
    found = MARK.search(out.stderr)
    if out.returncode != 0 or found is None:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
        raise RuntimeError(f"{tree}: {' '.join(overrides)} failed (exit {out.returncode}):\n{tail}")
    return {
        "first_step_s": float(found.group(1)),
        "exit_s": total,
        "stderr": out.stderr if importtime else "",
    }


def time_import(tree: Path) -> float:
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-c", "import liverfusion.train"],
        env=_env(tree, t0),
        check=True,
        capture_output=True,
    )
    return time.time() - t0


def import_breakdown(stderr: str, top: int = 12) -> list[dict[str, Any]]:
    """Self time of every module imported by the main process, summed per top-level package (seconds)."""
    per: Counter[str] = Counter()
    for line in stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            per[m.group(4).split(".")[0]] += int(m.group(1)) / 1e6
    return [{"package": k, "self_s": round(v, 3)} for k, v in per.most_common(top)]


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def markdown(res: dict[str, Any]) -> str:
    trees = list(res["trees"])
    lines = [
        "# Time to the first step (`benchmarks/first_step.py`)",
        "",
        "Wall seconds from process start to the end of the first optimiser step of `python -m liverfusion.train "
        "<arm>` (`debug=fast`), median of the timed repeats (min-max) after one warm-up per tree; the trees "
        "alternate, so the ratio between them is measured under the same load.",
        "",
        f"Trees: {', '.join(f'`{k}` = {v}' for k, v in res['trees'].items())}. {res.get('machine', '')}",
        "",
        "| arm | " + " | ".join(f"{t} s" for t in trees) + (" | ratio |" if len(trees) == 2 else ""),
        "|---|" + "---:|" * len(trees) + ("---:|" if len(trees) == 2 else ""),
    ]
    for arm, per in res["arms"].items():
        cells = [
            f"{per[t]['first_step']['median']:.2f} ({per[t]['first_step']['min']:.2f}-{per[t]['first_step']['max']:.2f})"
            if t in per
            else "-"
            for t in trees
        ]
        ratio = ""
        if len(trees) == 2 and all(t in per for t in trees):
            ratio = f" {per[trees[1]]['first_step']['median'] / per[trees[0]]['first_step']['median']:.2f} |"
        lines.append(f"| {arm} | " + " | ".join(cells) + (" |" + ratio if ratio else " |"))
    if res.get("import_train"):
        cells = [
            f"{res['import_train'][t]['median']:.2f}" if t in res["import_train"] else "-" for t in trees
        ]
        lines.append("| import_train (`import liverfusion.train`) | " + " | ".join(cells) + " |")
    if res.get("imports"):
        lines += [
            "",
            f"Imported before the first step of `{res['imports']['arm']}` ({res['imports']['tree']}), "
            "self time per top-level package (`-X importtime`; the rest of the time is the run's own work):",
            "",
        ]
        lines += ["| package | s |", "|---|---:|"]
        lines += [f"| {r['package']} | {r['self_s']:.2f} |" for r in res["imports"]["packages"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--trees", nargs="*", default=[f"current={common.REPO}"], help="LABEL=PATH source trees"
    )
    parser.add_argument("--arms", nargs="*", default=None, help="arms of first_step/runs.yaml (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=common.REPO / ".cache" / "benchmarks" / "first_step")
    parser.add_argument("--data-dir", type=Path, default=None, help="phantom folder (default: <work>/data)")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="preprocessing cache (default: <work>/cache)"
    )
    parser.add_argument("--results", type=Path, default=common.RESULTS / "first_step.json")
    parser.add_argument("--fresh", action="store_true", help="redo finished (tree, arm) pairs")
    args = parser.parse_args(argv)

    trees = {}
    for item in args.trees:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).joinpath("liverfusion", "train.py").is_file():
            parser.error(f"--trees takes LABEL=PATH of a liverfusion source tree, got {item!r}")
        trees[label] = Path(path).resolve()
    table = common.load_yaml("first_step", "runs")
    unknown = sorted(set(args.arms or ()) - set(table))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {sorted(table)}")
    chosen = [a for a in table if args.arms is None or a in args.arms]
    work = args.work.resolve()
    paths = [
        f"paths.data_dir={(args.data_dir or work / 'data').resolve()}",
        f"paths.cache_dir={(args.cache_dir or work / 'cache').resolve()}",
    ]

    res = common.read_json(args.results) if not args.fresh else {}
    if res.get("trees") not in (None, {k: str(v) for k, v in trees.items()}):
        res = {}  # other trees: a new comparison
    res["trees"] = {k: str(v) for k, v in trees.items()}
    res.setdefault("arms", {})
    load0 = os.getloadavg()[0]
    for arm in chosen:
        per = res["arms"].setdefault(arm, {})
        todo = [t for t in trees if t not in per]
        if not todo:
            continue
        overrides = [*table[arm]["overrides"], *paths]
        runs: dict[str, list[float]] = {t: [] for t in todo}
        for rep in range(args.repeats + 1):  # repeat 0: the warm-up (data generated, caches filled)
            for tree in todo:
                run_dir = work / "runs" / tree / arm / f"r{rep}"
                got = time_run(trees[tree], overrides, run_dir)
                print(
                    f"[{time.strftime('%H:%M:%S')}] {arm} {tree} r{rep}: first step {got['first_step_s']:.2f} s",
                    flush=True,
                )
                if rep:
                    runs[tree].append(got["first_step_s"])
        if not res.get("imports"):  # one more, untimed run: -X importtime slows what it logs
            tree = todo[-1]
            got = time_run(trees[tree], overrides, work / "runs" / tree / arm / "importtime", importtime=True)
            res["imports"] = {"arm": arm, "tree": tree, "packages": import_breakdown(got["stderr"])}
        for tree in todo:
            per[tree] = {"first_step": _stats(runs[tree]), "runs_s": runs[tree]}
        common.write_results(args.results, res, markdown(res))
    res.setdefault("import_train", {})
    for tree in trees:
        if tree not in res["import_train"]:
            res["import_train"][tree] = _stats([time_import(trees[tree]) for _ in range(args.repeats)])
    res["machine"] = (
        f"{os.cpu_count()} CPU cores, Python {sys.version.split()[0]}; load average at start {load0:.2f}, "
        f"at end {os.getloadavg()[0]:.2f}."
    )
    common.write_results(args.results, res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
