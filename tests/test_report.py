"""``liverfusion.reporting`` and its CLI ``liverfusion.report`` on a fake multirun folder: grouping into arms,
mean +- std, pooling, comparisons, files; the package's place below the entry points."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from liverfusion.evaluate import PredictionSet, predictions_csv
from liverfusion.evaluation.calibration import write_calibration
from liverfusion.metrics import classification_metrics
from liverfusion.report import main
from liverfusion.reporting import find_runs, group_runs, make_report, neutral_card, pooled_predictions

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
    # a binary task lists its AUROC once; lld_score (the LLD-MMRI challenge's score) is not for these classes
    shown = {m for _, m in rows}
    assert "auroc" in shown and "binary/auroc" not in shown and "lld_score" not in shown
    cmp = res["comparisons"][0]
    assert cmp["n_cases"] == 36 and "delong_auroc_p" in cmp
    text = (out / "results.md").read_text()
    assert "out-of-fold (pooled)" in text and "± " in text and "lld_score" not in text
    card = (out / "model_card.md").read_text()
    assert "$metrics_table" not in card and "`toy`" in card and "| auroc |" in card and "DeLong [" in card
    assert "binary/auroc" not in card
    assert "| test | 12 | 12 | 0 | benign 6, malignant 6 |" in card
    # no liver-lesion wording for data that are not LLD-MMRI-like
    assert "lesion" not in card.lower() and "LLD-MMRI" not in card and "liver " not in card.lower()


def test_arms_are_named_after_the_experiment_never_runs(multirun, tmp_path):
    root, _ = multirun
    # one folder called runs, one arm: the experiment's name (not the folder's, not "runs")
    for job in range(6):
        sub = "pre" if job < 3 else "scr"
        (tmp_path / sub / "runs").mkdir(parents=True, exist_ok=True)
        (root / str(job)).rename(tmp_path / sub / "runs" / str(job))
    res = make_report([tmp_path / "pre" / "runs"], tmp_path / "r1", n_boot=50, plots=False)
    assert res["arms"] == ["cgc_finetune"]
    # two folders of one experiment: told apart by a folder name that says something; runs without overrides
    # or experiment: what they are (fusion-init-fine-tune mode)
    plain = tmp_path / "other" / "runs"
    for fold in range(2):
        cases = [f"Q{fold}{i:02d}_{i % 2}" for i in range(12)]
        fake_run(plain / str(fold), fold, "scratch", cases, 0.2, seed=fold, overrides=False)
    dirs = [tmp_path / "pre" / "runs", tmp_path / "scr" / "runs", plain]
    res = make_report(dirs, tmp_path / "r2", n_boot=50, plots=False)
    assert res["arms"] == ["cgc_finetune [1]", "cgc_finetune [2]", "cgc-scratch-full"]
    assert "comparison_metric" in json.loads((tmp_path / "r2" / "results.json").read_text())
    (tmp_path / "pre" / "runs").rename(tmp_path / "pre" / "pretrained")
    (tmp_path / "scr" / "runs").rename(tmp_path / "scr" / "scratch")
    res = make_report(
        [tmp_path / "pre" / "pretrained", tmp_path / "scr" / "scratch"], tmp_path / "r3", n_boot=50
    )
    assert res["arms"] == ["cgc_finetune [pretrained]", "cgc_finetune [scratch]"]
    # --names win
    dirs = [tmp_path / "pre" / "pretrained", tmp_path / "scr" / "scratch", plain]
    res = make_report(dirs, tmp_path / "r4", names=["A", "B", "C"], n_boot=50, plots=False)
    assert res["arms"] == ["A", "B", "C"]


def test_report_shows_the_stored_calibration(multirun, tmp_path):
    root, _ = multirun
    members = []
    for job in range(3):  # the pretrained arm's fold models
        ckpt = root / str(job) / "checkpoints" / "epoch=1.ckpt"
        ckpt.parent.mkdir()
        ckpt.write_bytes(f"weights {job}".encode())
        members.append(ckpt)
    arm = next(a for a in group_runs(find_runs(root), "") if "pretrained" in a.name)
    validation, _ = pooled_predictions(arm)
    write_calibration(root, members, 0.7, validation)
    res = make_report([root], tmp_path / "r", n_boot=50, embedding="none")
    cal = res["calibration"]
    assert list(cal) == ["model.init=pretrained"]  # the scratch arm's weights are not the fitted ones
    c = cal["model.init=pretrained"]
    assert c["temperature"] == pytest.approx(0.7) and c["before"]["ece"] != c["after"]["ece"]
    assert (tmp_path / "r" / c["figure"]).is_file()
    text = (tmp_path / "r" / "results.md").read_text()
    assert "## Calibration" in text and f"{c['after']['ece']:.3f}" in text and c["figure"] in text
    card = (tmp_path / "r" / "model_card.md").read_text()
    assert "## Calibration" in card and "Temperature 0.700" in card


def test_model_card_wording_neutral_for_other_data():
    text = (
        "- Task: classify each lesion (case) of a study.\n- Evaluated cases: $n_cases lesions of 3 patients.\n"
        "- Lesion crops are assumed to be centred on the lesion (the LLD-MMRI convention); the model does not detect\n"
        "  lesions.\n"
    )
    out = neutral_card(text)
    assert "lesion" not in out.lower() and "LLD-MMRI" not in out
    assert "classify each case of" in out and "$n_cases cases of" in out


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


def test_metrics_md_is_data_set_neutral(tmp_path):
    """``lld_score`` only for LLD-MMRI-style classes; a binary task's AUROC once (bootstrap and DeLong CI)."""
    from liverfusion.evaluation import shown_metrics, write_evaluation

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    p1 = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.25, 40), 0.01, 0.99)
    ids = [f"c{i}" for i in range(40)]
    write_evaluation(
        PredictionSet(ids, ids, np.stack([1 - p1, p1], 1), y, CLASSES), tmp_path / "b", n_boot=50
    )
    text = (tmp_path / "b" / "metrics.md").read_text()
    assert "lld_score" not in text and text.count("| auroc") == 1 and "DeLong [" in text
    assert "binary/auroc" not in text and "binary/sensitivity" in text and "per case" in text
    assert "lld_score" in json.loads((tmp_path / "b" / "metrics.json").read_text())  # the file keeps it all
    lld = ["hemangioma", "ICC", "abscess", "metastasis", "cyst", "FNH", "HCC"]
    assert "lld_score" in shown_metrics(["macro_f1", "lld_score", "auroc/ICC"], lld)
    assert shown_metrics(["macro_f1", "lld_score", "auroc/b"], ["a", "b", "c"]) == ["macro_f1", "auroc/b"]


ENTRY_POINTS = {
    "liverfusion.train",
    "liverfusion.evaluate",
    "liverfusion.predict",
    "liverfusion.report",
    "liverfusion.demo",
    "liverfusion.resume",
    "liverfusion.synth",
    "liverfusion.export",
    "liverfusion.help",
    "liverfusion.prepare.__main__",
}


def _imported(path) -> set[str]:
    """Every module a file imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_reporting_sits_below_the_entry_points():
    """reporting/ imports no command; the library packages below it (models, modules, data, ...) never import it."""
    from pathlib import Path

    import liverfusion

    root = Path(liverfusion.__file__).parent
    package = sorted((root / "reporting").glob("*.py"))
    assert {f.stem for f in package} >= {"runs", "tables", "build", "model_card"}
    for f in package:
        bad = _imported(f) & ENTRY_POINTS
        assert not bad, f"{f} imports {bad}"
    for lower in ("models", "modules", "data", "prepare", "evaluation", "metrics", "viz", "utils"):
        for f in sorted((root / lower).rglob("*.py")):
            bad = {m for m in _imported(f) if m.split(".")[:2] == ["liverfusion", "reporting"]}
            assert not bad, f"{f} imports {bad}"
    assert "liverfusion.reporting" in _imported(root / "report.py")
