"""What a self-supervised method pre-trains: the network that turns one view into the pooled vector (N, F).

- ``modality``: the shared single-channel encoder; a view is one phase (C = 1). The paper's MDA.
- ``stack``: the network that sees all phases of a case at once; a view is the whole stack (C = M, absent phases
  zero). It is the classifier's own feature path (``FusionClassifierNet``: shared encoder + fusion block, e.g. CGC;
  or the early-fusion encoder with M input channels) without its class head, so fine-tuning can start from the
  pre-trained fusion block too.

``model.backbone`` selects one: ``kind`` (modality | stack) and ``fusion`` (stack only: a ``conf/fusion`` preset).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from liverfusion.errors import ConfigError
from liverfusion.models.classifier_net import FusionClassifierNet, build_fusion_classifier, fusion_class
from liverfusion.models.encoder_base import Encoder, plain
from liverfusion.models.fusion import FUSIONS, Fusion

KINDS = ("modality", "stack")
# fusion-config keys that only shape the class head: not part of what pre-training learns or exports
HEAD_KEYS = ("num_classes", "dropout", "hidden_dims")
_RUNTIME_KEYS = ("num_modalities", "in_channels", "num_classes")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


class NoHead(nn.Module):
    """Stands in for a fusion block's class head during pre-training: (..., F) -> (..., 0), no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class SSLBackbone(nn.Module, abc.ABC):
    """``encode(view, present) -> (N, feature_dim)``; ``monitor_features`` feeds the kNN monitor and the probe."""

    kind: ClassVar[str]
    feature_dim: int
    encoder: Encoder  # exported as encoder.pt's state_dict

    @property
    def fusion(self) -> Fusion | None:
        """The fusion block without its head (stack backbones), else None."""
        return None

    @abc.abstractmethod
    def encode(self, view: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features (N, F) of one view (N, C, D, H, W); ``present`` (N, M) bool marks real phases."""

    @abc.abstractmethod
    def monitor_features(
        self,
        image: torch.Tensor,
        present: torch.Tensor,
        prepare: Callable[[torch.Tensor], torch.Tensor] = _same,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, S, F), mask (N, S) bool) of whole cases (N, M, D, H, W), S slots per case; ``prepare``
        sets the memory layout of the network's input (channels_last)."""

    def monitor_width(self, num_modalities: int) -> int:
        """Width of the flattened monitor features (the kNN input)."""
        return self.feature_dim

    def export(self) -> dict[str, Any]:
        """Keys added to ``encoder.pt`` besides the encoder's weights and config."""
        return {"backbone": {"kind": self.kind}}


class ModalityBackbone(SSLBackbone):
    """The shared encoder, one phase per view (the paper's setting)."""

    kind = "modality"

    def __init__(self, encoder: nn.Module):
        super().__init__()
        if int(getattr(encoder, "in_channels", 1)) != 1:
            raise ConfigError(
                f"model.backbone.kind=modality reads one phase per view, but model.encoder has in_channels="
                f"{encoder.in_channels}; set model.encoder.in_channels=1, or model.backbone.kind=stack"
            )
        self.encoder = encoder
        self.feature_dim = int(encoder.feature_dim)

    def encode(self, view: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(view).pooled

    def monitor_features(
        self,
        image: torch.Tensor,
        present: torch.Tensor,
        prepare: Callable[[torch.Tensor], torch.Tensor] = _same,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every modality of each case on its own (N, M, F); missing modalities are zeros."""
        n, m = image.shape[:2]
        pooled = self.encoder(prepare(image.reshape(n * m, 1, *image.shape[2:]))).pooled.reshape(n, m, -1)
        return pooled * present.unsqueeze(-1).to(pooled.dtype), present

    def monitor_width(self, num_modalities: int) -> int:
        return self.feature_dim * max(1, num_modalities)


class StackBackbone(SSLBackbone):
    """Encoder + fusion block of the classifier (``FusionClassifierNet``), class head removed: sees all phases."""

    kind = "stack"

    def __init__(self, net: FusionClassifierNet):
        super().__init__()
        net.fusion.head = NoHead()
        self.net = net
        self.feature_dim = int(net.fusion.feature_dim)

    @property
    def encoder(self) -> Encoder:
        return self.net.encoder

    @property
    def fusion(self) -> Fusion:
        return self.net.fusion

    def encode(self, view: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        enc = self.net.encode(view, present)
        maps = enc.maps if self.net.fusion.consumes == "map" else None
        return self.net.fusion(maps, enc.pooled, enc.mask).features

    def monitor_features(
        self,
        image: torch.Tensor,
        present: torch.Tensor,
        prepare: Callable[[torch.Tensor], torch.Tensor] = _same,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot per case: the fused features of the whole stack (N, 1, F)."""
        feats = self.encode(prepare(image), present)[:, None]
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)

    def export(self) -> dict[str, Any]:
        fusion = self.net.fusion
        return {
            "backbone": {"kind": self.kind, "fusion": fusion.name, "topology": fusion.topology},
            "fusion_state_dict": {k: v.detach().cpu().contiguous() for k, v in fusion.state_dict().items()},
            "fusion_config": fusion_config(fusion),
        }


def fusion_config(fusion: Fusion) -> dict[str, Any]:
    """``fusion.config()`` without the class-head keys: what a pre-trained fusion block is."""
    return plain({k: v for k, v in fusion.config().items() if k not in HEAD_KEYS})


def _fusion_factory(fusion: Any) -> Callable[..., Fusion]:
    """A Hydra ``_partial_`` of a fusion preset, a preset's name (``model.backbone.fusion=early`` on the command
    line: ``conf/fusion/early.yaml`` as it is), or a plain ``fusion.config()``-style dict with ``name``."""
    if isinstance(fusion, str):
        from pathlib import Path

        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from liverfusion.utils.hydra_utils import CONFIG_DIR

        folder = Path(CONFIG_DIR) / "fusion"
        if not (folder / f"{fusion}.yaml").is_file():
            presets = sorted(p.stem for p in folder.glob("*.yaml"))
            raise ConfigError(
                f"model.backbone.fusion={fusion!r} is not a conf/fusion preset; choose one of {presets}"
            )
        fusion = instantiate(OmegaConf.load(folder / f"{fusion}.yaml"))
    if isinstance(fusion, Mapping):
        cfg = {k: v for k, v in fusion.items() if k not in _RUNTIME_KEYS and not str(k).startswith("_")}
        name = cfg.pop("name", None)
        if name not in FUSIONS:
            raise ConfigError(
                f"model.backbone.fusion.name={name!r} is unknown; choose one of {sorted(FUSIONS)}"
            )
        return functools.partial(FUSIONS[name], **cfg)
    fusion_class(fusion)  # a ConfigError unless it builds a liverfusion Fusion
    return fusion


def build_backbone(
    kind: str,
    encoder: nn.Module | Callable[..., nn.Module],
    fusion: Any,
    modalities: Sequence[str],
) -> SSLBackbone:
    """The backbone of ``model.backbone``: ``encoder`` is an Encoder or a factory taking ``in_channels`` (a Hydra
    ``_partial_``; the early-fusion stack needs one, or an encoder built with in_channels = M)."""
    if kind not in KINDS:
        raise ConfigError(f"model.backbone.kind={kind!r} is unknown; choose one of {list(KINDS)}")
    built = isinstance(encoder, nn.Module)
    if kind == "modality":
        if fusion is not None:
            raise ConfigError(
                "model.backbone.fusion is set but model.backbone.kind=modality pre-trains the encoder alone; "
                "set model.backbone.fusion=null, or model.backbone.kind=stack (+experiment=stack_pretrain)"
            )
        return ModalityBackbone(encoder if built else encoder(in_channels=1))
    modalities = list(modalities)
    if len(modalities) < 2:
        raise ConfigError(
            f"model.backbone.kind=stack needs a data set with two or more modalities, this one has {modalities}; "
            "use model.backbone.kind=modality with data.pairs.policy=same"
        )
    if fusion is None:
        raise ConfigError(
            "model.backbone.kind=stack needs model.backbone.fusion, a conf/fusion preset "
            "(e.g. /fusion@model.backbone.fusion: cgc in the experiment, or fusion@model.backbone.fusion=early)"
        )
    factory = _fusion_factory(fusion)
    cls = fusion_class(factory)
    want_in = len(modalities) if cls.topology == "early" else 1
    if built and int(encoder.in_channels) != want_in:
        raise ConfigError(
            f"model.backbone.fusion={cls.name!r} needs an encoder with in_channels={want_in}, model.encoder has "
            f"{encoder.in_channels}; set model.encoder._partial_=true so the backbone builds it"
        )
    net = build_fusion_classifier(encoder, factory, modalities, num_classes=1)
    return StackBackbone(net)


def backbone_from_export(payload: Mapping[str, Any]) -> SSLBackbone:
    """The pre-trained backbone of an ``encoder.pt`` payload (``liverfusion.modules.encoder_file.load_encoder_payload``),
    weights loaded: the encoder alone, or encoder + fusion block for ``stack`` runs. Files without a ``backbone``
    entry (the main of 2026-12-02) are modality backbones. For diagnostics on what pre-training produced."""
    from liverfusion.models.encoder_factory import build_encoder

    config = dict(payload.get("encoder_config") or {})
    if not config:
        raise ConfigError("encoder.pt without encoder_config: cannot rebuild its backbone")
    kind = (payload.get("backbone") or {}).get("kind", "modality")
    encoder = build_encoder(**config)
    encoder.load_state_dict(payload["state_dict"])
    if kind == "modality":
        return ModalityBackbone(encoder)
    fusion = {k: v for k, v in (payload.get("fusion_config") or {}).items() if k != "num_modalities"}
    backbone = build_backbone("stack", encoder, fusion, payload.get("modalities") or [])
    backbone.fusion.load_state_dict(payload["fusion_state_dict"])
    return backbone
