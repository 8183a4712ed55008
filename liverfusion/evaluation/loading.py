"""Classifier checkpoints and fold ensembles: rebuild a network from its checkpoint's own metadata (weights read as
data only), find the selected checkpoint of a run or of every run of a multirun, and check that ensemble members
agree on what they are fed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liverfusion.errors import CheckpointError
from liverfusion.models.classifier_net import FusionClassifierNet
from liverfusion.models.encoder_base import plain


@dataclass
class LoadedClassifier:
    """A rebuilt network (in eval mode), its checkpoint metadata and where it came from."""

    net: FusionClassifierNet
    meta: dict[str, Any]
    path: Path


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Rebuild the network of a classifier checkpoint from its own metadata and load its weights."""
    from liverfusion.models.encoder_factory import build_encoder
    from liverfusion.models.fusion import build_fusion
    from liverfusion.utils.checkpoint_io import safe_load

    path = Path(path).expanduser()
    ckpt = safe_load(path)
    meta = plain(ckpt.get("liverfusion")) if isinstance(ckpt, Mapping) else None
    if not meta or not str(meta.get("format", "")).startswith("liverfusion-classifier"):
        raise CheckpointError(
            f"{path}: not a liverfusion classifier checkpoint (no 'liverfusion' metadata); an encoder.pt or an SSL "
            "checkpoint is loaded by fine-tuning (model.pretrained.path), not evaluated"
        )
    try:
        encoder = build_encoder(**meta["encoder_config"])
        fusion = build_fusion(**meta["fusion_config"])
        net = FusionClassifierNet(encoder, fusion, meta["modalities"], len(meta["class_names"]), meta["mode"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: classifier metadata is incomplete ({exc})") from None
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the recorded architecture: {exc}") from None
    net.eval()
    return LoadedClassifier(net, meta, path)


def best_in_run(run: Path) -> Path | None:
    """The selected checkpoint of one training run: recorded in test/summary.json, else the non-last .ckpt."""
    from liverfusion.utils.run_folder import file_in_run

    summary = run / "test" / "summary.json"
    # the recorded path is looked up inside this run only (a copy never reads the original)
    if summary.is_file():
        best = file_in_run(run, json.loads(summary.read_text()).get("best_checkpoint"))
        if best is not None:
            return best
    ckpts = sorted(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    if len(ckpts) == 1:
        return ckpts[0]
    last = run / "checkpoints" / "last.ckpt"
    if not ckpts and last.is_file():
        return last
    if ckpts:
        raise CheckpointError(f"{run}: several checkpoints {[p.name for p in ckpts]}; pass one as ckpt_path")
    return None


def find_checkpoints(path: str | Path) -> list[Path]:
    """A .ckpt file, one run dir, or a multirun dir (every run under it: the ensemble of its fold models)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"ckpt_path {path}: no such file or folder")
    runs = sorted({p.parent for p in path.rglob("config_resolved.yaml")})
    found = [c for c in (best_in_run(r) for r in runs) if c is not None]
    if not found:
        raise CheckpointError(
            f"ckpt_path {path}: no classifier checkpoint found in {len(runs)} run folder(s)"
        )
    return found


def check_ensemble(models: Sequence[LoadedClassifier]) -> dict[str, Any]:
    """All members must agree on modalities, classes, preprocessing and crop; return the shared metadata."""
    from liverfusion.data.preprocess import PreprocessConfig

    def comparable(
        meta: Mapping[str, Any], key: str
    ) -> Any:  # a member without `orientation` reads as `none`
        value = meta.get(key)
        if key == "preprocess" and isinstance(value, Mapping):
            return PreprocessConfig.from_dict(value, key="checkpoint preprocess").as_dict()
        return value

    first = models[0].meta
    for m in models[1:]:
        for key in ("modalities", "class_names", "preprocess", "eval_crop"):
            if comparable(m.meta, key) != comparable(first, key):
                raise CheckpointError(
                    f"ensemble members disagree on {key}: {models[0].path} has {first.get(key)!r}, {m.path} has "
                    f"{m.meta.get(key)!r}"
                )
    return first


_best_in_run = best_in_run  # the name tests and older callers import


def load_ensemble(ckpt_path: Any) -> tuple[list[LoadedClassifier], dict[str, Any]]:
    """The models behind ``ckpt_path`` (a .ckpt, a run folder or a multirun folder) and their shared metadata."""
    if ckpt_path in (None, "", "???"):
        raise CheckpointError(
            "ckpt_path is required",
            fix="pass ckpt_path=<a classifier .ckpt, a run folder or a multirun folder>",
        )
    models = [load_classifier(p) for p in find_checkpoints(ckpt_path)]
    return models, check_ensemble(models)
