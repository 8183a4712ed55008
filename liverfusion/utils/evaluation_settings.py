"""The evaluation settings groups: how held-out predictions are scored (``conf/evaluation/default.yaml``) and how a
trained classifier is run (``conf/inference/default.yaml``).

One source for every consumer: the classifier's test step (``model.evaluation``), ``evaluate`` and ``predict``
(composed at the top level), ``report`` and the library writers (:func:`defaults`, read from the same files when a
caller passes nothing). Code lists the key names and checks the values; the YAML states every default.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from liverfusion.errors import ConfigError

SCORING_KEYS = ("n_boot", "alpha", "seed", "threshold", "robustness", "aggregate")
INFERENCE_KEYS = ("device", "tta", "tta_axes", "calibration")
GROUPS = {"evaluation": SCORING_KEYS, "inference": INFERENCE_KEYS}
AGGREGATES = (None, "mean", "max")
TTA_MODES = ("none", "flip")
AXES = ("D", "H", "W")
CALIBRATION_MODES = ("auto", "none")


@cache
def _read(path: Path) -> tuple[tuple[str, Any], ...]:
    import yaml

    values = yaml.safe_load(path.read_text()) or {}
    group = path.parent.name
    if sorted(values) != sorted(GROUPS[group]):
        raise ConfigError(f"{path}: keys {sorted(values)}, expected {sorted(GROUPS[group])}")
    return tuple(values.items())


def source(group: str) -> Path:
    """The ``default.yaml`` of a group that Hydra would compose: the first on the config search path (``./conf``,
    ``LIVERFUSION_CONFIG_DIR``, the package)."""
    from liverfusion.utils.search_path import config_dirs

    if group not in GROUPS:
        raise ConfigError(f"unknown settings group {group!r}: choose one of {sorted(GROUPS)}")
    found = [d / group / "default.yaml" for d in config_dirs()]
    return next((p for p in found if p.is_file()), found[-1])


def defaults(group: str = "evaluation") -> dict[str, Any]:
    """``conf/<group>/default.yaml`` as plain values (``evaluation``: scoring, ``inference``: running)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _read(source(group))}


def scoring(
    values: Mapping[str, Any] | None = None, where: str = "evaluation", **given: Any
) -> dict[str, Any]:
    """The scoring settings: ``values`` (and keyword overrides; None = the YAML's) over the YAML defaults, each
    checked; a key the group does not know is a ConfigError."""
    from liverfusion.utils.config_sections import check_value

    merged = _merged("evaluation", values, given, where)
    out = {
        "n_boot": check_value(f"{where}.n_boot", merged["n_boot"], "int", low=1),
        "alpha": check_value(f"{where}.alpha", merged["alpha"], "float", 0, 1, low_open=True, high_open=True),
        "seed": check_value(f"{where}.seed", merged["seed"], "int"),
        "threshold": check_value(f"{where}.threshold", merged["threshold"], "float", 0, 1),
        "robustness": check_value(f"{where}.robustness", merged["robustness"], "bool"),
        "aggregate": merged["aggregate"],
    }
    if out["aggregate"] not in AGGREGATES:
        raise ConfigError(f"{where}.aggregate={out['aggregate']!r}: choose one of {list(AGGREGATES)}")
    return out


def inference(
    values: Mapping[str, Any] | None = None, where: str = "inference", **given: Any
) -> dict[str, Any]:
    """The inference settings (device, tta, tta_axes, calibration), as :func:`scoring`."""
    merged = _merged("inference", values, given, where)
    if merged["tta"] not in TTA_MODES:
        raise ConfigError(f"{where}.tta={merged['tta']!r}: choose one of {list(TTA_MODES)}")
    axes = merged["tta_axes"]
    if isinstance(axes, str) or not axes or any(a not in AXES for a in axes):
        raise ConfigError(
            f"{where}.tta_axes={axes!r}: a non-empty list of {list(AXES)}", fix="e.g. tta_axes=[H,W]"
        )
    if merged["calibration"] not in CALIBRATION_MODES:
        raise ConfigError(
            f"{where}.calibration={merged['calibration']!r}: choose one of {list(CALIBRATION_MODES)}"
        )
    return {**merged, "device": str(merged["device"]), "tta_axes": list(axes)}


def _merged(
    group: str, values: Mapping[str, Any] | None, given: Mapping[str, Any], where: str
) -> dict[str, Any]:
    keys = GROUPS[group]
    chosen = {**dict(values or {}), **{k: v for k, v in given.items() if v is not None}}
    unknown = sorted(set(chosen) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {list(keys)}")
    return {**defaults(group), **chosen}
