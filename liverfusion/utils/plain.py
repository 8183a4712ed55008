"""The one conversion of configs to plain Python: OmegaConf nodes, mappings, tuples and paths as dicts, lists and
strings, recursively.

Why one: a spec hash, a settings fingerprint, a checkpoint's ``hyper_parameters`` read back with
``weights_only=True``, W&B metadata and an encoder's ``config()`` compared with another's all need the same plain
form; several hand-written conversions drifted apart (tuples kept here, paths kept there).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["to_plain"]


def to_plain(obj: Any, throw_on_missing: bool = False) -> Any:
    """``obj`` with every OmegaConf container (interpolations resolved), mapping, list, tuple and path turned into
    dicts with string keys, lists and strings, recursively; anything else is returned as it is.

    ``throw_on_missing``: a mandatory ``???`` value raises OmegaConf's ``MissingMandatoryValue`` instead of staying
    the string ``"???"`` (for callers that turn it into a ConfigError naming the key)."""
    if isinstance(obj, DictConfig | ListConfig):
        obj = OmegaConf.to_container(obj, resolve=True, throw_on_missing=throw_on_missing)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, throw_on_missing) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v, throw_on_missing) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
