"""Bootstrap intervals: the batched weighted metrics equal the torchmetrics report, intervals behave, groups hold."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from liverfusion.errors import DataError
from liverfusion.metrics import (
    UndefinedMetricWarning,
    bootstrap_ci,
    classification_metrics,
    paired_bootstrap,
    validate_probs_labels,
    weighted_metrics,
)
from liverfusion.metrics.bootstrap import _resample_weights


def _prediction_set(n: int, k: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    logits = rng.normal(size=(n, k)) * 1.5
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2) + 1e-9  # ties, as in real low-precision exports
    return probs / probs.sum(axis=1, keepdims=True), labels


@pytest.mark.parametrize("k", [2, 3, 7])
def test_weighted_metrics_at_unit_weights_equal_classification_metrics(k):
    probs, labels = _prediction_set(300, k, seed=k)
    names = [f"c{i}" for i in range(k)]
    report = classification_metrics(probs, labels, names, threshold=0.4)
    p, y = validate_probs_labels(probs, labels)
    batched = weighted_metrics(p, y, torch.ones(1, len(y), dtype=torch.float64), names, threshold=0.4)
    assert set(batched) == set(report)
    for key, value in report.items():
        assert batched[key][0].item() == pytest.approx(value, abs=1e-6), key


def test_weighted_metrics_equal_metrics_of_the_repeated_cases():
    """Integer weights mean multiplicities: same numbers as the explicitly resampled set."""
    probs, labels = _prediction_set(80, 4, seed=20)
    names = list("abcd")
    rng = np.random.default_rng(21)
    counts = rng.multinomial(80, np.full(80, 1 / 80), size=3)
    p, y = validate_probs_labels(probs, labels)
    batched = weighted_metrics(p, y, torch.tensor(counts, dtype=torch.float64), names)
    for b in range(3):
        idx = np.repeat(np.arange(80), counts[b])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            expected = classification_metrics(probs[idx], labels[idx], names)
        for key, value in expected.items():
            got = batched[key][b].item()
            if np.isnan(value):
                assert np.isnan(got), key
            else:
                assert got == pytest.approx(value, abs=1e-6), key


def test_weighted_auroc_matches_sklearn_sample_weight():
    probs, labels = _prediction_set(150, 2, seed=22)
    w = np.random.default_rng(23).uniform(0.1, 3.0, size=150)
    p, y = validate_probs_labels(probs, labels)
    batched = weighted_metrics(p, y, torch.tensor(w[None, :]), ["neg", "pos"])
    expected = skm.roc_auc_score(labels, probs[:, 1], sample_weight=w)
    assert batched["binary/auroc"][0].item() == pytest.approx(expected, abs=1e-10)


def test_intervals_contain_point_and_narrow_with_more_cases():
    small_p, small_y = _prediction_set(100, 3, seed=24)
    large_p, large_y = _prediction_set(1000, 3, seed=25)
    keys = ["accuracy", "balanced_accuracy", "macro_f1", "kappa", "lld_score", "auroc", "ece"]
    small = bootstrap_ci(small_p, small_y, keys, n_boot=500, seed=0)
    large = bootstrap_ci(large_p, large_y, keys, n_boot=500, seed=0)
    for key in keys:
        for ci in (small[key], large[key]):
            assert ci.low <= ci.point <= ci.high, key
            assert ci.low < ci.high, key
        assert (large[key].high - large[key].low) < 0.6 * (small[key].high - small[key].low), key


def test_accuracy_interval_matches_binomial_standard_error():
    """For accuracy the bootstrap SE is the binomial one, sqrt(a (1 - a) / n): a check on the resampling itself."""
    probs, labels = _prediction_set(400, 3, seed=26)
    ci = bootstrap_ci(probs, labels, "accuracy", n_boot=2000, seed=1)["accuracy"]
    a = ci.point
    se = np.sqrt(a * (1 - a) / 400)
    assert (ci.high - ci.low) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.1)


def test_seed_reproducible_and_default_reports_every_metric():
    probs, labels = _prediction_set(120, 3, seed=27)
    names = ["benign", "ICC", "HCC"]
    one = bootstrap_ci(probs, labels, n_boot=200, seed=5, class_names=names)
    two = bootstrap_ci(probs, labels, n_boot=200, seed=5, class_names=names)
    other = bootstrap_ci(probs, labels, n_boot=200, seed=6, class_names=names)
    assert one == two
    assert one["kappa"] != other["kappa"]
    assert set(one) == set(classification_metrics(probs, labels, names))
    assert "sensitivity/HCC" in one


def test_metric_function_path_matches_builtin_path():
    probs, labels = _prediction_set(150, 3, seed=28)

    def accuracy(p: np.ndarray, y: np.ndarray) -> float:
        return float(skm.accuracy_score(y, p.argmax(axis=1)))

    custom = bootstrap_ci(probs, labels, accuracy, n_boot=300, seed=3)["accuracy"]
    builtin = bootstrap_ci(probs, labels, "accuracy", n_boot=300, seed=3)["accuracy"]
    assert custom == pytest.approx(builtin, abs=1e-6)


def test_grouped_resampling_draws_whole_groups():
    groups = np.repeat([f"MR{i:06d}" for i in range(30)], np.arange(30) % 4 + 1)
    rng = np.random.default_rng(0)
    weights = _resample_weights(len(groups), 200, rng, groups)
    sizes = {g: int((groups == g).sum()) for g in np.unique(groups)}
    for row in weights:
        for g in sizes:
            assert len(np.unique(row[groups == g])) == 1  # all lesions of a patient share a multiplicity
        drawn = sum(row[groups == g][0] for g in sizes)
        assert drawn == 30  # 30 patients drawn with replacement
    with pytest.raises(DataError, match="one entry per case"):
        _resample_weights(len(groups), 10, rng, groups[:-1])


def test_grouped_interval_is_wider_for_clustered_cases():
    """Five identical lesions per patient carry the information of one: the grouped CI must be about sqrt(5) wider."""
    probs, labels = _prediction_set(80, 3, seed=29)
    probs5, labels5 = np.repeat(probs, 5, axis=0), np.repeat(labels, 5)
    groups = np.repeat(np.arange(80), 5)
    naive = bootstrap_ci(probs5, labels5, "accuracy", n_boot=1000, seed=0)["accuracy"]
    grouped = bootstrap_ci(probs5, labels5, "accuracy", n_boot=1000, seed=0, groups=groups)["accuracy"]
    ratio = (grouped.high - grouped.low) / (naive.high - naive.low)
    assert ratio == pytest.approx(np.sqrt(5), rel=0.2)


def test_paired_bootstrap_of_model_against_itself_is_zero():
    probs, labels = _prediction_set(200, 3, seed=30)
    out = paired_bootstrap(probs, probs.copy(), labels, "lld_score", n_boot=300, seed=0)
    assert out["delta"] == 0.0 and out["low"] == 0.0 and out["high"] == 0.0
    assert out["p_value"] == 1.0


def test_paired_bootstrap_detects_better_model_and_groups_work():
    probs_good, labels = _prediction_set(300, 3, seed=31, signal=2.5)
    rng = np.random.default_rng(32)
    noisy = probs_good + rng.uniform(0, 0.8, probs_good.shape)
    probs_poor = noisy / noisy.sum(axis=1, keepdims=True)
    for groups in (None, np.arange(300) // 3):
        out = paired_bootstrap(probs_good, probs_poor, labels, "auroc", n_boot=1000, seed=0, groups=groups)
        assert out["delta"] > 0
        assert out["low"] > 0
        assert out["p_value"] < 0.01
        assert out["delta"] == pytest.approx(out["metric_a"] - out["metric_b"])


def test_undefined_resamples_warn_and_unknown_metric_raises():
    probs, labels = _prediction_set(60, 3, seed=33)
    labels[3:] = np.where(
        labels[3:] == 2, 0, labels[3:]
    )  # class 2 has a single case: often absent in resamples
    with pytest.warns(UndefinedMetricWarning, match="auroc/2"):
        ci = bootstrap_ci(probs, labels, ["auroc", "auroc/2"], n_boot=200, seed=0)
    assert np.isfinite(ci["auroc/2"].low)
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci(probs, labels, "f1", n_boot=10)


def test_thousand_resamples_of_five_hundred_cases_are_fast():
    probs, labels = _prediction_set(500, 7, seed=34)
    start = time.perf_counter()
    cis = bootstrap_ci(probs, labels, n_boot=1000, seed=0, groups=np.arange(500) // 2)
    elapsed = time.perf_counter() - start
    assert len(cis) == 5 + 1 + 1 + 3 * 7
    assert elapsed < 5.0
