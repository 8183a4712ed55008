"""Label efficiency on the phantom: 10 % vs 100 % of the training labels; CGC on the MDA-pretrained encoder vs
the same network from scratch vs an encoder pre-trained on same-modality pairs (plain SimSiam, no MDA).

    python benchmarks/label_efficiency.py          # resumable; reuses the 100 % runs of fusion_phantom.py

The method's claim: MDA pre-training helps most when labels are few. Protocol as ``fusion_phantom.py`` (phantom
seed 4242, split seed 0, folds 0-2, training seed 0, pre-training per fold on that fold's training patients);
``data.label_fraction=0.1`` keeps the labels of a class-stratified 10 % of each fold's training patients (at least
one per class; validation and test stay fully labelled). Arms (``benchmarks/label_efficiency/arms.yaml``):
- ``mda_probe`` / ``same_probe``: frozen encoder (MDA / same-modality SimSiam) + CGC + head;
- ``mda_finetune`` / ``same_finetune``: MDA / same-modality encoder fine-tuned (``+experiment=cgc_finetune``: the
  encoder at the head's lr);
- ``scratch``: the same CGC network trained end to end from random weights.
Results: ``benchmarks/results/label_efficiency.{md,csv,json}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

if __package__:  # imported as benchmarks.label_efficiency (the tests)
    from benchmarks import common
else:  # run as python benchmarks/label_efficiency.py: common.py lies beside it, on sys.path
    import common

FRACTIONS = (0.1, 1.0)
ARMS = common.load_yaml("label_efficiency", "arms")
# the 100 % runs that fusion_phantom.py already made with identical settings
REUSE = {name: spec["reuse"] for name, spec in ARMS.items() if "reuse" in spec}


def arms(work: Path) -> dict[str, list[str]]:
    """Overrides of every arm (``label_efficiency/arms.yaml``), with the fold's MDA and same-modality encoders."""
    mda = str(work / "pretrain" / "mda" / "fold{fold}" / "checkpoints" / "encoder.pt")
    same = str(work / "pretrain" / "same" / "fold{fold}" / "checkpoints" / "encoder.pt")
    return common.arm_table(ARMS, mda_encoder=mda, same_encoder=same)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work",
        default=None,
        help="shared with fusion_phantom.py (phantom, encoders, 100 % runs); default: its work folder",
    )
    parser.add_argument(
        "--normalize",
        default=None,
        help="as fusion_phantom.py --normalize: another normalisation than the preset's, its own folders",
    )
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="*",
        default=list(FRACTIONS),
        help="label fractions to run (default: all)",
    )
    parser.add_argument("--summary-only", action="store_true", help="only aggregate the finished runs")
    args = parser.parse_args(argv)
    suffix, extra, normalize = common.preset_variant(normalize=args.normalize)
    work = Path(args.work or common.REPO / ".cache" / "benchmarks" / f"fusion_phantom{suffix}").resolve()
    for fold in common.FOLDS:
        common.pretrain(work, "mda", fold, extra=extra)
        common.pretrain(
            work,
            "same",
            fold,
            extra=[*extra, "data.pairs.policy=same", "task_name=simsiam_same_modality"],
        )
    table = arms(work)
    dirs: dict[str, Path] = {}
    for frac in args.fractions:
        tag = f"labels{int(frac * 100)}"
        sub = {}
        for name, overrides in table.items():
            reused = work / "runs" / REUSE.get(name, "")
            if (
                frac == 1.0
                and name in REUSE
                and all((reused / f"fold{f}" / "test" / "summary.json").is_file() for f in common.FOLDS)
            ):
                dirs[f"{name}@{tag}"] = reused
                continue
            sub[f"{name}@{tag}"] = [*overrides, f"data.label_fraction={frac}"]
        lw = work / "label_efficiency"
        only = [f"{o}@{tag}" for o in args.only] if args.only else None
        # runs go under <lw>/runs and read fusion_phantom.py's phantom and cache (not a second generated copy that
        # two label-fraction processes would write at once); reused 100 % runs stay where it put them
        dirs.update(
            common.run_arms(
                lw,
                sub,
                common.FOLDS,
                extra=extra,
                only=only,
                base=common.base_overrides(work),
                summary_only=args.summary_only,
            )
        )
    notes = (
        f"Phantom seed {common.PHANTOM_SEED} (450 cases, untuned), split seed 0, folds {list(common.FOLDS)}, training seed "
        f"{common.TRAIN_SEED}; intensities: {normalize} normalisation. 10 %: `data.label_fraction=0.1` (class-stratified "
        "share of each fold's training patients, at least one per class; validation/test fully labelled). "
        "Encoders pre-trained per fold on the fold's training patients: MDA (`+experiment=simsiam_pretrain`, cross-phase pairs) and same-modality "
        "(`data.pairs.policy=same`). Command: `python benchmarks/label_efficiency.py"
        + (f" --normalize {args.normalize}" if args.normalize else "")
        + "`."
    )
    order = [f"{a}@labels{int(f * 100)}" for f in args.fractions for a in table]
    dirs = {k: dirs[k] for k in order if k in dirs}
    pairs = [
        (f"mda_probe@{t}", f"{b}@{t}") for t in ("labels10", "labels100") for b in ("scratch", "same_probe")
    ]
    pairs += [
        (f"mda_finetune@{t}", f"{b}@{t}")
        for t in ("labels10", "labels100")
        for b in ("scratch", "same_finetune")
    ]
    print(
        common.summarise(
            dirs,
            work / "label_efficiency",
            f"label_efficiency{suffix}",
            "Label efficiency on the phantom" + (f" ({normalize} normalisation)" if args.normalize else ""),
            notes,
            embedding="tsne",
            pairs=pairs,
            figures=["mda_finetune@labels10", "scratch@labels10", "same_finetune@labels10"],
        )
    )


if __name__ == "__main__":
    main()
