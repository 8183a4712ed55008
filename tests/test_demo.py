"""`make demo`: every step's command line is valid for its entry point, and the steps run in order."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from liverfusion import demo
from liverfusion.utils.hydra_utils import CONFIG_DIR
from tests.helpers import tiny_phantom_overrides

PRIMARY = {
    "liverfusion.train": "train",
    "liverfusion.evaluate": "evaluate",
    "liverfusion.data.check": "check",
}


def test_every_step_composes_with_its_entry_point(tmp_path):
    commands = demo.step_commands(tmp_path / "demo", ["data.batch_size=4", "trainer.max_epochs=1"])
    assert list(commands) == list(demo.STEP_NAMES)
    assert commands["finetune"][commands["finetune"].index("-m") + 1] == "liverfusion.train"
    encoder = str(tmp_path / "demo" / "pretrain" / "checkpoints" / "encoder.pt")
    # the finetune step reads what the pretrain step wrote
    assert f"model.pretrained.path={encoder}" in commands["finetune"]
    for name, args in commands.items():
        module = args[1]
        if module not in PRIMARY:  # the report CLI is argparse: its folder is the finetune run
            assert args[2] == str(tmp_path / "demo" / "finetune")
            continue
        overrides = [a for a in args[2:] if not a.startswith("hydra.")]
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose(PRIMARY[module], overrides=overrides)
        if name == "pretrain":
            assert cfg.model._target_.endswith("SimSiam") and cfg.data.pairs.policy == "cross"
            assert cfg.trainer.max_epochs == 1  # the user's overrides reach the training steps
        if name == "finetune":
            assert cfg.model.init == "pretrained" and cfg.model.fusion._target_.endswith("CGCFusion")
    # evaluate and check take only the data/paths overrides: the rest are training settings
    assert "data.batch_size=4" in commands["evaluate"] and "trainer.max_epochs=1" not in commands["evaluate"]


def test_unknown_step_is_refused(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--steps", "check,fly"])
    assert "unknown steps ['fly']" in capsys.readouterr().err


def test_check_step_runs_on_the_phantom(tiny_phantom, tmp_path, capsys):
    overrides = [o for o in tiny_phantom_overrides(tiny_phantom, tmp_path / "cache") if o.startswith("data.")]
    overrides += [f"paths.data_dir={tiny_phantom.parent}", f"paths.cache_dir={tmp_path / 'cache'}"]
    demo.main(["--steps", "check", "--root", str(tmp_path / "demo"), *overrides])
    out = capsys.readouterr().out
    assert "=== check: python -m liverfusion.data.check data=phantom" in out
    assert "demo finished" in out and "check" in out.split("demo finished")[1]


def test_failing_step_stops_the_demo_with_its_name(tmp_path):
    with pytest.raises(SystemExit, match="demo step 'check' failed"):
        demo.main(
            [
                "--steps",
                "check",
                "--root",
                str(tmp_path),
                "data.layout.root=/nonexistent/phantom",
                "data.layout.generate=false",
            ]
        )


@pytest.mark.slow
def test_whole_demo_on_a_tiny_phantom(tiny_phantom, tmp_path, capsys):
    overrides = tiny_phantom_overrides(tiny_phantom, tmp_path / "cache")
    overrides = [o for o in overrides if not o.startswith("extras.")]
    overrides += ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "logger=csv"]
    demo.main(["--root", str(tmp_path / "demo"), *overrides])
    for path in ("pretrain/checkpoints/encoder.pt", "evaluate/metrics.md", "report/results.md"):
        assert (tmp_path / "demo" / path).is_file(), path
