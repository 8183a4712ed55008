"""Preprocess every case once and keep the result on disk, so no epoch ever decodes NIfTI again.

Each case becomes ``<cache_dir>/<dataset>/<key>.npy`` (M, D, H, W) plus ``<key>.json`` (raw shapes, spacings,
intensity ranges: what ``data.check`` prints). The key hashes the content digests of the case's files, the modality
list and the preprocessing config, so a changed file or setting gives a new entry: the cache cannot go stale.
Old entries are harmless; ``clear_cache`` removes them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from liverfusion.data.case import Case
from liverfusion.data.io import file_digest, load_volume
from liverfusion.data.preprocess import PreprocessConfig, Preprocessor
from liverfusion.errors import DataError
from liverfusion.utils.atomic import atomic_path, atomic_write_text

CACHE_VERSION = 1


@dataclass
class CachedCase:
    """A preprocessed case: the (M, D, H, W) array lives in ``path``; ``present`` marks real modalities."""

    case_id: str
    patient_id: str
    label: int | None
    present: list[bool]
    path: Path
    meta: dict = field(default_factory=dict)

    def load(self, mmap: bool = False) -> np.ndarray:
        return np.load(self.path, mmap_mode="r" if mmap else None)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class PreprocessedCache:
    def __init__(self, cache_dir: str | Path, dataset: str, modalities: Sequence[str], cfg: PreprocessConfig):
        self.root = Path(cache_dir).expanduser() / _safe(dataset)
        self.modalities = list(modalities)
        self.cfg = cfg

    def key(self, case: Case) -> str:
        files = {
            m: ("missing" if m in case.missing else file_digest(case.images[m])) for m in self.modalities
        }
        payload = json.dumps({"v": CACHE_VERSION, "cfg": self.cfg.as_dict(), "files": files}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()

    def build(self, cases: Sequence[Case], workers: int = 0, progress: bool = True) -> list[CachedCase]:
        """Return cached entries for all cases, preprocessing (in ``workers`` processes) those not cached yet."""
        self.root.mkdir(parents=True, exist_ok=True)
        jobs = []
        for case in cases:
            key = self.key(case)
            jobs.append((case, self.root / f"{_safe(case.case_id)[:40]}-{key}.npy"))
        pending = [(c, p) for c, p in jobs if not (p.is_file() and p.with_suffix(".json").is_file())]
        if pending:
            args = [(c, p, self.modalities, self.cfg) for c, p in pending]
            bar = tqdm(
                total=len(pending), desc=f"preprocessing {self.root.name}", disable=not progress, unit="case"
            )
            if workers > 0 and len(pending) > 1:
                ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
                with ctx.Pool(workers, initializer=_worker_init) as pool:
                    for _ in pool.imap_unordered(_build_one, args, chunksize=4):
                        bar.update()
            else:
                for a in args:
                    _build_one(a)
                    bar.update()
            bar.close()
        out = []
        for case, path in jobs:
            meta = json.loads(path.with_suffix(".json").read_text())
            out.append(
                CachedCase(
                    case.case_id,
                    case.patient_id,
                    case.label,
                    [m not in case.missing for m in self.modalities],
                    path,
                    meta,
                )
            )
        return out


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _build_one(args: tuple[Case, Path, list[str], PreprocessConfig]) -> None:
    case, path, modalities, cfg = args
    pre = Preprocessor(cfg)
    dtype = np.float16 if cfg.cache_dtype == "float16" else np.float32
    arrays, raw = [], {}
    grid = None
    for m in modalities:
        if m in case.missing:
            arrays.append(np.zeros(cfg.shape, dtype=np.float32))
            continue
        try:
            vol = load_volume(case.images[m])
        except DataError as err:
            raise DataError(err.reason, path=err.path, case=case.case_id) from None
        if cfg.require_same_grid:
            this = (vol.array.shape, tuple(round(s, 4) for s in vol.spacing))
            if grid is not None and this != grid[1]:
                raise DataError(
                    f"shape/spacing {this} differs from {grid[0]!r} {grid[1]} (require_same_grid)",
                    path=vol.path,
                    case=case.case_id,
                )
            grid = grid or (m, this)
        raw[m] = {
            "shape": list(vol.array.shape),
            "spacing": [round(s, 4) for s in vol.spacing],
            "min": float(vol.array.min()),
            "max": float(vol.array.max()),
        }
        try:
            arrays.append(pre(vol))
        except ValueError as err:  # e.g. normalisation that the volume's intensities do not allow
            raise DataError(str(err), path=vol.path, case=case.case_id) from None
    stack = np.stack(arrays).astype(dtype)
    with atomic_path(path) as tmp:
        np.save(tmp, stack)
    atomic_write_text(
        path.with_suffix(".json"),
        json.dumps({"case": case.case_id, "raw": raw, "missing": sorted(case.missing)}),
    )


def clear_cache(cache_dir: str | Path, dataset: str | None = None) -> int:
    """Delete cached entries (of one data set, or all); return how many files went."""
    root = Path(cache_dir).expanduser()
    target = root / _safe(dataset) if dataset else root
    if not target.exists():
        return 0
    n = sum(1 for p in target.rglob("*") if p.is_file())
    shutil.rmtree(target)
    return n
