"""Frozen-feature diagnostics of one encoder (issue 15, item 4): what a pre-training recipe kept.

    python benchmarks/ssl_diagnostics.py --encoder runs/.../checkpoints/encoder.pt --recipe mda --out mda.json
    python benchmarks/ssl_diagnostics.py --encoder random_bn --out random_bn.json \\
        --data-overrides data.layout.seed=7 data.num_workers=0

The data set is the composed ``train`` config's ``data`` (default: the phantom, fold 0) with ``--data-overrides``
(any Hydra overrides; ``--experiment`` adds ``+experiment=NAME`` first). Features: the pooled feature of every
phase of every case of the training split and of the held-out splits (default val + test, other patients),
no augmentation, eval mode. ``random`` / ``random_bn`` build ``model.encoder`` from the same config (seeded;
``random_bn`` re-estimates BatchNorm statistics on the training cases): the floor a recipe must beat.

Metrics (``liverfusion.metrics.ssl_diagnostics``): class kNN and linear-probe macro-F1 (bank / fit: the labelled
training cases), the M-way phase-ID probe (fit on training cases, scored on held-out ones; chance 1/M),
same-case retrieval across phases among the held-out cases (top-1) and the collapse metric (sqrt(d) * std of the
l2-normalised features: ~1 spread, 0 collapsed). Prints a one-line table; ``--out`` writes the JSON record, whose
first keys are the ``diagnostics`` entry of ``ssl_value.json`` (issue 15, item 5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__:  # imported as benchmarks.ssl_diagnostics (the tests)
    from benchmarks import common
else:  # run as python benchmarks/ssl_diagnostics.py: common.py lies beside it, on sys.path
    import common

ITEM5_KEYS = ("recipe", "knn_macro_f1", "linear_probe_macro_f1", "phase_id_accuracy", "retrieval_top1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--encoder", required=True, help="encoder.pt / SSL Lightning checkpoint, random or random_bn"
    )
    p.add_argument(
        "--recipe", default=None, help="name in the record (default: random[_bn] or the run folder)"
    )
    p.add_argument("--experiment", default=None, help="compose with +experiment=NAME first")
    p.add_argument("--data-overrides", nargs="*", default=[], help="Hydra overrides of the composed config")
    p.add_argument("--held-out", nargs="+", default=["val", "test"], help="splits scored (never train)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of random / random_bn")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    return p.parse_args(argv)


def recipe_name(encoder: str) -> str:
    """random / random_bn, else the run folder of ``<run>/checkpoints/encoder.pt`` (or the file's stem)."""
    if encoder in ("random", "random_bn"):
        return encoder
    path = Path(encoder)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def diagnose(
    encoder: str,
    overrides: list[str],
    recipe: str | None = None,
    held_out: tuple[str, ...] = ("val", "test"),
    seed: int = 0,
) -> dict[str, Any]:
    """The diagnostics record of one encoder on the data set the overrides compose."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from liverfusion.errors import ConfigError
    from liverfusion.metrics.ssl_diagnostics import FeatureSet, ssl_diagnostics
    from liverfusion.modules.frozen_features import frozen_features

    if "train" in held_out:
        raise ConfigError("--held-out: the training split cannot be held out; choose from val, test")
    cfg = common.compose("train", [*overrides, *common.NO_OUTPUT])
    start = time.perf_counter()
    dm = instantiate(cfg.data, progress=False)
    dm.setup("fit")
    encoder_cfg = OmegaConf.to_container(cfg.model.encoder, resolve=True)
    knn = cfg.model.get("knn") or {}
    feats, info = frozen_features(
        dm,
        encoder,
        encoder_config=encoder_cfg,
        parts=("train", *held_out),
        seed=seed,
        channels_last=bool(cfg.model.get("channels_last", False)),
    )
    features_s = time.perf_counter() - start
    test = FeatureSet.concat([feats[p] for p in held_out])
    metrics = ssl_diagnostics(
        feats["train"],
        test,
        dm.num_classes,
        k=int(knn.get("k", 20)),
        temperature=float(knn.get("temperature", 0.07)),
    )
    record = {"recipe": recipe or recipe_name(encoder), **metrics}
    record.update(
        {
            "encoder": str(encoder),
            "encoder_info": info,
            "data": {
                "dataset": dm.layout.name,
                "fold": dm.fold,
                "label_fraction": dm.label_fraction,
                "modalities": dm.modalities,
                "held_out": list(held_out),
                "input_shape": list(dm.input_shape),
            },
            "overrides": list(overrides),
            "seconds": {
                "features": round(features_s, 1),
                "metrics": round(time.perf_counter() - start - features_s, 1),
            },
        }
    )
    return record


def table(record: dict[str, Any]) -> str:
    def f(key: str) -> str:
        value = record.get(key)
        return "-" if value is None else f"{value:.3f}"

    head = "recipe | kNN F1 | probe F1 | phase-ID (chance) | retrieval top-1 (patient) | collapse std"
    row = (
        f"{record['recipe']} | {f('knn_macro_f1')} | {f('linear_probe_macro_f1')} | "
        f"{f('phase_id_accuracy')} ({f('phase_id_chance')}) | {f('retrieval_top1')} "
        f"({f('retrieval_top1_patient')}) | {f('collapse_std')}"
    )
    return f"{head}\n{row}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    overrides = ([f"+experiment={args.experiment}"] if args.experiment else []) + list(args.data_overrides)
    record = diagnose(args.encoder, overrides, args.recipe, tuple(args.held_out), args.seed)
    print(table(record))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_json(args.out, record)
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    from liverfusion.utils.cli import cli_errors

    sys.exit(cli_errors(main)())
