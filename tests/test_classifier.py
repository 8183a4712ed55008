"""The fusion classifier LightningModule: init, fine-tune modes, modality dropout, cache, loss, checkpoint metadata."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from liverfusion.errors import CheckpointError, ConfigError
from liverfusion.evaluate import load_classifier
from liverfusion.models import FUSIONS, build_encoder
from liverfusion.modules.classifier import (
    CLASSIFIER_FORMAT,
    FusionClassifier,
    freeze_report,
    modality_dropout,
)
from liverfusion.modules.encoder_file import ENCODER_FORMAT
from liverfusion.utils.config_sections import model_config

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
SPEC = {
    "dataset": "toy",
    "modalities": MODS,
    "class_names": ["a", "b", "c"],
    "preprocess": PRE,
    "input_shape": [8, 32, 32],
    "eval_crop": None,
}
FUSION_KW = {
    "cgc": {"width": 4},
    "single": {"modality": "DWI"},
    "early": {},
    "late_concat": {},
    "late_mean": {},
}


def make(fusion: str = "cgc", **kw) -> FusionClassifier:
    torch.manual_seed(kw.pop("seed", 0))
    enc = functools.partial(build_encoder, **TINY)
    fus = functools.partial(FUSIONS[fusion], **FUSION_KW[fusion])
    return FusionClassifier(encoder=enc, fusion=fus, data_spec=SPEC, **model_config("classifier", **kw))


def batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(n, len(MODS), dtype=torch.bool)
    present[0, 1] = False
    return {
        "image": torch.randn(n, len(MODS), 8, 32, 32, generator=g),
        "present": present,
        "label": torch.tensor([i % 3 for i in range(n)]),
        "case_id": [f"C{i}" for i in range(n)],
        "patient_id": [f"P{i}" for i in range(n)],
    }


def sgd_step(module: FusionClassifier, b: dict) -> None:
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    module.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss = module.training_step(b, 0)
    loss.backward()
    opt.step()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module, prefix: str = "") -> set[str]:
    now = module.state_dict()
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], now[k])}


def test_linear_probe_keeps_encoder_and_bn_statistics_fixed():
    m = make(finetune={"mode": "linear_probe"})
    m.train()
    assert not any(mod.training for mod in m.net.encoder.modules()), "BN must stay in eval when probing"
    assert m.net.fusion.training
    enc_before, fus_before = snapshot(m.net.encoder), snapshot(m.net.fusion)
    sgd_step(m, batch())
    assert changed(enc_before, m.net.encoder) == set()  # weights and running stats
    assert changed(fus_before, m.net.fusion)
    assert freeze_report(m.net.encoder)["trainable"] == 0


def test_partial_freeze_trains_only_the_unfrozen_stages():
    m = make(finetune={"mode": "partial", "freeze": ["conv1", "bn1", "layer1"]})
    m.train()
    assert not m.net.encoder.bn1.training and not m.net.encoder.layer1.training
    assert m.net.encoder.layer4.training
    before = snapshot(m.net.encoder)
    sgd_step(m, batch())
    moved = changed(before, m.net.encoder)
    assert not {k for k in moved if k.startswith(("conv1", "bn1", "layer1"))}
    assert {k for k in moved if k.startswith("layer4")}
    with pytest.raises(ConfigError, match="not encoder modules"):
        make(finetune={"mode": "partial", "freeze": ["stem"]})


def test_full_finetune_uses_a_lower_encoder_lr():
    m = make(finetune={"mode": "full", "encoder_lr_scale": 0.1}, optimizer={"lr": 1e-3})
    m.trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = m.configure_optimizers()["optimizer"]
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["encoder"] == pytest.approx(1e-4) and lrs["fusion"] == pytest.approx(1e-3)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups}["encoder_no_decay"] == 0.0
    probe = make(finetune={"mode": "linear_probe"})
    probe.trainer = SimpleNamespace(estimated_stepping_batches=10)
    names = {g["name"] for g in probe.configure_optimizers()["optimizer"].param_groups}
    assert not any(n.startswith("encoder") for n in names)


def test_modality_dropout_keeps_absent_absent_and_at_least_min_keep():
    torch.manual_seed(0)
    present = torch.rand(200, 5) > 0.3
    present[0] = False
    present[0, 2] = True
    assert modality_dropout(present, 0.0) is present
    for p, keep in ((0.5, 1), (1.0, 2)):
        out = modality_dropout(present, p, min_keep=keep)
        assert not (out & ~present).any()
        assert (out.sum(1) >= torch.clamp(present.sum(1), max=keep)).all()
    assert (modality_dropout(present, 1.0, min_keep=2).sum(1) == torch.clamp(present.sum(1), max=2)).all()
    assert modality_dropout(present, 0.5).sum() < present.sum()


def test_init_pretrained_needs_a_path_and_early_refuses_a_shared_encoder(tmp_path):
    unset = make(init="pretrained")  # composes (config checks), but refuses to train without the file
    unset.trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(ConfigError, match="pretrained.path"):
        unset.setup("fit")
    enc = build_encoder(**TINY)
    torch.save(
        {
            "format": ENCODER_FORMAT,
            "state_dict": enc.state_dict(),
            "encoder_config": enc.config(),
            "modalities": MODS,
            "preprocess": PRE,
        },
        tmp_path / "encoder.pt",
    )
    m = make(init="pretrained", pretrained={"path": str(tmp_path / "encoder.pt")})
    assert torch.equal(m.net.encoder.conv1.weight, enc.conv1.weight)
    assert m.load_report["kind"] == "encoder.pt"
    with pytest.raises(CheckpointError, match="in_channels=1 but this classifier needs in_channels=3"):
        make("early", init="pretrained", pretrained={"path": str(tmp_path / "encoder.pt")})


def test_feature_cache_gives_the_same_outputs():
    m = make(finetune={"mode": "linear_probe"}).eval()
    b = batch()
    plain = m.encode(b, "eval")
    m._cache_on = True
    first = m.encode(b, "eval")
    assert len(m._cache) == 4
    second = m.encode(b, "eval")
    for x, y, z in ((plain.maps, first.maps, second.maps), (plain.pooled, first.pooled, second.pooled)):
        assert torch.allclose(x, y, atol=1e-6) and torch.equal(y, z)


def test_class_weighted_loss_uses_training_counts():
    m = make(loss={"class_weighted": True})
    m.trainer = SimpleNamespace(
        datamodule=SimpleNamespace(class_counts=lambda: [6, 2, 4], train_transform=None)
    )
    m.setup("fit")
    assert torch.allclose(m.class_weights, torch.tensor([12 / 18, 12 / 6, 12 / 12]))
    logits = torch.zeros(2, 3, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]), weight=m.class_weights)
    assert torch.isclose(m._loss(logits, torch.tensor([0, 1])), expected)


@pytest.mark.parametrize("fusion", ["cgc", "early", "single", "late_mean"])
def test_checkpoint_metadata_rebuilds_the_same_network(fusion, tmp_path):
    m = make(fusion).eval()
    ckpt = {"state_dict": m.state_dict(), "pytorch-lightning_version": "2.6.6"}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "model.ckpt")
    meta = ckpt["liverfusion"]
    assert meta["format"] == CLASSIFIER_FORMAT
    assert meta["modalities"] == MODS and meta["class_names"] == ["a", "b", "c"]
    assert meta["preprocess"] == PRE and meta["input_shape"] == [8, 32, 32]
    loaded = load_classifier(tmp_path / "model.ckpt")  # weights_only=True inside
    b = batch()
    with torch.no_grad():
        assert torch.allclose(m(b["image"], b["present"]).logits, loaded.net(b["image"], b["present"]).logits)


def test_unknown_options_are_config_errors():
    with pytest.raises(ConfigError, match="finetune.mode"):
        make(finetune={"mode": "half"})
    with pytest.raises(ConfigError, match="unknown key"):
        make(loss={"focal": True})
    with pytest.raises(ConfigError, match="init"):
        make(init="imagenet")


def test_every_key_comes_from_the_yaml():
    """No defaults in code: a section missing a key is refused with the way to build it, and the YAML's values are
    what a model built from model_config holds (the scheduler's warm-up is the YAML's 0.05, not a code value)."""
    args = model_config("classifier")
    del args["loss"]["label_smoothing"]
    enc = functools.partial(build_encoder, **TINY)
    with pytest.raises(
        ConfigError, match=r"model.loss: missing key\(s\) \['label_smoothing'\].*model_config"
    ):
        FusionClassifier(encoder=enc, fusion=functools.partial(FUSIONS["early"]), data_spec=SPEC, **args)
    m = make("early")
    assert m.scheduler_cfg == {"warmup_fraction": 0.05, "warmup_steps": None, "min_lr_ratio": 0.0}
    assert m.optimizer_cfg["momentum"] == 0.9 and m.optimizer_cfg["nesterov"] is False


def test_a_legacy_run_still_builds(tmp_path):
    """tests/fixtures/legacy_main/cgc (main of 2026-12-02): its config_resolved.yaml lacks optimizer.momentum,
    optimizer.nesterov and scheduler.warmup_steps (the YAML's values fill them, for a resume); its checkpoint's
    hyper-parameters rebuild the network its weights load into."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    legacy = Path(__file__).parent / "fixtures" / "legacy_main" / "cgc"
    ckpt = torch.load(legacy / "checkpoints" / "best_epoch000.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    node = OmegaConf.load(legacy / "config_resolved.yaml").model
    assert "momentum" not in node.optimizer and "warmup_steps" not in node.scheduler
    node.pretrained.path = None  # the encoder file of that run is not kept; its weights are in the checkpoint
    model = instantiate(node, data_spec=hp["data_spec"])
    assert model.optimizer_cfg == {
        **OmegaConf.to_container(node.optimizer),
        "momentum": 0.9,
        "nesterov": False,
    }
    assert model.scheduler_cfg["warmup_steps"] is None and model.scheduler_cfg["warmup_fraction"] == 0.05
    model.load_state_dict(ckpt["state_dict"])  # strict
    again = FusionClassifier(**{**hp, "pretrained": {**hp["pretrained"], "path": None}})
    again.load_state_dict(ckpt["state_dict"])
    assert again.hparams["optimizer"] == hp["optimizer"] and again.hparams["evaluation"] == hp["evaluation"]


def test_checkpoint_state_is_plain(tmp_path):
    """hparams hold no OmegaConf or partial objects: the Lightning checkpoint itself loads with weights_only."""
    m = make()
    copy.deepcopy(dict(m.hparams))
    torch.save({"hyper_parameters": dict(m.hparams)}, tmp_path / "hp.pt")
    torch.load(tmp_path / "hp.pt", weights_only=True)


def test_lldmmri_baseline_recipe(tmp_path):
    """+experiment=lldmmri_baseline: early fusion of the 8 phases, 16x128x128 -> 14x112x112 crops with one spatial
    draw for all phases, AdamW 1e-4 / wd 0.05 with warm-up + cosine, selection on the challenge score."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from liverfusion.utils.hydra_utils import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=lldmmri_baseline", "trainer=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    assert cfg.data.preprocess.shape == [16, 128, 128] and cfg.data.preprocess.normalize == "minmax"
    assert cfg.callbacks.model_checkpoint.monitor == "val/lld_score"
    dm = instantiate(cfg.data)
    torch.manual_seed(0)
    phase = torch.rand(1, 16, 128, 128)
    for _ in range(3):
        out = torch.as_tensor(dm.train_transform(phase.repeat(8, 1, 1, 1)))
        assert out.shape == (8, 14, 112, 112)
        assert all(torch.equal(out[0], out[i]) for i in range(1, 8)), "phases must share the spatial draw"
    assert torch.as_tensor(dm.eval_transform(phase.repeat(8, 1, 1, 1))).shape == (8, 14, 112, 112)
    spec = {**dm.data_spec(), "class_names": dm.class_names}
    assert spec["network_input_shape"] == [14, 112, 112]
    model = instantiate(cfg.model, data_spec=spec)
    assert model.net.mode == "early" and model.net.encoder.in_channels == 8
    assert model.init_mode == "scratch"
    assert model.optimizer_cfg["name"] == "adamw" and model.optimizer_cfg["lr"] == pytest.approx(1e-4)
    assert model.optimizer_cfg["weight_decay"] == pytest.approx(0.05)
    assert model.scheduler_cfg["warmup_fraction"] > 0
