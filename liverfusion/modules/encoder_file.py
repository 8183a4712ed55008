"""The ``encoder.pt`` file format, in one place: what it holds, how it is written and read, what it must contain.

An export is one dict (:func:`encoder_payload` builds it) with ``format`` = :data:`ENCODER_FORMAT`, the encoder's
``state_dict`` and ``encoder_config`` (rebuild with ``build_encoder(**...)``), ``modalities``, ``input_shape``,
``preprocess``, ``dataset``, ``layout``, ``method``, the backbone's own keys (``backbone``; ``stack`` runs add
``fusion_state_dict`` + ``fusion_config``, the fusion block without its class head), ``hparams``, ``seed``,
``epochs``, ``global_step`` and ``liverfusion_version``. Files of the main of 2026-12-02 lack ``backbone`` and the
fusion keys and still read. It is written atomically (:func:`write_encoder_file`) and read as data with
``weights_only`` (:func:`load_encoder_payload` for the dict, :func:`read_encoder_file` for what a weight file says
about its encoder, from an export or a Lightning checkpoint of an SSL or classifier run).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import liverfusion
from liverfusion.errors import CheckpointError
from liverfusion.utils.checkpoint_io import safe_load, save_atomic
from liverfusion.utils.plain import to_plain

log = logging.getLogger(__name__)

ENCODER_FORMAT = "liverfusion-encoder/1"
LIGHTNING_PREFIX = "encoder."  # where an SSL run's Lightning checkpoint keeps the encoder's weights
CLASSIFIER_PREFIX = "net.encoder."  # and a classifier run's
# Encoder config keys that only say where weights came from, not what the network is.
PROVENANCE_KEYS = ("pretrained", "weights_path")
_WEIGHT_KEYS = ("state_dict", "fusion_state_dict")  # the tensors; every other key is metadata


@dataclass
class EncoderFile:
    """What a weight file says about the encoder it holds."""

    path: Path
    kind: str  # "encoder.pt" | "lightning"
    state_dict: dict[str, torch.Tensor]
    encoder_config: dict[str, Any] | None
    modalities: list[str] | None
    preprocess: dict[str, Any] | None
    input_shape: list[int] | None
    meta: dict[str, Any] = field(default_factory=dict)
    # stack pre-training only (absent from files of the main of 2026-12-02 and from modality pre-training)
    fusion_state_dict: dict[str, torch.Tensor] | None = None
    fusion_config: dict[str, Any] | None = None


def encoder_payload(
    encoder: nn.Module,
    *,
    method: str,
    modalities: Sequence[str],
    data_spec: Mapping[str, Any],
    backbone_keys: Mapping[str, Any],
    hparams: Mapping[str, Any],
    seed: int | None,
    epochs: int,
    global_step: int,
) -> dict[str, Any]:
    """The ``encoder.pt`` dict of a trained ``encoder`` (weights copied to CPU). ``backbone_keys`` is what the
    SSL backbone adds (``SSLBackbone.export()``); ``data_spec`` is the data module's (shape, preprocessing, ...)."""
    return {
        "format": ENCODER_FORMAT,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
        "encoder_config": encoder.config(),
        "modalities": modalities,
        "input_shape": data_spec.get("input_shape"),
        "preprocess": data_spec.get("preprocess"),
        "dataset": data_spec.get("dataset"),
        "layout": data_spec.get("layout"),
        "method": method,
        **backbone_keys,
        "hparams": to_plain(dict(hparams)),
        "seed": seed,
        "epochs": int(epochs),
        "global_step": int(global_step),
        "liverfusion_version": liverfusion.__version__,
    }


def write_encoder_file(payload: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` via a same-folder temporary file, fsynced and renamed into place: a full disk
    leaves the previous ``encoder.pt`` intact and the OSError names the file."""
    return save_atomic(dict(payload), path)


def log_encoder_artifact(loggers: Sequence[Any], path: Path, payload: Mapping[str, Any]) -> None:
    """Upload ``path`` as a W&B ``model`` artifact (metadata: the payload without its tensors) to every W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            meta = {k: v for k, v in payload.items() if k not in _WEIGHT_KEYS}
            art = wandb.Artifact(f"encoder-{lg.experiment.id}", type="model", metadata=meta)
            art.add_file(str(path))
            lg.experiment.log_artifact(art)


def _checked_payload(obj: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """An export's dict, its tensors checked to be state dicts."""
    if not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointError(f"{path}: encoder file without a state_dict")
    fusion_state = obj.get("fusion_state_dict")
    if fusion_state is not None and not isinstance(fusion_state, Mapping):
        raise CheckpointError(
            f"{path}: fusion_state_dict is a {type(fusion_state).__name__}, not a state dict"
        )
    return dict(obj)


def load_encoder_payload(path: str | Path) -> dict[str, Any]:
    """The dict of an ``encoder.pt`` export, read as :func:`read_encoder_file` reads it (``safe_load``); anything
    else (a Lightning checkpoint included) is refused."""
    path = Path(path).expanduser()
    obj = safe_load(path)
    if not isinstance(obj, Mapping) or obj.get("format") != ENCODER_FORMAT:
        raise CheckpointError(f"encoder file {path} is not a {ENCODER_FORMAT} export")
    return _checked_payload(obj, path)


def checkpoint_kind(obj: Any) -> str:
    """What a loaded checkpoint is: ``classifier``, ``ssl`` (a pre-training run), ``encoder.pt`` or ``unknown``."""
    if not isinstance(obj, Mapping):
        return "unknown"
    if obj.get("format") == ENCODER_FORMAT:
        return "encoder.pt"
    lf = obj.get("liverfusion")
    if isinstance(lf, Mapping) and str(lf.get("format", "")).startswith("liverfusion-classifier"):
        return "classifier"
    state = obj.get("state_dict")
    if isinstance(state, Mapping) and any(str(k).startswith(LIGHTNING_PREFIX) for k in state):
        return "ssl"
    return "unknown"


def _config_beside(path: Path) -> dict[str, Any] | None:
    """A Lightning checkpoint from ``train`` sits in <run>/checkpoints/: its run's resolved config has the encoder."""
    for parent in (path.parent.parent, path.parent):
        cfg_file = parent / "config_resolved.yaml"
        if cfg_file.is_file():
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(cfg_file)
            enc = OmegaConf.select(cfg, "model.encoder")
            if enc is not None:
                from liverfusion.models.encoder_factory import build_encoder

                enc = to_plain(OmegaConf.to_container(enc, resolve=False))
                args = {k: v for k, v in enc.items() if not k.startswith("_") and k not in PROVENANCE_KEYS}
                try:  # build it: the live config fills the defaults (null shortcut -> the arch's own)
                    return build_encoder(**args).config()
                except Exception as exc:
                    log.warning("%s: encoder config could not be rebuilt (%s)", cfg_file, exc)
    return None


def _export_file(path: Path, obj: dict[str, Any]) -> EncoderFile:
    fusion_state = obj.get("fusion_state_dict")
    return EncoderFile(
        path=path,
        kind="encoder.pt",
        state_dict=dict(obj["state_dict"]),
        encoder_config=to_plain(obj.get("encoder_config")),
        modalities=to_plain(obj.get("modalities")),
        preprocess=to_plain(obj.get("preprocess")),
        input_shape=to_plain(obj.get("input_shape")),
        meta={k: to_plain(v) for k, v in obj.items() if k not in _WEIGHT_KEYS},
        fusion_state_dict=None if fusion_state is None else dict(fusion_state),
        fusion_config=to_plain(obj.get("fusion_config")),
    )


def _lightning_file(path: Path, obj: Mapping[str, Any]) -> EncoderFile:
    if obj.get("liverfusion", {}).get("format", "").startswith("liverfusion-classifier"):
        prefix = CLASSIFIER_PREFIX
    else:
        prefix = LIGHTNING_PREFIX
    state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
    if not state:
        heads = sorted({k.split(".")[0] for k in obj["state_dict"]})
        raise CheckpointError(
            f"{path}: Lightning checkpoint has no weights under {prefix!r} (top-level modules: {heads}); "
            "is it a liverfusion SSL or classifier checkpoint?"
        )
    hp = to_plain(obj.get("hyper_parameters") or {})
    lf = to_plain(obj.get("liverfusion") or {})
    spec = lf or hp.get("data_spec") or {}
    enc_cfg = lf.get("encoder_config") or hp.get("encoder_config") or _config_beside(path)
    backbone = hp.get("backbone") if prefix == LIGHTNING_PREFIX else None
    fusion_state, fusion_cfg = None, None
    if isinstance(backbone, Mapping) and backbone.get("kind") == "stack":  # an SSL run on whole stacks
        fusion_state = {
            k[len("fusion.") :]: v for k, v in obj["state_dict"].items() if k.startswith("fusion.")
        }
        fusion_cfg = backbone.get("fusion")
    return EncoderFile(
        path=path,
        kind="lightning",
        state_dict=state,
        encoder_config=enc_cfg,
        modalities=spec.get("modalities"),
        preprocess=spec.get("preprocess"),
        input_shape=spec.get("input_shape"),
        meta={
            "epoch": obj.get("epoch"),
            "global_step": obj.get("global_step"),
            "dataset": spec.get("dataset"),
        },
        fusion_state_dict=fusion_state,
        fusion_config=fusion_cfg,
    )


def read_encoder_file(path: str | Path) -> EncoderFile:
    """Read ``encoder.pt`` or a Lightning checkpoint of an SSL run (encoder weights under ``encoder.``) or of a
    classifier run (under ``net.encoder.``)."""
    path = Path(path).expanduser()
    obj = safe_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    if obj.get("format") == ENCODER_FORMAT:
        return _export_file(path, _checked_payload(obj, path))
    if "state_dict" in obj and "pytorch-lightning_version" in obj:
        return _lightning_file(path, obj)
    keys = sorted(obj)[:10]
    raise CheckpointError(
        f"{path}: neither an encoder export (format {ENCODER_FORMAT!r}) nor a Lightning checkpoint; keys: {keys}"
    )
