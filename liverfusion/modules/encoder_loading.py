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

Files are always read with ``torch.load(weights_only=True)``. Lightning checkpoints written with OmegaConf objects
in their hyper-parameters are read with exactly those OmegaConf container classes allow-listed (still no arbitrary
code).
"""

from __future__ import annotations

import collections
import logging
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from liverfusion.errors import CheckpointError
from liverfusion.models.encoder_base import Encoder, plain
from liverfusion.models.encoder_factory import encoder_config_diff
from liverfusion.models.ssl_backbone import HEAD_KEYS as FUSION_HEAD_KEYS

log = logging.getLogger(__name__)

ENCODER_FORMAT = "liverfusion-encoder/1"
LIGHTNING_PREFIX = "encoder."
# Preprocessing keys that change what an intensity means to the network: a mismatch is refused.
NORMALISATION_KEYS = ("normalize", "percentiles", "nonzero")
# Keys whose mismatch is allowed with a warning (geometry only).
GEOMETRY_KEYS = ("shape", "mode", "target_spacing", "interpolation", "orientation")
# Encoder config keys that only say where weights came from, not what the network is.
_PROVENANCE_KEYS = ("pretrained", "weights_path")


class EncoderModalityWarning(UserWarning):
    """The encoder was pre-trained on another modality set (allowed: the encoder is modality-agnostic)."""


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


def _omegaconf_globals() -> list[Any]:
    """The classes a pickled OmegaConf container needs; nothing that executes code on load."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    # the builtin types appear as type references (a node's ref_type / key_type), not as calls
    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        typing.Any,
        collections.defaultdict,
        dict,
        list,
        int,
        float,
        str,
        bool,
    ]


def _unsafe_payload(exc: BaseException) -> bool:
    text = str(exc)
    return "Unsupported global" in text or "Unsupported class" in text


def safe_load(path: str | Path) -> Any:
    """Read a checkpoint or encoder file as data: ``torch.load(weights_only=True)`` on CPU, then every metadata
    value checked to be plain (see ``checkpoint_data``). A missing, corrupt, pickled-object or interpolating file is
    one CheckpointError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or corrupt files
        if "omegaconf" not in str(first):
            raise _load_error(path, first) from None
        try:  # Lightning checkpoints of older runs hold OmegaConf containers: exactly those classes allowed
            with torch.serialization.safe_globals(_omegaconf_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _load_error(path, exc) from None
    return checkpoint_data(obj, path)


def _load_error(path: Path, exc: BaseException) -> CheckpointError:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    first = next((ln.strip() for ln in lines if "Unsupported" in ln), lines[0])[:200]
    if _unsafe_payload(exc):
        return CheckpointError(
            f"{path}: holds pickled Python objects that only an unsafe load would build ({first}); refused: "
            "checkpoints are read as data (weights and plain values), never as code",
            fix="use a checkpoint written by liverfusion, or re-save its state_dict with torch.save",
        )
    return CheckpointError(
        f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: {first}); is it "
        "truncated or another kind of file?"
    )


_PLAIN = (torch.Tensor, int, float, bool, bytes, type(None), torch.dtype, torch.device)


def checkpoint_data(obj: Any, path: str | Path, key: str = "") -> Any:
    """``obj`` as plain data: OmegaConf containers become dicts/lists *without* resolving them, and any string
    holding an interpolation (``${...}``) is refused, so no value read from a file is ever resolved as config (a
    ``${oc.env:...}`` or a custom resolver would run at that point)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, str):
        if "${" in obj:
            raise CheckpointError(
                f"{path}: {key or 'a value'} holds an interpolation ({obj[:60]!r}): checkpoint metadata is data, "
                "never config; refused",
                fix="use a checkpoint written by liverfusion, unedited",
            )
        return obj
    if isinstance(obj, DictConfig | ListConfig):
        obj = OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, Mapping):
        out = type(obj)() if isinstance(obj, dict) else {}
        for k, v in obj.items():
            name = f"{key}.{k}" if key else str(k)
            out[checkpoint_data(k, path, name) if isinstance(k, str) else k] = checkpoint_data(v, path, name)
        return out
    if isinstance(obj, list | tuple):
        items = [checkpoint_data(v, path, f"{key}[{i}]") for i, v in enumerate(obj)]
        return (
            tuple(items)
            if isinstance(obj, tuple) and not isinstance(obj, torch.Size)
            else (torch.Size(items) if isinstance(obj, torch.Size) else items)
        )
    if isinstance(obj, set | frozenset):
        return type(obj)(checkpoint_data(v, path, key) for v in obj)
    raise CheckpointError(f"{path}: {key or 'a value'} is a {type(obj).__name__}, not plain data; refused")


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

                enc = plain(OmegaConf.to_container(enc, resolve=False))
                args = {k: v for k, v in enc.items() if not k.startswith("_") and k not in _PROVENANCE_KEYS}
                try:  # build it: the live config fills the defaults (null shortcut -> the arch's own)
                    return build_encoder(**args).config()
                except Exception as exc:
                    log.warning("%s: encoder config could not be rebuilt (%s)", cfg_file, exc)
    return None


def read_encoder_file(path: str | Path) -> EncoderFile:
    """Read ``encoder.pt`` or a Lightning checkpoint of an SSL run (encoder weights under ``encoder.``)."""
    path = Path(path).expanduser()
    obj = safe_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    if obj.get("format") == ENCODER_FORMAT:
        state = obj.get("state_dict")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: encoder file without a state_dict")
        meta = {k: plain(v) for k, v in obj.items() if k not in ("state_dict", "fusion_state_dict")}
        fusion_state = obj.get("fusion_state_dict")
        if fusion_state is not None and not isinstance(fusion_state, Mapping):
            raise CheckpointError(
                f"{path}: fusion_state_dict is a {type(fusion_state).__name__}, not a state dict"
            )
        return EncoderFile(
            path=path,
            kind="encoder.pt",
            state_dict=dict(state),
            encoder_config=plain(obj.get("encoder_config")),
            modalities=plain(obj.get("modalities")),
            preprocess=plain(obj.get("preprocess")),
            input_shape=plain(obj.get("input_shape")),
            meta=meta,
            fusion_state_dict=None if fusion_state is None else dict(fusion_state),
            fusion_config=plain(obj.get("fusion_config")),
        )
    if "state_dict" in obj and "pytorch-lightning_version" in obj:
        if obj.get("liverfusion", {}).get("format", "").startswith("liverfusion-classifier"):
            prefix = "net.encoder."
        else:
            prefix = LIGHTNING_PREFIX
        state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not state:
            heads = sorted({k.split(".")[0] for k in obj["state_dict"]})
            raise CheckpointError(
                f"{path}: Lightning checkpoint has no weights under {prefix!r} (top-level modules: {heads}); "
                "is it a liverfusion SSL or classifier checkpoint?"
            )
        hp = plain(obj.get("hyper_parameters") or {})
        lf = plain(obj.get("liverfusion") or {})
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
    keys = sorted(obj)[:10]
    raise CheckpointError(
        f"{path}: neither an encoder export (format {ENCODER_FORMAT!r}) nor a Lightning checkpoint; keys: {keys}"
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
            {k: v for k, v in want.items() if k not in _PROVENANCE_KEYS},
            {k: v for k, v in found.items() if k not in _PROVENANCE_KEYS},
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


def _key_report(
    state: Mapping[str, torch.Tensor], module: nn.Module
) -> tuple[list[str], list[str], list[str]]:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, mis_shaped


def _listing(label: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
    return f"{label} {len(keys)}: {', '.join(keys[:8])}{more}"


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


FUSION_HEAD_PREFIX = "head."  # every fusion block's class head is ``self.head``


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
    own = {k: v for k, v in fusion.state_dict().items() if not k.startswith(FUSION_HEAD_PREFIX)}
    state = {k: v for k, v in file.fusion_state_dict.items() if not k.startswith(FUSION_HEAD_PREFIX)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        parts = [
            _listing(label, keys)
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mis_shaped),
            )
            if keys
        ]
        raise CheckpointError(f"{file.path}: fusion weights do not fit fusion {name!r}; " + "; ".join(parts))
    result = fusion.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if not k.startswith(FUSION_HEAD_PREFIX)]
    if (
        left or result.unexpected_keys
    ):  # cannot happen after the checks above; never load half a block silently
        raise CheckpointError(f"{file.path}: fusion load left {left} / {result.unexpected_keys}")
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
    state = {k.removeprefix("module."): v for k, v in file.state_dict.items()}
    missing, unexpected, mis_shaped = _key_report(state, encoder)
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
        raise CheckpointError(
            f"{file.path}: weights do not fit the encoder; "
            + "; ".join(parts)
            + ("" if mis_shaped else " (model.pretrained.strict_keys=false loads the matching keys only)")
        )
    if missing or unexpected:
        notes.append(
            f"{file.path}: partial load; "
            + "; ".join(
                _listing(lbl, k) for lbl, k in (("missing", missing), ("unexpected", unexpected)) if k
            )
        )
        state = {k: v for k, v in state.items() if k not in unexpected}
    encoder.load_state_dict(state, strict=not (missing or unexpected))
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
