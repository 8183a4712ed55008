"""Evaluation: prediction files, submission format, robustness, per-patient aggregation, and the checkpoint
metadata round trip from a real (tiny) training run into ``liverfusion.evaluate``."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from liverfusion.errors import CheckpointError
from liverfusion.evaluate import (
    PredictionSet,
    aggregate_by_patient,
    batch_predictions,
    compare_predictions,
    evaluate,
    find_checkpoints,
    load_classifier,
    predictions_csv,
    read_predictions_csv,
    robustness_table,
    submission_json,
    write_evaluation,
)
from liverfusion.models import FUSIONS, build_encoder, build_fusion_classifier
from liverfusion.train import train
from liverfusion.utils.hydra_utils import CONFIG_DIR
from tests.helpers import tiny_phantom_overrides

CLASSES = ["a", "b", "c"]
MODS = ["T2WI", "DWI", "C+A"]


def toy_predictions(n: int = 30, seed: int = 0) -> PredictionSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    dropped = {m: np.roll(probs, i + 1, axis=1) if m == "DWI" else probs for i, m in enumerate(MODS)}
    return PredictionSet(
        case_ids=[f"P{i // 2:03d}" + ("_1" if i % 2 else "") for i in range(n)],
        patient_ids=[f"P{i // 2:03d}" for i in range(n)],
        probs=probs,
        labels=labels,
        class_names=CLASSES,
        modalities=MODS,
        dropped=dropped,
        present=np.ones((n, 3), dtype=bool),
    )


def test_predictions_csv_and_submission_format(tmp_path):
    p = toy_predictions()
    text = predictions_csv(p)
    header = text.splitlines()[0].split(",")
    assert header == [
        "case_id",
        "patient_id",
        "prob_a",
        "prob_b",
        "prob_c",
        "prediction",
        "prediction_name",
        "label",
        "label_name",
    ]
    (tmp_path / "predictions.csv").write_text(text)
    back = read_predictions_csv(tmp_path / "predictions.csv")
    assert back.case_ids == p.case_ids and np.allclose(back.probs, p.probs, atol=1e-6)
    assert (back.labels == p.labels).all()
    sub = json.loads(submission_json(p))
    assert len(sub) == len(p.case_ids)
    assert set(sub[0]) == {"image_id", "prediction", "score"}
    assert sub[1]["image_id"] == "P000_1" and len(sub[1]["score"]) == 3
    assert all(e["prediction"] == int(np.argmax(e["score"])) for e in sub)
    assert all(abs(sum(e["score"]) - 1) < 1e-4 for e in sub)


def test_unlabelled_cases_have_empty_label_cells():
    p = toy_predictions(6)
    p.labels[:] = -1
    rows = predictions_csv(p).splitlines()[1:]
    assert all(r.endswith(",,") for r in rows)


def test_robustness_table_reports_the_loss_of_each_modality():
    rows = robustness_table(toy_predictions())
    assert [r["dropped"] for r in rows] == ["none", *MODS]
    by = {r["dropped"]: r for r in rows}
    assert by["T2WI"]["delta_macro_f1"] == pytest.approx(0.0)
    assert by["DWI"]["delta_macro_f1"] < -0.3  # DWI "carries" the class in this toy set
    assert by["DWI"]["macro_f1"] == pytest.approx(by["none"]["macro_f1"] + by["DWI"]["delta_macro_f1"])


def test_per_patient_aggregation_means_probabilities_and_counts_disagreement():
    p = toy_predictions(6)  # patients P000 (cases 0,1), P001 (2,3), P002 (4,5); labels 0,1,2,0,1,2
    agg, disagree = aggregate_by_patient(p, "mean")
    assert agg.case_ids == ["P000", "P001", "P002"]
    assert np.allclose(agg.probs[0], p.probs[:2].mean(0) / p.probs[:2].mean(0).sum())
    assert disagree == 3
    assert list(agg.labels) == [0, 0, 1]  # ties -> lowest class
    mx, _ = aggregate_by_patient(p, "max")
    assert np.allclose(mx.probs.sum(1), 1)


def test_write_evaluation_files_and_patient_level_cis(tmp_path):
    p = toy_predictions()
    summary = write_evaluation(p, tmp_path, n_boot=200, aggregate="mean", compare_to=toy_predictions(seed=1))
    for name in (
        "predictions.csv",
        "submission.json",
        "metrics.json",
        "metrics.md",
        "robustness.csv",
        "patient_predictions.csv",
        "patient_metrics.json",
        "comparison.json",
        "summary.json",
    ):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "lld_score", "auroc", "ece"):
        m = metrics[key]
        assert m["low"] <= m["point"] <= m["high"], key
    assert metrics["n_patients"]["point"] == 15
    assert summary["comparison"]["n_cases"] == 30


def test_binary_tasks_get_delong_ci_and_test():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    pa = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.2, 40), 0.01, 0.99)
    pb = np.clip(0.5 + 0.1 * (2 * y - 1) + rng.normal(0, 0.2, 40), 0.01, 0.99)

    def ps(p1):
        return PredictionSet(
            [f"c{i}" for i in range(40)],
            [f"c{i}" for i in range(40)],
            np.stack([1 - p1, p1], 1),
            y,
            ["neg", "pos"],
        )

    from liverfusion.evaluate import metrics_with_ci

    m = metrics_with_ci(ps(pa), n_boot=100)
    assert "binary/auroc_delong" in m and "binary/sensitivity" in m
    cmp = compare_predictions(ps(pa), ps(pb), metric="auroc", n_boot=200)
    assert cmp["delta"] > 0 and 0 <= cmp["delong"]["p_value"] < 0.05


@pytest.mark.parametrize("fusion", ["cgc", "early"])
def test_refusing_equals_running_the_network_with_that_mask(fusion):
    torch.manual_seed(0)
    enc = functools.partial(
        build_encoder,
        name="resnet3d",
        arch="resnet10",
        widths=[4, 8, 8, 8],
        pool_stride=[1, 2, 2],
        stage_strides=[1, 2, 2, 1],
    )
    fus = functools.partial(FUSIONS[fusion], **({"width": 4} if fusion == "cgc" else {}))
    net = build_fusion_classifier(enc, fus, MODS, 3).eval()
    b = {
        "image": torch.randn(2, 3, 8, 32, 32),
        "present": torch.ones(2, 3, dtype=torch.bool),
        "label": torch.tensor([0, 1]),
        "case_id": ["x", "y"],
        "patient_id": ["x", "y"],
    }
    rec = batch_predictions(net, b)
    mask = b["present"].clone()
    mask[:, 1] = False
    with torch.no_grad():
        direct = net(b["image"], mask).logits.softmax(1).numpy()
    assert np.allclose(rec["dropped"]["DWI"], direct, atol=1e-5)


def _train_tiny(tiny_phantom, tmp_path, name: str, extra: list[str] | None = None):
    GlobalHydra.instance().clear()
    overrides = [
        "+experiment=cgc_demo",
        "model.init=scratch",
        "logger=none",
        "callbacks=none",
        "trainer.max_epochs=2",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "model.evaluation.n_boot=100",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
        *(extra or []),
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    return train(cfg)


def _evaluate(tiny_phantom, tmp_path, ckpt, name: str, extra: list[str] | None = None):
    GlobalHydra.instance().clear()
    data = [
        o for o in tiny_phantom_overrides(tiny_phantom, tmp_path / "cache") if o.startswith(("paths", "data"))
    ]
    data = [o for o in data if not o.startswith(("data.preprocess", "data.batch_size"))]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="evaluate", overrides=[f"ckpt_path={ckpt}", "n_boot=100", *data, *(extra or [])]
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    return evaluate(cfg)


def test_checkpoint_round_trip_into_evaluate(tiny_phantom, tmp_path):
    """The training run's own test outputs and `evaluate` on its checkpoint agree, with the data config giving
    the modalities in another order and another preprocessing size: the checkpoint decides both."""
    metrics, objects = _train_tiny(tiny_phantom, tmp_path / "multi", "0")
    run = tmp_path / "multi" / "0"
    assert "test/macro_f1" in metrics
    # frozen encoder without augmentation: features cached, so later epochs load no images (validation has no
    # drop_last: every case is cached after the first epoch)
    assert objects["datamodule"]._views["val"].image_free
    assert (run / "test" / "predictions.csv").is_file() and (run / "test" / "robustness.csv").is_file()
    ckpt = torch.load(next(run.rglob("*.ckpt")), weights_only=True)
    meta = ckpt["liverfusion"]
    assert meta["preprocess"]["shape"] == [16, 32, 32]
    assert meta["class_names"][0] == "hemangioma" and len(meta["modalities"]) == 8
    shuffled = list(reversed(meta["modalities"]))
    summary = _evaluate(
        tiny_phantom,
        tmp_path,
        run,
        "eval",
        [
            f"data.layout.modalities=[{','.join(repr(m) for m in shuffled)}]",
            "data.preprocess.shape=[16,64,64]",
        ],
    )
    ours = read_predictions_csv(tmp_path / "eval" / "predictions.csv")
    theirs = read_predictions_csv(run / "test" / "predictions.csv")
    assert ours.case_ids == theirs.case_ids
    assert np.allclose(ours.probs, theirs.probs, atol=1e-5)
    assert summary["metrics"]["macro_f1"] == pytest.approx(metrics["test/macro_f1"], abs=1e-6)
    sub = json.loads((tmp_path / "eval" / "submission.json").read_text())
    assert [e["image_id"] for e in sub] == ours.case_ids

    # the two runs of a "multirun" folder evaluate as an ensemble (mean probabilities)
    _train_tiny(tiny_phantom, tmp_path / "multi", "1", ["seed=5"])
    found = find_checkpoints(tmp_path / "multi")
    assert len(found) == 2
    assert load_classifier(found[1]).meta["modalities"] == meta["modalities"]
    _evaluate(tiny_phantom, tmp_path, tmp_path / "multi", "ens", ["robustness=false"])
    ens = read_predictions_csv(tmp_path / "ens" / "predictions.csv")
    one = read_predictions_csv(tmp_path / "multi" / "1" / "test" / "predictions.csv")
    assert np.allclose(ens.probs, (theirs.probs + one.probs) / 2, atol=1e-5)


def test_weight_averaged_run_tests_the_weights_it_saved(tiny_phantom, tmp_path):
    """With Lightning's EMA callback, the checkpoint holds the averaged weights (what validation scored and model
    selection chose); the run's own test must score those, as `evaluate` does, not the raw weights beside them."""
    _train_tiny(
        tiny_phantom,
        tmp_path,
        "ema",
        [
            "model.finetune.mode=full",
            "model.feature_cache.enabled=auto",
            "trainer.max_epochs=3",
            "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
            "+callbacks.ema.decay=0.5",
            "+callbacks.best._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            f"+callbacks.best.dirpath={tmp_path / 'ema' / 'checkpoints'}",
            "+callbacks.best.monitor=val/loss",
        ],
    )
    run = tmp_path / "ema"
    ckpt = torch.load(find_checkpoints(run)[0], weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if k.startswith("net.encoder"))
    _evaluate(tiny_phantom, tmp_path, run, "eval", ["robustness=false"])
    ours = read_predictions_csv(tmp_path / "eval" / "predictions.csv")
    theirs = read_predictions_csv(run / "test" / "predictions.csv")
    assert ours.case_ids == theirs.case_ids
    assert np.allclose(ours.probs, theirs.probs, atol=1e-5)


def test_evaluate_refuses_an_encoder_file(tmp_path):
    enc = build_encoder(name="resnet3d", arch="resnet10", widths=[4, 8, 8, 8])
    torch.save({"format": "liverfusion-encoder/1", "state_dict": enc.state_dict()}, tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match="not a liverfusion classifier checkpoint"):
        load_classifier(tmp_path / "encoder.pt")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "liverfusion.evaluate",
            f"ckpt_path={tmp_path / 'encoder.pt'}",
            f"hydra.run.dir={tmp_path / 'ev'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2  # a problem the user can fix (liverfusion.utils.cli)
    assert "not a liverfusion classifier checkpoint" in out.stderr and "Traceback" not in out.stderr


ENTRY_POINTS = {
    "liverfusion.evaluate",
    "liverfusion.predict",
    "liverfusion.train",
    "liverfusion.report",
    "liverfusion.demo",
    "liverfusion.resume",
    "liverfusion.synth",
    "liverfusion.export",
}


def _imports(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_library_packages_import_no_entry_point():
    """modules/ (the classifier's test step) and evaluation/ use the evaluation library, never a CLI module."""
    from pathlib import Path

    import liverfusion

    root = Path(liverfusion.__file__).parent
    files = sorted((root / "modules").glob("*.py")) + sorted((root / "evaluation").glob("*.py"))
    assert any(f.parent.name == "evaluation" for f in files)
    for f in files:
        bad = _imports(f) & ENTRY_POINTS
        assert not bad, f"{f} imports {bad}"
    assert "liverfusion.evaluation" in _imports(root / "modules" / "held_out.py")  # the test loop


def test_evaluate_reexports_the_library():
    """Code that imports from liverfusion.evaluate gets the library's own objects."""
    import liverfusion.evaluate as cli
    import liverfusion.evaluation as lib

    shared = [n for n in cli.__all__ if n not in ("evaluate", "main", "_best_in_run")]
    assert set(shared) <= set(lib.__all__)
    for name in shared:
        assert getattr(cli, name) is getattr(lib, name), name
    assert cli._best_in_run is lib.best_in_run
