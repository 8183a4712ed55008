"""Preprocess every case once and keep the result on disk, so no epoch ever decodes NIfTI again.

Each case becomes ``<cache_dir>/<dataset>/<key>.npy`` (M, D, H, W) plus ``<key>.json`` (raw shapes, spacings,
intensity ranges: what ``data.check`` prints). The key hashes the content digests of the case's files, the modality
list and the preprocessing config, so a changed file or setting gives a new entry: the cache cannot go stale.
Old entries are harmless; ``clear_cache`` removes them.

Several processes may fill one cache folder at once (multirun jobs, DDP ranks, nodes of a cluster): each entry is
written under its own lock (``<entry>.lock``, gone once written) to a temporary file that is renamed into place, so a reader
never sees half an entry and two writers never build the same one twice. A process first builds the entries no one
else is building, then waits for the rest. Every entry is checked on read: its ``.npy`` header must hold the
shape and dtype the config asks for and the file the size that header implies, matching what the ``.json``
records; a damaged or truncated entry is rebuilt (under the lock), not used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from liverfusion.data.case import Case
from liverfusion.data.io import file_digest, geometry, load_volume
from liverfusion.data.preprocess import PreprocessConfig, Preprocessor
from liverfusion.errors import DataError
from liverfusion.utils.atomic import atomic_write_bytes, atomic_write_text
from liverfusion.utils.locks import FileLock

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIR_ENV = "LIVERFUSION_CACHE_DIR"


def default_cache_dir() -> Path:
    """The per-user cache folder (what ``paths.cache_dir`` resolves to in ``conf/paths/default.yaml``):
    ``$LIVERFUSION_CACHE_DIR``, else ``$XDG_CACHE_HOME/liverfusion``, else ``~/.cache/liverfusion``. Not the launch
    folder, so one data set started from two folders is preprocessed once (entries are keyed by content)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or f"{os.environ.get('HOME', '.')}/.cache"
    return Path(base) / "liverfusion"


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

    def expected(self) -> tuple[tuple[int, ...], str]:
        """The (M, D, H, W) shape and dtype every entry of this cache has."""
        return (len(self.modalities), *self.cfg.shape), np.dtype(_dtype(self.cfg)).str

    def build(self, cases: Sequence[Case], workers: int = 0, progress: bool = True) -> list[CachedCase]:
        """Return cached entries for all cases, preprocessing (in ``workers`` processes) those not cached yet.

        Safe when other processes build the same folder at once: see the module docstring.
        """
        jobs = []
        for case in cases:
            key = self.key(case)
            jobs.append((case, self.root / f"{_safe(case.case_id)[:40]}-{key}.npy"))
        shape, dtype = self.expected()
        pending = [(c, p) for c, p in jobs if entry_problem(p, shape, dtype) is not None]
        if pending:
            self.root.mkdir(parents=True, exist_ok=True)
            bar = tqdm(
                total=len(pending), desc=f"preprocessing {self.root.name}", disable=not progress, unit="case"
            )
            # first pass: the entries no other process is building; second pass: wait for the others' entries
            for blocking in (False, True):
                args = [(c, p, self.modalities, self.cfg, blocking) for c, p in pending]
                done = _run(args, workers, bar)
                pending = [j for j, ok in zip(pending, done) if not ok]
                if not pending:
                    break
            bar.close()
        out = []
        for case, path in jobs:
            problem = entry_problem(path, shape, dtype)
            if problem is not None:  # another process removed or damaged it since: refuse, never read it
                raise DataError(
                    f"cache entry is unusable ({problem})",
                    path=path,
                    case=case.case_id,
                    fix="run again (the entry is rebuilt) or clear the cache",
                )
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


def _dtype(cfg: PreprocessConfig) -> type:
    return np.float16 if cfg.cache_dtype == "float16" else np.float32


def _run(args: list[tuple], workers: int, bar: tqdm) -> list[bool]:
    """``_build_locked`` over ``args`` (in a pool when ``workers``), in order; the bar counts entries done."""
    done = []
    if workers > 0 and len(args) > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=_worker_init) as pool:
            for ok in pool.imap(_build_locked, args, chunksize=4):
                done.append(ok)
                bar.update(int(ok))
    else:
        for a in args:
            done.append(_build_locked(a))
            bar.update(int(done[-1]))
    return done


def entry_problem(path: Path, shape: Sequence[int], dtype: str) -> str | None:
    """What is wrong with the cache entry ``path`` (+ its ``.json``), or None when it is complete and consistent.

    Cheap (one header read and two stats): the ``.npy`` header must say ``shape`` and ``dtype``, the file must
    have the size that header implies, and the ``.json`` must record the same shape, dtype and size.
    """
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        return "no .npy file"
    if not sidecar.is_file():
        return "no .json sidecar"
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(fh)
            else:
                return f"unsupported .npy format version {version}"
            offset = fh.tell()
        size = os.path.getsize(path)
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad magic/header, bad JSON
        return f"unreadable: {err}"
    got_shape, fortran, got_dtype = header
    if tuple(got_shape) != tuple(shape) or got_dtype.str != dtype or fortran:
        return f".npy holds {got_dtype.str} {list(got_shape)}, expected {dtype} {list(shape)}"
    want = offset + int(np.prod(shape)) * got_dtype.itemsize
    if size != want:
        return f".npy has {size} bytes, its header implies {want} (truncated?)"
    array = meta.get("array") if isinstance(meta, dict) else None
    if array is None:
        return ".json records no array shape/dtype/size (written before content checks)"
    if array != {"shape": list(shape), "dtype": dtype, "bytes": size}:
        return f".json records {array}, the .npy is {dtype} {list(shape)} of {size} bytes"
    return None


def _build_locked(args: tuple[Case, Path, list[str], PreprocessConfig, bool]) -> bool:
    """Build one entry under its lock unless it is (now) valid; False when ``blocking`` is off and it is taken."""
    case, path, modalities, cfg, blocking = args
    shape, dtype = (len(modalities), *cfg.shape), np.dtype(_dtype(cfg)).str
    lock = FileLock(path.with_suffix(".lock"), what=f"cache entry {path}")
    if not lock.acquire(blocking=blocking):
        return False
    try:
        problem = entry_problem(path, shape, dtype)
        if problem is None:  # another process built it meanwhile
            return True
        if path.exists() or path.with_suffix(".json").exists():
            log.warning("cache entry %s is damaged (%s): rebuilding it", path, problem)
        _build_one((case, path, modalities, cfg))
    finally:
        lock.release()
    return True


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _build_one(args: tuple[Case, Path, list[str], PreprocessConfig]) -> None:
    case, path, modalities, cfg = args
    pre = Preprocessor(cfg)
    dtype = _dtype(cfg)
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
            **geometry(vol),  # stored axis codes, field of view: data.check compares the modalities of a case
        }
        try:
            arrays.append(pre(vol))
        except ValueError as err:  # e.g. normalisation that the volume's intensities do not allow
            raise DataError(str(err), path=vol.path, case=case.case_id) from None
    stack = np.stack(arrays).astype(dtype)
    buffer = io.BytesIO()
    np.save(buffer, stack)
    # .npy first, then the .json that vouches for it: a reader accepts the pair only once both agree
    atomic_write_bytes(path, buffer.getbuffer())
    array = {"shape": list(stack.shape), "dtype": stack.dtype.str, "bytes": buffer.getbuffer().nbytes}
    atomic_write_text(
        path.with_suffix(".json"),
        json.dumps({"case": case.case_id, "raw": raw, "missing": sorted(case.missing), "array": array}),
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
