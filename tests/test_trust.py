"""Trust: checkpoint payloads run no code, run folders are self-contained, the salt never lands in a run's files,
and files written by the main of 2026-12-02 (tests/fixtures/legacy_main) still load."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from liverfusion.errors import CheckpointError, ConfigError
from liverfusion.evaluate import _best_in_run, load_classifier
from liverfusion.modules.encoder_file import checkpoint_kind, read_encoder_file
from liverfusion.resume import checkpoint_is_readable, find_resume_checkpoint
from liverfusion.utils.checkpoint_io import safe_load
from liverfusion.utils.cli import error_line
from liverfusion.utils.run_folder import load_run_config, save_run_config

LEGACY = Path(__file__).parent / "fixtures" / "legacy_main"
CLASSIFIER = LEGACY / "cgc" / "checkpoints" / "best_epoch000.ckpt"


def tree_hash(root: Path) -> str:
    h = hashlib.blake2b()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_no_resolver_runs_code():
    assert not OmegaConf.has_resolver("eval")


class _Payload:  # a pickle that would write a file when unpickled by an unsafe load
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize(
    "payload",
    [
        '${eval:\'__import__("os").system("touch MARKER")\'}',
        "${oc.env:HOME}",
        "${oc.select:x,${oc.env:PATH}}",
    ],
)
def test_interpolating_checkpoint_metadata_is_refused_by_name(tmp_path, payload):
    ckpt = torch.load(CLASSIFIER, weights_only=True)
    ckpt["liverfusion"]["class_names"][0] = payload.replace("MARKER", str(tmp_path / "ran"))
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="interpolation") as info:
        load_classifier(bad)
    assert str(bad) in str(info.value) and "class_names" in str(info.value)
    assert not (tmp_path / "ran").exists()


def test_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    bad = tmp_path / "pickle.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(tmp_path / "ran")}, bad)
    for load in (safe_load, load_classifier, read_encoder_file):
        with pytest.raises(CheckpointError, match="pickled Python objects") as info:
            load(bad)
        assert str(bad) in str(info.value)
    assert checkpoint_is_readable(bad) is not None  # resume never treats it as readable
    assert not (tmp_path / "ran").exists()


def test_files_of_the_previous_main_still_load():
    net = load_classifier(CLASSIFIER)
    assert net.meta["class_names"] and net.meta["modalities"]
    enc = read_encoder_file(LEGACY / "ssl" / "checkpoints" / "encoder.pt")
    assert enc.kind == "encoder.pt" and enc.state_dict
    assert checkpoint_kind(safe_load(LEGACY / "ssl" / "checkpoints" / "last.ckpt")) == "ssl"
    assert checkpoint_kind(safe_load(CLASSIFIER)) == "classifier"


def test_a_copied_legacy_run_reads_only_inside_the_copy(tmp_path):
    before = tree_hash(LEGACY)
    copy = tmp_path / "moved run ü" / "ssl"
    shutil.copytree(LEGACY / "ssl", copy)
    cfg = load_run_config(copy, salt="liverfusion")
    assert cfg.paths.output_dir == str(copy.resolve())
    assert cfg.callbacks.model_checkpoint.dirpath == str(copy.resolve() / "checkpoints")
    assert cfg.trainer.default_root_dir == str(copy.resolve())
    assert find_resume_checkpoint(Path(cfg.callbacks.model_checkpoint.dirpath)).parent == copy / "checkpoints"
    run = tmp_path / "cgc"
    shutil.copytree(LEGACY / "cgc", run)
    assert _best_in_run(run) == run / "checkpoints" / "best_epoch000.ckpt"  # not the recorded original path
    assert tree_hash(LEGACY) == before


def test_saved_config_is_relative_masked_and_fingerprinted(tmp_path):
    run = tmp_path / "run"
    cfg = OmegaConf.create(
        {
            "privacy_salt": "Zq-distinctive-salt-91",
            "callbacks": {"w": {"salt": "Zq-distinctive-salt-91", "dirpath": str(run / "checkpoints")}},
            "paths": {"output_dir": str(run), "data_dir": "/data/elsewhere"},
        }
    )
    save_run_config(cfg, run)
    for f in run.rglob("*"):
        assert b"Zq-distinctive-salt-91" not in f.read_bytes(), f
    saved = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert (
        saved["callbacks"]["w"]["dirpath"] == "checkpoints"
        and saved["paths"]["data_dir"] == "/data/elsewhere"
    )
    moved = tmp_path / "moved"
    run.rename(moved)
    back = load_run_config(moved, salt="Zq-distinctive-salt-91")
    assert back.callbacks.w.dirpath == str(moved.resolve() / "checkpoints")
    assert back.privacy_salt == "Zq-distinctive-salt-91" == back.callbacks.w.salt
    with pytest.raises(ConfigError, match="LIVERFUSION_PRIVACY_SALT"):
        load_run_config(moved, salt="another salt")


def test_an_edited_run_config_with_an_interpolation_is_refused(tmp_path):
    run = tmp_path / "run"
    save_run_config(OmegaConf.create({"paths": {"output_dir": str(run)}, "x": 1}), run)
    (run / "config_resolved.yaml").write_text("paths:\n  output_dir: .\nx: ${oc.env:HOME}\n")
    with pytest.raises(CheckpointError, match="interpolation"):
        load_run_config(run)


def test_error_line_names_the_file_and_a_fix(tmp_path):
    err = OSError(28, "No space left on device", str(tmp_path / "x.ckpt"))
    line = error_line(err)
    assert line.startswith("error: ") and str(tmp_path / "x.ckpt") in line and "free disk space" in line
    assert error_line(ConfigError("data.batch_size=-1: must be positive", fix="set it to 8")).endswith(
        "set it to 8"
    )


def test_error_line_unwraps_hydra_instantiation():
    from hydra.errors import InstantiationException

    try:
        try:
            raise ConfigError("data.batch_size=-1: must be a positive integer")
        except ConfigError as inner:
            raise InstantiationException("Error in call to target") from inner
    except InstantiationException as outer:
        assert error_line(outer) == "error: data.batch_size=-1: must be a positive integer"
