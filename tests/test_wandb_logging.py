"""W&B dashboards of the classifier (WandbClassifierLogger) and the privacy switch, on offline W&B runs."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from liverfusion.callbacks.wandb_classifier import (
    WandbClassifierLogger,
    ids_in_checkpoint,
    per_class_rows,
    prediction_rows,
    roc_rows,
)
from liverfusion.errors import ConfigError
from liverfusion.evaluate import PredictionSet
from liverfusion.train import train
from liverfusion.utils.hydra_utils import CONFIG_DIR
from liverfusion.utils.privacy import hash_id, ids_in_text, without_secrets
from tests.helpers import tiny_phantom_overrides

SALT = "pepper-9f3a1c"
WANDB_DIRS = ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR")
CHART_KEYS = (
    "val/confusion_matrix_table",
    "val/roc_table",
    "val/per_class",
    "test/confusion_matrix_table",
    "test/roc_table",
    "test/per_class",
    "test/predictions",
    "test/metrics_ci",
    "test/robustness",
)


# ---- helpers, no trainer ----
def _toy():
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 0, 1, 1, 0])
    return probs, labels, ["a", "b", "c"]


def test_per_class_rows_match_hand_counts():
    probs, labels, names = _toy()  # predictions 0 0 1 0 2
    rows = {r["class"]: r for r in per_class_rows(probs, labels, names)}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a["support"], b["support"], c["support"]) == (3, 2, 0)
    assert a["sensitivity"] == pytest.approx(2 / 3) and a["precision"] == pytest.approx(2 / 3)
    assert a["specificity"] == pytest.approx(1 / 2) and a["f1"] == pytest.approx(2 / 3)
    assert b["sensitivity"] == pytest.approx(1 / 2) and b["precision"] == pytest.approx(1.0)
    assert b["specificity"] == pytest.approx(1.0) and b["f1"] == pytest.approx(2 / 3)
    assert np.isnan(c["sensitivity"]) and c["specificity"] == pytest.approx(4 / 5) and c["precision"] == 0


def test_roc_rows_skip_classes_without_positives():
    probs, labels, names = _toy()
    rows = roc_rows(probs, labels, names)
    classes = {r[0] for r in rows}
    assert classes == {"a", "b"}  # c has no positive case: no curve (AUROC undefined)
    for c in classes:
        pts = [(r[1], r[2]) for r in rows if r[0] == c]
        assert pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 1.0)


def test_prediction_rows_hash_ids_only_under_privacy():
    probs, labels, names = _toy()
    preds = PredictionSet(
        case_ids=["P0001", "P0001_1", "P0002", "P0003", "P0004"],
        patient_ids=["P0001", "P0001", "P0002", "P0003", "P0004"],
        probs=probs,
        labels=np.array([0, 0, 1, 1, -1]),
        class_names=names,
    )
    cols, rows = prediction_rows(preds, privacy=True, salt=SALT)
    assert cols == ["case_id", "patient_id", "p_a", "p_b", "p_c", "prediction", "label"]
    assert rows[0][:2] == [hash_id("P0001", SALT), hash_id("P0001", SALT)]
    assert rows[1][0] == hash_id("P0001_1", SALT) and rows[4][-2:] == ["c", ""]
    assert not ids_in_text([str(r) for r in rows], preds.case_ids)
    _, plain_rows = prediction_rows(preds, privacy=False)
    assert [r[0] for r in plain_rows] == preds.case_ids and plain_rows[2][-2:] == ["b", "b"]


def test_privacy_helpers():
    assert without_secrets({"a": 1, "privacy_salt": "x", "cb": {"w": {"salt": "x", "privacy": True}}}) == {
        "a": 1,
        "cb": {"w": {"privacy": True}},
    }
    assert ids_in_text(["cgc_P0007_fold0", "tag-P0001"], ["P0007", "P0001", "P000", "P0007_1"]) == [
        "P0001",
        "P0007",
    ]
    assert "salt" not in repr(WandbClassifierLogger(privacy=True, salt=SALT)).replace("privacy", "")
    assert SALT not in repr(WandbClassifierLogger(privacy=True, salt=SALT))


def test_ids_in_checkpoint_reads_strings_not_weights(tmp_path):
    import torch

    path = tmp_path / "c.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "loops": {"cases": ["P0042_1"]}}, path)
    # the patient id inside a lesion id counts too
    assert ids_in_checkpoint(path, ["P0042_1", "P0042", "P0001"]) == ["P0042", "P0042_1"]


def test_callback_is_a_noop_without_wandb_or_for_other_modules():
    cb = WandbClassifierLogger()
    trainer = SimpleNamespace(loggers=[], sanity_checking=False, is_global_zero=True, world_size=1)
    cb.on_validation_batch_end(trainer, object(), {"probs": None}, {"label": [0]}, 0)
    cb.on_validation_epoch_end(trainer, object())
    cb.on_test_end(trainer, object())
    cb.on_fit_end(trainer, object())
    assert cb.logged_keys == [] and cb.artifact_name is None


# ---- tiny offline runs ----
def _offline_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in WANDB_DIRS:
        monkeypatch.setenv(key, str(tmp_path / "wandb_home" / key.lower()))


def _compose(tiny_phantom: Path, tmp_path: Path, extra: list[str]):
    GlobalHydra.instance().clear()
    overrides = [
        "+experiment=cgc_demo",
        "model.init=scratch",
        "logger=wandb",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "trainer.max_epochs=1",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "model.evaluation.n_boot=20",
        f"privacy_salt={SALT}",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
        *extra,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def _tiny_run(tiny_phantom: Path, tmp_path: Path, monkeypatch, privacy: bool):
    import wandb

    _offline_env(monkeypatch, tmp_path)
    _, objects = train(_compose(tiny_phantom, tmp_path, [f"privacy={str(privacy).lower()}"]))
    # wandb.finish() returns before W&B's service has flushed its last buffered block of the run file (seen under
    # load: the test-time records were missing); teardown waits for the service, as process exit does for the CLI
    wandb.teardown()
    cb = next(c for c in objects["trainer"].callbacks if isinstance(c, WandbClassifierLogger))
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0], cb


def _wandb_bytes(tmp_path: Path) -> tuple[bytes, list[Path]]:
    """Every byte W&B wrote (the run folder and W&B's own dirs: artifact staging, cache)."""
    files = [
        p
        for root in (tmp_path / "run" / "wandb", tmp_path / "wandb_home")
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]
    return b"".join(p.read_bytes() for p in files), files


def _case_ids(tmp_path: Path) -> list[str]:
    with (tmp_path / "run" / "test" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    return sorted({r["case_id"] for r in rows} | {r["patient_id"] for r in rows})


def test_classifier_run_logs_charts_tables_and_model_artifact(tiny_phantom, tmp_path, monkeypatch):
    run, cb = _tiny_run(tiny_phantom, tmp_path, monkeypatch, privacy=False)
    record = next(run.glob("run-*.wandb")).read_bytes()
    for key in CHART_KEYS:
        assert key.encode() in record, key
    assert b"wandb/confusion_matrix/v1" in record and b"wandb/area-under-curve/v0" in record
    tables = {p.name.split("_")[0] for p in (run / "files" / "media" / "table").rglob("*.table.json")}
    assert tables, "no table media written"
    # the best checkpoint as a model artifact, named after the run, with the inference metadata
    assert cb.artifact_name is not None and cb.artifact_name.encode() in record
    assert b'"liverfusion-classifier/1"' in record or b"liverfusion-classifier/1" in record
    assert b"best_epoch" in record  # the checkpoint file name inside the artifact manifest
    data, _ = _wandb_bytes(tmp_path)
    assert SALT.encode() not in data  # the salt is never logged, even with privacy off
    # privacy off: the raw ids do reach W&B (the predictions table), so the privacy test below can fail
    assert any(i.encode() in data for i in _case_ids(tmp_path))


def test_privacy_keeps_raw_ids_and_images_off_wandb(tiny_phantom, tmp_path, monkeypatch):
    """privacy=true: no raw case / patient id in any byte W&B wrote, no image, no salt, no console capture.
    (The same check finds the ids with privacy off: test_classifier_run_logs_charts_tables_and_model_artifact.)"""
    _, cb = _tiny_run(tiny_phantom, tmp_path, monkeypatch, privacy=True)
    ids = _case_ids(tmp_path)
    assert any(i.startswith("P") for i in ids) and len(ids) > 3  # local outputs keep the real ids
    data, files = _wandb_bytes(tmp_path)
    leaked = [i for i in ids if i.encode() in data]
    assert not leaked, f"raw ids in the W&B run: {leaked[:5]}"
    assert hash_id(ids[0], SALT).encode() in data or hash_id(ids[-1], SALT).encode() in data
    assert "test/predictions" in cb.logged_keys and cb.artifact_name is not None
    assert SALT.encode() not in data
    assert not [p for p in files if p.name == "output.log"]  # no console capture (warnings name cases)
    images = [p for p in files if p.suffix.lower() in (".png", ".jpg", ".jpeg") or "media/images" in str(p)]
    assert not images, images


def test_privacy_refuses_case_ids_in_run_names(tiny_phantom, tmp_path, monkeypatch):
    _offline_env(monkeypatch, tmp_path)
    with (Path(tiny_phantom) / "labels.txt").open() as f:
        case = f.readline().split()[0]
    cfg = _compose(tiny_phantom, tmp_path, ["privacy=true", f"run_name=check_{case}"])
    with pytest.raises(ConfigError, match="case or patient id"):
        train(cfg)
    assert not (tmp_path / "run" / "wandb").exists()  # refused before any W&B run was made


def test_report_leaves_figures_off_wandb_under_privacy(tmp_path, monkeypatch):
    from liverfusion.reporting.wandb_upload import to_wandb

    _offline_env(monkeypatch, tmp_path)
    fig = tmp_path / "fig.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(1, 1))
    plt.savefig(fig)
    plt.close("all")
    written = {}
    for privacy in (True, False):
        out = tmp_path / f"report_{privacy}"
        out.mkdir()
        to_wandb(out, [{"arm": "a", "macro_f1": 0.5}], [], {"roc": fig}, "offline", privacy=privacy)
        written[privacy] = list(out.rglob("media/images/*"))
    assert not written[True] and written[False]
