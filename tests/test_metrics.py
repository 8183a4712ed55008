"""Classification metrics against sklearn and hand-computed values; DeLong against brute force and simulation."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats
from sklearn import metrics as skm

from liverfusion.errors import DataError
from liverfusion.metrics import (
    UndefinedMetricWarning,
    classification_metrics,
    confusion_matrix,
    delong_ci,
    delong_covariance,
    delong_test,
    make_metric_collection,
)

NAMES7 = ["hemangioma", "ICC", "abscess", "metastasis", "cyst", "FNH", "HCC"]


def _prediction_set(n: int, k: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities with some signal, rounded so that ties occur, and labels covering every class."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    logits = rng.normal(size=(n, k)) * 1.5
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2) + 1e-9
    return probs / probs.sum(axis=1, keepdims=True), labels


def _one_hot_probs(pred: np.ndarray, k: int, confidence: float) -> np.ndarray:
    probs = np.full((len(pred), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


# ---------------------------------------------------------------- classification_metrics


def test_perfect_predictor_scores_one_everywhere():
    labels = np.repeat(np.arange(7), 5)
    m = classification_metrics(_one_hot_probs(labels, 7, 0.9), labels, NAMES7)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "lld_score", "auroc"):
        assert m[key] == pytest.approx(1.0), key
    for c in NAMES7:
        assert m[f"sensitivity/{c}"] == pytest.approx(1.0)
        assert m[f"specificity/{c}"] == pytest.approx(1.0)
        assert m[f"auroc/{c}"] == pytest.approx(1.0)
    # Every case has confidence 0.9 and is right: the calibration gap is exactly 0.1.
    assert m["ece"] == pytest.approx(0.1, abs=1e-6)


def test_hand_computed_small_case():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(_one_hot_probs(pred, 3, 0.8), labels, ["a", "b", "c"])
    # Confusion rows [1,1,0], [0,2,0], [1,0,1]: po = 4/6, pe = (2*2 + 2*3 + 2*1) / 36 = 1/3 -> kappa 0.5.
    f1 = (0.5 + 0.8 + 2 / 3) / 3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(f1, abs=1e-6)
    assert m["kappa"] == pytest.approx(0.5, abs=1e-6)
    assert m["lld_score"] == pytest.approx((f1 + 0.5) / 2, abs=1e-6)
    assert m["sensitivity/b"] == pytest.approx(1.0)
    assert m["specificity/b"] == pytest.approx(3 / 4)
    np.testing.assert_array_equal(
        confusion_matrix(_one_hot_probs(pred, 3, 0.8), labels), [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    )


@pytest.mark.parametrize("k", [3, 7])
def test_against_sklearn(k):
    probs, labels = _prediction_set(400, k, seed=k)
    names = [f"c{i}" for i in range(k)]
    pred = probs.argmax(axis=1)
    m = classification_metrics(probs, labels, names)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-6)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"), abs=1e-6)
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(labels, pred), abs=1e-6)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-6)
    recall = skm.recall_score(labels, pred, average=None)
    cm = skm.confusion_matrix(labels, pred)
    for i, c in enumerate(names):
        assert m[f"sensitivity/{c}"] == pytest.approx(recall[i], abs=1e-6)
        tn = cm.sum() - cm[i].sum() - cm[:, i].sum() + cm[i, i]
        assert m[f"specificity/{c}"] == pytest.approx(tn / (cm.sum() - cm[i].sum()), abs=1e-6)
        assert m[f"auroc/{c}"] == pytest.approx(skm.roc_auc_score(labels == i, probs[:, i]), abs=1e-6)
    np.testing.assert_array_equal(confusion_matrix(probs, labels), cm)
    rows = confusion_matrix(probs, labels, normalize="true").sum(axis=1)
    np.testing.assert_allclose(rows, 1.0, atol=1e-6)
    assert "binary/auroc" not in m


def test_chance_predictor_has_kappa_near_zero():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 6000)
    probs = rng.dirichlet(np.ones(4), size=6000)
    m = classification_metrics(probs, labels, list("abcd"))
    assert abs(m["kappa"]) < 0.03
    assert abs(m["auroc"] - 0.5) < 0.03
    assert abs(m["balanced_accuracy"] - 0.25) < 0.03


def test_binary_task_threshold_metrics():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    p1 = np.clip(0.35 * labels + rng.uniform(0, 0.65, 300), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(probs, labels, ["benign", "malignant"], threshold=0.3)
    assert m["binary/auroc"] == pytest.approx(skm.roc_auc_score(labels, p1), abs=1e-6)
    assert m["binary/auroc"] == pytest.approx(m["auroc"], abs=1e-6)
    pred = (p1 > 0.3).astype(int)
    assert m["binary/sensitivity"] == pytest.approx(skm.recall_score(labels, pred), abs=1e-6)
    assert m["binary/specificity"] == pytest.approx(skm.recall_score(1 - labels, 1 - pred), abs=1e-6)
    # At 0.5 the threshold metrics coincide with the arg-max per-class ones.
    m5 = classification_metrics(probs, labels, ["benign", "malignant"], threshold=0.5)
    assert m5["binary/sensitivity"] == pytest.approx(m5["sensitivity/malignant"], abs=1e-6)
    assert m5["binary/specificity"] == pytest.approx(m5["sensitivity/benign"], abs=1e-6)


def test_ece_calibrated_small_overconfident_large():
    rng = np.random.default_rng(3)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(size=n) < conf  # right exactly as often as claimed
    labels = rng.integers(0, 2, n)
    pred = np.where(correct, labels, 1 - labels)
    probs = np.where(pred[:, None] == np.arange(2), conf[:, None], 1 - conf[:, None])
    calibrated = classification_metrics(probs, labels, ["a", "b"])["ece"]
    assert calibrated < 0.02
    # Claims 0.95, right 60 % of the time: ECE about 0.35.
    wrong = rng.uniform(size=n) > 0.6
    pred = np.where(wrong, 1 - labels, labels)
    over = classification_metrics(_one_hot_probs(pred, 2, 0.95), labels, ["a", "b"])
    assert over["ece"] == pytest.approx(0.95 - (1 - wrong.mean()), abs=1e-4)
    assert over["ece"] > 0.3
    fewer_bins = classification_metrics(probs, labels, ["a", "b"], n_bins=5)["ece"]
    assert fewer_bins < 0.02


def test_absent_class_gives_nan_and_macro_over_defined_classes():
    probs, labels = _prediction_set(300, 4, seed=4)
    keep = labels != 2
    probs, labels = probs[keep], labels[keep]
    with pytest.warns(UndefinedMetricWarning, match="AUROC"):
        m = classification_metrics(probs, labels, list("abcd"))
    assert np.isnan(m["auroc/c"]) and np.isnan(m["sensitivity/c"])
    assert np.isfinite(m["specificity/c"])
    defined = [skm.roc_auc_score(labels == i, probs[:, i]) for i in (0, 1, 3)]
    assert m["auroc"] == pytest.approx(np.mean(defined), abs=1e-6)
    # Balanced accuracy over the true classes only (sklearn), even though class c may be predicted.
    assert m["balanced_accuracy"] == pytest.approx(
        skm.recall_score(labels, probs.argmax(1), labels=[0, 1, 3], average="macro"), abs=1e-6
    )


def test_single_class_labels_do_not_crash():
    probs, _ = _prediction_set(30, 3, seed=5)
    labels = np.zeros(30, dtype=int)
    with pytest.warns(UndefinedMetricWarning):
        m = classification_metrics(probs, labels, list("abc"))
    assert np.isnan(m["auroc"])
    assert m["accuracy"] == pytest.approx((probs.argmax(1) == 0).mean(), abs=1e-6)
    assert m["balanced_accuracy"] == pytest.approx(m["sensitivity/a"])
    assert np.isnan(m["specificity/a"])


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "no cases"),
        (np.array([[2.0, -1.0, 0.5]]), np.array([0]), "softmax"),
        (np.array([[0.5, 0.5, 0.5]]), np.array([0]), "sum to 1"),
        (np.array([[0.5, 0.5, 0.0]]), np.array([-1]), r"\[0, 2\]"),
        (np.array([[0.5, 0.5, 0.0]]), np.array([0, 1]), "rows"),
        (np.array([[np.nan, 0.5, 0.5]]), np.array([0]), "NaN"),
    ],
)
def test_bad_input_raises_clear_error(probs, labels, match):
    with pytest.raises(DataError, match=match):
        classification_metrics(probs, labels, list("abc"))


def test_class_name_count_must_match():
    probs, labels = _prediction_set(20, 3, seed=6)
    with pytest.raises(DataError, match="class names"):
        classification_metrics(probs, labels, ["a", "b"])


# ---------------------------------------------------------------- MetricCollection


def test_metric_collection_matches_full_report_across_batches():
    probs, labels = _prediction_set(120, 4, seed=7)
    labels[labels == 3] = 0  # class 3 absent: torchmetrics' own macro AUROC would count it as 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        full = classification_metrics(probs, labels, list("abcd"))
    mc = make_metric_collection(4, prefix="val/")
    p, y = torch.tensor(probs, dtype=torch.float64), torch.tensor(labels)
    for chunk in range(0, 120, 50):
        mc.update(p[chunk : chunk + 50], y[chunk : chunk + 50])
    out = {k: float(v) for k, v in mc.compute().items()}
    assert set(out) == {
        f"val/{k}"
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "lld_score", "auroc", "ece")
    }
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "lld_score", "auroc", "ece"):
        assert out[f"val/{key}"] == pytest.approx(full[key], abs=1e-5), key
    test_mc = mc.clone(prefix="test/")
    test_mc.reset()
    test_mc.update(p, y)
    assert float(test_mc.compute()["test/accuracy"]) == pytest.approx(full["accuracy"], abs=1e-6)


def _ddp_worker(
    rank: int, world: int, init_file: str, out_file: str, probs: torch.Tensor, labels: torch.Tensor
):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mc = make_metric_collection(3)
        mc.update(probs[rank::world], labels[rank::world])
        result = {k: float(v) for k, v in mc.compute().items()}
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_metric_collection_syncs_across_ddp_processes():
    """Two gloo processes each see half of the cases; the synced result equals the single-process one."""
    probs, labels = _prediction_set(60, 3, seed=8)
    p, y = torch.tensor(probs, dtype=torch.float32), torch.tensor(labels)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        # fork: the children need no re-import of this module (spawn costs ~10 s of imports on 2 cores).
        mp.start_processes(
            _ddp_worker,
            args=(2, os.path.join(tmp, "init"), out, p, y),
            nprocs=2,
            join=True,
            start_method="fork",
        )
        synced = torch.load(out, weights_only=True)
    single = make_metric_collection(3)
    single.update(p, y)
    for key, value in single.compute().items():
        assert synced[key] == pytest.approx(float(value), abs=1e-6), key


# ---------------------------------------------------------------- DeLong


def _binormal(rng: np.random.Generator, m: int, n: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    labels = np.r_[np.ones(m, dtype=int), np.zeros(n, dtype=int)]
    return rng.normal(size=m + n) + shift * labels, labels


def test_delong_auc_equals_mann_whitney_and_sklearn():
    rng = np.random.default_rng(10)
    scores, labels = _binormal(rng, 40, 55)
    scores = np.round(scores, 1)  # ties
    ci = delong_ci(scores, labels)
    u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert ci.auc == pytest.approx(u / (40 * 55), abs=1e-12)
    assert ci.auc == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert ci.low < ci.auc < ci.high


def test_delong_covariance_equals_brute_force_structural_components():
    rng = np.random.default_rng(11)
    a, labels = _binormal(rng, 25, 30)
    b = np.round(a + rng.normal(size=a.shape), 1)
    auc, cov = delong_covariance(np.stack([a, b]), labels)

    def components(s):
        x, y = s[labels == 1], s[labels == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])  # O(m n) pair kernel
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = components(a), components(b)
    np.testing.assert_allclose(auc, [auc_a, auc_b], atol=1e-12)
    brute = np.cov(np.stack([v10_a, v10_b])) / 25 + np.cov(np.stack([v01_a, v01_b])) / 30
    np.testing.assert_allclose(cov, brute, rtol=1e-10, atol=1e-15)


def test_delong_variance_and_coverage_match_simulation():
    rng = np.random.default_rng(12)
    m, n, reps = 50, 70, 1500
    aucs, variances, diffs, diff_vars, covered = [], [], [], [], 0
    true_auc = stats.norm.cdf(1.0 / np.sqrt(2))
    for _ in range(reps):
        a, labels = _binormal(rng, m, n)
        b = a + rng.normal(size=a.shape) * 0.8  # correlated second model
        auc, cov = delong_covariance(np.stack([a, b]), labels)
        aucs.append(auc[0])
        variances.append(cov[0, 0])
        diffs.append(auc[0] - auc[1])
        diff_vars.append(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
        half = 1.959964 * np.sqrt(cov[0, 0])
        covered += abs(auc[0] - true_auc) <= half
    assert np.var(aucs, ddof=1) / np.mean(variances) == pytest.approx(1.0, abs=0.12)
    assert np.var(diffs, ddof=1) / np.mean(diff_vars) == pytest.approx(1.0, abs=0.12)
    assert 0.92 <= covered / reps <= 0.975


def test_delong_identical_and_rank_equivalent_scores_give_p_one():
    rng = np.random.default_rng(13)
    a, labels = _binormal(rng, 30, 30)
    same = delong_test(a, a.copy(), labels)
    assert same.z == 0.0 and same.p_value == 1.0 and same.auc_a == same.auc_b
    monotone = delong_test(a, np.exp(a), labels)
    assert monotone.p_value == pytest.approx(1.0)


def test_delong_detects_clearly_better_model():
    rng = np.random.default_rng(14)
    good, labels = _binormal(rng, 80, 80, shift=2.0)
    poor = good + rng.normal(size=good.shape) * 3.0
    result = delong_test(good, poor, labels)
    assert result.auc_a > result.auc_b
    assert result.z > 0
    assert result.p_value < 1e-3


def test_delong_null_rejection_rate_is_nominal():
    rng = np.random.default_rng(15)
    rejections = 0
    for _ in range(400):
        base, labels = _binormal(rng, 40, 40)
        a = base + rng.normal(size=base.shape)
        b = base + rng.normal(size=base.shape)  # same AUC in expectation
        rejections += delong_test(a, b, labels).p_value < 0.05
    assert 0.02 <= rejections / 400 <= 0.09


def test_delong_ci_narrows_with_more_cases():
    rng = np.random.default_rng(16)
    small = delong_ci(*_binormal(rng, 30, 30))
    large = delong_ci(*_binormal(rng, 300, 300))
    assert (large.high - large.low) < 0.5 * (small.high - small.low)


def test_delong_rejects_bad_labels():
    with pytest.raises(DataError, match="binary"):
        delong_ci(np.arange(6.0), np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(DataError, match="2 positives"):
        delong_ci(np.arange(6.0), np.array([0, 0, 0, 0, 0, 1]))
    with pytest.raises(DataError, match="two"):
        delong_test(np.arange(6.0), np.arange(5.0), np.array([0, 0, 0, 1, 1, 1]))
