"""What may leave the machine through W&B: with ``privacy`` on (the default for data sets marked clinical), case and
patient ids are replaced by salted hashes and no image is logged."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from liverfusion.errors import ConfigError, LiverfusionError

log = logging.getLogger(__name__)

PUBLIC_DEFAULT_SALT = "liverfusion"  # conf/train.yaml's fallback when LIVERFUSION_PRIVACY_SALT is unset


def hash_id(value: str, salt: str = "") -> str:
    """A stable pseudonym for an id: the first 12 hex digits of blake2b(salt + id)."""
    return hashlib.blake2b(f"{salt}{value}".encode(), digest_size=6).hexdigest()


def public_ids(ids: Iterable[str], privacy: bool, salt: str = "") -> list[str]:
    """Ids as they may be shown in dashboards: hashed under privacy, unchanged otherwise."""
    return [hash_id(str(i), salt) if privacy else str(i) for i in ids]


SECRET_KEYS = ("privacy_salt", "salt")


def without_secrets(params: Any) -> Any:
    """A copy of a (nested) config container without the salt under any of ``SECRET_KEYS``: with the salt anyone
    could re-identify hashed ids by hashing candidate ids."""
    if isinstance(params, Mapping):
        return {k: without_secrets(v) for k, v in params.items() if k not in SECRET_KEYS}
    if isinstance(params, list | tuple):
        return [without_secrets(v) for v in params]
    return params


def ids_in_text(texts: Iterable[str], ids: Iterable[str]) -> list[str]:
    """The ids that occur in any of ``texts`` as a whole token (not next to a letter or digit), sorted."""
    joined = "\n".join(str(t) for t in texts)
    found = set()
    for i in {str(i) for i in ids if str(i)}:
        if i in joined and re.search(rf"(?<![A-Za-z0-9]){re.escape(i)}(?![A-Za-z0-9])", joined):
            found.add(i)
    return sorted(found)


def images_allowed(log_images: bool | str, clinical: bool) -> bool:
    """``auto`` shows images unless the data set is marked clinical (patient images must not leave the site)."""
    if isinstance(log_images, str):
        if log_images != "auto":
            raise ConfigError(f"log_images must be true, false or 'auto', got {log_images!r}")
        return not clinical
    return bool(log_images)


def public_names(cfg: Mapping[str, Any]) -> list[str]:
    """What names a run outside the machine: run name, task, tags and the loggers' name/group/tags/job type."""
    texts = [str(cfg.get("run_name", "")), str(cfg.get("task_name", "")), *map(str, cfg.get("tags") or [])]
    for sub in (cfg.get("logger") or {}).values():
        if isinstance(sub, Mapping):
            texts += [str(sub.get(k) or "") for k in ("name", "group", "job_type", "notes")]
            texts += [str(t) for t in (sub.get("tags") or [])]
    return texts


def check_public_names(cfg: Mapping[str, Any], datamodule: Any) -> None:
    """Refuse a run whose W&B name, group or tags contain a case or patient id of the data set."""
    layout = getattr(datamodule, "layout", None)
    if layout is None:
        return
    try:
        cases = layout.scan()
    except (LiverfusionError, OSError) as err:  # not there yet (phantom generated on first use)
        log.debug("privacy: run names not checked against case ids (%s)", err)
        return
    found = ids_in_text(public_names(cfg), [c.case_id for c in cases] + [c.patient_id for c in cases])
    if found:
        raise ConfigError(
            f"privacy is on but the run name / group / tags contain {len(found)} case or patient id(s) "
            f"({', '.join(found[:3])}): they would reach W&B; rename the run (run_name, tags)"
        )


def guard_run(cfg: Mapping[str, Any], datamodule: Any, callbacks: Sequence[Any], to_wandb: bool) -> None:
    """A run with ``privacy`` on: names that reach W&B carry no case id, the shipped salt is warned about, and no
    callback logs images, whatever it was told."""
    if to_wandb:
        check_public_names(cfg, datamodule)
        if str(cfg.get("privacy_salt")) == PUBLIC_DEFAULT_SALT:
            log.warning(
                "privacy is on with the salt shipped in conf/train.yaml: anyone can re-hash candidate ids; "
                "set LIVERFUSION_PRIVACY_SALT to a secret (the same one for every run of a study)"
            )
    for cb in callbacks:
        if hasattr(cb, "log_images"):
            cb.log_images = False
