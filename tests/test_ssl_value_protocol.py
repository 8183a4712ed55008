"""The pre-training value benchmark's YAML protocol (benchmarks/ssl_value/): every recipe and every arm composes
and builds, so a broken recipe fails here in seconds instead of after a 45-minute pre-training."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from benchmarks import common
from liverfusion.utils.hydra_utils import CONFIG_DIR


def _load(name: str) -> dict:
    """benchmarks/ssl_value/<name>.yaml, read as ssl_value.py reads it."""
    return common.load_yaml("ssl_value", name)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, "paths.output_dir=/tmp/ssl_value_protocol"])


def test_protocol_keeps_test_patients_out_of_pretraining_and_has_its_stages():
    protocol = _load("protocol")
    assert protocol["pretrain"]["parts"] == [
        "unlabelled"
    ]  # one encoder for every fold: no fold's patient seen
    assert protocol["screening"]["phantom_seed"] == 7 and protocol["benchmark"]["phantom_seed"] == 4242
    assert protocol["external"]["phantom_seed"] not in (7, 4242, 424242, 20231030)
    assert protocol["headline"]["fraction"] in protocol["benchmark"]["fractions"]


@pytest.mark.parametrize("name", sorted(_load("recipes")))
def test_every_recipe_composes_and_its_model_builds(name):
    recipe, protocol = _load("recipes")[name], _load("protocol")
    parts = ",".join(protocol["pretrain"]["parts"])
    cfg = _compose(
        [f"data.pretrain_parts=[{parts}]", *protocol["pretrain"]["overrides"], *recipe["overrides"]]
    )
    assert cfg.data._target_.endswith("MDADataModule") and list(cfg.data.pretrain_parts) == ["unlabelled"]
    assert cfg.trainer.max_epochs >= 1
    modalities = list(cfg.data.layout.modalities)
    spec = {
        "modalities": modalities,
        "class_names": list(cfg.data.layout.class_names),
        "input_shape": [16, 64, 64],
    }
    model = instantiate(cfg.model, data_spec=spec)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", sorted(_load("arms")))
def test_every_arm_composes_with_every_recipe(name):
    arm = _load("arms")[name]
    recipes = _load("recipes") if arm["kind"] == "pretrained" else {"scratch": {}}
    for recipe in recipes.values():
        overrides = [o.replace("{encoder}", "/nonexistent/encoder.pt") for o in arm["overrides"]]
        cfg = _compose([*overrides, *recipe.get("finetune_overrides", []), "data.label_fraction=0.1"])
        assert cfg.model._target_.endswith("FusionClassifier")
        assert cfg.model.init == ("pretrained" if arm["kind"] == "pretrained" else "scratch")
