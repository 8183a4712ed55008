"""Frozen per-modality features of every case of a data module, from a trained or a random encoder.

What the SSL diagnostics (:mod:`liverfusion.metrics.ssl_diagnostics`) read: one pooled feature per (case,
modality), no augmentation (the data module's evaluation transform only), eval mode, no gradient, nothing
written to disk. The encoder comes from

- an ``encoder.pt`` export or a Lightning checkpoint of an SSL run (checked against the data's normalisation by
  :func:`~liverfusion.modules.encoder_loading.load_pretrained_encoder`, read with ``weights_only``);
- ``random``: the configured architecture, randomly initialised (seeded), the floor a recipe must beat;
- ``random_bn``: the same with its BatchNorm running statistics re-estimated on the training cases (no gradient
  step): how much of a pre-trained encoder's lead is mere BatchNorm calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from liverfusion.data.datasets import CaseDataset
from liverfusion.errors import CheckpointError, ConfigError, DataError
from liverfusion.metrics.ssl_diagnostics import FeatureSet
from liverfusion.models.encoder_base import Encoder
from liverfusion.models.encoder_factory import build_encoder
from liverfusion.modules.encoder_file import PROVENANCE_KEYS, read_encoder_file
from liverfusion.modules.encoder_loading import load_pretrained_encoder
from liverfusion.utils.plain import to_plain

log = logging.getLogger(__name__)

RANDOM_SOURCES = ("random", "random_bn")


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """An encoder config (Hydra node or ``Encoder.config()``) as ``build_encoder`` arguments, no weights named."""
    cfg = to_plain(dict(config))
    return {k: v for k, v in cfg.items() if not str(k).startswith("_") and k not in PROVENANCE_KEYS}


def build_frozen_encoder(
    source: str | Path,
    encoder_config: Mapping[str, Any] | None = None,
    data_spec: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Encoder, dict[str, Any]]:
    """(encoder in eval mode, what it is) for ``source``: a weight file, ``random`` or ``random_bn``.

    ``encoder_config`` (e.g. ``cfg.model.encoder``) builds the random encoders and stands in for a checkpoint that
    records none; ``data_spec`` (the data module's) lets the loader refuse weights trained on another intensity
    normalisation. ``random_bn`` is returned un-calibrated here: see :func:`recalibrate_batchnorm`.
    """
    name = str(source)
    if name in RANDOM_SOURCES:
        if encoder_config is None:
            raise ConfigError(
                f"encoder {name!r}: a random encoder needs an encoder config; pass encoder_config "
                "(e.g. the composed cfg.model.encoder)"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            encoder = build_encoder(**_architecture(encoder_config))
        info: dict[str, Any] = {"source": name, "seed": int(seed)}
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"{path}: no such encoder file",
                fix=f"give an encoder.pt or an SSL run's Lightning checkpoint, or one of {list(RANDOM_SOURCES)}",
            )
        file = read_encoder_file(path)
        config = file.encoder_config or encoder_config
        if config is None:
            raise CheckpointError(
                f"{path}: records no encoder architecture; pass encoder_config (the run's model.encoder)"
            )
        encoder = build_encoder(**_architecture(config))
        report = load_pretrained_encoder(encoder, path, data_spec=data_spec)
        info = {"source": "file", "path": str(path), "kind": report.kind, "warnings": report.warnings}
    encoder.eval()
    info["encoder_config"] = encoder.config()
    return encoder, info


def _volumes(
    batch: Mapping[str, Any], channels_last: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The present modality volumes of a case batch as (P, 1, D, H, W), and the (n, M) present mask."""
    image, present = batch["image"], torch.as_tensor(batch["present"], dtype=torch.bool)
    x = image[present].unsqueeze(1).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x, present


def _device_of(encoder: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(encoder.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def recalibrate_batchnorm(
    encoder: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    channels_last: bool = False,
    device: str | torch.device | None = None,
) -> int:
    """Set every BatchNorm's running statistics to the plain average over the batches' present modality volumes
    (cumulative average, no gradient, no other layer in train mode); returns how many volumes were seen.

    The encoder is left in eval mode with its BatchNorm momenta restored. Without BatchNorm it is a no-op (0).
    """
    norms = [m for m in encoder.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        log.warning("recalibrate_batchnorm: the encoder has no BatchNorm layer; nothing re-estimated")
        return 0
    device = _device_of(encoder, device)
    momenta = [m.momentum for m in norms]
    encoder.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                x, _ = _volumes(batch, channels_last, device)
                if x.shape[0]:
                    encoder(x)
                    seen += int(x.shape[0])
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        encoder.eval()
    if seen == 0:
        raise DataError("recalibrate_batchnorm: no present modality volume in the batches given")
    return seen


def encode_cases(
    encoder: Encoder,
    batches: Iterable[Mapping[str, Any]],
    channels_last: bool = False,
    device: str | torch.device | None = None,
) -> FeatureSet:
    """Pooled features (N, M, F) of every case of ``batches`` (``CaseDataset`` items collated), zeros where a
    modality is missing; eval mode and no gradient (the encoder's mode is restored afterwards)."""
    device = _device_of(encoder, device)
    was_training = encoder.training
    encoder.eval()
    feats, presents, labels, cases, patients = [], [], [], [], []
    try:
        with torch.no_grad():
            for batch in batches:
                x, present = _volumes(batch, channels_last, device)
                out = torch.zeros(*present.shape, int(encoder.feature_dim))
                if x.shape[0]:
                    out[present] = encoder(x).pooled.float().cpu()
                feats.append(out)
                presents.append(present)
                labels.append(torch.as_tensor(batch["label"], dtype=torch.int64).reshape(-1))
                cases += list(batch["case_id"])
                patients += list(batch["patient_id"])
    finally:
        encoder.train(was_training)
    if not feats:
        raise DataError("encode_cases: no case in the batches given")
    return FeatureSet(torch.cat(feats), torch.cat(presents), torch.cat(labels), cases, patients)


def _part_loader(dm: Any, parts: Sequence[str], batch_size: int | None) -> DataLoader | None:
    entries = [e for part in parts for e in dm.part_entries(part)]
    if not entries:
        return None
    dataset = CaseDataset(entries, transform=getattr(dm, "eval_transform", None), in_memory=False)
    return DataLoader(
        dataset,
        batch_size=int(batch_size or dm.eval_batch_size),
        shuffle=False,
        num_workers=int(getattr(dm, "num_workers", 0)),
    )


def _check_parts(dm: Any, parts: Sequence[str], key: str) -> None:
    unknown = [p for p in parts if p not in dm.partition]
    if unknown:
        raise ConfigError(f"{key}: unknown split(s) {unknown}; choose from {sorted(dm.partition)}")


def extract_features(
    encoder: Encoder,
    dm: Any,
    parts: Sequence[str] = ("train", "val", "test"),
    batch_size: int | None = None,
    channels_last: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, FeatureSet]:
    """Features of every case (labelled or not) of each split of a set-up data module, in ``part_entries``
    order; with ``label_fraction < 1`` the withheld training labels read -1, as the classifier sees them."""
    _check_parts(dm, parts, "parts")
    out = {}
    for part in parts:
        loader = _part_loader(dm, [part], batch_size)
        if loader is None:
            m, dim = len(dm.modalities), int(encoder.feature_dim)
            out[part] = FeatureSet(
                torch.zeros(0, m, dim), torch.zeros(0, m, dtype=torch.bool), torch.zeros(0), [], []
            )
            continue
        out[part] = encode_cases(encoder, loader, channels_last, device)
    return out


def frozen_features(
    dm: Any,
    source: str | Path,
    encoder_config: Mapping[str, Any] | None = None,
    parts: Sequence[str] = ("train", "val", "test"),
    bn_parts: Sequence[str] = ("train",),
    seed: int = 0,
    batch_size: int | None = None,
    channels_last: bool = False,
    device: str | torch.device | None = None,
) -> tuple[dict[str, FeatureSet], dict[str, Any]]:
    """Build the encoder of ``source`` (see :func:`build_frozen_encoder`), re-estimate its BatchNorm statistics on
    the cases of ``bn_parts`` for ``random_bn`` (training cases only: never the held-out ones), and extract the
    features of ``parts``. Returns (part -> FeatureSet, what the encoder is)."""
    if not dm.partition:
        dm.setup("fit")
    _check_parts(dm, parts, "parts")
    encoder, info = build_frozen_encoder(source, encoder_config, dm.data_spec(), seed)
    if device is not None:
        encoder.to(device)
    if str(source) == "random_bn":
        _check_parts(dm, bn_parts, "bn_parts")
        loader = _part_loader(dm, bn_parts, batch_size)
        if loader is None:
            raise DataError(f"random_bn: no case in {list(bn_parts)} to estimate BatchNorm statistics on")
        info["bn_parts"] = list(bn_parts)
        info["bn_volumes"] = recalibrate_batchnorm(encoder, loader, channels_last, device)
    return extract_features(encoder, dm, parts, batch_size, channels_last, device), info
