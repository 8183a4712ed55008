"""Does self-supervised pre-training pay off when labels are few? Recipes pre-trained once on the phantom's
unlabelled pool, fine-tuned and probed at several label fractions, scored on the 88-case test split and on an
external cohort of 1000 phantom cases from an unused seed.

    python benchmarks/ssl_value.py --stage screening          # tuning phantom (seed 7), fold 0, 10 % labels
    python benchmarks/ssl_value.py --stage benchmark --recipes mda hybrid stack_cgc
    python benchmarks/ssl_value.py --stage benchmark --summary-only
    nohup python benchmarks/ssl_value.py --stage screening > ssl_value.log 2>&1 &   # resumable: re-run it
    python benchmarks/ssl_value.py --stage benchmark --recipes hybrid --best hybrid --fractions 0.1  # headline first

The protocol, the recipes and the arms are YAML files in ``benchmarks/ssl_value/`` (protocol.yaml, recipes.yaml,
arms.yaml). Per arm: test metrics mean +- std over folds, the fold ensemble with a patient-level bootstrap 95 % CI,
the paired difference to the best from-scratch arm (chosen on validation, never on test). Frozen-feature
diagnostics (kNN, linear probe, phase-ID probe, cross-phase retrieval, collapse) for every recipe and for a random
encoder with BatchNorm statistics (``benchmarks/ssl_diagnostics.py``). Results:
``benchmarks/results/ssl_value[_screening].{md,csv,json}`` and ``figures/ssl_value*/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__:  # imported as benchmarks.ssl_value (the tests)
    from benchmarks import common
else:  # run as python benchmarks/ssl_value.py: common.py lies beside it, on sys.path
    import common

SCRATCH, PRETRAINED = "scratch", "pretrained"
ARCHIVE = common.RESULTS / "ssl_value_runs"
"""The finished runs of each stage, committed (results, configs, curves, encoder files; no checkpoints)."""
ARCHIVED_PARTS = ("pretrain", "runs", "external")


def pct(fraction: float) -> str:
    return f"{round(100 * fraction):g}"


def arm_name(arm: str, recipe: str | None, fraction: float) -> str:
    return f"{recipe + '_' if recipe else ''}{arm}@labels{pct(fraction)}"


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def data_overrides(work: Path, seed: int, protocol: Mapping[str, Any]) -> list[str]:
    ph = protocol["phantom"]
    return [
        *common.base_overrides(work, seed),
        f"data.layout.n_cases={ph['n_cases']}",
        f"data.layout.n_unlabelled={ph['n_unlabelled']}",
    ]


def pretrain(
    work: Path, name: str, recipe: Mapping[str, Any], seed: int, protocol: Mapping[str, Any]
) -> Path:
    """One recipe, once, on the unlabelled pool; returns its encoder file."""
    pre = protocol["pretrain"]
    out = work / "pretrain" / name
    parts = ",".join(pre["parts"])
    common.run(
        [
            "-m",
            "liverfusion.train",
            f"seed={pre['seed']}",
            "data.fold=0",
            f"data.pretrain_parts=[{parts}]",
            *pre.get("overrides", []),
            *recipe["overrides"],  # after the common ones: a recipe's own values win
            *data_overrides(work, seed, protocol),
        ],
        out,
        done="checkpoints/encoder.pt",
    )
    return out / "checkpoints" / "encoder.pt"


def arm_table(
    arms: Mapping[str, Any], recipes: Mapping[str, Any], encoders: Mapping[str, Path]
) -> dict[str, tuple[str | None, str, list[str]]]:
    """name -> (recipe or None, arm, overrides) of every (recipe x pretrained arm) and every scratch arm."""
    table: dict[str, tuple[str | None, str, list[str]]] = {}
    for arm, spec in arms.items():
        if spec["kind"] == SCRATCH:
            table[arm] = (None, arm, list(spec["overrides"]))
            continue
        for recipe, path in encoders.items():
            over = common.fill(spec["overrides"], encoder=str(path))
            table[f"{recipe}_{arm}"] = (
                recipe,
                arm,
                over + list(recipes[recipe].get("finetune_overrides", [])),
            )
    return table


def run_finetunes(
    work: Path,
    table: Mapping[str, tuple[str | None, str, list[str]]],
    fractions: Mapping[str, Sequence[float]],
    folds: Sequence[int],
    seed: int,
    protocol: Mapping[str, Any],
    summary_only: bool = False,
) -> dict[str, Path]:
    """Every (arm, fraction, fold) run (finished ones are skipped); returns name@labelsN -> arm folder."""
    dirs = {}
    for name, (_, _, overrides) in table.items():
        for fraction in fractions[name]:
            arm_dir = work / "runs" / f"{name}@labels{pct(fraction)}"
            for fold in folds:
                out = arm_dir / f"fold{fold}"
                if summary_only and not (out / "test" / "summary.json").is_file():
                    continue
                common.run(
                    [
                        "-m",
                        "liverfusion.train",
                        f"seed={protocol['train_seed']}",
                        *overrides,
                        f"data.fold={fold}",
                        f"data.label_fraction={fraction}",
                        *data_overrides(work, seed, protocol),
                    ],
                    out,
                )
            if any(arm_dir.glob("fold*/test/summary.json")):
                dirs[arm_dir.name] = arm_dir
    return dirs


def score_external(work: Path, arm_dir: Path, protocol: Mapping[str, Any]) -> dict[str, Path]:
    """Every fold model of an arm and their ensemble on the external cohort (inference only); -> predictions."""
    ext = protocol["external"]
    out = {}
    members = sorted(p.parent.parent for p in arm_dir.glob("fold*/test/summary.json"))
    for target in [*members, arm_dir]:
        tag = "ensemble" if target == arm_dir else target.name
        dest = work / "external" / arm_dir.name / tag
        common.run(
            [
                "-m",
                "liverfusion.evaluate",
                f"ckpt_path={target}",
                "split=all",
                "robustness=false",
                f"n_boot={protocol['n_boot']}",
                f"paths.data_dir={work / 'data_external'}",
                f"paths.cache_dir={work / 'cache'}",
                f"data.layout.seed={ext['phantom_seed']}",
                f"data.layout.n_cases={ext['n_cases']}",
                "data.layout.n_unlabelled=0",
            ],
            dest,
            log_name="evaluate.log",
            done="predictions.csv",
        )
        out[tag] = dest / "predictions.csv"
    return out


def diagnostics(work: Path, encoder: str | Path, name: str, seed: int, protocol: Mapping[str, Any]) -> dict:
    """Frozen-feature diagnostics of one encoder (``benchmarks/ssl_diagnostics.py``), cached as JSON."""
    out = work / "diagnostics" / f"{name}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            str(common.BENCHMARKS / "ssl_diagnostics.py"),
            "--encoder",
            str(encoder),
            "--recipe",
            name,
            "--out",
            str(out),
            "--data-overrides",
            *data_overrides(work, seed, protocol),
        ]
        print(f"[{time.strftime('%H:%M:%S')}] diagnostics {name}", flush=True)
        subprocess.run(cmd, check=True, cwd=common.REPO)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------------
# summarising
# ---------------------------------------------------------------------------------------------------------------
def fold_scores(arm_dir: Path, metric: str) -> tuple[list[float], list[float]]:
    """(test metric, validation selection score) of every finished fold run."""
    runs = [json.loads(p.read_text()) for p in sorted(arm_dir.glob("fold*/test/summary.json"))]
    return [float(r["metrics"][metric]) for r in runs], [float(r.get("selection_score") or 0.0) for r in runs]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else (float("nan"), 0.0)


def cohort_predictions(
    dirs: Mapping[str, Path], external: Mapping[str, Mapping[str, Path]]
) -> dict[str, dict]:
    """arm -> {"test": ensemble PredictionSet on the test split, "external": ensemble and per-fold sets}."""
    from liverfusion.evaluate import read_predictions_csv
    from liverfusion.reporting import find_runs, group_runs, pooled_predictions

    out: dict[str, dict] = {}
    for name, d in dirs.items():
        (arm,) = group_runs(find_runs(d), name)[:1]
        entry: dict[str, Any] = {"test": pooled_predictions(arm)[0]}
        if name in external:
            entry["external"] = read_predictions_csv(external[name]["ensemble"])
            entry["external_folds"] = [
                read_predictions_csv(p) for t, p in sorted(external[name].items()) if t != "ensemble"
            ]  # fold0, fold1, ...: the same order for every arm (per-fold differences pair them)
        out[name] = entry
    return out


def arm_rows(
    dirs: Mapping[str, Path], preds: Mapping[str, dict], metric: str, n_boot: int
) -> list[dict[str, Any]]:
    from liverfusion.evaluate import metrics_with_ci

    rows = []
    for name, d in dirs.items():
        test, val = fold_scores(d, metric)
        row: dict[str, Any] = {"arm": name, "folds": len(test)}
        row["test_mean"], row["test_std"] = mean_std(test)
        row["val_mean"], _ = mean_std(val)
        for cohort in ("test", "external"):
            p = preds[name].get(cohort)
            if p is None:
                continue
            m = metrics_with_ci(p, n_boot=n_boot)[metric]
            row[f"{cohort}_ensemble"], row[f"{cohort}_low"], row[f"{cohort}_high"] = (
                m["point"],
                m["low"],
                m["high"],
            )
        folds = preds[name].get("external_folds") or []
        if folds:
            row["external_folds"] = [f.point_metrics()[metric] for f in folds]
            row["external_fold_mean"], row["external_fold_std"] = mean_std(row["external_folds"])
        rows.append(row)
    return rows


def best_on_validation(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str | None:
    """The arm among ``names`` with the best mean validation selection score (never the test metric)."""
    cands = [r for r in rows if r["arm"] in names and r["folds"]]
    return max(cands, key=lambda r: r["val_mean"])["arm"] if cands else None


def paired(preds: Mapping[str, dict], a: str, b: str, cohort: str, metric: str, n_boot: int) -> dict | None:
    from liverfusion.evaluate import compare_predictions

    pa, pb = preds.get(a, {}).get(cohort), preds.get(b, {}).get(cohort)
    if pa is None or pb is None:
        return None
    return compare_predictions(pa, pb, metric=metric, n_boot=n_boot)


def learning_curves(work: Path, recipes: Sequence[str], dest: Path) -> list[dict[str, Any]]:
    """Loss and kNN monitor per epoch of every recipe (from its CSV log); one PNG with both panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = []
    for name in recipes:
        files = sorted((work / "pretrain" / name).rglob("metrics.csv"))
        if not files:
            continue
        loss: dict[int, float] = {}
        knn: dict[int, float] = {}
        with files[-1].open() as f:
            for rec in csv.DictReader(f):
                if not rec.get("epoch"):
                    continue
                e = int(float(rec["epoch"]))
                if rec.get("train/loss_epoch"):
                    loss[e] = float(rec["train/loss_epoch"])
                if rec.get("monitor/knn_f1"):
                    knn[e] = float(rec["monitor/knn_f1"])
        seconds = work / "pretrain" / name / "seconds.txt"
        curves.append(
            {
                "recipe": name,
                "loss": [loss[e] for e in sorted(loss)],
                "knn_f1": [knn[e] for e in sorted(knn)],
                "minutes": float(seconds.read_text()) / 60 if seconds.is_file() else None,
            }
        )
    if curves:
        fig = Figure(figsize=(10, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax_loss, ax_knn = fig.subplots(1, 2)
        for c in curves:
            ax_loss.plot(range(1, len(c["loss"]) + 1), c["loss"], marker=".", label=c["recipe"])
            ax_knn.plot(range(1, len(c["knn_f1"]) + 1), c["knn_f1"], marker=".", label=c["recipe"])
        ax_loss.set(xlabel="epoch", ylabel="training loss (method's own scale)", title="pre-training loss")
        ax_knn.set(xlabel="epoch", ylabel="kNN macro-F1 (fold 0 val)", title="kNN monitor")
        ax_knn.legend(fontsize=8)
        dest.mkdir(parents=True, exist_ok=True)
        fig.savefig(dest / "learning_curves.png", dpi=110)
    return curves


def label_efficiency_plot(rows: Sequence[Mapping[str, Any]], cohort: str, dest: Path) -> Path | None:
    """Macro-F1 of each arm's fold ensemble against the label fraction, with its 95 % CI band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    for r in rows:
        if f"{cohort}_ensemble" not in r:
            continue
        base, frac = r["arm"].rsplit("@labels", 1)
        lines.setdefault(base, []).append(
            (float(frac) / 100, r[f"{cohort}_ensemble"], r[f"{cohort}_low"], r[f"{cohort}_high"])
        )
    if not lines:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for base, pts in sorted(lines.items()):
        pts.sort()
        x = [p[0] for p in pts]
        line = ax.plot(x, [p[1] for p in pts], marker="o", label=base)[0]
        ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.12)
    ax.set_xscale("log")
    ax.set(xlabel="fraction of training labels", ylabel=f"macro-F1, fold ensemble ({cohort})")
    ax.set_title(f"Label efficiency ({cohort} cohort, 95 % CI bands)", fontsize=10)
    ax.legend(fontsize=7)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"label_efficiency_{cohort}.png"
    fig.savefig(path, dpi=110)
    return path


def fmt(v: Any, signed: bool = False) -> str:
    if v is None or v != v:
        return ""
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def write_results(
    stem: str,
    stage: Mapping[str, Any],
    rows: list[dict[str, Any]],
    headline: dict[str, Any] | None,
    comparisons: list[dict[str, Any]],
    diag: list[dict[str, Any]],
    curves: list[dict[str, Any]],
    command: str,
) -> str:
    lines = [
        f"# Pre-training value ({stem})",
        "",
        f"Phantom seed {stage['phantom_seed']}, folds {stage['folds']}, label fractions "
        f"{stage['fractions']}{' + ' + str(stage.get('extra_fractions')) if stage.get('extra_fractions') else ''}"
        f"; protocol `benchmarks/ssl_value/*.yaml`. Command: `{command}`.",
        "",
        "Test metric per fold model (mean ± sample std), validation selection score, fold ensemble on the "
        "88-case test split and on the external cohort with patient-level bootstrap 95 % CIs.",
        "",
        "| arm | folds | test macro-F1 (mean ± std) | val (mean) | test ensemble [95 % CI] | external per fold "
        "| external ensemble [95 % CI] |",
        "|---|---:|---|---:|---|---|---|",
    ]
    for r in rows:
        ext_fold = (
            f"{fmt(r['external_fold_mean'])} ± {fmt(r['external_fold_std'])}"
            if "external_fold_mean" in r
            else ""
        )
        test_ens = f"{fmt(r.get('test_ensemble'))} [{fmt(r.get('test_low'))}, {fmt(r.get('test_high'))}]"
        ext_ens = (
            f"{fmt(r['external_ensemble'])} [{fmt(r['external_low'])}, {fmt(r['external_high'])}]"
            if "external_ensemble" in r
            else ""
        )
        lines.append(
            f"| {r['arm']} | {r['folds']} | {fmt(r['test_mean'])} ± {fmt(r['test_std'])} | {fmt(r['val_mean'])} "
            f"| {test_ens} | {ext_fold} | {ext_ens} |"
        )
    if comparisons:
        lines += ["", "| a | b | cohort | a | b | delta [95 % CI] | p |", "|---|---|---|---:|---:|---|---:|"]
        for c in comparisons:
            lines.append(
                f"| {c['a']} | {c['b']} | {c['cohort']} | {fmt(c['metric_a'])} | {fmt(c['metric_b'])} | "
                f"{fmt(c['delta'], True)} [{fmt(c['low'], True)}, {fmt(c['high'], True)}] | {c['p_value']:.3g} |"
            )
    if diag:
        lines += [
            "",
            "Frozen-feature diagnostics (chance: phase-ID 0.125):",
            "",
            "| recipe | kNN macro-F1 | linear probe macro-F1 | phase-ID accuracy | retrieval top-1 | collapse std (0 = collapsed) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for d in diag:
            lines.append(
                f"| {d['recipe']} | {fmt(d.get('knn_macro_f1'))} | {fmt(d.get('linear_probe_macro_f1'))} | "
                f"{fmt(d.get('phase_id_accuracy'))} | {fmt(d.get('retrieval_top1'))} | {fmt(d.get('collapse_std'))} |"
            )
    if curves:
        lines += ["", "Pre-training (kNN monitor per epoch; `figures/.../learning_curves.png`):", ""]
        for c in curves:
            knn = ", ".join(f"{v:.2f}" for v in c["knn_f1"])
            mins = f"{c['minutes']:.0f} min" if c["minutes"] else "?"
            lines.append(f"- {c['recipe']}: {len(c['loss'])} epochs, {mins}; kNN {knn}")
    if headline:
        h = headline
        lines += [
            "",
            f"**Headline** ({h['cohort']}, {pct(h['fraction'])} % labels): best pre-trained arm chosen on "
            f"validation `{h['best_arm']}` {fmt(h['best_ensemble_macro_f1'])} vs best scratch arm "
            f"`{h['scratch_arm']}` {fmt(h['scratch_ensemble_macro_f1'])}: delta {fmt(h['delta'], True)} "
            f"[{fmt(h['delta_low'], True)}, {fmt(h['delta_high'], True)}], p {h['p']:.3g}."
            + (
                f" Per fold model: {', '.join(fmt(d, True) for d in h['fold_deltas'])}"
                f" ({'all one sign' if h['folds_agree_in_sign'] else 'signs differ'})."
                if "fold_deltas" in h
                else ""
            ),
        ]
    text = "\n".join(lines) + "\n"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"{stem}.md").write_text(text)
    with (common.RESULTS / f"{stem}.csv").open("w", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "arm", k))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    payload = {"stage": dict(stage), "arms": rows, "headline": headline, "paired": comparisons}
    payload.update({"diagnostics": diag, "pretraining": curves})
    (common.RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float))
    return text


# ---------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("screening", "benchmark"), default="screening")
    parser.add_argument("--recipes", nargs="*", default=None, help="recipes of recipes.yaml (default: all)")
    parser.add_argument("--arms", nargs="*", default=None, help="arms of arms.yaml (default: all)")
    parser.add_argument(
        "--best", default=None, help="benchmark: the recipe that also gets the extra fractions"
    )
    parser.add_argument(
        "--fractions",
        nargs="*",
        type=float,
        default=None,
        help="only these label fractions of the stage (run the benchmark in phases, headline first)",
    )
    parser.add_argument("--no-external", action="store_true", help="skip the external cohort")
    parser.add_argument("--no-diagnostics", action="store_true")
    parser.add_argument("--summary-only", action="store_true", help="only aggregate the finished runs")
    parser.add_argument(
        "--work", default=None, help="work folder (default: .cache/benchmarks/ssl_value_<stage>)"
    )
    parser.add_argument(
        "--archive",
        action="store_true",
        help=f"at the end, keep the finished runs' results (no checkpoints) in {ARCHIVE.relative_to(common.REPO)}/"
        "<stage>: a fresh clone restores them from there and resumes",
    )
    args = parser.parse_args(argv)

    protocol, recipes, arms = (common.load_yaml("ssl_value", n) for n in ("protocol", "recipes", "arms"))
    for what, chosen, known in (("recipe", args.recipes, recipes), ("arm", args.arms, arms)):
        unknown = sorted(set(chosen or ()) - set(known))
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {sorted(known)}")
    recipes = {k: v for k, v in recipes.items() if args.recipes is None or k in args.recipes}
    arms = {k: v for k, v in arms.items() if args.arms is None or k in args.arms}
    stage = protocol[args.stage]
    seed = int(stage["phantom_seed"])
    work = Path(args.work or common.REPO / ".cache" / "benchmarks" / f"ssl_value_{args.stage}").resolve()
    metric, n_boot = protocol["headline"]["metric"], int(protocol["n_boot"])
    staged = [*stage["fractions"], *(stage.get("extra_fractions") or [])]
    unknown_fractions = sorted(set(args.fractions or ()) - set(staged))
    if unknown_fractions:
        parser.error(f"unknown fraction(s) {unknown_fractions}; the {args.stage} stage has {staged}")

    restored = common.restore_runs(ARCHIVE / args.stage, work)
    if restored:
        print(f"{restored} file(s) of finished runs restored from {ARCHIVE / args.stage}", flush=True)
    encoders: dict[str, Path] = {}
    for name, recipe in recipes.items():
        path = work / "pretrain" / name / "checkpoints" / "encoder.pt"
        if not args.summary_only:
            path = pretrain(work, name, recipe, seed, protocol)
        if path.is_file():
            encoders[name] = path
    table = arm_table(arms, recipes, encoders)
    extra = list(stage.get("extra_fractions") or [])
    fractions = {
        name: list(stage["fractions"]) + (extra if rec is None or rec == args.best else [])
        for name, (rec, _, _) in table.items()
    }
    if args.fractions is not None:
        fractions = {n: [f for f in fs if f in args.fractions] for n, fs in fractions.items()}
    dirs = run_finetunes(work, table, fractions, stage["folds"], seed, protocol, args.summary_only)

    external: dict[str, dict[str, Path]] = {}
    if not args.no_external and args.stage == "benchmark":
        for name, d in dirs.items():
            if args.summary_only:
                found = {p.parent.name: p for p in (work / "external" / name).glob("*/predictions.csv")}
                if "ensemble" in found:
                    external[name] = found
            else:
                external[name] = score_external(work, d, protocol)

    diag: list[dict[str, Any]] = []
    if not args.no_diagnostics:
        for name, path in [("random_bn", "random_bn"), *encoders.items()]:
            try:
                diag.append(diagnostics(work, path, name, seed, protocol))
            except (subprocess.CalledProcessError, FileNotFoundError) as exc:
                print(f"diagnostics of {name} failed: {exc}", flush=True)

    preds = cohort_predictions(dirs, external)
    rows = arm_rows(dirs, preds, metric, n_boot)
    comparisons, headline = [], None
    cohorts = ["external", "test"] if external else ["test"]
    for fraction in sorted({f for fs in fractions.values() for f in fs}):
        tag = f"@labels{pct(fraction)}"
        scratch = [n for n in dirs if n.endswith(tag) and table[n.removesuffix(tag)][0] is None]
        trained = [n for n in dirs if n.endswith(tag) and table[n.removesuffix(tag)][0] is not None]
        best_s, best_p = best_on_validation(rows, scratch), best_on_validation(rows, trained)
        for arm in trained:
            for cohort in cohorts:
                c = paired(preds, arm, best_s, cohort, metric, n_boot) if best_s else None
                if c:
                    comparisons.append({"a": arm, "b": best_s, "cohort": cohort, **c})
        h = protocol["headline"]
        if best_s and best_p and fraction == h["fraction"]:
            cohort = h["cohort"] if h["cohort"] in cohorts else cohorts[0]
            c = paired(preds, best_p, best_s, cohort, metric, n_boot)
            if c:
                headline = {
                    "fraction": fraction,
                    "cohort": cohort,
                    "scratch_arm": best_s,
                    "scratch_ensemble_macro_f1": c["metric_b"],
                    "best_arm": best_p,
                    "best_ensemble_macro_f1": c["metric_a"],
                    "delta": c["delta"],
                    "delta_low": c["low"],
                    "delta_high": c["high"],
                    "p": c["p_value"],
                }
                by_arm = {r["arm"]: r for r in rows}
                fa, fb = (by_arm[n].get(f"{cohort}_folds") for n in (best_p, best_s))
                if fa and fb and len(fa) == len(fb):  # per fold model, paired by fold
                    deltas = [x - y for x, y in zip(fa, fb, strict=True)]
                    headline["fold_deltas"] = deltas
                    headline["folds_agree_in_sign"] = all(d > 0 for d in deltas) or all(d < 0 for d in deltas)
    stem = "ssl_value" + ("_screening" if args.stage == "screening" else "")
    figures = common.RESULTS / "figures" / stem
    curves = learning_curves(work, list(encoders), figures)
    for cohort in cohorts:
        label_efficiency_plot(rows, cohort, figures)
    command = "python benchmarks/ssl_value.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_results(stem, stage, rows, headline, comparisons, diag, curves, command.strip()))
    if args.archive:
        n = common.archive_runs(work, ARCHIVE / args.stage, ARCHIVED_PARTS, loose=["diagnostics/*.json"])
        print(f"{n} file(s) archived in {ARCHIVE / args.stage}", flush=True)


if __name__ == "__main__":
    main()
