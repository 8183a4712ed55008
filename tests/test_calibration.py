"""Calibration: temperature scaling recovers a known over-confidence without changing any prediction, the scores
(ECE, MCE, Brier, NLL, AURC) match hand computations, the temperature is stored with exactly the weights it was
fitted for, and ``evaluate calibrate=true`` / ``predict`` apply it (one temperature for a fold ensemble)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from liverfusion.evaluation import PredictionSet, read_predictions_csv
from liverfusion.evaluation.calibration import (
    calibration_file,
    calibration_scores,
    fit_temperature,
    risk_coverage,
    stored_calibration,
    write_calibration,
)
from tests.test_evaluate import _evaluate, _train_tiny


def _set(probs, labels, log_probs=None) -> PredictionSet:
    n = len(labels)
    ids = [f"c{i}" for i in range(n)]
    k = np.asarray(probs).shape[1]
    return PredictionSet(
        ids,
        ids,
        np.asarray(probs, float),
        np.asarray(labels),
        [f"k{i}" for i in range(k)],
        log_probs=log_probs,
    )


def _overconfident(n=3000, k=4, t_true=2.5, seed=0):
    """Logits whose labels are drawn from softmax(z / t_true): the raw softmax is over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 3
    p_true = np.exp(z / t_true)
    p_true /= p_true.sum(1, keepdims=True)
    y = (rng.random((n, 1)) > p_true.cumsum(1)).sum(1)
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return _set(np.exp(lp), y, lp), z, y


def test_temperature_recovers_a_known_overconfidence_and_keeps_every_prediction():
    preds, z, y = _overconfident()
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.1)
    cal = preds.with_temperature(t)
    assert (cal.predictions == preds.predictions).all()
    before, after = calibration_scores(preds), calibration_scores(cal)
    assert before["ece"] > 0.15 and after["ece"] < 0.04
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert np.allclose(cal.probs.sum(1), 1)
    # an already calibrated model keeps (about) its temperature
    assert fit_temperature(z / 2.5, y) == pytest.approx(1.0, rel=0.1)


def test_scores_match_hand_computation():
    probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]
    s = calibration_scores(_set(probs, [0, 1, 1]))
    # each case alone in its bin: |0.9 - 1|, |0.6 - 0|, |0.7 - 1|
    assert s["ece"] == pytest.approx((0.1 + 0.6 + 0.3) / 3, abs=1e-6)
    assert s["mce"] == pytest.approx(0.6, abs=1e-6)
    assert s["brier"] == pytest.approx((0.02 + 0.72 + 0.18) / 3)
    assert s["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7)) / 3)


def test_risk_coverage_ranks_by_confidence():
    # 10 cases, confidence falling with the index; the two errors are the least confident: an oracle ranking
    conf = np.linspace(0.95, 0.55, 10)
    probs = np.stack([conf, 1 - conf], 1)
    labels = np.array([0] * 8 + [1, 1])
    good = risk_coverage(_set(probs, labels))
    assert good["aurc"] == pytest.approx(good["aurc_oracle"])
    # the kept 80 % are all class 0 and right; like the project's macro_f1 (torchmetrics), an absent class that is
    # never predicted does not count
    assert good["risk_at_80"] == 0.0 and good["macro_f1_at_80"] == pytest.approx(1.0)
    assert good["macro_f1_at_100"] < 1.0
    assert good["risk"][-1] == pytest.approx(0.2)
    bad = risk_coverage(_set(probs, np.array([1, 1] + [0] * 8)))  # the errors are the most confident
    assert bad["aurc"] > good["aurc"] + 0.3 and bad["risk_at_80"] == pytest.approx(2 / 8)
    assert bad["aurc_oracle"] == pytest.approx(good["aurc_oracle"])


def test_calibration_is_stored_for_exactly_its_weights(tmp_path):
    preds, z, y = _overconfident(n=200)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.write_bytes(b"weights-1")
    where = write_calibration(run, [ckpt], 2.0, preds)
    assert where == run / "calibration.json" == calibration_file(run)
    stored = stored_calibration(run, [ckpt])
    assert (
        stored["temperature"] == 2.0
        and stored["validation_after"]["nll"] < stored["validation_before"]["nll"]
    )
    # the run's own .ckpt finds the run's file; other weights never get it
    assert stored_calibration(ckpt, [ckpt])["temperature"] == 2.0
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"weights-2")
    assert stored_calibration(run, [other]) is None
    ckpt.write_bytes(b"retrained")
    assert stored_calibration(run, [ckpt]) is None
    (run / "calibration.json").write_text(
        json.dumps({"format": "liverfusion-calibration/1", "temperature": -1})
    )
    with pytest.raises(Exception, match="not a positive number"):
        stored_calibration(run, [ckpt])


def test_evaluate_fits_stores_and_applies_the_temperature(tiny_phantom, tmp_path):
    from tests.test_predict import _predict

    _train_tiny(tiny_phantom, tmp_path / "multi", "0")
    run = tmp_path / "multi" / "0"
    _evaluate(tiny_phantom, tmp_path, run, "raw", ["robustness=false", "calibration=none"])
    summary = _evaluate(tiny_phantom, tmp_path, run, "cal", ["robustness=false", "calibrate=true"])
    stored = json.loads((run / "calibration.json").read_text())
    t = stored["temperature"]
    assert summary["temperature"] == pytest.approx(t) and stored["n_cases"] > 0
    for name in (
        "calibration.json",
        "calibration.md",
        "reliability.png",
        "risk_coverage.csv",
        "risk_coverage.png",
    ):
        assert (tmp_path / "cal" / name).is_file(), name
    assert "## Calibration and selective prediction" in (tmp_path / "cal" / "metrics.md").read_text()
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert report["after"]["nll"] is not None and 0 <= report["selective"]["aurc"] <= 1
    raw = read_predictions_csv(tmp_path / "raw" / "predictions.csv")
    cal = read_predictions_csv(tmp_path / "cal" / "predictions.csv")
    expected = raw.with_temperature(t).probs
    assert np.allclose(cal.probs, expected, atol=2e-5)
    assert (cal.predictions == raw.predictions).all()
    summary_raw = json.loads((tmp_path / "raw" / "summary.json").read_text())
    assert summary["metrics"]["macro_f1"] == pytest.approx(summary_raw["metrics"]["macro_f1"])

    # predict applies the stored temperature (on the test cases, from their phantom folders)
    payload = _predict(run, tiny_phantom / "images", tmp_path / "pred")
    assert payload["model"]["temperature"] == pytest.approx(t)
    probs = {c["case_id"]: list(c["probabilities"].values()) for c in payload["cases"]}
    assert np.allclose([probs[c] for c in cal.case_ids], cal.probs, atol=2e-6)

    # a fold ensemble: one temperature on the members' out-of-fold validation logits, argmax unchanged; the
    # single run's calibration is not applied to the ensemble (other weights)
    _train_tiny(tiny_phantom, tmp_path / "multi", "1", ["seed=5", "data.fold=1"])
    ens_raw = _evaluate(tiny_phantom, tmp_path, tmp_path / "multi", "ens_raw", ["robustness=false"])
    assert ens_raw["temperature"] is None
    ens = _evaluate(tiny_phantom, tmp_path, tmp_path / "multi", "ens", ["robustness=false", "calibrate=true"])
    stored = json.loads((tmp_path / "multi" / "calibration.json").read_text())
    assert len(stored["digests"]) == 2 and ens["temperature"] == pytest.approx(stored["temperature"])
    a = read_predictions_csv(tmp_path / "ens_raw" / "predictions.csv")
    b = read_predictions_csv(tmp_path / "ens" / "predictions.csv")
    assert (a.predictions == b.predictions).all()
    assert np.allclose(b.probs, a.with_temperature(stored["temperature"]).probs, atol=2e-5)


def test_calibration_phantom_benchmark_on_a_tiny_setting(tiny_phantom, tmp_path):
    """benchmarks/calibration_phantom.py end to end on the tiny phantom (the real run: 1000 cases, the demo model)."""
    from benchmarks import calibration_phantom
    from tests.helpers import tiny_phantom_overrides

    _train_tiny(tiny_phantom, tmp_path / "multi", "0")
    data = [
        o for o in tiny_phantom_overrides(tiny_phantom, tmp_path / "cache") if o.startswith(("paths", "data"))
    ]
    data = [o for o in data if not o.startswith(("data.preprocess", "data.batch_size"))]
    args = [
        "--model",
        str(tmp_path / "multi" / "0"),
        "--n-cases",
        "14",
        "--explain-cases",
        "4",
        "--n-boot",
        "50",
    ]
    args += [
        "--threads",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--results",
        str(tmp_path / "res" / "cal.json"),
    ]
    assert calibration_phantom.main(args + [f"--override={o}" for o in data]) == 0
    res = json.loads((tmp_path / "res" / "cal.json").read_text())
    assert res["n_cases"] == 14 and res["seed"] == 90125 and res["macro_f1_unchanged"]
    t = json.loads((tmp_path / "multi" / "0" / "calibration.json").read_text())["temperature"]
    assert res["calibration"]["temperature"] == pytest.approx(t)
    assert res["calibration"]["before"]["ece"] != res["calibration"]["after"]["ece"]
    cam = res["gradcam"]
    assert cam["cases"] == 4 and 0 <= cam["lesion_mass"] <= 1 and 0 <= cam["blob_mass"] <= 1
    text = (tmp_path / "res" / "cal.md").read_text()
    assert "ECE (15 bins)" in text and "centred blob" in text and "the centre prior" in text
    cohort = tmp_path / "work" / "cohort_seed90125_n14"
    assert len(list((cohort / "images").iterdir())) == 14 and (cohort / "masks").is_dir()
