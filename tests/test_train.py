"""The training entry point: train(cfg) through the compose API, and the real CLI from another directory."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from liverfusion.train import train
from liverfusion.utils.hydra_utils import CONFIG_DIR
from tests.helpers import tiny_phantom_overrides

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def logged(run_dir: Path, key: str) -> list[float]:
    """Every value of ``key`` in the run's CSV log, in step order."""
    (path,) = run_dir.rglob("metrics.csv")
    with open(path, newline="") as fh:
        return [float(r[key]) for r in csv.DictReader(fh) if r.get(key)]


def test_train_function_fits_and_returns_metrics(tiny_phantom, tmp_path):
    GlobalHydra.instance().clear()
    overrides = [
        "+experiment=simsiam_pretrain",
        "logger=csv",
        "trainer.max_epochs=1",
        "callbacks=none",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics, objects = train(cfg)
    steps = logged(tmp_path / "run", "train/loss_step")
    # a negative cosine of unit vectors per step: a loss on unnormalised features (or NaN) leaves [-1, 1], and a
    # loss that ignores its batch repeats one value
    assert len(steps) >= 2 and all(-1.0 <= v <= 1.0 for v in steps) and len(set(steps)) > 1
    # the returned epoch loss is the mean of that epoch's step losses (full batches: drop_last)
    assert metrics["train/loss_epoch"] == pytest.approx(sum(steps) / len(steps), abs=1e-5)
    # no collapse: the per-dimension std of the l2-normalised projections stays near 1/sqrt(d) (isotropic), above
    # the collapse threshold 0.5/sqrt(d) (0 when every case maps to one point)
    assert metrics["train/z_std"] >= 0.5 / math.sqrt(cfg.model.projector.out_dim)
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()
    assert (tmp_path / "run" / "splits.json").is_file()
    assert (tmp_path / "run" / "encoder.pt").is_file() or any((tmp_path / "run").rglob("encoder.pt"))
    # the resolved config has no interpolation left: the run is reproducible from it + its seed
    assert "${" not in (tmp_path / "run" / "config_resolved.yaml").read_text()


def test_cli_prints_config_from_any_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "liverfusion.train", "+experiment=simsiam_pretrain", "--cfg", "job"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "task_name: simsiam_pretrain" in out.stdout
    assert "MDADataModule" in out.stdout


def test_cli_multirun_gives_each_job_its_dir(tiny_phantom, tmp_path):
    args = [
        sys.executable,
        "-m",
        "liverfusion.train",
        "--multirun",
        "+experiment=simsiam_pretrain",
        "debug=fast",
        "seed=1,2",
        f"paths.log_dir={tmp_path / 'logs'}",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "c"),
    ]
    out = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "logs").rglob("config_resolved.yaml"))
    assert len(jobs) == 2
    assert [p.name for p in jobs] == ["0", "1"]


def test_cli_reports_bad_data_without_a_trace(tmp_path):
    args = [
        sys.executable,
        "-m",
        "liverfusion.train",
        "+experiment=simsiam_pretrain",
        "data=lgg",
        "debug=fast",
        f"paths.shared_data_dir={tmp_path / 'nowhere'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    out = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2  # a problem the user can fix (liverfusion.utils.cli)
    assert "data folder does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    assert str(Path(tmp_path / "nowhere")) in out.stderr


def _composed(overrides: list[str], out: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def test_bare_train_pairs_a_classifier_with_labelled_cases(tiny_phantom, tmp_path):
    """Without an experiment the defaults are a matching pair (a CGC classifier from scratch on the phantom), so
    `train debug=fast` runs; every experiment overrides the model."""
    cfg = _composed(
        [
            "logger=csv",
            "callbacks=none",
            "+trainer.fast_dev_run=true",
            *tiny_phantom_overrides(tiny_phantom, tmp_path),
        ],
        tmp_path / "run",
    )
    assert cfg.model._target_.endswith("FusionClassifier") and cfg.model.init == "scratch"
    metrics, _ = train(cfg)
    assert math.isfinite(metrics["train/loss_step"])


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["model=simsiam"], "is an SSL method and needs a data module that yields views"),
        (["+experiment=simsiam_pretrain", "model=classifier"], "is a classifier, but data"),
    ],
)
def test_a_mismatched_model_and_data_module_is_refused_before_the_data_is_built(overrides, said, tmp_path):
    from liverfusion.errors import ConfigError

    cfg = _composed(
        [*overrides, "logger=csv", "paths.data_dir=" + str(tmp_path / "nowhere")], tmp_path / "run"
    )
    with pytest.raises(ConfigError, match=said) as info:
        train(cfg)
    assert "+experiment=" in info.value.fix
    assert not (tmp_path / "nowhere").exists()  # refused before any phantom was generated
