"""Fusion benchmark on the phantom: CGC vs the baselines (single modality, early, late_concat, late_mean), with the
SimSiam (MDA) encoder and from scratch, mean +- std over the 3 validation folds, fixed test split.

    python benchmarks/fusion_phantom.py            # resumable: finished runs are skipped on a re-run
    nohup python benchmarks/fusion_phantom.py > fusion_phantom.log 2>&1 &
    python benchmarks/fusion_phantom.py --n-cases 900 --only cgc_finetune --folds 0   # a larger phantom, one fold

Protocol (every number is a config value, nothing was tuned on this phantom):
- data: the phantom (default spec, 450 cases, 16x64x64) generated with seed 4242, which no tuning used (the demo
  and development used seed 7); split seed 0: 20 % of the patients are the test split, the rest 3 folds;
- pre-training: ``+experiment=simsiam_pretrain`` (MDA cross-phase pairs) once per fold on that fold's training
  patients (its validation and test patients are never seen), training seed 0;
- arms (``benchmarks/fusion_phantom/arms.yaml``; training seed 0, each on folds 0, 1, 2; model selection on the fold's validation macro-F1; test once):
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
from collections.abc import Sequence
from pathlib import Path

if __package__:  # imported as benchmarks.fusion_phantom (the tests)
    from benchmarks import common
else:  # run as python benchmarks/fusion_phantom.py: common.py lies beside it, on sys.path
    import common


def arms(encoder: str) -> dict[str, list[str]]:
    """Overrides of every arm (``fusion_phantom/arms.yaml``); ``encoder`` may hold ``{fold}``, filled per fold."""
    return common.arm_table(common.load_yaml("fusion_phantom", "arms"), encoder=encoder)


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
    seeds = {f: common.ensemble_metric(d, metric) for f, d in sorted(by_fold.items()) if len(d) > 1}
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
        "--folds",
        nargs="*",
        type=int,
        default=list(common.FOLDS),
        help="folds to pre-train and run (default: all)",
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
    suffix, extra, normalize = common.preset_variant(args.n_cases, args.normalize)
    work = Path(args.work or common.REPO / ".cache" / "benchmarks" / f"fusion_phantom{suffix}").resolve()
    for fold in args.folds:  # pre-training per fold: it never sees that fold's validation or test patients
        common.pretrain(work, "mda", fold, extra=extra)
    encoder = str(work / "pretrain" / "mda" / "fold{fold}" / "checkpoints" / "encoder.pt")
    table = arms(encoder)
    dirs = common.run_arms(
        work, table, args.folds, extra=extra, only=args.only, summary_only=args.summary_only
    )
    from omegaconf import OmegaConf

    data = OmegaConf.load(common.REPO / "conf" / "data" / "phantom.yaml")
    n_cases = args.n_cases or data.layout.n_cases
    shape = "x".join(map(str, data.preprocess.shape))
    notes = (
        f"Phantom seed {common.PHANTOM_SEED} ({n_cases} cases, {shape}, untuned), split seed 0 (test 20 %, "
        f"3 folds), training seed {common.TRAIN_SEED}; intensities: {normalize} normalisation; encoder `resnet10_cpu`; "
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
    text = common.summarise(
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
