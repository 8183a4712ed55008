"""Recipe tuning for the CGC fine-tune, on a *tuning* phantom only (never on the benchmark seed of
``fusion_phantom.py``): each variant is the ``+experiment=cgc_finetune`` arm of that script plus a few overrides.

    python benchmarks/fusion_tuning.py                          # phantom seed 7, fold 0, every variant
    python benchmarks/fusion_tuning.py --variants enc01 enc10   # some of them
    python benchmarks/fusion_tuning.py --phantom-seed 20231030  # the other tuning phantom
    python benchmarks/fusion_tuning.py --fold 1 --variants enc10    # another fold (its own pre-training)
    python benchmarks/fusion_tuning.py --n-cases 900 --fold 0 --variants enc10  # a larger tuning phantom
    python benchmarks/fusion_tuning.py --ensembles              # fold ensembles vs seed ensembles, no training

Resumable like ``fusion_phantom.py``. Reports the best validation and the test macro-F1 of the tuning phantom's
own test split (looking at it is allowed: this phantom is for tuning, the benchmark one is never looked at).
Results: ``benchmarks/results/fusion_tuning.json`` (one entry per phantom seed, fold and variant).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

if __package__:  # imported as benchmarks.fusion_tuning (the tests)
    from benchmarks import common
else:  # run as python benchmarks/fusion_tuning.py: common.py lies beside it, on sys.path
    import common

VARIANTS: dict[str, list[str]] = {
    name: list(spec["overrides"]) for name, spec in common.load_yaml("fusion_tuning", "variants").items()
}
"""name -> overrides added to the benchmark's cgc_finetune arm (``fusion_tuning/variants.yaml``)."""
# every variant without a preprocessing override of its own was tuned with the percentile window, the preset of the
# time, and keeps it
PERCENTILE = "data.preprocess.normalize=percentile"


def preprocessing(name: str) -> list[str]:
    """The preprocessing overrides of a variant, which its fold's pre-training must share (a fine-tune refuses an
    encoder pre-trained on other intensities): its own ``data.preprocess.*`` ones, else the percentile window."""
    own = [o for o in VARIANTS[name] if o.startswith("data.preprocess.")]
    return own or [PERCENTILE]


def finetune_arm(encoder: Path) -> list[str]:
    """fusion_phantom.py's ``cgc_finetune`` arm (``fusion_phantom/arms.yaml``) on this encoder."""
    return common.fill(
        common.load_yaml("fusion_phantom", "arms")["cgc_finetune"]["overrides"], encoder=str(encoder)
    )


def ensembles(runs: Path, seeds: Sequence[str] = ("enc10", "enc10_seed1", "enc10_seed2")) -> dict:
    """Where an ensemble's gain comes from. A fold ensemble's members were trained on different patients (together
    on every non-test patient); a seed ensemble's members (the preset with training seeds 0, 1, 2 on one fold) on
    the same ones. A seed ensemble's gain is what removing training noise alone can give a fold model; a fold
    ensemble adds what more training patients give."""
    out: dict[str, dict] = {}
    for variant in sorted(p.name for p in runs.iterdir() if p.is_dir()):
        folds = sorted(p for p in (runs / variant).glob("fold*") if (p / "test" / "summary.json").is_file())
        if len(folds) > 1:
            out[f"folds_{variant}"] = {
                "members": {p.name: common.ensemble_metric([p]) for p in folds},
                "ensemble": common.ensemble_metric(folds),
            }
    for fold in sorted({p.name for v in seeds for p in (runs / v).glob("fold*")}):
        dirs = [runs / v / fold for v in seeds if (runs / v / fold / "test" / "summary.json").is_file()]
        if len(dirs) > 1:
            out[f"seeds_{fold}"] = {
                "members": {d.parent.name: common.ensemble_metric([d]) for d in dirs},
                "ensemble": common.ensemble_metric(dirs),
            }
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=str(common.REPO / ".cache" / "benchmarks" / "fusion_tuning"))
    parser.add_argument("--phantom-seed", type=int, default=7)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument(
        "--n-cases",
        type=int,
        default=None,
        help="phantom size (default: the data config's); another size is a separate tuning phantom",
    )
    parser.add_argument(
        "--ensembles",
        action="store_true",
        help="train nothing: compare fold ensembles with seed ensembles of the runs made so far",
    )
    args = parser.parse_args(argv)
    if args.phantom_seed == common.PHANTOM_SEED:
        parser.error(f"phantom seed {common.PHANTOM_SEED} is the benchmark's: never tune on it")
    size_suffix, size_extra, _ = common.preset_variant(n_cases=args.n_cases)
    tag = f"seed{args.phantom_seed}{size_suffix}"
    work = Path(args.work).resolve() / tag
    out_json = common.RESULTS / "fusion_tuning.json"
    if args.ensembles:
        results = common.read_json(out_json)
        results[f"{tag}_ensembles"] = found = ensembles(work / "runs")
        common.write_json(out_json, results)
        print(json.dumps(found, indent=1))
        return
    extra = [*size_extra, *([f"extras.torch_threads={args.threads}"] if args.threads else [])]
    for name in args.variants:
        pre = preprocessing(name)
        pinned = pre if pre == [PERCENTILE] else []  # a variant's own preprocessing is among its overrides
        encoder = common.pretrain(
            work,
            "mda" if pinned else f"mda_{name}",
            args.fold,
            extra=[*extra, *pre],
            phantom_seed=args.phantom_seed,
        )
        out = work / "runs" / name / f"fold{args.fold}"
        common.run(
            [
                "-m",
                "liverfusion.train",
                f"seed={common.TRAIN_SEED}",
                *finetune_arm(encoder),  # the benchmark's arm, on the tuning phantom
                f"data.fold={args.fold}",
                *common.base_overrides(work, args.phantom_seed),
                *extra,
                *pinned,
                *VARIANTS[name],
            ],
            out,
        )
        summary = json.loads((out / "test" / "summary.json").read_text())
        log = pd.read_csv(next(out.glob("csv/**/metrics.csv")))
        val = log.dropna(subset=["val/macro_f1"])
        entry = {
            "overrides": [*pinned, *VARIANTS[name]],
            "val_macro_f1_best": float(val["val/macro_f1"].max()),
            "val_best_epoch": int(val.loc[val["val/macro_f1"].idxmax(), "epoch"]),
            "test_macro_f1": summary["metrics"]["macro_f1"],
            "test_auroc": summary["metrics"].get("auroc"),
        }
        # re-read: calls for other variants may run beside this one and have written their entries meanwhile
        results = common.read_json(out_json)
        done = results.setdefault(f"{tag}_fold{args.fold}", {})
        if (out / "seconds.txt").is_file():  # written by the call that trained it
            entry["seconds"] = float((out / "seconds.txt").read_text())
        done[name] = entry
        common.write_json(out_json, results)  # atomic: a killed call keeps the earlier entries
        print(name, json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
