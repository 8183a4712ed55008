"""Shared fixtures. Real-data tests find ../shared/data through LIVERFUSION_SHARED_DATA: unset -> skip, set -> must run.

Plain helpers (no fixture) live in tests/helpers.py; test files import them from there and never import this file
(pytest loads it as ``conftest``: imported again as ``tests.conftest`` it would run twice)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
# runs that leave paths.cache_dir at its per-user default must not fill the user's ~/.cache: one folder per session
if "LIVERFUSION_CACHE_DIR" not in os.environ:
    os.environ["LIVERFUSION_CACHE_DIR"] = tempfile.mkdtemp(prefix="liverfusion-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LIVERFUSION_CACHE_DIR"], ignore_errors=True)

# after the environment above: the helpers import the package
from tests.helpers import TINY_PHANTOM  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> Path:
    value = os.environ.get("LIVERFUSION_SHARED_DATA")
    if not value:
        pytest.skip("LIVERFUSION_SHARED_DATA is not set (real-data tests run in .ci/run)")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        pytest.fail(f"LIVERFUSION_SHARED_DATA={value} is set but {path} does not exist")
    return path


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A small phantom generated once per test session (same request -> reused by PhantomLayout)."""
    from liverfusion.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("data") / "phantom"
    generate_phantom(
        root,
        "default",
        seed=TINY_PHANTOM["seed"],
        n_cases=TINY_PHANTOM["n_cases"],
        workers=2,
        shape=TINY_PHANTOM["shape"],
        progress=False,
    )
    return root
