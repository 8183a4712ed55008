"""Real data: LGG (70 TCGA lower-grade-glioma patients, grade 1 vs 2, t1_pre / flair / t1_post; FLAIR copies count
as missing), 5-fold nested CV: scratch vs pretrained, ``early`` vs ``cgc``.

    LIVERFUSION_SHARED_DATA=/work/shared/data python benchmarks/lgg_cv.py     # resumable

Protocol (config values and ``benchmarks/lgg_cv/protocol.yaml``, not tuned on the results): ``data=lgg`` (32x96x96 resize, percentile normalisation,
split seed 0, 5 folds without a test split: fold k tests, fold k+1 validates, the rest trains), training seed 0,
model selection on the validation fold's AUROC (14 patients: macro-F1 is too coarse there).
Pre-training: once per fold and recipe on that fold's training patients only (42 patients, so batch 16 and 150
epochs instead of the phantom preset's 32 / 20): ``mda`` is SimSiam on MDA pairs of the 3 sequences
(``+experiment=simsiam_pretrain data=lgg data.fold=k``), ``hybrid`` the phantom's best recipe
(``+experiment=hybrid_pretrain``, ``benchmarks/ssl_value.py``; not tuned on LGG). Arms
(``benchmarks/lgg_cv/arms.yaml``):
- ``early_scratch``: the sequences as input channels of one encoder (the LLD-MMRI baseline design), from scratch;
- ``cgc_scratch``: shared encoder + CGC, from scratch;
- ``cgc_pretrained``: the same, encoder initialised from the fold's SimSiam encoder, fine-tuned (encoder lr x0.1,
  the preset's value when this arm was first run);
- ``cgc_pretrained_enc10``: as ``cgc_pretrained`` with the encoder at the head's lr (the ``cgc_finetune`` preset
  since ``fusion_tuning.py``; chosen on the phantom, not on LGG);
- ``cgc_probe``: the fold's SimSiam encoder frozen, CGC + head trained;
- ``hybrid_finetune`` / ``hybrid_probe``: the same two on the fold's hybrid encoder.
Reported: AUROC and balanced accuracy mean +- std over the 5 test folds, the pooled out-of-fold AUROC with its
DeLong and bootstrap 95 % CIs, paired comparisons on the pooled out-of-fold predictions.
Results: ``benchmarks/results/lgg_cv.{md,csv,json}``. ``--archive`` keeps the finished runs' results (no
checkpoints, no encoders) in ``benchmarks/results/lgg_cv_runs``: a fresh clone restores them and re-runs only what
is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__:  # imported as benchmarks.lgg_cv (the tests)
    from benchmarks import common
else:  # run as python benchmarks/lgg_cv.py: common.py lies beside it, on sys.path
    import common

PROTOCOL = common.load_yaml("lgg_cv", "protocol")
FOLDS = tuple(PROTOCOL["folds"])
PRETRAIN = list(PROTOCOL["pretrain"]["overrides"])
RECIPES: dict[str, list[str]] = {k: list(v) for k, v in PROTOCOL["pretrain"]["recipes"].items()}
ARMS = common.load_yaml("lgg_cv", "arms")
# the arms that need a fold encoder (of their `recipe`)
PRETRAINED_ARMS = tuple(name for name, spec in ARMS.items() if spec["kind"] == "pretrained")
ARCHIVE = common.RESULTS / "lgg_cv_runs"


def recipe_of(arm: str) -> str:
    """The pre-training recipe a ``pretrained`` arm fine-tunes or probes (refused if unknown)."""
    recipe = ARMS[arm].get("recipe")
    if recipe not in RECIPES:
        raise ValueError(
            f"arm {arm!r}: recipe {recipe!r} is not one of {sorted(RECIPES)} (lgg_cv/protocol.yaml)"
        )
    return recipe


def encoder_path(work: Path, recipe: str) -> str:
    """The fold encoder of a recipe (``{fold}`` filled per fold by :func:`common.run_arms`)."""
    return str(work / "pretrain" / recipe / "fold{fold}" / "checkpoints" / "encoder.pt")


def base(work: Path) -> list[str]:
    return ["data=lgg", f"paths.cache_dir={work / 'cache'}", *common.QUIET]


def arms(work: Path) -> dict[str, list[str]]:
    """Overrides of every arm (``lgg_cv/arms.yaml``): the data set's :func:`base` and the fold encoder of the arm's
    recipe filled."""
    return {
        name: common.fill(
            spec["overrides"],
            base=base(work),
            **({"encoder": encoder_path(work, recipe_of(name))} if name in PRETRAINED_ARMS else {}),
        )
        for name, spec in ARMS.items()
    }


def pooled_auroc(dirs: dict[str, Path]) -> dict[str, dict]:
    """Pooled out-of-fold AUROC of each arm with its DeLong and bootstrap CIs."""
    from liverfusion.evaluate import metrics_with_ci
    from liverfusion.reporting import find_runs, group_runs, pooled_predictions

    out = {}
    for name, d in dirs.items():
        (arm,) = group_runs(find_runs(d), name)[:1]
        preds, kind = pooled_predictions(arm)
        m = metrics_with_ci(preds, n_boot=2000)
        out[name] = {
            "kind": kind,
            "n": int(m["n_cases"]["point"]),
            "auroc_bootstrap": m["binary/auroc"],
            "auroc_delong": m.get("binary/auroc_delong"),
            "balanced_accuracy": m["balanced_accuracy"],
        }
    return out


def pending_recipes(work: Path, only: Sequence[str] | None = None) -> list[str]:
    """The recipes whose fold encoders an unfinished pretrained arm (of ``only``, default all) still needs."""
    unfinished = [
        a
        for a in PRETRAINED_ARMS
        if (not only or a in only)
        and not all((work / "runs" / a / f"fold{k}" / "test" / "summary.json").is_file() for k in FOLDS)
    ]
    return list(dict.fromkeys(recipe_of(a) for a in unfinished))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=str(common.REPO / ".cache" / "benchmarks" / "lgg_cv"))
    parser.add_argument("--only", nargs="*", default=None, help=f"run only these arms (of {list(ARMS)})")
    parser.add_argument(
        "--archive",
        action="store_true",
        help=f"at the end, keep the finished runs' results in {ARCHIVE.relative_to(common.REPO)}",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not os.environ.get("LIVERFUSION_SHARED_DATA"):
        sys.exit("set LIVERFUSION_SHARED_DATA to the folder holding lgg_tcga_3seq_dev")
    work = Path(args.work).resolve()
    restored = common.restore_runs(ARCHIVE, work)
    if restored:
        print(f"{restored} file(s) of finished runs restored from {ARCHIVE}", flush=True)
    table = arms(work)
    # pre-training per fold and recipe, only for pretrained arms still to run: it never sees that fold's validation
    # or test patients
    for recipe in pending_recipes(work, args.only):
        for fold in FOLDS:
            common.run(
                [
                    "-m",
                    "liverfusion.train",
                    *RECIPES[recipe],
                    f"data.fold={fold}",
                    f"seed={common.TRAIN_SEED}",
                    *base(work),
                    *PRETRAIN,
                ],
                work / "pretrain" / recipe / f"fold{fold}",
                done="checkpoints/encoder.pt",
            )
    dirs = common.run_arms(work, table, FOLDS, only=args.only, base=())  # the arms carry base(work)
    pooled = pooled_auroc(dirs)
    notes = (
        "TCGA LGG, 70 patients (grade 1 vs 2, positive class grade_2), sequences t1_pre, flair, t1_post (FLAIR "
        "copies count as missing), 32x96x96; 5-fold nested CV (split seed 0), training seed 0; selection on "
        "validation AUROC. Pre-training per fold on that fold's 42 training patients (`mda`: SimSiam on MDA "
        "cross-sequence pairs; `hybrid`: the phantom's best recipe, not tuned on LGG; "
        f"{' '.join(PRETRAIN)}). Command: `python benchmarks/lgg_cv.py --archive`.\n\n"
        "Pooled out-of-fold AUROC (grade_2 vs grade_1) with 95 % CIs:\n\n"
        "| arm | cases | AUROC | DeLong CI | bootstrap CI (patients) |\n|---|---:|---:|---|---|\n"
        + "\n".join(
            f"| {n} | {p['n']} | {p['auroc_bootstrap']['point']:.3f} | "
            + (
                f"[{p['auroc_delong']['low']:.3f}, {p['auroc_delong']['high']:.3f}]"
                if p["auroc_delong"]
                else "n/a"
            )
            + f" | [{p['auroc_bootstrap']['low']:.3f}, {p['auroc_bootstrap']['high']:.3f}] |"
            for n, p in pooled.items()
        )
    )
    pairs = [
        ("cgc_pretrained", "cgc_scratch"),
        ("cgc_scratch", "early_scratch"),
        ("cgc_pretrained", "early_scratch"),
        ("cgc_probe", "cgc_scratch"),
        ("cgc_pretrained_enc10", "cgc_scratch"),
        ("cgc_pretrained_enc10", "cgc_pretrained"),
        ("hybrid_finetune", "cgc_scratch"),
        ("hybrid_finetune", "cgc_pretrained_enc10"),
        ("hybrid_probe", "cgc_probe"),
    ]
    pairs = [(a, b) for a, b in pairs if a in dirs and b in dirs]
    text = common.summarise(
        dirs,
        work,
        "lgg_cv",
        "LGG grade, 5-fold nested CV",
        notes,
        embedding="tsne",
        pairs=pairs,
        keys=("binary/auroc", "balanced_accuracy", "macro_f1", "accuracy"),
        metric="auroc",
        figures=["cgc_probe", "cgc_scratch", "early_scratch"],
    )
    (common.RESULTS / "lgg_cv_pooled.json").write_text(json.dumps(pooled, indent=1))
    print(text)
    if args.archive:
        n = common.archive_runs(work, ARCHIVE, ["runs"])
        print(f"{n} file(s) archived in {ARCHIVE}", flush=True)


if __name__ == "__main__":
    main()
