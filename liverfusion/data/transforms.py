"""Augmentation pipelines declared in YAML as lists of MONAI (or torchio) transforms.

Each list item is a Hydra ``_target_`` config; :func:`build_transform` composes the instantiated items. Random
transforms draw from their own generators, so :func:`reseed` re-seeds them from torch's generator per item: views
are then reproducible under ``seed_everything(workers=True)`` and differ between workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.transforms import Compose, Randomizable


def build_transform(items: Sequence[Any] | Callable | None) -> Callable | None:
    """A MONAI Compose from instantiated transforms (Hydra already instantiated nested ``_target_`` items)."""
    if items is None:
        return None
    if callable(items) and not isinstance(items, list | tuple):
        return items
    items = [t for t in items if t is not None]
    if not items:
        return None
    for t in items:
        if not callable(t):
            raise TypeError(f"augmentation item {t!r} is not a transform (did the YAML miss a _target_?)")
    return Compose(items)


def reseed(transform: Callable | None) -> None:
    """Seed a MONAI Randomizable pipeline from torch's generator (seeded per worker by Lightning)."""
    if isinstance(transform, Randomizable):
        transform.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,)).item()))
