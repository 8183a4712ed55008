"""Fusion benchmark on the phantom: CGC vs the baselines (single modality, early, late_concat, late_mean), with the
SimSiam (MDA) encoder and from scratch, mean +- std over the 3 validation folds, fixed test split.

    python benchmarks/fusion_phantom.py            # resumable: finished runs are skipped on a re-run
    nohup python benchmarks/fusion_phantom.py > fusion_phantom.log 2>&1 &
    python benchmarks/fusion_phantom.py --n-cases 900 --only cgc_finetune --folds 0   # a larger phantom, one fold

Protocol (every number is a config value below, nothing was tuned on this phantom):
- data: the phantom (default spec, 450 cases, 16x64x64) generated with seed 4242, which no tuning used (the demo
  and development used seed 7); split seed 0: 20 % of the patients are the test split, the rest 3 folds;
- pre-training: ``+experiment=simsiam_pretrain`` (MDA cross-phase pairs) once per fold on that fold's training
  patients (its validation and test patients are never seen), training seed 0;
- arms (training seed 0, each on folds 0, 1, 2; model selection on the fold's validation macro-F1; test once):
  ``*_probe``: frozen pre-trained encoder + fusion + head (``+experiment=cgc_demo`` settings);
  ``cgc_finetune``: pre-trained encoder fine-tuned (``+experiment=cgc_finetune``: the encoder at the head's lr, as
  chosen by ``fusion_tuning.py`` on the tuning phantom; ``cgc_finetune_enc01``: the former encoder lr x0.1);
  ``*_scratch``: the same networks trained end to end from random weights (``early`` can only be scratch: its
  encoder reads 8 channels, the pre-trained one 1).
Results: ``benchmarks/results/fusion_phantom.{md,csv,json}`` (+ the report folder in the work dir).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PHANTOM_SEED = 4242
TRAIN_SEED = 0
FOLDS = (0, 1, 2)
MODALITIES = ["T2WI", "DWI", "In Phase", "Out Phase", "C-pre", "C+A", "C+V", "C+Delay"]


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
    return [
        f"paths.data_dir={work / 'data'}",
        f"paths.cache_dir={work / 'cache'}",
        f"data.layout.seed={phantom_seed}",
        "logger=csv",
        "extras.print_config=false",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "+trainer.enable_progress_bar=false",
    ]


def run(args: Sequence[str], out: Path, log_name: str = "run.log", done: str = "test/summary.json") -> float:
    """Run one ``python -m liverfusion.*`` command into ``out`` unless it already finished; return seconds."""
    if (out / done).is_file():
        return 0.0
    if out.exists():  # an interrupted run: start it again cleanly
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [sys.executable, *args, f"hydra.run.dir={out}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(args[:4])} ... -> {out}", flush=True)
    with (out / log_name).open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0 or not (out / done).is_file():
        raise RuntimeError(f"run failed ({proc.returncode}); see {out / log_name}")
    seconds = time.perf_counter() - start
    (out / "seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


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


def arms(encoder: str) -> dict[str, list[str]]:
    """Overrides of every arm; ``encoder`` may hold ``{fold}``, filled per fold."""
    pre = ["model.init=pretrained", f"model.pretrained.path={encoder}"]
    probe = ["+experiment=cgc_demo", *pre]
    finetune = ["+experiment=cgc_finetune", *pre, "callbacks.step_checkpoint=null"]
    scratch = [
        "+experiment=cgc_finetune",
        "model.init=scratch",
        "model.finetune.encoder_lr_scale=1.0",
        "callbacks.step_checkpoint=null",
    ]
    table = {
        "cgc_probe": probe,
        "late_concat_probe": [*probe, "fusion@model.fusion=late_concat"],
        "late_mean_probe": [*probe, "fusion@model.fusion=late_mean"],
    }
    for i, m in enumerate(MODALITIES):
        table[f"single_{m.replace(' ', '').replace('+', '')}_probe"] = [
            *probe,
            "fusion@model.fusion=single",
            f"model.fusion.modality={i}",
        ]
    table["cgc_finetune"] = finetune
    # the preset before tuning (encoder lr x0.1; benchmarks/fusion_tuning.py chose x1.0 on the tuning phantom)
    table["cgc_finetune_enc01"] = [*finetune, "model.finetune.encoder_lr_scale=0.1"]
    # the preset again with two more training seeds: how far its per-fold number moves by chance alone
    for seed in (1, 2):
        table[f"cgc_finetune_seed{seed}"] = [*finetune, f"seed={seed}"]
    table["cgc_scratch"] = scratch
    table["early_scratch"] = [*scratch, "fusion@model.fusion=early"]
    return table


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
            args = [o.replace("{fold}", str(fold)) for o in overrides]
            run(
                [
                    "-m",
                    "liverfusion.train",
                    f"seed={TRAIN_SEED}",  # before the arm's overrides: an arm may set its own seed
                    *args,
                    f"data.fold={fold}",
                    *base,
                    *extra,
                ],
                out,
            )
        dirs[name] = work / "runs" / name
    return dirs


def paired(dirs: dict[str, Path], pairs: Sequence[tuple[str, str]], metric: str = "macro_f1") -> list[dict]:
    """Paired bootstrap (and DeLong for binary AUROC) between arms on their pooled test predictions."""
    from liverfusion.evaluate import compare_predictions
    from liverfusion.report import find_runs, group_runs, pooled_predictions

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
    from liverfusion.report import make_report

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
    from liverfusion.report import file_slug

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
    from liverfusion.report import Arm, find_runs, pooled_predictions

    members = [r for d in runs for r in find_runs(d)]
    return float(pooled_predictions(Arm("ensemble", members))[0].point_metrics()[metric])


def seed_spread(dirs: dict[str, Path], names: Sequence[str], metric: str = "macro_f1") -> str:
    """One recipe run with several training seeds (one arm per seed): the test ``metric`` of every fold model
    together, so the per-fold mean comes with its standard error; and per fold the ensemble of the seeds (models
    trained on the same patients: what averaging away training noise alone gives)."""
    import numpy as np

    if sum(n in dirs for n in names) < 2:  # one seed: the arm's own row says it all
        return ""
    runs = sorted(p for n in names if n in dirs for p in dirs[n].glob("fold*/test/summary.json"))
    v = np.array([json.loads(p.read_text())["metrics"][metric] for p in runs])
    std = v.std(ddof=1)
    text = (
        f"Fold models of {', '.join(n for n in names if n in dirs)} together ({len(v)} runs): test {metric} "
        f"{v.mean():.3f} ± {std:.3f} (sample std; standard error of the mean {std / np.sqrt(len(v)):.3f}; "
        f"range {v.min():.3f} to {v.max():.3f})."
    )
    by_fold: dict[str, list[Path]] = {}
    for p in runs:  # <arm>/<fold>/test/summary.json
        by_fold.setdefault(p.parent.parent.name, []).append(p.parent.parent)
    seeds = {f: ensemble_metric(d, metric) for f, d in sorted(by_fold.items()) if len(d) > 1}
    if seeds:
        text += (
            " Per fold, the ensemble of its training seeds (same training patients): "
            + ", ".join(f"{f} {m:.3f}" for f, m in seeds.items())
            + f" (mean {np.mean(list(seeds.values())):.3f})."
        )
    return text


def best_single(dirs: dict[str, Path], metric: str = "macro_f1") -> list[str]:
    """The single-phase arm with the best mean test ``metric`` over its finished folds (none: [])."""
    means = {}
    for name, d in dirs.items():
        if name.startswith("single_"):
            runs = [json.loads(p.read_text()) for p in d.glob("fold*/test/summary.json")]
            if runs:
                means[name] = sum(r["metrics"][metric] for r in runs) / len(runs)
    return [max(means, key=means.get)] if means else []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", default=None, help="work folder (default: .cache/benchmarks/fusion_phantom[_nN])"
    )
    parser.add_argument("--only", nargs="*", default=None, help="arm names to run (default: all)")
    parser.add_argument("--summary-only", action="store_true", help="only aggregate the finished runs")
    parser.add_argument(
        "--folds", nargs="*", type=int, default=list(FOLDS), help="folds to pre-train and run (default: all)"
    )
    parser.add_argument(
        "--n-cases",
        type=int,
        default=None,
        help="another phantom size (same seed and spec): its own work folder and results/fusion_phantom_nN.*",
    )
    parser.add_argument(
        "--normalize",
        default=None,
        help="another intensity normalisation than the preset's (e.g. percentile, the preset before the median "
        "ratio): its own work folder and results/fusion_phantom[_nN]_<normalize>.*",
    )
    args = parser.parse_args(argv)
    suffix, extra, normalize = preset_variant(args.n_cases, args.normalize)
    work = Path(args.work or REPO / ".cache" / "benchmarks" / f"fusion_phantom{suffix}").resolve()
    for fold in args.folds:  # pre-training per fold: it never sees that fold's validation or test patients
        pretrain(work, "mda", fold, extra=extra)
    encoder = str(work / "pretrain" / "mda" / "fold{fold}" / "checkpoints" / "encoder.pt")
    table = arms(encoder)
    dirs = run_arms(work, table, args.folds, extra=extra, only=args.only, summary_only=args.summary_only)
    from omegaconf import OmegaConf

    data = OmegaConf.load(REPO / "conf" / "data" / "phantom.yaml")
    n_cases = args.n_cases or data.layout.n_cases
    shape = "x".join(map(str, data.preprocess.shape))
    notes = (
        f"Phantom seed {PHANTOM_SEED} ({n_cases} cases, {shape}, untuned), split seed 0 (test 20 %, "
        f"3 folds), training seed {TRAIN_SEED}; intensities: {normalize} normalisation; encoder `resnet10_cpu`; "
        "SimSiam (MDA, `+experiment=simsiam_pretrain`) pre-trained per fold on that fold's training patients. "
        "Command: `python benchmarks/fusion_phantom.py"
        + (f" --n-cases {args.n_cases}" if args.n_cases else "")
        + (f" --normalize {args.normalize}" if args.normalize else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
        + "`."
    )
    names = list(dirs)
    pairs = [("cgc_probe", n) for n in names if n != "cgc_probe"]  # the probe against every other arm
    pairs += [  # pre-trained vs scratch, CGC vs early fusion
        ("cgc_finetune", "cgc_scratch"),
        ("cgc_finetune", "cgc_finetune_enc01"),
        ("cgc_scratch", "early_scratch"),
        ("cgc_finetune", "early_scratch"),
    ]
    figures = ["cgc_finetune", "cgc_scratch", "early_scratch", "cgc_probe", *best_single(dirs)]
    spread = seed_spread(dirs, ["cgc_finetune", "cgc_finetune_seed1", "cgc_finetune_seed2"])
    text = summarise(
        dirs,
        work,
        f"fusion_phantom{suffix}",
        "Fusion on the phantom"
        + (f" ({args.n_cases} cases)" if args.n_cases else "")
        + (f" ({normalize} normalisation)" if args.normalize else ""),
        notes,
        pairs=pairs,
        figures=figures,
        appendix=spread,
    )
    print(text)


if __name__ == "__main__":
    main()
