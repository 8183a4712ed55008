"""The settings of a prepare run: reading the config, checking what cannot work before anything is read or
written, and the fingerprint that ties a data set folder to the settings that made it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError, MissingMandatoryValue

from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.plain import to_plain

KINDS = ("dicom", "nifti", "lldmmri")
ROI_MODES = ("none", "mask", "centre")
RUNTIME_KEYS = ("input", "out", "dry_run", "strict", "overwrite", "progress", "limit", "threads", "hydra")
"""Settings that do not change what a case contains (left out of the data set's settings fingerprint)."""
EXIT_FAILED_CASES = 1
EXIT_PRIVACY = 3
_USAGE = "python -m liverfusion.prepare input=EXPORT out=DATASET kind=..."


def setting(cfg: Mapping[str, Any], dotted: str) -> Any:
    """``cfg[a][b]`` for ``dotted="a.b"`` (None stays None). Every key is stated in ``conf/prepare.yaml`` and
    :func:`check_keys` has refused a config without it, so a missing part is a ConfigError, never a default."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(
                f"prepare: missing setting {dotted!r}; compose conf/prepare.yaml (its defaults live there)"
            )
        node = node[part]
    return node


def check_keys(cfg: Mapping[str, Any]) -> None:
    """Every section holds exactly the keys the shipped ``conf/prepare.yaml`` states (a preset or an own config
    that adds a misspelt key, or drops one, is refused naming it); the rule set (``rules``) has its own schema and ``preset`` only selects a recipe."""
    _compare(cfg, _reference(), "")


def _reference() -> dict[str, Any]:
    import yaml

    text = (Path(__file__).resolve().parents[1] / "conf" / "prepare.yaml").read_text()
    ref = yaml.safe_load(text)
    for key in ("defaults", "hydra"):
        ref.pop(key, None)
    return ref


def _compare(given: Mapping[str, Any], ref: Mapping[str, Any], where: str) -> None:
    ignored = {"rules", "preset"} if not where else set()  # groups with their own schema (preset=none: empty)
    unknown = sorted(set(given) - set(ref) - ignored)
    missing = sorted(set(ref) - set(given))
    name = where.rstrip(".") or "prepare"
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; known keys: {sorted(ref)}")
    if missing:
        raise ConfigError(
            f"{name}: missing key(s) {missing}; compose conf/prepare.yaml (its defaults live there)"
        )
    for key, value in ref.items():
        if isinstance(value, dict):
            if not isinstance(given[key], Mapping):
                raise ConfigError(
                    f"{where}{key} must be a mapping with keys {sorted(value)}, got {given[key]!r}"
                )
            _compare(given[key], value, f"{where}{key}.")


def plain_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The run's config as a plain dict without Hydra's own node; a missing mandatory value or an unresolvable
    interpolation is a ConfigError naming it."""
    try:
        data = to_plain(cfg, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key}=... is required ({_USAGE})") from None
    except (InterpolationResolutionError, InterpolationKeyError) as exc:
        raise ConfigError(f"config value cannot be resolved: {exc}") from None
    data = dict(data)
    data.pop("hydra", None)
    return data


def validate(cfg: dict[str, Any]) -> tuple[Path, Path, Path]:
    """Paths and choices that cannot work fail here, before anything is read or written."""
    check_keys(cfg)
    for key in ("input", "out"):
        if not cfg.get(key) or str(cfg[key]) == "???":
            raise ConfigError(f"{key}=... is required ({_USAGE})")
    _check_choices(cfg)
    inp = Path(str(cfg["input"])).expanduser().resolve()
    out = Path(str(cfg["out"])).expanduser().resolve()
    if not inp.is_dir():
        raise DataError("input folder does not exist", path=inp)
    if _inside(out, inp):
        raise ConfigError(f"out={out} lies inside the input tree {inp}: the input is never written to")
    if _inside(inp, out):
        raise ConfigError(f"input={inp} lies inside out={out}: choose an output folder outside the export")
    key_file = setting(cfg, "privacy.key_file")
    key_path = (
        Path(str(key_file)).expanduser().resolve()
        if key_file
        else out.parent / f"{out.name}.private_ids.json"
    )
    if _inside(key_path, inp) or _inside(key_path, out):
        raise ConfigError(
            f"privacy.key_file={key_path} must lie outside both the input tree and the output folder"
        )
    _check_creatable(out, "out")
    _check_creatable(key_path.parent, "privacy.key_file")
    return inp, out, key_path


def _check_choices(cfg: dict[str, Any]) -> None:
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, not {kind!r}")
    mode = setting(cfg, "roi.mode")
    if mode not in ROI_MODES:
        raise ConfigError(f"roi.mode must be one of {ROI_MODES}, not {mode!r}")
    if kind == "lldmmri" and mode != "none":
        raise ConfigError("kind=lldmmri crops on the Annotation.json boxes: leave roi.mode=none")
    resample = setting(cfg, "geometry.resample")
    if resample not in ("reference", "spacing", "none"):
        raise ConfigError(f"geometry.resample must be reference, spacing or none, not {resample!r}")
    if resample == "spacing" and not setting(cfg, "geometry.spacing"):
        raise ConfigError("geometry.resample=spacing needs geometry.spacing=[sD,sH,sW] in mm")


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_creatable(folder: Path, key: str) -> None:
    """A folder that cannot be made or written fails before anything is read (not as an OSError half-way)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    fix = "choose a folder you may write to"
    if not probe.is_dir():
        raise ConfigError(f"{key}={folder}: cannot be created: {probe} is a file, not a folder", fix=fix)
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == folder else f"cannot be created: {probe} is not writable"
        raise ConfigError(f"{key}={folder}: {what}", fix=fix)


def make_folder(folder: Path, key: str = "out") -> None:
    """``mkdir -p`` whose failure is a ConfigError naming the setting."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{key}={folder}: the folder cannot be created ({exc.strerror or exc})",
            fix="choose a folder you may write to",
        ) from None


def settings_fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what a case contains: a data set folder is only added to with the same ones."""
    data = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    priv = dict(data.get("privacy") or {})
    priv.pop("salt", None)
    priv.pop("key_file", None)
    data["privacy"] = priv
    out = dict(data.get("output") or {})
    out.pop("qa", None)
    data["output"] = out
    return data


def sanitized_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as recorded in prepare_log.json: JSON-safe, the salt replaced by ``<set>``."""
    data = json.loads(json.dumps(cfg, default=str))
    if setting(data, "privacy.salt"):
        data["privacy"]["salt"] = "<set>"
    return data
