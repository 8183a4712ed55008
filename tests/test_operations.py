"""Operations: resume after SIGKILL mid-epoch, SIGTERM checkpoint, corrupt checkpoints, determinism, sweeps, W&B
offline runs per multirun job, the SLURM launcher config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from liverfusion.errors import CheckpointError
from liverfusion.resume import find_resume_checkpoint
from liverfusion.train import train
from liverfusion.utils.hydra_utils import CONFIG_DIR
from tests.helpers import tiny_phantom_overrides

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
STEPS_PER_EPOCH_ARGS = ["data.batch_size=4", "data.pairs.policy=cross"]


def run_args(tiny_phantom: Path, tmp_path: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "liverfusion.train",
        "+experiment=simsiam_pretrain",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        "trainer.check_val_every_n_epoch=100",
        "data.layout.generate=false",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
        *STEPS_PER_EPOCH_ARGS,
        *extra,
    ]


def steps_per_epoch(tiny_phantom: Path, tmp_path: Path) -> int:
    """Optimiser steps per pre-training epoch of the run_args() config (drop_last batches of the pair loader)."""
    GlobalHydra.instance().clear()
    overrides = [
        "+experiment=simsiam_pretrain",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
        *STEPS_PER_EPOCH_ARGS,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "count")
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("fit")
    return len(dm.train_dataloader())


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_slurm_launcher_and_trainer_compose():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["hydra/launcher=slurm", "trainer=slurm"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices
    assert launcher.nodes == cfg.trainer.num_nodes
    # one owner of pre-emption: submitit requeues, Lightning's SLURM auto-requeue is off
    assert cfg.trainer.plugins[0].auto_requeue is False and launcher.max_num_timeout > 0


def test_resume_after_sigkill_mid_epoch_gives_same_step_count(tiny_phantom, tmp_path):
    """SIGKILL inside epoch 2, resume from the run dir: the run ends with epochs x steps-per-epoch steps."""
    epochs = 2
    run_dir = tmp_path / "killed"
    args = run_args(
        tiny_phantom,
        tmp_path,
        run_dir,
        [f"trainer.max_epochs={epochs}", "callbacks.step_checkpoint.every_n_train_steps=1"],
    )
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    per_epoch = steps_per_epoch(tiny_phantom, tmp_path)
    assert per_epoch >= 3
    killed_at = None
    deadline = time.time() + 400
    ckpts = run_dir / "checkpoints"
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        for ck in ckpts.glob("step_*.ckpt"):
            step = int(ck.stem.split("_")[1])
            if step > per_epoch and step % per_epoch:
                killed_at = step
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run ended before a mid-epoch checkpoint appeared"
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [sys.executable, "-m", "liverfusion.resume", str(run_dir)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    # same number of optimiser steps as an uninterrupted run: the epoch was continued, not restarted
    assert ckpt_step(ckpts / "last.ckpt") == epochs * per_epoch
    # data order: the loader position is in the checkpoint (StatefulDataLoader), so the remaining batches of the
    # interrupted epoch come in their original order
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["loops"]["fit_loop"]["state_dict"].get("combined_loader")


def test_sigterm_saves_a_checkpoint_before_exit(tiny_phantom, tmp_path):
    run_dir = tmp_path / "term"
    proc = subprocess.Popen(
        run_args(
            tiny_phantom,
            tmp_path,
            run_dir,
            ["trainer.max_epochs=50", "callbacks.step_checkpoint.every_n_train_steps=1"],
        ),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 400
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("step_*.ckpt")):
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), err[-2000:]
    assert ckpt_step(last) >= 1
    assert find_resume_checkpoint(run_dir / "checkpoints").name in {last.name} | {
        p.name for p in (run_dir / "checkpoints").glob("step_*.ckpt")
    }


def test_corrupt_checkpoint_is_detected_and_previous_kept(tmp_path, capsys):
    good = tmp_path / "step_0000004.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 4}, good)
    time.sleep(0.01)
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(good.read_bytes()[:100])  # truncated, newer
    assert find_resume_checkpoint(tmp_path) == good
    assert "last.ckpt is unreadable" in capsys.readouterr().err
    good.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        find_resume_checkpoint(tmp_path)
    assert bad.exists() and good.exists()  # nothing deleted


def test_deterministic_mode_gives_bit_identical_weights(tiny_phantom, tmp_path):
    weights = []
    for i in range(2):
        GlobalHydra.instance().clear()
        overrides = [
            "+experiment=simsiam_pretrain",
            "logger=none",
            "callbacks=none",
            "trainer.max_epochs=1",
            "trainer.deterministic=true",
            "seed=5",
            "trainer.check_val_every_n_epoch=100",
            *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"run{i}")
        _, objects = train(cfg)
        weights.append({k: v.clone() for k, v in objects["model"].state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    changed = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not changed, f"non-identical tensors: {changed[:5]}"


def test_multirun_jobs_get_their_own_offline_wandb_runs(tiny_phantom, tmp_path):
    env = {**ENV, "WANDB_MODE": "offline"}
    args = [
        sys.executable,
        "-m",
        "liverfusion.train",
        "--multirun",
        "+experiment=simsiam_pretrain",
        "logger=wandb",
        "seed=1,2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "trainer.check_val_every_n_epoch=100",
        "callbacks=none",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
    ]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].parent.parent != runs[1].parent.parent
    ids = {(tmp_path / "sweep" / d / "wandb_run_id.txt").read_text() for d in ("0", "1")}
    assert len(ids) == 2


def test_optuna_sweep_two_trials(tiny_phantom, tmp_path):
    args = [
        sys.executable,
        "-m",
        "liverfusion.train",
        "+experiment=simsiam_pretrain",
        "hparams_search=simsiam_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.direction=minimize",
        "optimized_metric=train/loss_epoch",
        f"hydra.sweep.dir={tmp_path / 'opt'}",
        "logger=none",
        "callbacks=none",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "trainer.check_val_every_n_epoch=100",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
    ]
    out = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    import yaml

    result = yaml.safe_load((tmp_path / "opt" / "optimization_results.yaml").read_text())
    assert isinstance(result["best_value"], float)
    lrs = {
        yaml.safe_load(p.read_text())["model"]["optimizer"]["base_lr"]
        for p in (tmp_path / "opt").glob("*/config_resolved.yaml")
    }
    assert len(lrs) == 2
