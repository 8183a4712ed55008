"""The one mechanism by which modules know their keys: the YAML states every default, code lists the key names.

A LightningModule (or any config-built object) names, per section, the keys it requires and the ones it may take;
:func:`check_section` refuses an unknown or missing key with one error naming it and where the defaults live.
:func:`model_config` reads ``conf/model/<name>.yaml`` (with its same-group defaults chain, as Hydra merges it), so
tests and scripts build a module in Python from the YAML's defaults instead of a second set written in code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from liverfusion.errors import ConfigError


def check_section(
    key: str, value: Any, required: Sequence[str], optional: Sequence[str] = (), where: str = "model"
) -> dict[str, Any]:
    """``<where>.<key>`` as a plain dict with exactly the known keys: unknown or missing ones are a ConfigError."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.{key} must be a mapping with keys {list(required)}, got {value!r}")
    value = dict(value)
    known = [*required, *optional]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{key}: unknown key(s) {unknown}; known keys: {known}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ConfigError(
            f"{where}.{key}: missing key(s) {missing}; the defaults live in conf/{where}/<name>.yaml "
            "(compose it, or build the arguments with liverfusion.utils.config_sections.model_config)"
        )
    return value


def merge_sections(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` over ``base``, one level deep: a section given as a mapping updates the section it replaces."""
    out = dict(base)
    for k, v in new.items():
        out[k] = {**out[k], **v} if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def model_config(name: str, group: str = "model", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a module as ``conf/<group>/<name>.yaml`` gives them, each override merged into its
    section. Same-group entries of the file's ``defaults`` list (e.g. ``_ssl``) are merged first, as Hydra does;
    group entries (an encoder preset) and ``_target_`` / ``_convert_`` / ``encoder`` are left out.
    """
    from omegaconf import OmegaConf

    from liverfusion.utils.hydra_utils import CONFIG_DIR

    folder = Path(CONFIG_DIR) / group

    def load(stem: str) -> dict[str, Any]:
        path = folder / f"{stem}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
            raise ConfigError(f"{group}={stem!r}: no {path}; choose one of {choices}")
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        merged: dict[str, Any] = {}
        for entry in raw.pop("defaults", []) or []:
            if isinstance(entry, str) and entry != "_self_":
                merged = merge_sections(merged, load(entry))
        return merge_sections(merged, raw)

    cfg = load(name)
    for key in ("_target_", "_convert_", "encoder"):
        cfg.pop(key, None)
    return merge_sections(cfg, overrides)
