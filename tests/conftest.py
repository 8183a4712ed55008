"""Shared fixtures. Real-data tests find ../shared/data through LIVERFUSION_SHARED_DATA: unset -> skip, set -> must run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    value = os.environ.get("LIVERFUSION_SHARED_DATA")
    if not value:
        pytest.skip("LIVERFUSION_SHARED_DATA is not set (real-data tests run in .ci/run)")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        pytest.fail(f"LIVERFUSION_SHARED_DATA={value} is set but {path} does not exist")
    return path


def shared_subdir(root: Path, name: str) -> Path:
    sub = root / name
    if not sub.is_dir():
        pytest.fail(f"LIVERFUSION_SHARED_DATA is set but {sub} is missing")
    return sub
