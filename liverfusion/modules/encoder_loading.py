"""Load a pre-trained encoder into a classifier: from ``encoder.pt`` (the SSL export) or a Lightning checkpoint.

Files of ``stack`` pre-training (``model.backbone.kind=stack``) also hold the fusion block the encoder was trained
with, without its class head (``fusion_state_dict`` + ``fusion_config``): :func:`load_pretrained_network` loads it
too when the classifier's fusion block is the same (name and config, head options aside) on the same modalities in
the same order, and says so in the report; otherwise that block starts from random weights, with a warning.

Strict about what would silently ruin a fine-tune, lenient about what is by design:

* refused (``CheckpointError``): another architecture (``Encoder.config()`` differs), another number of input
  channels (e.g. a shared 1-channel encoder into the ``early`` baseline), another intensity normalisation than the
  classifier's data, and missing, unexpected or mis-shaped weight keys (all listed);
* warned: another modality set (the encoder is modality-agnostic: pre-training on a union or a disjoint pool is
  the point), another preprocessing size or resampling mode (convolutions do not care about the crop size).

The files are read by :func:`liverfusion.modules.encoder_file.read_encoder_file` (``weights_only``, plain data
only); every tensor goes in through :func:`_load_checked`, one key report for the encoder and the fusion block.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from liverfusion.errors import CheckpointError
from liverfusion.models.encoder_base import Encoder, plain
from liverfusion.models.encoder_factory import encoder_config_diff
from liverfusion.models.ssl_backbone import HEAD_KEYS as FUSION_HEAD_KEYS
from liverfusion.modules.encoder_file import PROVENANCE_KEYS, EncoderFile, read_encoder_file

log = logging.getLogger(__name__)

# Preprocessing keys that change what an intensity means to the network: a mismatch is refused.
NORMALISATION_KEYS = ("normalize", "percentiles", "nonzero")
# Keys whose mismatch is allowed with a warning (geometry only).
GEOMETRY_KEYS = ("shape", "mode", "target_spacing", "interpolation", "orientation")
FUSION_HEAD_PREFIX = "head."  # every fusion block's class head is ``self.head``
STRICT_KEYS_HINT = " (model.pretrained.strict_keys=false loads the matching keys only)"


class EncoderModalityWarning(UserWarning):
    """The encoder was pre-trained on another modality set (allowed: the encoder is modality-agnostic)."""


@dataclass
class LoadReport:
    """What happened when the weights were loaded; stored in every classifier checkpoint."""

    path: str
    kind: str
    loaded_keys: int
    missing: list[str]
    unexpected: list[str]
    warnings: list[str]
    source: dict[str, Any]
    fusion: dict[str, Any] | None = None  # what happened to the fusion block (load_pretrained_network)

    def as_dict(self) -> dict[str, Any]:
        return plain(
            {
                "path": self.path,
                "kind": self.kind,
                "fusion": self.fusion,
                "loaded_keys": self.loaded_keys,
                "missing": self.missing,
                "unexpected": self.unexpected,
                "warnings": self.warnings,
                "source": self.source,
            }
        )


def _check_architecture(file: EncoderFile, encoder: Encoder) -> list[str]:
    """Refuse another architecture / channel count; return notes when only tensor shapes could be compared."""
    notes: list[str] = []
    want = encoder.config()
    found = file.encoder_config
    found_in = (found or {}).get("in_channels")
    if found is None:
        stem = next((v for k, v in file.state_dict.items() if k.endswith("conv1.weight")), None)
        found_in = int(stem.shape[1]) if stem is not None and stem.ndim >= 3 else None
        notes.append(
            f"{file.path}: no encoder config recorded; architecture checked by weight names and shapes"
        )
    if found_in is not None and int(found_in) != int(encoder.in_channels):
        raise CheckpointError(
            f"{file.path}: the encoder was trained with in_channels={found_in} but this classifier needs "
            f"in_channels={encoder.in_channels} (the shared encoder reads 1 modality per pass; the early-fusion "
            "baseline stacks all modalities as channels): these weights cannot initialise it"
        )
    if found is not None:
        diffs = encoder_config_diff(
            {k: v for k, v in want.items() if k not in PROVENANCE_KEYS},
            {k: v for k, v in found.items() if k not in PROVENANCE_KEYS},
        )
        if diffs:
            raise CheckpointError(
                f"{file.path}: encoder architecture differs from the classifier's encoder config: "
                + "; ".join(diffs)
                + " (pick the matching encoder preset, e.g. model/encoder=<name>, or another file)"
            )
    return notes


def _check_preprocess(
    file: EncoderFile, data_spec: Mapping[str, Any], strict_normalization: bool
) -> list[str]:
    notes: list[str] = []
    ours = plain(data_spec.get("preprocess") or {})
    theirs = plain(file.preprocess or {})
    if not theirs:
        notes.append(f"{file.path}: no preprocessing recorded; normalisation could not be checked")
        return notes
    norm_diff = [
        f"{k}: encoder {theirs.get(k)!r} vs data {ours.get(k)!r}"
        for k in NORMALISATION_KEYS
        if k in theirs and k in ours and theirs[k] != ours[k]
    ]
    if norm_diff:
        msg = (
            f"{file.path}: intensity normalisation differs from the data the classifier reads ("
            + "; ".join(norm_diff)
            + "): set data.preprocess to the encoder's values"
        )
        if strict_normalization:
            raise CheckpointError(msg + " (or model.pretrained.strict_normalization=false to accept it)")
        notes.append(msg)
    geo_diff = [
        f"{k}: encoder {theirs.get(k)!r} vs data {ours.get(k)!r}"
        for k in GEOMETRY_KEYS
        if k in theirs and k in ours and theirs[k] != ours[k]
    ]
    if geo_diff:
        notes.append(f"{file.path}: pre-trained on other geometry (" + "; ".join(geo_diff) + ")")
    return notes


def _check_modalities(file: EncoderFile, modalities: list[str]) -> list[str]:
    if not file.modalities:
        return []
    theirs, ours = list(file.modalities), list(modalities)
    if set(theirs) == set(ours):
        return []
    only_ours = [m for m in ours if m not in theirs]
    only_theirs = [m for m in theirs if m not in ours]
    msg = (
        f"{file.path}: encoder pre-trained on modalities {theirs}, classifier uses {ours}"
        + (f" (never seen in pre-training: {only_ours})" if only_ours else "")
        + (f" (pre-training only: {only_theirs})" if only_theirs else "")
        + "; accepted because the encoder is shared by all modalities"
    )
    warnings.warn(msg, EncoderModalityWarning, stacklevel=3)
    return [msg]


def _listing(label: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
    return f"{label} {len(keys)}: {', '.join(keys[:8])}{more}"


def _load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: Path,
    what: str,
    misfit: str,
    strict_keys: bool = True,
    fresh: str | None = None,
    hint: str = "",
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The one way file weights go into a module (in place): one key report against ``module.state_dict()``.

    Mis-shaped keys are refused (``<path>: <misfit>; <listing>``), and missing or unexpected ones too unless
    ``strict_keys=False``, which loads the matching keys only (``hint`` ends a refusal without mis-shaped keys).
    Keys under ``fresh`` (a fusion block's class head) are left out on both sides and keep the module's weights.
    Returns (the loaded state, missing, unexpected)."""

    def kept(keys: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in keys.items() if fresh is None or not k.startswith(fresh)}

    own, state = kept(module.state_dict()), kept(state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if mis_shaped or (strict_keys and (missing or unexpected)):
        parts = [
            _listing(label, keys)
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mis_shaped),
            )
            if keys
        ]
        raise CheckpointError(f"{path}: {misfit}; " + "; ".join(parts) + ("" if mis_shaped else hint))
    state = {k: v for k, v in state.items() if k not in unexpected}
    result = module.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if k not in missing and (fresh is None or not k.startswith(fresh))]
    if (
        left or result.unexpected_keys
    ):  # cannot happen after the report above; never load half a module silently
        raise CheckpointError(f"{path}: {what} load left {left} / {result.unexpected_keys}")
    return state, missing, unexpected


def load_pretrained_encoder(
    encoder: Encoder,
    path: str | Path,
    data_spec: Mapping[str, Any] | None = None,
    strict_normalization: bool = True,
    strict_keys: bool = True,
) -> LoadReport:
    """Check ``path`` against ``encoder`` and the classifier's data, then load its weights (in place).

    Raises CheckpointError for another architecture, channel count or normalisation, and for mis-shaped keys;
    missing or unexpected keys are refused too unless ``strict_keys=False``, which loads the matching ones and
    lists the rest in the report. A different modality set gives an :class:`EncoderModalityWarning`; an encoder
    that reads the modalities as channels (early fusion) must see them in the same order.
    """
    return _load_encoder(
        read_encoder_file(path), encoder, dict(data_spec or {}), strict_normalization, strict_keys
    )


def load_pretrained_network(
    net: nn.Module,
    path: str | Path,
    data_spec: Mapping[str, Any] | None = None,
    strict_normalization: bool = True,
    strict_keys: bool = True,
) -> LoadReport:
    """The classifier's initialisation from a pre-training file: the encoder as :func:`load_pretrained_encoder`,
    then the fusion block except its class head when the file holds one that fits (``report.fusion`` says)."""
    data_spec = dict(data_spec or {})
    file = read_encoder_file(path)
    report = _load_encoder(file, net.encoder, data_spec, strict_normalization, strict_keys)
    report.fusion = load_pretrained_fusion(net.fusion, file, list(data_spec.get("modalities") or []))
    if report.fusion.get("reason") and file.fusion_state_dict is not None:
        report.warnings.append(f"{file.path}: fusion block not loaded: {report.fusion['reason']}")
    return report


def load_pretrained_fusion(fusion: nn.Module, file: EncoderFile, modalities: list[str]) -> dict[str, Any]:
    """Load ``file``'s fusion block into ``fusion`` (in place) when it is the same block on the same modalities;
    the class head keeps its fresh weights. Returns ``{"loaded", "name", "tensors", "reason"}``."""
    name = getattr(fusion, "name", type(fusion).__name__)
    if file.fusion_state_dict is None:
        return {"loaded": False, "name": name, "tensors": 0, "reason": "no fusion weights in the file"}
    theirs = {k: v for k, v in (file.fusion_config or {}).items() if k not in FUSION_HEAD_KEYS}
    ours = {k: v for k, v in fusion.config().items() if k not in FUSION_HEAD_KEYS}
    reason = None
    if theirs.get("name") != ours.get("name"):
        reason = f"the file's fusion is {theirs.get('name')!r}, the classifier's {ours.get('name')!r}"
    elif diffs := encoder_config_diff(ours, theirs):
        reason = f"fusion {name!r} configured differently (" + "; ".join(diffs) + ")"
    elif file.modalities and modalities and list(file.modalities) != list(modalities):
        reason = (
            f"pre-trained on modalities {list(file.modalities)}, the classifier has {list(modalities)}: the block's "
            "groups follow the modality order"
        )
    if reason is not None:
        log.warning("%s: fusion block not loaded: %s", file.path, reason)
        return {"loaded": False, "name": name, "tensors": 0, "reason": reason}
    state, _, _ = _load_checked(
        fusion,
        file.fusion_state_dict,
        file.path,
        "fusion",
        f"fusion weights do not fit fusion {name!r}",
        fresh=FUSION_HEAD_PREFIX,
    )
    log.info("fusion block %r loaded from %s (%d tensors; class head fresh)", name, file.path, len(state))
    return {"loaded": True, "name": name, "tensors": len(state), "reason": None}


def _load_encoder(
    file: EncoderFile,
    encoder: Encoder,
    data_spec: dict[str, Any],
    strict_normalization: bool,
    strict_keys: bool,
) -> LoadReport:
    notes = _check_architecture(file, encoder)
    notes += _check_preprocess(file, data_spec, strict_normalization)
    modalities = list(data_spec.get("modalities") or [])
    if (
        int(encoder.in_channels) > 1
        and file.modalities
        and modalities
        and list(file.modalities) != modalities
    ):
        raise CheckpointError(
            f"{file.path}: this encoder reads the modalities as its {encoder.in_channels} input channels in the "
            f"order {list(file.modalities)}, but the classifier's data has {modalities}: its channels would mean "
            "other phases; pre-train on the same modalities in the same order"
        )
    notes += _check_modalities(file, modalities)
    state, missing, unexpected = _load_checked(
        encoder,
        {k.removeprefix("module."): v for k, v in file.state_dict.items()},
        file.path,
        "encoder",
        "weights do not fit the encoder",
        strict_keys=strict_keys,
        hint=STRICT_KEYS_HINT,
    )
    if missing or unexpected:
        notes.append(
            f"{file.path}: partial load; "
            + "; ".join(
                _listing(lbl, k) for lbl, k in (("missing", missing), ("unexpected", unexpected)) if k
            )
        )
    for note in notes:
        log.warning(note)
    source = {
        k: v for k, v in file.meta.items() if k in ("dataset", "method", "seed", "epochs", "global_step")
    }
    source.update(
        {"modalities": file.modalities, "preprocess": file.preprocess, "input_shape": file.input_shape}
    )
    log.info("encoder weights loaded from %s (%s, %d tensors)", file.path, file.kind, len(state))
    return LoadReport(
        path=str(file.path),
        kind=file.kind,
        loaded_keys=len(state),
        missing=missing,
        unexpected=unexpected,
        warnings=notes,
        source=plain(source),
    )
