"""A run folder is self-contained data: its saved config names its own files relative to itself, holds no secret,
and is read back as plain YAML (never resolved as config).

``config_resolved.yaml`` stores every path that points into the run folder relative to it, and ``run.json`` lists
those keys, so a copied or moved run resumes, evaluates and reports inside the copy. Run folders written before
``run.json`` existed stored absolute paths: their recorded ``paths.output_dir`` is rebased onto the folder they are
read from. The privacy salt is masked; ``run.json`` keeps a slow salted fingerprint of it, so a resume with another
salt is refused by name without the salt ever being stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from liverfusion.errors import CheckpointError, ConfigError
from liverfusion.utils.atomic import atomic_write_text
from liverfusion.utils.privacy import PUBLIC_DEFAULT_SALT, SECRET_KEYS

RUN_FILE = "run.json"
RUN_FORMAT = "liverfusion-run/1"
CONFIG_FILE = "config_resolved.yaml"
MASK = "***"
SALT_ENV = "LIVERFUSION_PRIVACY_SALT"
_KDF_ROUNDS = 200_000  # slow enough that a fingerprint does not help guessing a salt


def salt_fingerprint(salt: str, nonce: str | None = None) -> dict[str, Any]:
    """A salted PBKDF2 fingerprint of ``salt``: says whether two salts are equal, not what they are."""
    nonce = nonce or secrets.token_hex(8)
    digest = hashlib.pbkdf2_hmac("sha256", salt.encode(), bytes.fromhex(nonce), _KDF_ROUNDS).hex()[:32]
    return {"kdf": "pbkdf2-sha256", "rounds": _KDF_ROUNDS, "nonce": nonce, "digest": digest}


def salt_matches(salt: str, fingerprint: Mapping[str, Any]) -> bool:
    want = salt_fingerprint(salt, str(fingerprint["nonce"]))["digest"]
    return hmac.compare_digest(want, str(fingerprint.get("digest", "")))


def mask_secrets(tree: Any) -> Any:
    """A copy of a plain config tree with every value under a ``SECRET_KEYS`` key replaced by ``***``."""
    if isinstance(tree, Mapping):
        return {k: (MASK if k in SECRET_KEYS and v is not None else mask_secrets(v)) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [mask_secrets(v) for v in tree]
    return tree


def _secret_values(tree: Any) -> set[str]:
    if isinstance(tree, Mapping):
        out: set[str] = set()
        for k, v in tree.items():
            if k in SECRET_KEYS and isinstance(v, str) and v != MASK:
                out.add(v)
            else:
                out |= _secret_values(v)
        return out
    if isinstance(tree, list):
        return set().union(*(_secret_values(v) for v in tree)) if tree else set()
    return set()


def _walk_paths(tree: Any, prefix: str = ""):
    """(dotted key, value) of every string leaf."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _walk_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _walk_paths(v, f"{prefix}.{i}")
    elif isinstance(tree, str):
        yield prefix, tree


def _set(tree: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _relative_to(value: str, root: Path) -> str | None:
    """``value`` relative to ``root`` when it is ``root`` or lies under it (as a path string), else None."""
    try:
        rel = Path(value).relative_to(root)
    except ValueError:
        return None
    return rel.as_posix() if str(rel) != "." else "."


def save_run_config(cfg: DictConfig | Mapping[str, Any], output_dir: str | Path) -> Path:
    """Write ``config_resolved.yaml`` (resolved, secrets masked, own paths relative) and ``run.json``."""
    out = Path(output_dir).resolve()
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    tree = json.loads(json.dumps(tree, default=str))  # plain, and a deep copy
    salt = tree.get("privacy_salt")
    relative: dict[str, str] = {}
    for key, value in list(_walk_paths(tree)):
        if not value.startswith(("/", "~")) and not Path(value).is_absolute():
            continue
        expanded = str(Path(value).expanduser())  # the folder as given and as resolved (symlinked /tmp, say)
        rel = _relative_to(expanded, Path(output_dir)) or _relative_to(expanded, out)
        if rel is not None:
            relative[key] = rel
            _set(tree, key, rel)
    masked = mask_secrets(tree)
    run = {"format": RUN_FORMAT, "relative_paths": sorted(relative)}
    if isinstance(salt, str):
        run["salt_fingerprint"] = salt_fingerprint(salt)
        run["salt_is_public_default"] = salt == PUBLIC_DEFAULT_SALT
    atomic_write_text(out / RUN_FILE, json.dumps(run, indent=1))
    return atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(masked, sort_keys=False))


def _refuse_interpolations(tree: Any, source: Path) -> None:
    for key, value in _walk_paths(tree):
        if "${" in value:
            raise CheckpointError(
                f"{source}: {key} holds an interpolation ({value[:60]!r}): a saved run config is data, never "
                "config to resolve; refused",
                fix="use the run folder that liverfusion wrote, unedited",
            )


def read_run_json(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path}: not a liverfusion run file (expected format {RUN_FORMAT})")
    return data


def load_run_config(run_dir: str | Path, salt: str | None = None) -> DictConfig:
    """The saved config of ``run_dir`` with its own paths rebased onto ``run_dir`` and the salt filled in.

    ``salt`` defaults to ``$LIVERFUSION_PRIVACY_SALT`` (else the public default); it must match the fingerprint the
    run recorded, so a resumed run hashes ids exactly as before.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise CheckpointError(f"{saved}: missing: is {run_dir} a liverfusion run folder?")
    try:
        tree = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{saved}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{saved}: not a config mapping")
    _refuse_interpolations(tree, saved)
    run = read_run_json(run_dir)
    if run is not None:
        for key in run.get("relative_paths", []):
            try:
                rel = _get(tree, key)
            except (KeyError, IndexError, ValueError, TypeError):
                continue
            _set(tree, key, str(run_dir if rel == "." else run_dir / rel))
    else:  # written before run.json: absolute paths under the recorded output_dir
        old = (tree.get("paths") or {}).get("output_dir")
        if isinstance(old, str) and old:
            for key, value in list(_walk_paths(tree)):
                rel = _relative_to(value, Path(old))
                if rel is not None:
                    _set(tree, key, str(run_dir if rel == "." else run_dir / rel))
    tree.setdefault("paths", {})["output_dir"] = str(run_dir)
    _restore_salt(tree, run, saved, salt)
    return OmegaConf.create(tree)


def _get(tree: Any, dotted: str) -> Any:
    node = tree
    for p in dotted.split("."):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node


def _restore_salt(tree: dict, run: Mapping[str, Any] | None, saved: Path, salt: str | None) -> None:
    """Put the salt of this environment where the saved config masked it; refuse another salt than the run's."""
    salt = salt if salt is not None else os.environ.get(SALT_ENV, PUBLIC_DEFAULT_SALT)
    recorded = (run or {}).get("salt_fingerprint")
    legacy = _secret_values(tree)  # run folders of before masking hold the salt in clear
    if recorded is not None and not salt_matches(salt, recorded):
        raise ConfigError(
            f"{SALT_ENV}: differs from the salt run {saved.parent} was started with: its hashed ids would not match",
            fix=f"set {SALT_ENV} to the run's salt",
        )
    if recorded is None and legacy and salt not in legacy:
        raise ConfigError(
            f"{SALT_ENV}: differs from the salt recorded in {saved}: its hashed ids would not match",
            fix=f"set {SALT_ENV} to the run's salt",
        )

    def fill(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in SECRET_KEYS and v is not None:
                    node[k] = salt
                else:
                    fill(v)
        elif isinstance(node, list):
            for v in node:
                fill(v)

    fill(tree)


def file_in_run(run_dir: str | Path, recorded: str | Path | None, subdir: str = "checkpoints") -> Path | None:
    """A file a run recorded (absolute, as old runs did, or relative to the run) found inside ``run_dir`` only.

    An absolute path outside the run (the run was copied or moved) is looked up by name under ``subdir``: a copy never
    reads the original's files.
    """
    if not recorded:
        return None
    run_dir = Path(run_dir).resolve()
    p = Path(recorded)
    candidates = [run_dir / p] if not p.is_absolute() else []
    if p.is_absolute() and _relative_to(str(p.resolve()), run_dir) is not None:
        candidates.append(p)
    candidates.append(run_dir / subdir / p.name)
    for c in candidates:
        if c.is_file():
            return c
    return None


def relative_in_run(run_dir: str | Path, path: str | Path | None) -> str | None:
    """``path`` as recorded in a run's own files: relative to the run when inside it."""
    if not path:
        return None
    rel = _relative_to(str(Path(path).resolve()), Path(run_dir).resolve())
    return rel if rel is not None else str(path)
