"""``liverfusion.report`` on a fake multirun folder: grouping into arms, mean +- std, pooling, comparisons, files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from liverfusion.evaluate import PredictionSet, predictions_csv
from liverfusion.metrics import classification_metrics
from liverfusion.report import find_runs, group_runs, main, make_report, pooled_predictions

CLASSES = ["benign", "malignant"]


def fake_run(path, fold, init, cases, skill, seed, overrides=True):
    """A finished classifier run: test/summary.json, predictions.csv, features.npz and Hydra's overrides."""
    rng = np.random.default_rng(seed)
    n = len(cases)
    labels = np.array([int(c[-1]) % 2 for c in cases])
    p1 = np.clip(0.5 + skill * (2 * labels - 1) + rng.normal(0, 0.25, n), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], 1)
    preds = PredictionSet(list(cases), list(cases), probs, labels, CLASSES)
    (path / "test").mkdir(parents=True)
    (path / "test" / "predictions.csv").write_text(predictions_csv(preds))
    metrics = classification_metrics(probs, labels, CLASSES)
    summary = {
        "fold": fold,
        "init": init,
        "fusion": "cgc",
        "finetune_mode": "full",
        "class_names": CLASSES,
        "modalities": ["t1", "flair"],
        "metrics": metrics,
        "selection_metric": "val/macro_f1",
        "splits": {
            "test": {"cases": n, "patients": n, "unlabelled": 0, "per_class": {"benign": 6, "malignant": 6}}
        },
    }
    (path / "test" / "summary.json").write_text(json.dumps(summary))
    np.savez(
        path / "test" / "features.npz",
        case_ids=np.array(cases),
        labels=labels,
        features=rng.normal(size=(n, 4)),
        encoder_features=rng.normal(size=(n, 6)) + labels[:, None],
    )
    (path / "config_resolved.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"layout": {"name": "toy", "root": "/data/toy"}, "split": {"n_folds": 3}},
                "model": {"encoder": {"arch": "resnet10"}},
            }
        )
    )
    if overrides:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump(
                [
                    "+experiment=cgc_finetune",
                    f"model.init={init}",
                    f"data.fold={fold}",
                    f"model.pretrained.path=/pre/fold{fold}/encoder.pt",  # per-fold: a replicate, not an arm
                ]
            )
        )
    return metrics


@pytest.fixture
def multirun(tmp_path):
    """Nested CV: 3 folds x {pretrained, scratch}; fold k tests on its own (disjoint) 12 cases."""
    root = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    metrics = {}
    job = 0
    for init, skill in (("pretrained", 0.3), ("scratch", 0.1)):
        for fold in range(3):
            cases = [f"P{fold}{i:02d}_{i % 2}" for i in range(12)]
            metrics[(init, fold)] = fake_run(root / str(job), fold, init, cases, skill, seed=job)
            job += 1
    return root, metrics


def test_groups_by_varying_overrides_not_by_fold(multirun):
    root, _ = multirun
    arms = group_runs(find_runs(root), "")
    assert sorted(a.name for a in arms) == ["model.init=pretrained", "model.init=scratch"]
    assert all([r.fold for r in a.runs] == [0, 1, 2] for a in arms)


def test_report_tables_figures_and_card(multirun, tmp_path):
    root, metrics = multirun
    out = tmp_path / "report"
    res = make_report([root], out, n_boot=200, embedding="pca", metric="auroc")
    for name in (
        "results.md",
        "results.csv",
        "folds.csv",
        "comparisons.csv",
        "results.json",
        "model_card.md",
        "embedding.png",
        "confusion_model.init_pretrained.png",
        "roc_model.init_scratch.png",
        "per_fold_model.init_pretrained.png",
    ):
        assert (out / name).is_file(), name
    rows = {(r["arm"], r["metric"]): r for r in csv.DictReader((out / "results.csv").open())}
    for init in ("pretrained", "scratch"):
        vals = [metrics[(init, f)]["macro_f1"] for f in range(3)]
        row = rows[(f"model.init={init}", "macro_f1")]
        assert float(row["mean"]) == pytest.approx(np.mean(vals), abs=1e-5)
        assert float(row["std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-5)
        assert int(row["n_runs"]) == 3
        assert float(row["pooled_low"]) <= float(row["pooled"]) <= float(row["pooled_high"])
    assert "binary/auroc" in {m for _, m in rows}
    cmp = res["comparisons"][0]
    assert cmp["n_cases"] == 36 and "delong_auroc_p" in cmp
    text = (out / "results.md").read_text()
    assert "out-of-fold (pooled)" in text and "± " in text
    card = (out / "model_card.md").read_text()
    assert "$metrics_table" not in card and "`toy`" in card and "binary/auroc" in card
    assert "| test | 12 | 12 | 0 | benign 6, malignant 6 |" in card


def test_shared_test_split_pools_as_fold_ensemble(tmp_path):
    cases = [f"C{i:02d}_{i % 2}" for i in range(10)]
    for fold in range(2):
        fake_run(tmp_path / "m" / str(fold), fold, "pretrained", cases, 0.2, seed=fold, overrides=False)
    (arm,) = group_runs(find_runs(tmp_path / "m"), "cgc")
    pooled, kind = pooled_predictions(arm)
    assert kind.startswith("fold ensemble") and len(pooled.case_ids) == 10
    a = arm.runs[0].predictions()
    b = arm.runs[1].predictions()
    assert np.allclose(pooled.probs, (a.probs + b.probs) / 2)


def test_cli_several_dirs_as_arms(multirun, tmp_path, capsys):
    root, _ = multirun
    code = main(
        [
            str(root / "0"),
            str(root / "3"),
            "--names",
            "pre",
            "scr",
            "--out",
            str(tmp_path / "r"),
            "--n-boot",
            "100",
            "--no-plots",
        ]
    )
    assert code == 0
    assert "pre" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # a user's problem: one line, exit status 2, nothing created
        main([str(tmp_path / "nothing-here")])
    assert refused.value.code == 2 and not (tmp_path / "nothing-here").exists()
