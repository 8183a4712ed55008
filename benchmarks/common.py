"""What the benchmark scripts share: paths, the phantom protocol's seeds, running one ``liverfusion.*`` command
(resumable), pre-training per fold, running a table of arms, aggregating them into results/<stem>.{md,csv,json},
composing a config in-process, the arm and protocol YAML files beside the scripts, the result JSON files.

Every script imports this module and no script imports another one, so a script is read, run and changed on its
own. Run as ``python benchmarks/<script>.py`` a script finds it beside itself (the script's folder is on sys.path);
imported as ``benchmarks.<script>`` (the tests) through the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
# the phantom protocol of fusion_phantom.py, label_efficiency.py and fusion_tuning.py (which never tunes on it)
PHANTOM_SEED = 4242
TRAIN_SEED = 0
FOLDS = (0, 1, 2)
QUIET = [
    "logger=csv",
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "+trainer.enable_progress_bar=false",
]
"""Overrides of every benchmark run: a CSV log, no console decoration."""
NO_OUTPUT = ["paths.output_dir=/tmp/unused", "data.split.save_to=null"]
"""Overrides of a ``train`` config composed in-process only to build its data module or model (nothing written)."""


# ---------------------------------------------------------------------------------------------------------------
# arm and protocol files
# ---------------------------------------------------------------------------------------------------------------
def load_yaml(benchmark: str, name: str) -> dict[str, Any]:
    """``benchmarks/<benchmark>/<name>.yaml`` as plain data (never resolved: these files hold no interpolation).

    An arms file maps each arm's name to ``{kind: scratch | pretrained, overrides: [...]}`` (more keys where a
    script reads them), in the order the script runs and reports them."""
    import yaml

    return yaml.safe_load((BENCHMARKS / benchmark / f"{name}.yaml").read_text())


def fill(overrides: Iterable[str], **values: str | Sequence[str]) -> list[str]:
    """An arm's overrides with its placeholders filled: ``{key}`` inside an override takes a string value; an
    override that is exactly ``{key}`` takes a list value's items in its place (the order is kept). Placeholders
    without a value stay as they are (``{fold}`` is filled per fold by :func:`run_arms`)."""
    out: list[str] = []
    for override in overrides:
        spliced = values.get(override[1:-1]) if override[:1] == "{" and override[-1:] == "}" else None
        if spliced is not None and not isinstance(spliced, str):
            out.extend(spliced)
            continue
        for key, value in values.items():
            if isinstance(value, str):
                override = override.replace("{" + key + "}", value)
        out.append(override)
    return out


def arm_table(arms: Mapping[str, Mapping[str, Any]], **values: str | Sequence[str]) -> dict[str, list[str]]:
    """name -> overrides of every arm of an arms file, placeholders filled (:func:`fill`)."""
    return {name: fill(spec["overrides"], **values) for name, spec in arms.items()}


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def run_logged(cmd: Sequence[str], log: Path, **env: str) -> tuple[int, float]:
    """Run ``cmd`` from the repository, its output into ``log``, W&B off (plus ``env``); (exit code, seconds)."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **env}
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(
            list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=REPO
        ).returncode
    return code, time.perf_counter() - start


def run(args: Sequence[str], out: Path, log_name: str = "run.log", done: str = "test/summary.json") -> float:
    """Run one ``python -m liverfusion.*`` command into ``out`` unless it already finished; return seconds."""
    if (out / done).is_file():
        return 0.0
    if out.exists():  # an interrupted run: start it again cleanly
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [sys.executable, *args, f"hydra.run.dir={out}"]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(args[:4])} ... -> {out}", flush=True)
    code, seconds = run_logged(cmd, out / log_name, PYTHONWARNINGS="ignore")
    if code != 0 or not (out / done).is_file():
        raise RuntimeError(f"run failed ({code}); see {out / log_name}")
    (out / "seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


KEPT_SUFFIXES = (".json", ".csv", ".yaml", ".txt", ".md")
"""What :func:`archive_runs` keeps of a run: its results, configs, splits, metric curves and timings."""
KEPT_NAMES = ("encoder.pt",)
"""... and the exported encoders (a few MB each: what every fine-tuning arm starts from)."""
DROPPED_NAMES = ("submission.json",)
"""Per-case copies of what predictions.csv holds (the checkpoints, features and figures are dropped too)."""


def _kept(path: Path) -> bool:
    return path.name in KEPT_NAMES or (path.suffix in KEPT_SUFFIXES and path.name not in DROPPED_NAMES)


def archive_runs(work: Path, dest: Path, parts: Sequence[str], loose: Sequence[str] = ()) -> int:
    """Copy what a benchmark's summary needs of every finished run under ``work/<part>`` into ``dest`` (a tracked
    folder): no checkpoints, so it stays small, and a fresh clone that restores it (:func:`restore_runs`)
    aggregates and resumes without re-running what is done. Only finished runs (a ``seconds.txt``) are kept, plus
    the files matching the ``loose`` globs (relative to ``work``); returns the number of files written."""
    n = 0
    for pattern in loose:
        for f in sorted(work.glob(pattern)):
            target = dest / f.relative_to(work)
            if f.is_file() and (not target.is_file() or target.read_bytes() != f.read_bytes()):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
                n += 1
    for part in parts:
        for done in sorted((work / part).rglob("seconds.txt")):
            run_dir = done.parent
            for f in sorted(run_dir.rglob("*")):
                if f.is_file() and _kept(f):
                    target = dest / f.relative_to(work)
                    if not target.is_file() or target.read_bytes() != f.read_bytes():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, target)
                        n += 1
    return n


def restore_runs(src: Path, work: Path) -> int:
    """Copy an archive (:func:`archive_runs`) into ``work`` where a file is missing there; returns how many."""
    n = 0
    for f in sorted(src.rglob("*")) if src.is_dir() else []:
        target = work / f.relative_to(src)
        if f.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            n += 1
    return n


def in_process(threads: int, workdir: Path) -> None:
    """Set up a script that trains or predicts in its own process: W&B off (unless set), ``threads`` torch
    threads, its work folder."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    torch.set_num_threads(threads)
    workdir.mkdir(parents=True, exist_ok=True)


def compose(config_name: str, overrides: Sequence[str]) -> Any:
    """One of the package's configs (``train``, ``evaluate``, ``predict``) composed in this process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from liverfusion.utils.hydra_utils import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def read_json(path: Path, default: Any = None) -> Any:
    """A results file written before (resumable scripts), else ``default`` (``{}``)."""
    if path.is_file():
        return json.loads(path.read_text())
    return {} if default is None else default


def write_json(path: Path, data: Any, **dumps: Any) -> None:
    """A results file, written atomically (a killed script leaves the previous one)."""
    from liverfusion.utils.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, **dumps))


def write_results(path: Path, data: Any, markdown: str) -> None:
    """A script's results: ``path`` (JSON) and its Markdown beside it (the same name, ``.md``), each atomic."""
    from liverfusion.utils.atomic import atomic_write_text

    write_json(path, data)
    atomic_write_text(path.with_suffix(".md"), markdown)


# ---------------------------------------------------------------------------------------------------------------
# the phantom protocol: data, pre-training per fold, arms on every fold
# ---------------------------------------------------------------------------------------------------------------
def preset_variant(n_cases: int | None = None, normalize: str | None = None) -> tuple[str, list[str], str]:
    """A phantom size or intensity normalisation other than the preset's: the suffix of its work folder and
    results stem, the overrides of its every run (pre-training included), and the normalisation in effect."""
    from omegaconf import OmegaConf

    preset = OmegaConf.load(REPO / "conf" / "data" / "phantom.yaml").preprocess.normalize
    norm = normalize or preset
    suffix = (f"_n{n_cases}" if n_cases else "") + (f"_{norm}" if norm != preset else "")
    extra = [f"data.layout.n_cases={n_cases}"] if n_cases else []
    extra += [f"data.preprocess.normalize={norm}"] if normalize else []
    return suffix, extra, norm


def base_overrides(work: Path, phantom_seed: int = PHANTOM_SEED) -> list[str]:
    """Overrides of every run on the phantom: its data and cache under ``work``, its seed, :data:`QUIET`."""
    return [
        f"paths.data_dir={work / 'data'}",
        f"paths.cache_dir={work / 'cache'}",
        f"data.layout.seed={phantom_seed}",
        *QUIET,
    ]


def pretrain(
    work: Path, name: str, fold: int, extra: Sequence[str] = (), phantom_seed: int = PHANTOM_SEED
) -> Path:
    """SimSiam on the training patients of ``fold`` (its validation and test patients stay unseen)."""
    out = work / "pretrain" / name / f"fold{fold}"
    run(
        [
            "-m",
            "liverfusion.train",
            "+experiment=simsiam_pretrain",
            f"seed={TRAIN_SEED}",
            f"data.fold={fold}",
            *base_overrides(work, phantom_seed),
            *extra,
        ],
        out,
        done="checkpoints/encoder.pt",
    )
    return out / "checkpoints" / "encoder.pt"


def run_arms(
    work: Path,
    table: dict[str, list[str]],
    folds: Sequence[int],
    extra: Sequence[str] = (),
    phantom_seed: int = PHANTOM_SEED,
    only: Sequence[str] | None = None,
    base: Sequence[str] | None = None,
    summary_only: bool = False,
) -> dict[str, Path]:
    """Run every arm on every fold (finished runs are skipped) and return the run folders of the arms to report.
    ``only``: run just these arms (the others are reported if they finished before); ``summary_only``: run
    nothing. ``base``: overrides of every run (default: the phantom's, :func:`base_overrides`); another data set
    passes its own."""
    base = base_overrides(work, phantom_seed) if base is None else list(base)
    dirs = {}
    for name, overrides in table.items():
        if summary_only or (only and name not in only):
            if any((work / "runs" / name).glob("fold*/test/summary.json")):
                dirs[name] = work / "runs" / name  # finished before: it stays in the summary
            continue
        for fold in folds:
            out = work / "runs" / name / f"fold{fold}"
            run(
                [
                    "-m",
                    "liverfusion.train",
                    f"seed={TRAIN_SEED}",  # before the arm's overrides: an arm may set its own seed
                    *fill(overrides, fold=str(fold)),
                    f"data.fold={fold}",
                    *base,
                    *extra,
                ],
                out,
            )
        dirs[name] = work / "runs" / name
    return dirs


# ---------------------------------------------------------------------------------------------------------------
# aggregating
# ---------------------------------------------------------------------------------------------------------------
def paired(dirs: dict[str, Path], pairs: Sequence[tuple[str, str]], metric: str = "macro_f1") -> list[dict]:
    """Paired bootstrap (and DeLong for binary AUROC) between arms on their pooled test predictions."""
    from liverfusion.evaluate import compare_predictions
    from liverfusion.reporting import find_runs, group_runs, pooled_predictions

    pooled = {}
    for name, d in dirs.items():
        (arm,) = group_runs(find_runs(d), name)[:1]
        pooled[name] = pooled_predictions(arm)[0]
    out = []
    for a, b in pairs:
        if a in pooled and b in pooled:
            out.append(
                {"a": a, "b": b, **compare_predictions(pooled[a], pooled[b], metric=metric, n_boot=1000)}
            )
    return out


def summarise(
    dirs: dict[str, Path],
    work: Path,
    stem: str,
    title: str,
    notes: str,
    embedding: str = "none",
    pairs: Sequence[tuple[str, str]] | None = None,
    keys: Sequence[str] = ("macro_f1", "lld_score", "auroc", "balanced_accuracy"),
    metric: str = "macro_f1",
    figures: Sequence[str] = (),
    appendix: str = "",
) -> str:
    """Aggregate every arm with liverfusion.report; write results/<stem>.{md,csv,json} and the confusion matrix,
    ROC and per-fold plots of the arms in ``figures`` (+ the embedding) under results/figures/<stem>/; return the
    markdown (``appendix`` ends it)."""
    from liverfusion.reporting import make_report

    names = list(dirs)
    res = make_report(
        [dirs[n] for n in names],
        work / "report",
        names=names,
        metric=metric,
        n_boot=1000,
        embedding=embedding,
        card_template=None,
    )
    rows = res["summary"]
    seconds = {
        n: [
            float((p / "seconds.txt").read_text())
            for p in sorted(dirs[n].glob("fold*"))
            if (p / "seconds.txt").is_file()
        ]
        for n in names
    }
    lines = [
        f"# {title}",
        "",
        notes,
        "",
        "Mean ± sample std over folds of the test metrics; `ensemble` = the fold models' mean probabilities "
        "on the test split (pooled out-of-fold predictions for nested CV) with a patient-level bootstrap 95 % CI.",
        "",
        "| arm | folds | " + " | ".join(f"{k} (mean ± std)" for k in keys) + f" | {metric} pooled [95 % CI] "
        "| minutes/run |",
        "|---|---:|" + "---|" * len(keys) + "---|---:|",
    ]
    by = {(r["arm"], r["metric"]): r for r in rows}
    for n in names:
        cells = []
        for k in keys:
            r = by.get((n, k))
            cells.append("" if r is None else f"{r['mean']:.3f} ± {r['std']:.3f}")
        e = by.get((n, metric))
        ens = "" if e is None else f"{e['pooled']:.3f} [{e['pooled_low']:.3f}, {e['pooled_high']:.3f}]"
        mins = f"{sum(seconds[n]) / max(1, len(seconds[n])) / 60:.1f}" if seconds[n] else ""
        lines.append(
            f"| {n} | {by.get((n, 'macro_f1'), {}).get('n_runs', '')} | "
            + " | ".join(cells)
            + f" | {ens} | {mins} |"
        )
    comparisons = paired(dirs, pairs if pairs is not None else [(names[0], n) for n in names[1:]], metric)
    if comparisons:
        lines += [
            "",
            "Paired comparisons on the same test cases (pooled predictions: the fold-model ensemble for a "
            "fixed test split, out-of-fold for nested CV; paired bootstrap over patients):",
            "",
            "| a | b | metric | a | b | delta | 95 % CI | p |",
            "|---|---|---|---:|---:|---:|---|---:|",
        ]
        for c in comparisons:
            lines.append(
                f"| {c['a']} | {c['b']} | {c['metric']} | {c['metric_a']:.3f} | {c['metric_b']:.3f} | "
                f"{c['delta']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] | {c['p_value']:.3g} |"
            )
            if "delong" in c and "p_value" in c["delong"]:
                lines[-1] = lines[-1][:-2] + f" (DeLong AUROC p {c['delong']['p_value']:.3g}) |"
    res["paired"] = comparisons
    if appendix:
        lines += ["", appendix]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text)
    shutil.copy(work / "report" / "results.csv", RESULTS / f"{stem}.csv")
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    copy_figures(work / "report", RESULTS / "figures" / stem, [n for n in figures if n in dirs])
    return text


def copy_figures(report: Path, dest: Path, arms: Sequence[str]) -> None:
    """The committed plots: a few arms' confusion matrix / ROC / per-fold scores and the embedding (the report
    folder holds every arm's; committing them all would bloat the repository)."""
    from liverfusion.reporting import file_slug

    if not arms:
        return
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    wanted = [f"{kind}_{file_slug(a)}.png" for a in arms for kind in ("confusion", "roc", "per_fold")]
    for name in [*wanted, "embedding.png"]:
        if (report / name).is_file():
            shutil.copy(report / name, dest / name)


def ensemble_metric(runs: Sequence[Path], metric: str = "macro_f1") -> float:
    """Test ``metric`` of the mean probabilities of these runs (one run: its own)."""
    from liverfusion.reporting import Arm, find_runs, pooled_predictions

    members = [r for d in runs for r in find_runs(d)]
    return float(pooled_predictions(Arm("ensemble", members))[0].point_metrics()[metric])
