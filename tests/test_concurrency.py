"""Shared folders under concurrency and full disks: the phantom, the preprocessing cache, checkpoints, encoder.pt.

Several processes (multirun jobs, DDP ranks, benchmark workers) prepare one phantom and one cache at once; each
must succeed and see the same arrays a lone process makes. A write that runs out of disk must leave the previous
file as it was and raise an OSError naming the file (what the CLI prints).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from liverfusion.data.cache import PreprocessedCache
from liverfusion.data.layouts.phantom import PhantomLayout
from liverfusion.data.phantom import generate_phantom
from liverfusion.data.preprocess import PreprocessConfig
from liverfusion.errors import DataError
from liverfusion.utils import atomic
from liverfusion.utils.cli import error_line
from liverfusion.utils.locks import FileLock

SMALL = {"seed": 5, "n_cases": 8, "shape": [8, 16, 16]}
PRE = {"shape": (8, 16, 16), "normalize": "zscore"}
N_PROC = 4

# one process of the race: wait for "go" so that all start together, then phantom -> cache -> report arrays
WORKER = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    import numpy as np
    from liverfusion.data.cache import PreprocessedCache
    from liverfusion.data.layouts.phantom import PhantomLayout
    from liverfusion.data.preprocess import PreprocessConfig

    phantom, cache, sync, me, small, pre = sys.argv[1:7]
    small, pre = json.loads(small), json.loads(pre)
    Path(sync, f"ready-{me}").touch()
    while not Path(sync, "go").exists():
        time.sleep(0.01)
    layout = PhantomLayout(phantom, **small)
    cases = layout.scan()
    entries = PreprocessedCache(cache, "phantom", layout.modalities, PreprocessConfig(**pre)).build(
        cases, progress=False
    )
    arrays = {e.case_id: hashlib.sha256(np.ascontiguousarray(e.load()).tobytes()).hexdigest() for e in entries}
    print(json.dumps({"arrays": arrays, "paths": {e.case_id: str(e.path) for e in entries}}))
    """
)


def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, n_bytes: int = 64) -> None:
    """Every atomic write puts ``n_bytes`` into its temporary file, then hits ENOSPC (a full disk)."""

    def full(fh, data) -> None:
        fh.write(memoryview(data).cast("B")[:n_bytes])
        fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_write_chunks", full)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name or ".partial-" in p.name]


def _build(phantom: Path, cache: Path):
    layout = PhantomLayout(phantom, **SMALL)
    cases = layout.scan()
    return PreprocessedCache(cache, "phantom", layout.modalities, PreprocessConfig(**PRE)).build(
        cases, progress=False
    )


def test_processes_share_one_cold_phantom_and_cache(tmp_path):
    """4 processes start together on an empty phantom folder and an empty cache: all succeed, the phantom is
    written once and is byte-identical to one written alone, every cached array equals the one a lone process
    makes, and no temporary file is left."""
    shared, sync = tmp_path / "shared", tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(shared / "phantom"),
                str(shared / "cache"),
                str(sync),
                str(i),
                json.dumps(SMALL),
                json.dumps({**PRE, "shape": list(PRE["shape"])}),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(N_PROC)
    ]
    # meanwhile, the reference: the same phantom and cache made by this process alone
    reference = {
        e.case_id: e.load() for e in _build(tmp_path / "alone" / "phantom", tmp_path / "alone" / "cache")
    }
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < N_PROC and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    (sync / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    assert all(r == results[0] for r in results[1:]), "processes saw different cache entries"
    assert sorted(results[0]["arrays"]) == sorted(reference) and len(reference) == SMALL["n_cases"]
    for case_id, path in results[0]["paths"].items():
        got = np.load(path)
        assert np.array_equal(got, reference[case_id]), case_id
    alone = tmp_path / "alone" / "phantom"
    files = sorted(p.relative_to(alone) for p in alone.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(shared / "phantom") for p in (shared / "phantom").rglob("*") if p.is_file()
    )
    for rel in files:
        assert (alone / rel).read_bytes() == (shared / "phantom" / rel).read_bytes(), rel
    assert _temp_files(shared) == [] and list(shared.rglob("*.lock")) == []  # locks go with their holders
    assert sorted(p.name for p in shared.iterdir()) == ["cache", "phantom"]


def test_lock_waits_and_a_killed_holder_frees_it(tmp_path):
    """Another process holding the lock makes a non-blocking acquire fail; once it is killed (no release), the lock
    is free: a crashed writer never leaves a stale lock."""
    path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from liverfusion.utils.locks import FileLock; FileLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = FileLock(path)
        assert lock.acquire(blocking=False) is False
        assert "pid" in path.read_text()
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire(blocking=False) is True
    lock.release()


def test_cache_entry_content_check_rebuilds_damaged_entries(tmp_path):
    phantom, cache = tmp_path / "phantom", tmp_path / "cache"
    first = _build(phantom, cache)
    want = {e.case_id: e.load() for e in first}
    truncated, relabelled = first[0], first[1]
    with open(truncated.path, "r+b") as fh:  # half an entry, as a copy interrupted by a full disk leaves it
        fh.truncate(truncated.path.stat().st_size // 2)
    side = relabelled.path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["array"]["shape"][0] += 1  # the sidecar vouches for another array than the .npy holds
    side.write_text(json.dumps(meta))
    again = _build(phantom, cache)
    assert [e.path for e in again] == [e.path for e in first]
    for e in again:
        assert np.array_equal(e.load(), want[e.case_id]), e.case_id
    assert json.loads(side.read_text())["array"]["shape"][0] == len(want[relabelled.case_id])


def test_cache_entry_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    phantom, cache = tmp_path / "phantom", tmp_path / "cache"
    PhantomLayout(phantom, **SMALL).scan()
    _fill_disk_after(monkeypatch)
    with pytest.raises(OSError) as info:
        _build(phantom, cache)
    err = info.value
    assert err.errno == errno.ENOSPC and str(err.filename).endswith(".npy")
    assert Path(err.filename).parent == cache / "phantom"
    assert error_line(err).startswith(f"error: {err.filename}: No space left on device; free disk space")
    assert list((cache / "phantom").glob("*.npy")) == [] and _temp_files(cache) == []
    monkeypatch.undo()
    assert len(_build(phantom, cache)) == SMALL["n_cases"]  # room again: builds


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    """The trainer from conf/trainer/default.yaml writes checkpoints via AtomicCheckpointIO; a full disk during a
    save raises an OSError naming the checkpoint and leaves the previous checkpoint's bytes unchanged."""
    from hydra.utils import instantiate
    from lightning.pytorch.demos.boring_classes import BoringModel
    from omegaconf import OmegaConf

    from liverfusion.utils.checkpoint_io import AtomicCheckpointIO

    conf = OmegaConf.load(Path(__file__).parents[1] / "liverfusion" / "conf" / "trainer" / "default.yaml")
    conf.default_root_dir = str(tmp_path)
    conf.max_epochs, conf.limit_train_batches, conf.limit_val_batches = 1, 2, 0
    trainer = instantiate(conf, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.callbacks = []  # just the explicit saves below
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(BoringModel())
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    before = ckpt.read_bytes()
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2

    _fill_disk_after(monkeypatch)
    with pytest.raises(OSError) as info:
        trainer.save_checkpoint(ckpt)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(ckpt)
    assert error_line(info.value).startswith(f"error: {ckpt}: No space left on device")
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]


def test_encoder_export_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    from liverfusion.modules.encoder_file import load_encoder_payload
    from liverfusion.modules.ssl_base import SSLModule

    payload = {"format": "x", "state_dict": {"w": torch.arange(1000.0)}}
    module = SimpleNamespace(
        trainer=SimpleNamespace(
            checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)), default_root_dir="."
        ),
        export_cfg={"filename": "encoder.pt", "wandb_artifact": False},
        encoder_payload=lambda: payload,
    )
    path = SSLModule.export_encoder(module)
    assert path == tmp_path / "encoder.pt" and module.encoder_path == path
    before = path.read_bytes()
    payload["state_dict"]["w"] = torch.zeros(1000)
    _fill_disk_after(monkeypatch)
    with pytest.raises(OSError) as info:
        SSLModule.export_encoder(module)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt"]
    with pytest.raises(Exception, match="is not a"):  # still the old, complete file (format "x")
        load_encoder_payload(path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.arange(1000.0))


def test_phantom_leftovers_removed_and_incomplete_folder_refused(tmp_path):
    out = tmp_path / "phantom"
    stale = tmp_path / ".phantom.partial-abc_1234"  # a killed writer's temporary folder
    (stale / "images").mkdir(parents=True)
    other = tmp_path / ".phantom2.partial-abc_1234"  # another phantom's: not ours to remove
    other.mkdir()
    summary = generate_phantom(out, "default", progress=False, **SMALL)
    assert not stale.exists() and other.exists()
    assert generate_phantom(out, "default", progress=False, **SMALL) == summary  # complete: reused
    victim = next((out / "images").rglob("*.nii.gz"))
    victim.unlink()
    with pytest.raises(DataError, match="incomplete") as info:
        generate_phantom(out, "default", progress=False, **SMALL)
    assert str(victim.relative_to(out)) in str(info.value)
    generate_phantom(out, "default", progress=False, overwrite=True, **SMALL)
    assert victim.is_file()
