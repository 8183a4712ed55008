"""What may leave the machine through W&B: with ``privacy`` on (the default for data sets marked clinical), case and
patient ids are replaced by salted hashes and no image is logged."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any


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
