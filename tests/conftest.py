"""Shared fixtures. Real-data tests find ../shared/data through LIVERFUSION_SHARED_DATA: unset -> skip, set -> must run."""

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


TINY_PHANTOM = {"n_cases": 48, "seed": 11, "shape": [16, 32, 32]}


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


def tiny_phantom_overrides(root: Path, cache: Path) -> list[str]:
    """Hydra overrides that point data=phantom at the session's tiny phantom."""
    return [
        f"paths.data_dir={root.parent}",
        f"paths.cache_dir={cache}",
        f"data.layout.n_cases={TINY_PHANTOM['n_cases']}",
        f"data.layout.seed={TINY_PHANTOM['seed']}",
        f"data.layout.shape=[{','.join(str(s) for s in TINY_PHANTOM['shape'])}]",
        "data.preprocess.shape=[16,32,32]",
        "data.num_workers=0",
        "data.prep_workers=0",
        "data.batch_size=4",
        "extras.print_config=false",
    ]
