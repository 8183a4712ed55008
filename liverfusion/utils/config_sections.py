"""The one mechanism by which modules know their keys: the YAML states every default, code lists the key names.

A LightningModule (or any config-built object) names, per section, the keys it requires and the ones it may take;
:func:`check_section` refuses an unknown or missing key with one error naming it and where the defaults live.
:func:`model_config` reads ``conf/model/<name>.yaml`` (with its same-group defaults chain, as Hydra merges it), so
tests and scripts build a module in Python from the YAML's defaults instead of a second set written in code.
"""

from __future__ import annotations

import math
import numbers
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


_NUMBER_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def check_value(
    key: str,
    value: Any,
    kind: str = "int",
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> Any:
    """One config value checked against its type and range, returned as that type; else a ConfigError naming
    the key, the value and what is allowed (so a bad value fails when the module is built, not deep in torch).

    ``kind``: ``int``, ``float`` or ``bool``; ``low``/``high``: bounds, closed unless ``low_open``/``high_open``;
    ``optional``: None passes through.
    """
    if value is None and optional:
        return None
    allowed = _NUMBER_KINDS[kind]
    if kind != "bool" and (low is not None or high is not None):
        lo = "-inf" if low is None else (str(low) if isinstance(low, int) else f"{low:g}")
        hi = "inf" if high is None else (str(high) if isinstance(high, int) else f"{high:g}")
        allowed += f" in {'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    if optional:
        allowed += " or null"
    if kind == "bool":
        ok = isinstance(value, bool)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        ok = False
    elif kind == "int":
        ok = isinstance(value, numbers.Integral) or (float(value).is_integer())
    else:
        ok = math.isfinite(float(value))
    if ok and kind != "bool":
        value = int(value) if kind == "int" else float(value)
        ok = not (
            (low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))
        )
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    return value


def check_primary(command: str, given: Mapping[str, Any], known: Sequence[str]) -> None:
    """The top-level keys of a command's primary config (``conf/<command>.yaml`` and the groups it places at the
    top level): an unknown or a missing key is a ConfigError naming it."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"{command}: unknown key(s) {unknown}", fix=f"known keys: {', '.join(known)}")
    missing = [k for k in known if k not in given]
    if missing:
        raise ConfigError(
            f"{command}: missing key(s) {missing}; compose conf/{command}.yaml (its defaults live there)"
        )


def merge_sections(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` over ``base``, one level deep: a section given as a mapping updates the section it replaces."""
    out = dict(base)
    for k, v in new.items():
        out[k] = {**out[k], **v} if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def model_config(name: str, group: str = "model", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a module as ``conf/<group>/<name>.yaml`` gives them, each override merged into its
    section. Same-group entries of the file's ``defaults`` list (e.g. ``_ssl``) are merged first, as Hydra does, and
    so is a settings group placed in a section (``/evaluation@evaluation: default``: plain values, no
    ``_target_``); object groups (an encoder or fusion preset) and ``_target_`` / ``_convert_`` / ``encoder`` are
    left out.
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
            elif isinstance(entry, Mapping) and len(entry) == 1:
                merged = merge_sections(merged, settings_entry(*next(iter(entry.items()))))
        return merge_sections(merged, raw)

    def settings_entry(where: str, option: Any) -> dict[str, Any]:
        other, _, key = where.lstrip("/").partition("@")
        path = Path(CONFIG_DIR) / other / f"{option}.yaml"
        if not where.startswith("/") or not key or "." in key or not path.is_file():
            return {}
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        return {} if "_target_" in values or "defaults" in values else {key: values}

    cfg = load(name)
    for key in ("_target_", "_convert_", "encoder"):
        cfg.pop(key, None)
    return merge_sections(cfg, overrides)
