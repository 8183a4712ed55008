"""Frozen-feature SSL diagnostics: each metric on hand-made features whose answer is known, the no-leakage rules,
and the frozen-feature extraction (random, random_bn, encoder.pt) on a tiny data set."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from liverfusion.data.datamodule import ClassificationDataModule
from liverfusion.data.datasets import CaseDataset
from liverfusion.data.layouts import LLDMMRILayout
from liverfusion.errors import CheckpointError, ConfigError, DataError
from liverfusion.metrics.ssl_diagnostics import (
    FeatureSet,
    case_vectors,
    collapse_std,
    fit_linear_probe,
    knn_macro_f1,
    linear_probe_macro_f1,
    phase_id_accuracy,
    retrieval_top1,
    select_l2,
    ssl_diagnostics,
)
from liverfusion.models import build_encoder
from liverfusion.modules.encoder_file import ENCODER_FORMAT
from liverfusion.modules.frozen_features import (
    build_frozen_encoder,
    encode_cases,
    frozen_features,
    recalibrate_batchnorm,
)
from tests.helpers import PHASES, TINY_ENCODER, data_module, write_lld_like

N, M, D = 60, 8, 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def phase_coded(n: int = N, seed: int = 0, perm: list[int] | None = None) -> torch.Tensor:
    """Features = the phase's code + small noise, nothing of the case."""
    codes = torch.randn(M, D, generator=gen(100))
    if perm is not None:
        codes = codes[perm]
    return codes.unsqueeze(0) + 0.05 * torch.randn(n, M, D, generator=gen(seed))


def case_coded(n: int = N, seed: int = 0) -> torch.Tensor:
    """Features = one random vector per case, repeated in every phase: phase-invariant, case-specific."""
    return torch.randn(n, 1, D, generator=gen(seed)).expand(n, M, D).clone()


def feature_set(x: torch.Tensor, labels=None, prefix: str = "P", present=None) -> FeatureSet:
    n = x.shape[0]
    labels = torch.full((n,), -1) if labels is None else labels
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    return FeatureSet(x, torch.ones(n, M, dtype=torch.bool) if present is None else present, labels, ids, ids)


# ---- phase-ID probe ----


def test_phase_id_is_perfect_on_phase_coded_features():
    acc, _ = phase_id_accuracy(phase_coded(seed=0), None, phase_coded(seed=1), None)
    assert acc == 1.0


def test_phase_id_is_exactly_chance_when_phases_are_identical():
    # every phase of a case has the same feature, so every case gets one prediction for its M phases: 1 of M right
    acc, _ = phase_id_accuracy(case_coded(seed=0), None, case_coded(seed=1), None)
    assert acc == pytest.approx(1 / M)


def test_phase_id_near_chance_on_random_features():
    train = torch.randn(N, M, D, generator=gen(2))
    test = torch.randn(200, M, D, generator=gen(3))
    acc, _ = phase_id_accuracy(train, None, test, None)
    assert abs(acc - 1 / M) < 0.06


def test_phase_id_probe_is_fitted_on_the_training_cases_only():
    # held-out cases code the phases with swapped codes: a probe fitted on them would score 1.0, the one fitted on
    # the training cases gets every swapped phase wrong
    swapped = [1, 0, 3, 2, 5, 4, 7, 6]
    acc, _ = phase_id_accuracy(phase_coded(seed=0), None, phase_coded(seed=1, perm=swapped), None)
    assert acc == 0.0


def test_phase_id_ignores_missing_modalities():
    train, test = phase_coded(seed=0), phase_coded(seed=1)
    present = torch.ones(N, M, dtype=torch.bool)
    present[:, 3] = False
    test[:, 3] = 1e3 * torch.randn(N, D, generator=gen(9))  # garbage where the modality is missing
    acc, _ = phase_id_accuracy(train, None, test, present)
    assert acc == 1.0


# ---- retrieval ----


def test_retrieval_is_perfect_for_phase_invariant_case_features():
    assert retrieval_top1(case_coded(seed=0)) == 1.0


def test_retrieval_near_chance_for_phase_coded_or_random_features():
    assert retrieval_top1(phase_coded(seed=0)) < 0.1
    assert retrieval_top1(torch.randn(N, M, D, generator=gen(4))) < 0.1


def test_retrieval_counts_a_hit_on_the_group_and_skips_single_phase_cases():
    x = case_coded(n=4, seed=0)
    x[1] = x[0, 0]  # case 1 (a sibling lesion of one patient) looks exactly like case 0's first phase ...
    x[0, 1:] += 0.01 * torch.randn(M - 1, D, generator=gen(5))  # ... closer than case 0's own other phases
    present = torch.ones(4, M, dtype=torch.bool)
    present[3, 1:] = False  # a single-phase case: no query (it could not hit itself)
    per_case = retrieval_top1(x, present)
    per_patient = retrieval_top1(x, present, groups=["A", "A", "B", "C"])
    assert per_case < per_patient == 1.0


def test_retrieval_with_a_center_against_a_large_shared_component():
    base = torch.randn(N, 1, D, generator=gen(6)).expand(N, M, D)
    phase = 0.1 * torch.randn(1, M, D, generator=gen(7))
    x = 50.0 + base + phase  # a common component much larger than the case and the phase
    center = torch.nn.functional.normalize(x, dim=-1).mean(dim=(0, 1))
    assert retrieval_top1(x, center=center) == 1.0
    assert retrieval_top1(torch.randn(N, M, D, generator=gen(8)), center=center) < 0.1


# ---- collapse ----


def test_collapse_zero_for_constant_features_about_one_for_random():
    assert collapse_std(torch.ones(N, M, D)) == pytest.approx(0.0, abs=1e-6)
    assert collapse_std(torch.randn(500, M, 64, generator=gen(8))) == pytest.approx(1.0, abs=0.05)


# ---- class kNN and linear probe ----


def class_coded(n: int, seed: int, k: int = 4, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    means = 2 * torch.randn(k, M, D, generator=gen(50))
    y = torch.arange(n) % k
    return means[y] + noise * torch.randn(n, M, D, generator=gen(seed)), y


def test_knn_and_probe_perfect_on_class_coded_features_near_chance_on_random_labels():
    (xa, ya), (xb, yb) = class_coded(40, 0), class_coded(40, 1)
    assert knn_macro_f1(xa, None, ya, xb, None, yb, 4, k=5)["macro_f1"] == 1.0
    f1, _ = linear_probe_macro_f1(
        case_vectors(xa, normalise=False), ya, case_vectors(xb, normalise=False), yb, 4
    )
    assert f1 == 1.0
    noise_a, noise_b = torch.randn(200, M, D, generator=gen(2)), torch.randn(200, M, D, generator=gen(3))
    ra, rb = torch.randint(0, 4, (200,), generator=gen(4)), torch.randint(0, 4, (200,), generator=gen(5))
    assert knn_macro_f1(noise_a, None, ra, noise_b, None, rb, 4)["macro_f1"] < 0.4
    f1, _ = linear_probe_macro_f1(noise_a.flatten(1), ra, noise_b.flatten(1), rb, 4)
    assert f1 < 0.4


def test_probe_class_balancing_and_l2_selection_inside_the_training_data():
    x = torch.cat([torch.randn(90, 2, generator=gen(0)) + 1.0, torch.randn(10, 2, generator=gen(1)) - 1.0])
    y = torch.cat([torch.zeros(90), torch.ones(10)]).long()
    balanced = fit_linear_probe(x, y, 2, l2=1e-3, balanced=True).predict(x)
    plain = fit_linear_probe(x, y, 2, l2=1e-3, balanced=False).predict(x)
    assert (balanced == 1).sum() >= (plain == 1).sum()  # the minority class is predicted at least as often
    # an informative feature: a huge penalty (weights ~0, one class predicted) loses the grouped CV
    z = torch.randn(100, 5, generator=gen(2))
    groups = [i // 2 for i in range(100)]
    assert select_l2(z, (z[:, 0] > 0).long(), 2, grid=(1e-4, 1e3), groups=groups) == 1e-4
    assert select_l2(x, y, 2, grid=(0.5,)) == 0.5
    with pytest.raises(DataError, match="labels"):
        fit_linear_probe(x, y + 5, 2)


# ---- the combined record ----


def test_ssl_diagnostics_record_and_leakage_refusal():
    (xa, ya), (xb, yb) = class_coded(40, 0), class_coded(30, 1)
    train = feature_set(xa, ya, "T")
    test = feature_set(xb, yb, "H")
    out = ssl_diagnostics(train, test, num_classes=4, k=5)
    for key in (
        "knn_macro_f1",
        "linear_probe_macro_f1",
        "phase_id_accuracy",
        "retrieval_top1",
        "collapse_std",
    ):
        assert isinstance(out[key], float) and math.isfinite(out[key])
    assert out["knn_macro_f1"] == 1.0 and out["phase_id_chance"] == 1 / M
    assert out["n_train_labelled"] == 40 and out["n_test_cases"] == 30
    with pytest.raises(DataError, match="patient.*both"):
        ssl_diagnostics(train, feature_set(xb, yb, "T"), num_classes=4)
    with pytest.raises(DataError, match="labelled"):
        ssl_diagnostics(feature_set(xa, None, "T"), test, num_classes=4)
    with pytest.raises(DataError, match="shape"):
        FeatureSet(xa, torch.ones(40, M - 1, dtype=torch.bool), ya, list("a" * 40), list("a" * 40))


# ---- frozen features of a tiny data set ----

SHAPE = (6, 16, 16)


@pytest.fixture(scope="module")
def tiny_dm(tmp_path_factory) -> ClassificationDataModule:
    root = write_lld_like(tmp_path_factory.mktemp("ssl_diag") / "lld", n_patients=18, shape=SHAPE)
    layout = LLDMMRILayout(root, modalities=PHASES, class_names=["a", "b", "c"], name="tiny_diag")
    dm = data_module(
        ClassificationDataModule,
        layout,
        preprocess={"shape": list(SHAPE), "normalize": "percentile"},
        cache_dir=tmp_path_factory.mktemp("cache"),
        batch_size=4,
        num_workers=0,
        progress=False,
        split={"n_folds": 3, "test_fraction": 0.25, "seed": 0},
    )
    dm.setup("fit")
    return dm


def test_frozen_features_of_a_random_encoder(tiny_dm):
    feats, info = frozen_features(tiny_dm, "random", encoder_config=TINY_ENCODER, seed=3, batch_size=5)
    assert info["source"] == "random" and info["encoder_config"]["widths"] == [4, 8, 8, 8]
    for part in ("train", "val", "test"):
        entries = tiny_dm.part_entries(part)
        fs = feats[part]
        assert fs.features.shape == (len(entries), len(PHASES), 8) and bool(fs.present.all())
        assert fs.case_ids == [e.case_id for e in entries]
        assert fs.patient_ids == [e.patient_id for e in entries]
        assert fs.labels.tolist() == [e.label for e in entries]
    assert not set(feats["train"].patient_ids) & set(feats["test"].patient_ids + feats["val"].patient_ids)
    again, _ = frozen_features(tiny_dm, "random", encoder_config=TINY_ENCODER, seed=3, batch_size=1)
    other, _ = frozen_features(tiny_dm, "random", encoder_config=TINY_ENCODER, seed=4)
    # same seed, another batch size: equal (eval mode, BatchNorm uses its running statistics); another seed: not
    assert torch.allclose(again["val"].features, feats["val"].features, atol=1e-5)
    assert not torch.allclose(other["val"].features, feats["val"].features, atol=1e-3)
    out = ssl_diagnostics(
        feats["train"], FeatureSet.concat([feats["val"], feats["test"]]), tiny_dm.num_classes
    )
    assert 0.0 <= out["phase_id_accuracy"] <= 1.0 and out["n_modalities"] == len(PHASES)
    with pytest.raises(ConfigError, match="unknown split"):
        frozen_features(tiny_dm, "random", encoder_config=TINY_ENCODER, parts=("train", "holdout"))


def test_random_bn_sets_batchnorm_statistics_to_the_training_volumes(tiny_dm):
    encoder, _ = build_frozen_encoder("random", TINY_ENCODER, seed=0)
    train = CaseDataset(tiny_dm.part_entries("train"))
    volumes = torch.stack([train[i]["image"] for i in range(len(train))]).flatten(0, 1).unsqueeze(1)
    with torch.no_grad():
        stem = encoder.conv1(volumes)  # what bn1 normalises
    seen = recalibrate_batchnorm(encoder, DataLoader(train, batch_size=len(train)))
    assert seen == volumes.shape[0] and not encoder.training and encoder.bn1.momentum == 0.1
    assert torch.allclose(encoder.bn1.running_mean, stem.mean(dim=(0, 2, 3, 4)), atol=1e-4)
    feats, info = frozen_features(tiny_dm, "random_bn", encoder_config=TINY_ENCODER, seed=0, parts=("val",))
    assert info["bn_volumes"] == seen and info["bn_parts"] == ["train"]
    plain_feats, _ = frozen_features(tiny_dm, "random", encoder_config=TINY_ENCODER, seed=0, parts=("val",))
    assert not torch.allclose(feats["val"].features, plain_feats["val"].features, atol=1e-3)


def test_frozen_features_from_an_encoder_file(tiny_dm, tmp_path):
    torch.manual_seed(11)
    encoder = build_encoder(**TINY_ENCODER).eval()
    path = tmp_path / "encoder.pt"
    torch.save(
        {
            "format": ENCODER_FORMAT,
            "state_dict": encoder.state_dict(),
            "encoder_config": encoder.config(),
            "modalities": PHASES,
            "preprocess": tiny_dm.data_spec()["preprocess"],
        },
        path,
    )
    feats, info = frozen_features(tiny_dm, path, parts=("test",))
    assert info["source"] == "file" and info["kind"] == "encoder.pt"
    loader = DataLoader(CaseDataset(tiny_dm.part_entries("test")), batch_size=3)
    direct = encode_cases(encoder, loader)
    assert torch.allclose(feats["test"].features, direct.features, atol=1e-5)
    with pytest.raises(CheckpointError, match="no such encoder file"):
        frozen_features(tiny_dm, tmp_path / "missing.pt")
