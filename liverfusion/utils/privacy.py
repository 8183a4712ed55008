"""What may leave the machine through W&B: with ``privacy`` on (the default for data sets marked clinical), case and
patient ids are replaced by salted hashes and no image is logged."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def hash_id(value: str, salt: str = "") -> str:
    """A stable pseudonym for an id: the first 12 hex digits of blake2b(salt + id)."""
    return hashlib.blake2b(f"{salt}{value}".encode(), digest_size=6).hexdigest()


def public_ids(ids: Iterable[str], privacy: bool, salt: str = "") -> list[str]:
    """Ids as they may be shown in dashboards: hashed under privacy, unchanged otherwise."""
    return [hash_id(str(i), salt) if privacy else str(i) for i in ids]
