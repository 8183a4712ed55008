"""Loading a pre-trained encoder into the classifier: good files load, wrong ones are refused with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf

from liverfusion.errors import CheckpointError
from liverfusion.models import build_encoder
from liverfusion.modules.encoder_file import ENCODER_FORMAT, read_encoder_file
from liverfusion.modules.encoder_loading import EncoderModalityWarning, load_pretrained_encoder

TINY = {
    "name": "resnet3d",
    "arch": "resnet10",
    "widths": [4, 8, 8, 8],
    "pool_stride": [1, 2, 2],
    "stage_strides": [1, 2, 2, 1],
}
MODS = ["T2WI", "DWI", "C+A"]
PRE = {
    "shape": [8, 32, 32],
    "mode": "resize",
    "normalize": "percentile",
    "percentiles": [0.5, 99.5],
    "nonzero": False,
}
SPEC = {"modalities": MODS, "class_names": ["a", "b"], "preprocess": PRE, "input_shape": [8, 32, 32]}


def encoder(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return build_encoder(**{**TINY, **kw})


def write_export(path, enc, **meta):
    payload = {
        "format": ENCODER_FORMAT,
        "state_dict": enc.state_dict(),
        "encoder_config": enc.config(),
        "modalities": MODS,
        "input_shape": [8, 32, 32],
        "preprocess": PRE,
        "dataset": "phantom",
        "method": "SimSiam",
        **meta,
    }
    torch.save(payload, path)
    return path


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_good_export_loads_exactly(tmp_path):
    src = encoder(seed=1)
    path = write_export(tmp_path / "encoder.pt", src)
    dst = encoder(seed=2)
    assert not same_weights(src, dst)
    report = load_pretrained_encoder(dst, path, SPEC)
    assert same_weights(src, dst)
    assert report.kind == "encoder.pt" and report.missing == [] and report.unexpected == []
    assert report.loaded_keys == len(src.state_dict())
    assert report.source["dataset"] == "phantom"


def test_lightning_checkpoint_with_omegaconf_hparams_loads(tmp_path):
    """A Lightning checkpoint of an SSL run: weights under ``encoder.``, hyper-parameters may hold OmegaConf."""
    src = encoder(seed=3)
    state = {f"encoder.{k}": v for k, v in src.state_dict().items()}
    state["projector.layers.0.weight"] = torch.zeros(2, 2)
    ckpt = {
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state,
        "hyper_parameters": {"data_spec": SPEC, "projector": OmegaConf.create({"hidden_dim": 8})},
        "epoch": 3,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    dst = encoder(seed=4)
    report = load_pretrained_encoder(dst, tmp_path / "last.ckpt", SPEC)
    assert same_weights(src, dst)
    assert report.kind == "lightning"
    # no encoder config recorded: checked by names and shapes, and said so
    assert any("names and shapes" in w for w in report.warnings)


def test_wrong_architecture_is_refused(tmp_path):
    path = write_export(tmp_path / "encoder.pt", encoder(widths=[4, 8, 16, 16]))
    with pytest.raises(CheckpointError, match="architecture differs.*widths"):
        load_pretrained_encoder(encoder(), path, SPEC)


def test_wrong_input_channels_are_refused(tmp_path):
    path = write_export(tmp_path / "encoder.pt", encoder())  # shared encoder: 1 channel
    with pytest.raises(CheckpointError, match="in_channels=1 but this classifier needs in_channels=3"):
        load_pretrained_encoder(encoder(in_channels=3), path, SPEC)


def test_wrong_normalisation_is_refused_unless_allowed(tmp_path):
    path = write_export(tmp_path / "encoder.pt", encoder(), preprocess={**PRE, "normalize": "zscore"})
    with pytest.raises(CheckpointError, match="normalisation differs.*zscore"):
        load_pretrained_encoder(encoder(), path, SPEC)
    report = load_pretrained_encoder(encoder(), path, SPEC, strict_normalization=False)
    assert any("normalisation" in w for w in report.warnings)


def test_other_geometry_is_only_noted(tmp_path):
    path = write_export(tmp_path / "encoder.pt", encoder(), preprocess={**PRE, "shape": [16, 64, 64]})
    report = load_pretrained_encoder(encoder(), path, SPEC)
    assert any("other geometry" in w for w in report.warnings)


def test_other_modality_set_is_a_warning(tmp_path):
    path = write_export(tmp_path / "encoder.pt", encoder(), modalities=["t1_pre", "flair", "T2WI"])
    with pytest.warns(EncoderModalityWarning, match="never seen in pre-training"):
        report = load_pretrained_encoder(encoder(), path, SPEC)
    assert any("DWI" in w for w in report.warnings)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    src = encoder()
    state = src.state_dict()
    state.pop("layer4.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(
        {
            "format": ENCODER_FORMAT,
            "state_dict": state,
            "encoder_config": src.config(),
            "modalities": MODS,
            "preprocess": PRE,
        },
        tmp_path / "partial.pt",
    )
    with pytest.raises(
        CheckpointError, match=r"missing 1: layer4.0.conv1.weight; unexpected 1: extra.weight"
    ):
        load_pretrained_encoder(encoder(), tmp_path / "partial.pt", SPEC)
    dst = encoder(seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = load_pretrained_encoder(dst, tmp_path / "partial.pt", SPEC, strict_keys=False)
    assert report.missing == ["layer4.0.conv1.weight"] and report.unexpected == ["extra.weight"]
    assert torch.equal(dst.state_dict()["conv1.weight"], src.state_dict()["conv1.weight"])


def test_unreadable_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_encoder_file(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="neither an encoder export"):
        read_encoder_file(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_encoder_file(tmp_path / "garbage.pt")
