"""Writing a phantom data set: cases rendered in worker processes, the whole set built in a temporary sibling
folder and renamed into place, one lock per output folder, and ``phantom.json`` as the marker of a complete set.

Any worker count writes the same bytes: each case draws from its own seed sequence (:mod:`.plan`), and nibabel's
gzip writer uses mtime 0 and no file name.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from liverfusion import __version__
from liverfusion.data.io import save_volume
from liverfusion.data.phantom.plan import CasePlan, plan_cases
from liverfusion.data.phantom.render import render_case
from liverfusion.data.phantom.spec import (
    class_names,
    load_phantom_spec,
    spacing_mm,
    spec_hash,
    validate_spec,
)
from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.atomic import atomic_write_text
from liverfusion.utils.locks import FileLock

log = logging.getLogger(__name__)

FORMAT = "liverfusion-phantom"
FORMAT_VERSION = 1
LAYOUT = {
    "images": "images/<case>/<Phase>.nii.gz (int16)",
    "masks": "masks/<case>/<Phase>.nii.gz (uint8, aligned with that phase; not for training)",
    "labels": "labels.txt: '<case> <label>', -1 = unlabelled",
    "truth": "cases.csv: per-case ground truth and nuisance draws",
}


def generate_phantom(
    out_dir: str | Path,
    cfg: Mapping | str | Path = "default",
    seed: int = 7,
    n_cases: int = 450,
    n_unlabelled: int = 0,
    workers: int = 1,
    shape: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a phantom data set to ``out_dir`` and return its summary (the content of phantom.json).

    ``cfg`` is a spec (dict/DictConfig) or a spec name/path. ``shape`` (D, H, W) overrides the spec's.
    Existing ``out_dir``: empty -> used; a phantom with the same request (spec hash, seed, counts, shape, version)
    -> skipped, its summary returned, unless ``overwrite`` (a phantom.json whose files are not all there is a
    DataError, never used); another phantom -> ConfigError unless ``overwrite``; anything else -> refused
    (DataError), never deleted. The set is built in a sibling temporary folder and renamed into place, so
    ``out_dir`` never holds a half-written phantom.

    Concurrency: the whole call holds a lock (``.<name>.lock`` next to ``out_dir``), so processes asking for the
    same phantom at once (multirun jobs, DDP ranks, benchmark workers) write it once: the others wait, then find it
    and return its summary. Temporary folders of a killed writer are removed by the next one. A read-only parent
    folder (no lock possible) still serves a complete matching phantom.
    """
    spec = load_phantom_spec(cfg) if isinstance(cfg, str | Path) else validate_spec(cfg)
    if shape is not None:
        spec["geometry"]["shape"] = [int(s) for s in shape]
        spec = validate_spec(spec)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir).expanduser().resolve()
    request = _request(spec, seed, n_cases, n_unlabelled)
    lock = FileLock(out.parent / f".{out.name}.lock", what=f"phantom {out} (another process is writing it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError:
        previous = _existing(out, request, overwrite)
        if previous is not None:  # read-only location: reading needs no lock, the folder is complete
            return previous
        raise
    try:
        previous = _existing(out, request, overwrite)
        if previous is not None:
            return previous
        _remove_leftovers(out)
        return _write_phantom(out, spec, request, seed, n_cases, n_unlabelled, workers, progress)
    finally:
        lock.release()


def summary_text(summary: Mapping) -> str:
    """One-paragraph human summary of a phantom.json."""
    counts = ", ".join(f"{k} {v}" for k, v in summary["class_counts"].items())
    return (
        f"phantom {summary['spec_name']} ({summary['spec_hash']}), seed {summary['seed']}: {summary['n_cases']} "
        f"labelled + {summary['n_unlabelled']} unlabelled cases of {summary['n_patients']} patients "
        f"({summary['two_lesion_patients']} with two lesions), shape {'x'.join(map(str, summary['shape']))}; "
        f"classes: {counts}"
    )


def read_marker(folder: Path) -> dict | None:
    """The content of ``folder/phantom.json`` when it is a liverfusion phantom's marker, else None."""
    marker = folder / "phantom.json"
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


def pool_map(
    func: Callable,
    items: list,
    workers: int,
    progress: bool,
    desc: str,
    initializer: Callable | None = None,
    initargs: tuple = (),
) -> list:
    """Map in worker processes (order of results = order of items); a tqdm bar on stderr. ``initializer`` runs
    once per worker (in this process when ``workers`` is 1)."""
    from tqdm.auto import tqdm

    results: list = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False)
    try:
        if workers <= 1:
            if initializer is not None:
                initializer(*initargs)
            for i, item in enumerate(items):
                results[i] = func(item)
                bar.update(1)
        else:
            # forkserver/spawn, not fork: the caller may hold threads (tqdm's monitor, torch pools)
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            chunk = max(1, min(8, len(items) // (workers * 8) or 1))
            with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
                for i, res in enumerate(pool.imap(func, items, chunksize=chunk)):
                    results[i] = res
                    bar.update(1)
    finally:
        bar.close()
    return results


# ---- one case, in a worker ----

_WORKER: dict = {}


def _init_worker(spec: dict, seed: int, root: str) -> None:
    _WORKER.update(spec=spec, seed=seed, root=Path(root))


def _write_case(plan: CasePlan) -> dict:
    spec, seed, root = _WORKER["spec"], _WORKER["seed"], _WORKER["root"]
    images, masks, meta = render_case(spec, plan, seed)
    spacing = spacing_mm(spec)
    for phase in spec["phases"]:
        save_volume(
            root / "images" / plan.case_id / f"{phase}.nii.gz", images[phase], spacing, dtype=np.int16
        )
        save_volume(root / "masks" / plan.case_id / f"{phase}.nii.gz", masks[phase], spacing, dtype=np.uint8)
    return meta


# ---- what is there already ----


def _request(spec: dict, seed: int, n_cases: int, n_unlabelled: int) -> dict:
    """What names a phantom: a folder holding the same request is the same data set."""
    return {
        "spec_name": spec.get("name", ""),
        "spec_hash": spec_hash(spec),
        "seed": int(seed),
        "n_cases": int(n_cases),
        "n_unlabelled": int(n_unlabelled),
        "shape": list(spec["geometry"]["shape"]),
        "package_version": __version__,
    }


def _existing(out: Path, request: dict, overwrite: bool) -> dict | None:
    """The summary of the phantom already at ``out`` when it is the one requested and complete; None when ``out``
    is to be (re)written; an error when it must not be."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError("output path exists and is not a folder", path=out)
    if not any(out.iterdir()):
        return None
    previous = read_marker(out)
    if previous is None:
        raise DataError(
            "output folder is not empty and is not a liverfusion phantom (no phantom.json): refusing to "
            "write into it; choose an empty or new folder",
            path=out,
        )
    if overwrite:
        return None
    if not all(previous.get(k) == v for k, v in request.items()):
        diff = sorted(k for k, v in request.items() if previous.get(k) != v)
        raise ConfigError(
            f"{out} holds a phantom made with different settings ({', '.join(diff)}); "
            "pass overwrite=true to replace it or choose another folder"
        )
    missing = _missing_files(out, previous)
    if missing:
        raise DataError(
            f"phantom folder is incomplete: {len(missing)} file(s) missing, e.g. {missing[0]}",
            path=out,
            fix="pass overwrite=true to write it again, or delete the folder",
        )
    return previous


def _missing_files(out: Path, info: Mapping) -> list[str]:
    """Files a phantom with marker ``info`` must hold and ``out`` lacks (relative names; cheap: stats only)."""
    missing = [name for name in ("labels.txt", "cases.csv") if not (out / name).is_file()]
    if missing:
        return missing
    cases = [line.split()[0] for line in (out / "labels.txt").read_text().splitlines() if line.strip()]
    want = int(info.get("n_cases", 0)) + int(info.get("n_unlabelled", 0))
    if len(cases) != want:
        return [f"labels.txt lists {len(cases)} cases, phantom.json {want}"]
    for case in cases:
        for phase in info.get("phases", []):
            for sub in ("images", "masks"):
                rel = f"{sub}/{case}/{phase}.nii.gz"
                if not (out / rel).is_file():
                    missing.append(rel)
    return missing


def _leftover(out: Path, name: str) -> bool:
    """Whether sibling ``name`` is a temporary folder (``mkdtemp``'s 8 random characters) of a phantom at ``out``."""
    return any(
        re.fullmatch(re.escape(f".{out.name}.{kind}-") + r"[a-z0-9_]{8}", name) for kind in ("partial", "old")
    )


def _remove_leftovers(out: Path) -> None:
    """Delete temporary folders of writers that were killed (only called while holding the phantom's lock)."""
    for sibling in out.parent.iterdir():
        if sibling.is_dir() and not sibling.is_symlink() and _leftover(out, sibling.name):
            log.info("removing %s, left by an interrupted phantom writer", sibling)
            shutil.rmtree(sibling, ignore_errors=True)


# ---- writing the set ----


def _write_phantom(
    out: Path,
    spec: dict,
    request: dict,
    seed: int,
    n_cases: int,
    n_unlabelled: int,
    workers: int,
    progress: bool,
) -> dict:
    plans = plan_cases(spec, seed, n_cases, n_unlabelled)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the data set should follow the user's umask
    try:
        metas = pool_map(
            _write_case, plans, workers, progress, "phantom", _init_worker, (spec, int(seed), str(tmp))
        )
        _write_tables(tmp, metas)
        summary = _summary(spec, request, metas)
        # the marker last: a folder with phantom.json is complete (and the whole folder is renamed into place)
        atomic_write_text(tmp / "phantom.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write_tables(folder: Path, metas: list[dict]) -> None:
    """``labels.txt`` (what the LLD-MMRI reader reads) and ``cases.csv`` (the ground truth of every case)."""
    atomic_write_text(folder / "labels.txt", "".join(f"{m['case']} {m['label']}\n" for m in metas))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(metas[0].keys()) if metas else ["case"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(metas)
    atomic_write_text(folder / "cases.csv", buf.getvalue())


def _summary(spec: dict, request: dict, metas: list[dict]) -> dict:
    """The content of phantom.json: the request, counts, layout and the full spec."""
    names = class_names(spec)
    labelled = [m for m in metas if m["pool"] == "labelled"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **request,
        "n_patients": len({m["patient"] for m in metas}),
        "two_lesion_patients": sum(1 for m in metas if m["case"].endswith("_1")),
        "class_counts": {n: sum(1 for m in labelled if m["class"] == n) for n in names},
        "class_names": names,
        "phases": list(spec["phases"]),
        "spacing_mm": list(spacing_mm(spec)),
        "layout": dict(LAYOUT),
        "spec": spec,
    }


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; a previous one is moved aside first and deleted after."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
