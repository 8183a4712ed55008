"""The benchmark scripts' shared library (benchmarks/common.py) and their arm and protocol YAML files: every file
loads, the arms moved out of Python are exactly the lists the scripts built before (same names, order and
overrides, so cached runs and committed results stay valid), no script imports another one, and each script runs
both as ``python benchmarks/<script>.py`` and imported as ``benchmarks.<script>``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, fusion_phantom, fusion_tuning, label_efficiency, lgg_cv, run_all, ssl_value

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
YAML_FILES = sorted(p.relative_to(BENCHMARKS) for p in BENCHMARKS.glob("*/*.yaml"))
ARMS_FILES = [p for p in YAML_FILES if p.name == "arms.yaml"]
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "common"))
W = Path("/W")  # a work folder (nothing is written there)
QUIET = [
    "logger=csv",
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "+trainer.enable_progress_bar=false",
]

# ---- the arms as the scripts built them in Python before they moved to YAML ------------------------------------
ENC = "/W/pretrain/mda/fold{fold}/checkpoints/encoder.pt"
_PROBE = ["+experiment=cgc_demo", "model.init=pretrained", f"model.pretrained.path={ENC}"]
_FINETUNE = [
    "+experiment=cgc_finetune",
    "model.init=pretrained",
    f"model.pretrained.path={ENC}",
    "callbacks.step_checkpoint=null",
]
_SCRATCH = [
    "+experiment=cgc_finetune",
    "model.init=scratch",
    "model.finetune.encoder_lr_scale=1.0",
    "callbacks.step_checkpoint=null",
]
FUSION_PHANTOM_ARMS = {
    "cgc_probe": _PROBE,
    "late_concat_probe": [*_PROBE, "fusion@model.fusion=late_concat"],
    "late_mean_probe": [*_PROBE, "fusion@model.fusion=late_mean"],
    "single_T2WI_probe": [*_PROBE, "fusion@model.fusion=single", "model.fusion.modality=0"],
    "single_DWI_probe": [*_PROBE, "fusion@model.fusion=single", "model.fusion.modality=1"],
    "single_InPhase_probe": [*_PROBE, "fusion@model.fusion=single", "model.fusion.modality=2"],
    "single_OutPhase_probe": [*_PROBE, "fusion@model.fusion=single", "model.fusion.modality=3"],
    "single_C-pre_probe": [*_PROBE, "fusion@model.fusion=single", "model.fusion.modality=4"],
    "single_CA_probe": [*_PROBE, "fusion@model.fusion=single", "model.fusion.modality=5"],
    "single_CV_probe": [*_PROBE, "fusion@model.fusion=single", "model.fusion.modality=6"],
    "single_CDelay_probe": [*_PROBE, "fusion@model.fusion=single", "model.fusion.modality=7"],
    "cgc_finetune": _FINETUNE,
    "cgc_finetune_enc01": [*_FINETUNE, "model.finetune.encoder_lr_scale=0.1"],
    "cgc_finetune_seed1": [*_FINETUNE, "seed=1"],
    "cgc_finetune_seed2": [*_FINETUNE, "seed=2"],
    "cgc_scratch": _SCRATCH,
    "early_scratch": [*_SCRATCH, "fusion@model.fusion=early"],
}
_SAME = "/W/pretrain/same/fold{fold}/checkpoints/encoder.pt"
_TUNE = ["+experiment=cgc_finetune", "callbacks.step_checkpoint=null"]
LABEL_EFFICIENCY_ARMS = {
    "mda_probe": ["+experiment=cgc_demo", "model.init=pretrained", f"model.pretrained.path={ENC}"],
    "same_probe": ["+experiment=cgc_demo", "model.init=pretrained", f"model.pretrained.path={_SAME}"],
    "mda_finetune": [*_TUNE, "model.init=pretrained", f"model.pretrained.path={ENC}"],
    "same_finetune": [*_TUNE, "model.init=pretrained", f"model.pretrained.path={_SAME}"],
    "scratch": [*_TUNE, "model.init=scratch", "model.finetune.encoder_lr_scale=1.0"],
}
LABEL_EFFICIENCY_REUSE = {"mda_probe": "cgc_probe", "mda_finetune": "cgc_finetune", "scratch": "cgc_scratch"}
_LGG_BASE = ["data=lgg", "paths.cache_dir=/W/cache", *QUIET]
_LGG_ENC = "/W/pretrain/mda/fold{fold}/checkpoints/encoder.pt"
_LGG_HYBRID = "/W/pretrain/hybrid/fold{fold}/checkpoints/encoder.pt"
_LGG = [
    "+experiment=cgc_finetune",
    "callbacks.step_checkpoint=null",
    "callbacks.model_checkpoint.monitor=val/auroc",
    *_LGG_BASE,
]
_LGG_SCRATCH = [*_LGG, "model.init=scratch", "model.finetune.encoder_lr_scale=1.0"]
_LGG_PRETRAINED = [*_LGG, "model.init=pretrained", f"model.pretrained.path={_LGG_ENC}"]
LGG_ARMS = {
    "early_scratch": [*_LGG_SCRATCH, "fusion@model.fusion=early"],
    "cgc_scratch": _LGG_SCRATCH,
    "cgc_pretrained": [*_LGG_PRETRAINED, "model.finetune.encoder_lr_scale=0.1"],
    "cgc_pretrained_enc10": _LGG_PRETRAINED,
    "cgc_probe": [
        "+experiment=cgc_demo",
        "callbacks.step_checkpoint=null",
        "callbacks.model_checkpoint.monitor=val/auroc",
        *_LGG_BASE,
        "model.init=pretrained",
        f"model.pretrained.path={_LGG_ENC}",
    ],
    "hybrid_finetune": [*_LGG, "model.init=pretrained", f"model.pretrained.path={_LGG_HYBRID}"],
    "hybrid_probe": [
        "+experiment=cgc_demo",
        "callbacks.step_checkpoint=null",
        "callbacks.model_checkpoint.monitor=val/auroc",
        *_LGG_BASE,
        "model.init=pretrained",
        f"model.pretrained.path={_LGG_HYBRID}",
    ],
}
_EMA = [
    "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
    "+callbacks.ema.decay=0.99",
]
_LS40 = ["model.loss.label_smoothing=0.1", "trainer.max_epochs=40"]
_ENC01 = "model.finetune.encoder_lr_scale=0.1"
_AFFINE = (
    "data.train_transform=[{_target_:monai.transforms.RandFlip,prob:0.5,spatial_axis:1},"
    "{_target_:monai.transforms.RandFlip,prob:0.5,spatial_axis:2},"
    "{_target_:monai.transforms.RandAffine,prob:0.8,rotate_range:[0.26,0.0,0.0],scale_range:[0.1,0.1,0.1],"
    "translate_range:[1,4,4],padding_mode:zeros}]"
)
FUSION_TUNING_VARIANTS = {
    "enc01": [_ENC01],
    "ema_ls": [_ENC01, *_EMA, *_LS40],
    "ema_ls_enc03": [*_EMA, *_LS40, "model.finetune.encoder_lr_scale=0.3"],
    "enc10": ["model.finetune.encoder_lr_scale=1.0"],
    "ema_ls_enc10": [*_EMA, *_LS40],
    "ema998_ls_enc10": [_EMA[0], "+callbacks.ema.decay=0.998", *_LS40],
    "md0": ["model.modality_dropout.p=0.0"],
    "cw": ["model.loss.class_weighted=true"],
    "cw_ema_ls": ["model.loss.class_weighted=true", *_EMA, *_LS40],
    "lr3e4": ["model.optimizer.lr=3.0e-4", "trainer.max_epochs=40"],
    "enc10_seed1": ["seed=1"],
    "enc10_seed2": ["seed=2"],
    "aug": [_AFFINE],
    "aug_seed1": [_AFFINE, "seed=1"],
    "aug_e60": [_AFFINE, "trainer.max_epochs=60"],
    "median": ["data.preprocess.normalize=median"],
}


# ---- the YAML files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", YAML_FILES, ids=str)
def test_every_yaml_file_loads_as_a_mapping(path):
    data = common.load_yaml(path.parent.name, path.stem)
    assert isinstance(data, dict) and data, path


@pytest.mark.parametrize("path", ARMS_FILES, ids=str)
def test_every_arm_has_a_kind_and_overrides_that_match_it(path):
    for name, spec in common.load_yaml(path.parent.name, "arms").items():
        overrides = spec["overrides"]
        assert isinstance(overrides, list) and all(isinstance(o, str) for o in overrides), name
        assert spec["kind"] in ("scratch", "pretrained"), name
        assert f"model.init={spec['kind']}" in overrides, (
            f"{path}: {name} is {spec['kind']} but not its model.init"
        )


def test_fusion_phantom_arms_are_the_former_python_table():
    arms = fusion_phantom.arms(ENC)
    assert arms == FUSION_PHANTOM_ARMS
    assert list(arms) == list(FUSION_PHANTOM_ARMS)  # the order of the runs and of the results table


def test_label_efficiency_arms_and_reused_runs_are_the_former_python_table():
    arms = label_efficiency.arms(W)
    assert arms == LABEL_EFFICIENCY_ARMS and list(arms) == list(LABEL_EFFICIENCY_ARMS)
    assert label_efficiency.REUSE == LABEL_EFFICIENCY_REUSE
    assert set(label_efficiency.REUSE.values()) <= set(FUSION_PHANTOM_ARMS)  # runs fusion_phantom.py makes


def test_lgg_cv_arms_and_protocol_are_the_former_python_ones():
    arms = lgg_cv.arms(W)
    assert arms == LGG_ARMS and list(arms) == list(LGG_ARMS)
    assert lgg_cv.base(W) == _LGG_BASE
    assert lgg_cv.PRETRAINED_ARMS == (
        "cgc_pretrained",
        "cgc_pretrained_enc10",
        "cgc_probe",
        "hybrid_finetune",
        "hybrid_probe",
    )
    assert lgg_cv.RECIPES == {
        "mda": ["+experiment=simsiam_pretrain"],
        "hybrid": ["+experiment=hybrid_pretrain"],
    }
    assert lgg_cv.FOLDS == (0, 1, 2, 3, 4)
    assert lgg_cv.PRETRAIN == [
        "data.batch_size=16",
        "trainer.max_epochs=150",
        "trainer.check_val_every_n_epoch=50",
    ]


def test_lgg_cv_pretrains_only_the_recipes_an_unfinished_arm_needs(tmp_path, monkeypatch):
    assert lgg_cv.pending_recipes(tmp_path) == ["mda", "hybrid"]
    assert lgg_cv.pending_recipes(tmp_path, only=["cgc_scratch"]) == []
    for fold in lgg_cv.FOLDS:  # every mda arm finished: only hybrid is still needed
        for arm in ("cgc_pretrained", "cgc_pretrained_enc10", "cgc_probe"):
            summary = tmp_path / "runs" / arm / f"fold{fold}" / "test" / "summary.json"
            summary.parent.mkdir(parents=True)
            summary.write_text("{}")
    assert lgg_cv.pending_recipes(tmp_path) == ["hybrid"]
    monkeypatch.setitem(lgg_cv.ARMS, "hybrid_probe", {**lgg_cv.ARMS["hybrid_probe"], "recipe": "byol"})
    with pytest.raises(ValueError, match=r"hybrid_probe.*'byol'.*\['hybrid', 'mda'\]"):
        lgg_cv.arms(W)


def test_lgg_cv_refuses_an_unknown_arm(capsys):
    with pytest.raises(SystemExit):
        lgg_cv.main(["--only", "cgc_sratch"])
    assert "unknown arm(s) ['cgc_sratch']" in capsys.readouterr().err


def test_fusion_tuning_variants_are_the_former_python_table_on_the_benchmark_arm():
    assert fusion_tuning.VARIANTS == FUSION_TUNING_VARIANTS
    assert list(fusion_tuning.VARIANTS) == list(FUSION_TUNING_VARIANTS)
    assert fusion_tuning.finetune_arm(Path("/e.pt")) == [o.replace(ENC, "/e.pt") for o in _FINETUNE]


def test_ssl_value_reads_its_protocol_through_common():
    arms, recipes = common.load_yaml("ssl_value", "arms"), common.load_yaml("ssl_value", "recipes")
    table = ssl_value.arm_table(arms, recipes, {"mda": Path("/e.pt")})
    assert table["mda_probe"] == (
        "mda",
        "probe",
        ["+experiment=cgc_demo", "model.init=pretrained", "model.pretrained.path=/e.pt"],
    )
    assert table["scratch_cgc"][0] is None and "{encoder}" not in " ".join(table["scratch_cgc"][2])


def test_phantom_base_overrides_are_unchanged():
    assert common.base_overrides(W) == [
        "paths.data_dir=/W/data",
        "paths.cache_dir=/W/cache",
        "data.layout.seed=4242",
        *QUIET,
    ]
    assert common.base_overrides(W, 7)[2] == "data.layout.seed=7"


# ---- common.py's pure helpers ---------------------------------------------------------------------------------
def test_fill_replaces_strings_splices_lists_and_keeps_unknown_placeholders():
    overrides = ["a={encoder}", "{base}", "b=fold{fold}", "c"]
    assert common.fill(overrides, encoder="/e/fold{fold}.pt", base=["x=1", "y=2"]) == [
        "a=/e/fold{fold}.pt",
        "x=1",
        "y=2",
        "b=fold{fold}",
        "c",
    ]
    assert common.fill(["{base}", "{encoder}"], base=[], encoder="/e") == [
        "/e"
    ]  # an empty list splices nothing
    assert common.fill(["p={fold}"], fold="2") == ["p=2"]
    assert common.fill(["{x}"]) == ["{x}"]


def test_results_files_round_trip(tmp_path):
    path = tmp_path / "new" / "r.json"
    assert common.read_json(path) == {} and common.read_json(path, {"runs": {}}) == {"runs": {}}
    common.write_results(path, {"b": 1, "a": [1.5]}, "# table\n")
    assert common.read_json(path) == {"b": 1, "a": [1.5]}
    assert path.with_suffix(".md").read_text() == "# table\n"
    common.write_json(path, {"b": 1, "a": 2}, sort_keys=True)
    assert path.read_text() == json.dumps({"a": 2, "b": 1}, indent=1)


# ---- how the scripts import -----------------------------------------------------------------------------------
def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            if node.module == "benchmarks":
                names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_imports_another_script(script):
    imported = _imported_modules(BENCHMARKS / f"{script}.py")
    assert not imported & (set(SCRIPTS) - {script}), f"{script}.py imports {imported & set(SCRIPTS)}"


def test_the_package_and_the_scripts_share_one_common_module():
    assert fusion_phantom.common is common and ssl_value.common is common
    assert getattr(sys.modules.get("common"), "__file__", None) != common.__file__  # no second copy


def test_run_all_runs_scripts_not_the_library():
    names = [p.stem for p in run_all.scripts([])]
    assert "fusion_phantom" in names and "common" not in names and "__init__" not in names
    assert [p.stem for p in run_all.scripts(["lgg_cv", "nothing"])] == ["lgg_cv"]


@pytest.mark.parametrize(
    "script", ["fusion_phantom", "label_efficiency", "lgg_cv", "fusion_tuning", "ssl_value"]
)
def test_a_script_run_by_path_finds_common_beside_it(script, tmp_path):
    """``python benchmarks/<script>.py --help`` from another directory (only the script's folder on sys.path)."""
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {script}.py")


def test_archive_keeps_finished_runs_without_checkpoints_and_restore_fills_only_gaps(tmp_path):
    """A finished run keeps its results, configs and encoder file; its checkpoints, features and per-case copies
    stay behind; an unfinished run is not kept; restoring copies what is missing and never overwrites."""
    work, dest, fresh = tmp_path / "work", tmp_path / "archive", tmp_path / "fresh"
    done = work / "runs" / "arm@labels10" / "fold0"
    files = {
        "seconds.txt": "1.0\n",
        "test/summary.json": "{}",
        "test/predictions.csv": "case,label\n",
        ".hydra/config.yaml": "a: 1\n",
        "test/submission.json": "[]",
        "test/features.npz": "x",
        "checkpoints/best.ckpt": "x",
        "checkpoints/encoder.pt": "weights",
    }
    for rel, text in files.items():
        (done / rel).parent.mkdir(parents=True, exist_ok=True)
        (done / rel).write_text(text)
    (work / "runs" / "arm@labels10" / "fold1" / "test").mkdir(parents=True)
    (work / "runs" / "arm@labels10" / "fold1" / "test" / "summary.json").write_text("{}")  # no seconds.txt
    (work / "diagnostics").mkdir()
    (work / "diagnostics" / "random_bn.json").write_text("{}")
    assert common.archive_runs(work, dest, ["runs"], loose=["diagnostics/*.json"]) == 6
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    prefix = "runs/arm@labels10/fold0/"
    assert kept == sorted(
        ["diagnostics/random_bn.json"]
        + [prefix + r for r in (".hydra/config.yaml", "checkpoints/encoder.pt", "seconds.txt")]
        + [prefix + r for r in ("test/predictions.csv", "test/summary.json")]
    )
    assert common.archive_runs(work, dest, ["runs"], loose=["diagnostics/*.json"]) == 0  # nothing new
    (fresh / prefix / "test").mkdir(parents=True)
    (fresh / prefix / "test" / "summary.json").write_text('{"newer": 1}')
    assert common.restore_runs(dest, fresh) == 5
    assert (fresh / prefix / "test" / "summary.json").read_text() == '{"newer": 1}'
    assert (fresh / prefix / "checkpoints" / "encoder.pt").read_text() == "weights"
    assert common.restore_runs(tmp_path / "absent", fresh) == 0


def test_first_step_sums_import_self_time_per_top_level_package():
    from benchmarks import first_step

    log = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:      1500 |       1500 |     torch._C",
            "import time:      2500 |       4000 |   torch",
            "import time:       250 |        250 | hydra.core",
            "import time:      1000 |       1000 | lightning",
            "not an import line",
        ]
    )
    rows = first_step.import_breakdown(log)
    assert rows == [
        {"package": "torch", "self_s": 0.004},
        {"package": "lightning", "self_s": 0.001},
        {"package": "hydra", "self_s": 0.0},
    ]
    res = {
        "trees": {"before": "/a", "after": "/b"},
        "arms": {
            "x": {
                t: {"first_step": {"median": m, "min": m, "max": m}}
                for t, m in (("before", 4.0), ("after", 3.0))
            }
        },
    }
    assert "| x | 4.00 (4.00-4.00) | 3.00 (3.00-3.00) | 0.75 |" in first_step.markdown(res)


def test_first_step_probe_reports_the_first_optimiser_step(tmp_path):
    """The probe's hook fires on the first step of any torch optimiser and only once."""
    from benchmarks import first_step

    script = first_step.PROBE.replace(
        "runpy.run_module('liverfusion.train', run_name='__main__', alter_sys=True)",
        "import torch\np = torch.nn.Parameter(torch.ones(1))\nopt = torch.optim.SGD([p], lr=0.1)\n"
        "for _ in range(3):\n    p.grad = torch.ones(1)\n    opt.step()\n",
    )
    env = first_step._env(Path(__file__).resolve().parents[1], __import__("time").time())
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    marks = first_step.MARK.findall(out.stderr)
    assert len(marks) == 1 and 0 < float(marks[0]) < 120


def test_loader_throughput_counts_the_memory_of_its_workers():
    """Proportional set size of this process and its children: a child holding 200 MB of anonymous memory adds
    about that much (the in-memory cache's cost is counted across the loader workers)."""
    from benchmarks import loader_throughput

    alone = loader_throughput._memory_of_tree()
    hold = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        with_child = loader_throughput._memory_of_tree()
    finally:
        child.kill()
        child.wait()
    assert alone["pss_anon_mb"] > 0
    assert 180 < with_child["pss_anon_mb"] - alone["pss_anon_mb"] < 260


def test_gpu_throughput_composes_every_setting_of_its_yaml_on_cpu(tmp_path):
    """Every setting of gpu_throughput/settings.yaml composes with the train config (a typo in an override fails
    here, not in the one short slot on a GPU); fine-tuning settings drop the SSL head sizes of --tiny."""
    from benchmarks import gpu_throughput

    assert gpu_throughput.SETTINGS and gpu_throughput.TINY
    quick = [n for n, s in gpu_throughput.SETTINGS.items() if s.get("quick")]
    assert "pretrain_bf16" in quick and "finetune_cgc_bf16" in quick
    args = gpu_throughput.parse_args(["--device", "cpu", "--tiny", "--workdir", str(tmp_path)])
    for name, spec in gpu_throughput.SETTINGS.items():
        assert spec["kind"] in ("pretrain", "finetune") and spec["precision"] in ("32-true", "bf16-mixed"), (
            name
        )
        cfg = gpu_throughput.compose(args, spec)
        assert cfg.trainer.precision == spec["precision"], name
        assert list(cfg.data.preprocess.shape) == [8, 32, 32], name
        assert ("projector" in cfg.model) == (spec["kind"] == "pretrain"), name


def test_gpu_throughput_tiny_run_on_cpu_writes_every_field_the_issue_names(tmp_path):
    """The one-command GPU run, at --tiny size on CPU: the JSON carries device, torch, cuda and per setting name,
    samples_per_s, data_wait_fraction, mfu and lightning_over_plain; a second run resumes (nothing redone)."""
    cmd = [
        sys.executable,
        str(BENCHMARKS / "gpu_throughput.py"),
        "--device",
        "cpu",
        "--tiny",
        "--workdir",
        str(tmp_path),
        "--settings",
        "pretrain_bf16_device_augment",
        "finetune_cgc_bf16",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    payload = json.loads((tmp_path / "tiny.json").read_text())
    assert {"device", "torch", "cuda"} <= set(payload) and payload["device"] == "cpu"
    rows = {r["name"]: r for r in payload["settings"]}
    assert set(rows) == {"pretrain_bf16_device_augment", "finetune_cgc_bf16"}
    for row in rows.values():
        assert row["samples_per_s"] > 0 and 0 <= row["data_wait_fraction"] < 1
        assert row["mfu"] is None or row["mfu"] >= 0
        assert 0.2 < row["lightning_over_plain"] < 5
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "done (delete its entry" in again.stdout
