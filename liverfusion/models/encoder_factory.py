"""Build an encoder by name from plain config values, and compare recorded encoder configs.

``build_encoder(**encoder.config())`` rebuilds an architecture exactly, which is how checkpoints are checked
against the model they are loaded into.
"""

from __future__ import annotations

import inspect
from typing import Any

from liverfusion.errors import ConfigError
from liverfusion.models.encoder_base import Encoder, plain
from liverfusion.models.resnet3d import ResNetEncoder
from liverfusion.models.slab2d import Slab2dEncoder

ENCODERS: dict[str, type[Encoder]] = {"resnet3d": ResNetEncoder, "slab2d": Slab2dEncoder}
# arguments that a config may not set for a given name (the name already fixes them)
_FIXED: dict[str, dict[str, Any]] = {"resnet3d": {"spatial_dims": 3}}


def build_encoder(name: str = "resnet3d", **kwargs: Any) -> Encoder:
    """The Hydra ``_target_`` of ``conf/encoder/*.yaml``: ``name`` picks the class, the rest are its arguments."""
    if name not in ENCODERS:
        raise ConfigError(f"encoder.name={name!r} is unknown; choose one of {sorted(ENCODERS)}")
    cls, fixed = ENCODERS[name], _FIXED.get(name, {})
    accepted = set(inspect.signature(cls).parameters) - set(fixed)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"encoder {name!r} has no argument(s) {unknown}; accepted: {sorted(accepted)}")
    return cls(**kwargs, **fixed)


def encoder_config_diff(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable differences between two ``Encoder.config()`` dicts (empty when the architectures agree).

    Lists and tuples compare equal, so a config read back from YAML or a checkpoint matches the live one.
    """
    diffs = []
    for key in sorted(set(expected) | set(found)):
        a, b = plain(expected.get(key, "<absent>")), plain(found.get(key, "<absent>"))
        if a != b:
            diffs.append(f"{key}: expected {a!r}, found {b!r}")
    return diffs
