"""The command line as users know it: console scripts and their --help (no torch imported), the late groups
(experiment, hparams_search, debug) with or without `+` and in any order, ./conf and LIVERFUSION_CONFIG_DIR on the
search path, and a quiet console (config summary, known warnings filtered, where the results are)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from liverfusion import help as cli_help
from liverfusion.errors import ConfigError
from liverfusion.utils.hydra_utils import CONFIG_DIR, normalize_overrides
from liverfusion.utils.search_path import default_groups, user_config_dirs
from tests.helpers import tiny_phantom_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": ""}
HEAVY = ("torch", "lightning", "monai", "hydra", "omegaconf")


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- console scripts and --help --------------------------------------------------------------------------------
def test_every_entry_point_has_a_console_script_through_the_help_shim():
    scripts = pyproject()["project"]["scripts"]
    want = {f"liverfusion-{name}": f"liverfusion.help:{name}" for name in cli_help.COMMANDS}
    assert scripts == want
    for name, cmd in cli_help.COMMANDS.items():
        assert callable(getattr(cli_help, name)), name
        module = cmd.module if name != "prepare" else "liverfusion.prepare.__main__"
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
        assert len(cmd.examples) == 3 and all(e.startswith(cmd.script) for e in cmd.examples), name


def test_help_of_every_script_imports_nothing_heavy_and_names_the_command(tmp_path):
    """One fresh interpreter answers every script's --help; torch, Lightning, MONAI (and Hydra) stay unimported."""
    code = (
        "import io, contextlib, json, sys\n"
        "from liverfusion import help as h\n"
        "pages = {}\n"
        "for name in h.COMMANDS:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        code = h.run(name, ['--help'])\n"
        "    pages[name] = [code, buf.getvalue()]\n"
        f"print(json.dumps({{'pages': pages, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    for name, (code, page) in result["pages"].items():
        cmd = cli_help.COMMANDS[name]
        assert code == 0, name
        assert cmd.script in page and f"python -m {cmd.module}" in page, name
        assert all(e in page for e in cmd.examples), name
    train = result["pages"]["train"][1]
    for group in ("experiment:", "data:", "debug:", "hparams_search:"):
        assert group in train
    assert "simsiam_pretrain" in train and "fast, limit, overfit, profiler" in train
    assert "rules:" in result["pages"]["prepare"][1] and "ckpt_path" in result["pages"]["evaluate"][1]
    assert "experiment:" not in result["pages"]["check"][1]  # only its own config groups


def test_installed_console_script_answers_help_without_torch(tmp_path):
    exe = Path(sys.executable).with_name("liverfusion-train")
    if not exe.is_file():
        pytest.skip("console scripts are not installed in this environment (pip install -e .)")
    out = subprocess.run(
        [str(exe), "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: liverfusion-train")


@pytest.mark.parametrize(
    "module",
    [
        "liverfusion.train",
        "liverfusion.evaluate",
        "liverfusion.predict",
        "liverfusion.export",
        "liverfusion.data.check",
        "liverfusion.prepare.__main__",
        "liverfusion.synth",
        "liverfusion.viz.pairs",
    ],
)
def test_python_m_help_is_the_same_page(module, monkeypatch, capsys):
    """`python -m <module> --help` (through hydra_cli) prints the command's page, not Hydra's generic one."""
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module, "+experiment=simsiam_pretrain", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        mod.main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    name = next(c for c in cli_help.COMMANDS.values() if c.module == module.removesuffix(".__main__"))
    assert out == cli_help.help_text(name.name)


def test_argparse_commands_share_the_help_parsers(capsys):
    from liverfusion import demo, resume

    for main, name in ((resume.main, "resume"), (demo.main, "demo")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out == cli_help.build_parser(name).format_help()


def test_wheel_install_gives_working_console_scripts(tmp_path):
    """Build the wheel, install it (no dependencies: they are this environment's) into a fresh virtual
    environment, and run every console script's --help from an empty folder."""
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(wheel_dir.glob("liverfusion-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300
    )
    py = venv / "bin" / "python"
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert inst.returncode == 0, inst.stderr
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import liverfusion, hydra_plugins.liverfusion_plugins as p; print(liverfusion.__file__, p.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.count(str(venv)) == 2, (
        where.stdout + where.stderr
    )  # the wheel's copy, not the repository's
    empty = tmp_path / "empty"
    empty.mkdir()
    for name, cmd in cli_help.COMMANDS.items():
        out = subprocess.run(
            [str(venv / "bin" / cmd.script), "--help"],
            cwd=empty,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, f"{cmd.script}: {out.stderr}"
        assert cmd.script in out.stdout, name


# ---- experiment / hparams_search / debug -----------------------------------------------------------------------
def test_normalize_overrides_takes_both_forms_in_a_fixed_order():
    assert default_groups("train") >= {"data", "model", "trainer"}
    assert not default_groups("train") & {"experiment", "debug", "hparams_search"}
    got = normalize_overrides(
        "train", ["debug=fast", "seed=1", "experiment=x", "+hparams_search=h", "data=lgg"]
    )
    assert got == ["+experiment=x", "seed=1", "+hparams_search=h", "+debug=fast", "data=lgg"]
    assert normalize_overrides("train", ["+experiment=x"]) == ["+experiment=x"]  # the front door, untouched
    # viz_pairs selects an experiment in its defaults (through train): there the `+` is dropped
    assert "experiment" in default_groups("viz_pairs")
    assert normalize_overrides("viz_pairs", ["debug=fast", "+experiment=y"]) == [
        "+debug=fast",
        "experiment=y",
    ]
    # keys inside a group, other groups, deletions and values are left alone
    same = ["experiment.x=1", "~debug", "data.layout.root=/a=b", "model=classifier"]
    assert normalize_overrides("train", same) == same


@pytest.mark.parametrize(
    "module,args",
    [
        ("liverfusion.train", ["+experiment=simsiam_pretrain_gpu", "debug=overfit"]),
        ("liverfusion.train", ["debug=overfit", "experiment=simsiam_pretrain_gpu"]),
        ("liverfusion.viz.pairs", ["+experiment=simsiam_pretrain_gpu", "debug=overfit"]),
        ("liverfusion.viz.pairs", ["debug=overfit", "experiment=simsiam_pretrain_gpu"]),
    ],
)
def test_cfg_job_shows_the_debug_epochs_for_train_and_pairs(module, args, monkeypatch, capsys):
    """`... +experiment=simsiam_pretrain_gpu debug=overfit --cfg job`: the preset's 20 epochs, not the experiment's
    200, for both entry points that take an experiment, in either form and order."""
    import importlib

    import yaml

    mod = importlib.import_module(module)
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [module, *args, "--cfg", "job"])
    mod.main()
    GlobalHydra.instance().clear()
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_epochs"] == 20 and cfg["trainer"]["overfit_batches"] == 3
    assert cfg["model"]["encoder"]["arch"] == "resnet18"  # the experiment is there too


# ---- the config search path ------------------------------------------------------------------------------------
def _compose(config: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides=normalize_overrides(config, overrides))


def test_conf_in_the_working_directory_is_searched_first(tmp_path, monkeypatch):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "mine.yaml").write_text("defaults:\n  - phantom\nbatch_size: 3\n")
    (tmp_path / "conf" / "data" / "lgg.yaml").write_text("defaults:\n  - phantom\neval_batch_size: 5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIVERFUSION_CONFIG_DIR", raising=False)
    assert user_config_dirs() == [(tmp_path / "conf").resolve()]
    assert _compose("check", ["data=mine"]).data.batch_size == 3
    # ahead of the package: ./conf/data/lgg.yaml replaces the packaged data=lgg
    assert _compose("train", ["+experiment=simsiam_pretrain", "data=lgg"]).data.eval_batch_size == 5
    assert "mine" in cli_help.help_text("check")  # --help lists the user's options too


def test_liverfusion_config_dir_is_searched_after_the_working_directory(tmp_path, monkeypatch):
    lab = tmp_path / "lab" / "conf"
    (lab / "data").mkdir(parents=True)
    (lab / "data" / "shared_set.yaml").write_text("defaults:\n  - phantom\nbatch_size: 7\n")
    (lab / "data" / "mine.yaml").write_text("defaults:\n  - phantom\nbatch_size: 8\n")
    work = tmp_path / "work"
    (work / "conf" / "data").mkdir(parents=True)
    (work / "conf" / "data" / "mine.yaml").write_text("defaults:\n  - phantom\nbatch_size: 9\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv("LIVERFUSION_CONFIG_DIR", str(lab))
    assert _compose("check", ["data=shared_set"]).data.batch_size == 7
    assert _compose("check", ["data=mine"]).data.batch_size == 9  # ./conf first
    monkeypatch.setenv("LIVERFUSION_CONFIG_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="LIVERFUSION_CONFIG_DIR.*nowhere.*not a folder"):
        user_config_dirs()


def test_repository_conf_link_is_not_searched_twice(monkeypatch):
    monkeypatch.chdir(REPO)  # conf -> liverfusion/conf
    monkeypatch.delenv("LIVERFUSION_CONFIG_DIR", raising=False)
    assert user_config_dirs() == []


def test_a_bad_config_dir_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    from liverfusion.data import check

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIVERFUSION_CONFIG_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(sys, "argv", ["liverfusion-check", "data=phantom", "--cfg", "job"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        check.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LIVERFUSION_CONFIG_DIR=") and err.count("\n") == 1, err


# ---- a quiet console --------------------------------------------------------------------------------------------
def test_cli_warning_filters_are_the_test_suites():
    from liverfusion.utils.console import KNOWN_WARNINGS

    assert list(KNOWN_WARNINGS) == pyproject()["tool"]["pytest"]["ini_options"]["filterwarnings"]


def test_known_third_party_warnings_are_filtered_and_ours_are_not():
    from liverfusion.utils.console import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="torch.fx")
        warnings.warn_explicit("'set_vital' is deprecated", UserWarning, "y.py", 1, module="torchdata.x")
        warnings.warn_explicit("a real problem", UserWarning, "z.py", 1, module="liverfusion.data")
    assert [str(w.message) for w in seen] == ["a real problem"]


def test_lightning_advertising_lines_are_dropped(caplog):
    from liverfusion.utils.console import quiet_third_party

    quiet_third_party()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        logger.info("💡 Tip: For seamless cloud logging ... litlogger ...")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_model_summary_leaves_out_an_empty_flops_column(caplog):
    from liverfusion.utils.console import ModelSummary

    data = [
        (" ", ["0", "1"]),
        ("Name", ["encoder", "head"]),
        ("Type", ["ResNetEncoder", "Linear"]),
        ("Params", ["902 K", "1.0 K"]),
        ("Mode", ["train", "train"]),
        ("FLOPs", ["0", "0"]),
    ]
    with caplog.at_level(logging.INFO, logger="liverfusion"):
        ModelSummary.summarize(data, 903_000, 903_000, 3.6, {"train": 2, "eval": 0}, 0)
    text = caplog.text
    assert "ResNetEncoder" in text and "FLOPs" not in text and "903 K trainable" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="liverfusion"):
        ModelSummary.summarize(data, 903_000, 903_000, 3.6, {"train": 2, "eval": 0}, 5_000_000)
    assert "FLOPs" in caplog.text


def test_config_summary_is_short_and_says_what_runs(tmp_path):
    from liverfusion.utils.console import config_summary

    cfg = _compose("train", ["+experiment=cgc_finetune", "debug=limit", f"paths.output_dir={tmp_path}"])
    lines = config_summary(cfg)
    assert len(lines) <= 6
    text = "\n".join(lines)
    assert "cgc_finetune" in text and "FusionClassifier" in text and "PhantomLayout" in text
    assert "limit_train_batches=4" in text and str(tmp_path) in text


def test_run_outputs_name_metrics_and_checkpoints(tmp_path):
    from liverfusion.utils.console import run_outputs

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "metrics.md").write_text("| metric |")
    (tmp_path / "checkpoints").mkdir()
    for name in ("best_epoch003.ckpt", "last.ckpt", "step_0000050.ckpt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"x")
    text = "\n".join(run_outputs(tmp_path))
    assert str(tmp_path / "test" / "metrics.md") in text and "CIs" in text
    assert "selected: best_epoch003.ckpt" in text
    assert "none written" in "\n".join(run_outputs(tmp_path / "empty"))


def test_debug_fast_pretraining_prints_under_60_lines(tiny_phantom, tmp_path):
    """The whole console of a `debug=fast` pre-training: the config summary, Lightning's few lines, the model
    summary, where the results are; no config tree, no alembic, no third-party deprecations."""
    args = [
        sys.executable,
        "-m",
        "liverfusion.train",
        "+experiment=simsiam_pretrain",
        "debug=fast",
        f"paths.log_dir={tmp_path / 'logs'}",
        *(o for o in tiny_phantom_overrides(tiny_phantom, tmp_path / "cache") if not o.startswith("extras.")),
    ]
    out = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    lines = console.splitlines()
    assert len(lines) < 60, console
    assert "task:    simsiam_pretrain (experiment=simsiam_pretrain, debug=fast)" in console
    for noise in ("alembic", "Tip:", "set_vital", "FutureWarning", "DeprecationWarning", "defaults:"):
        assert noise not in console, noise
    assert "run folder:" in console and str(tmp_path / "logs" / "debug" / "simsiam_pretrain") in console


# ---- hparams_search on Optuna >= 4 -------------------------------------------------------------------------------
def test_sweeper_search_space_and_checkpoint_choice(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.liverfusion_plugins.optuna_sweeper import (
        make_storage,
        search_space,
        selected_checkpoint,
    )

    space, fixed = search_space(
        [
            "a=interval(0.1, 0.5)",
            "b=tag(log, interval(1e-4, 1e-2))",
            "c=choice(16, 32)",
            "d=range(1, 7, 2)",
            "e=3",
        ]
    )
    assert space["a"] == FloatDistribution(0.1, 0.5) and space["b"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["c"] == CategoricalDistribution([16, 32]) and space["d"] == IntDistribution(1, 5, step=2)
    assert fixed == {"e": "3"}
    assert make_storage(None) is None and make_storage("sqlite:///x.db") == "sqlite:///x.db"
    assert type(make_storage(str(tmp_path / "s" / "study.journal"))).__name__ == "JournalStorage"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "step_0000050.ckpt", "best_epoch002.ckpt"):
        (tmp_path / "run" / "checkpoints" / name).write_bytes(b"x")
    assert selected_checkpoint(tmp_path / "run").name == "best_epoch002.ckpt"


def test_optuna_sweep_fills_one_study_and_tests_the_best_trial_once(tiny_phantom, tmp_path, monkeypatch):
    """Two launches of the same sweep share the journal study (the second adds only the missing trial); trials
    train without the test split; the best trial is tested once, from its checkpoint, in best_test/."""
    import yaml

    from liverfusion import train

    journal = tmp_path / "study.journal"
    common = [
        "liverfusion-train",
        "+experiment=cgc_finetune",
        "hparams_search=cgc_optuna",
        "model.init=scratch",
        f"hydra.sweeper.storage={journal}",
        "hydra.sweeper.sampler.n_startup_trials=1",
        "logger=none",
        "trainer.max_epochs=1",
        "callbacks.step_checkpoint=null",
        "callbacks.preemption=null",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
    ]
    monkeypatch.chdir(tmp_path)
    for n_trials, sweep in ((1, "first"), (2, "second")):
        GlobalHydra.instance().clear()
        monkeypatch.setattr(
            sys,
            "argv",
            [*common, f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweep.dir={tmp_path / sweep}"],
        )
        train.main()
        GlobalHydra.instance().clear()
    first = sorted(p.name for p in (tmp_path / "first").iterdir() if p.is_dir())
    second = sorted(p.name for p in (tmp_path / "second").iterdir() if p.is_dir())
    assert first == second == ["0", "best_test"], (first, second)  # the second adds one trial
    for trial in ("first/0", "second/0"):
        cfg = yaml.safe_load((tmp_path / trial / "config_resolved.yaml").read_text())
        assert cfg["test"] is False and not (tmp_path / trial / "test").exists()
    best = yaml.safe_load((tmp_path / "second" / "best_test" / "config_resolved.yaml").read_text())
    assert best["test"] is True and best["train"] is False and best["ckpt_path"].endswith(".ckpt")
    assert (tmp_path / "second" / "best_test" / "test" / "metrics.json").is_file()
    result = yaml.safe_load((tmp_path / "second" / "optimization_results.yaml").read_text())
    assert result["n_complete"] == 2 and result["best_test"].endswith("best_test")
