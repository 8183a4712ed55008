"""Every config file composes, and every `_target_` in it instantiates (Hydra compose API, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from liverfusion.data.preprocess import PreprocessConfig
from liverfusion.utils.hydra_utils import CONFIG_DIR

CONF = Path(CONFIG_DIR)
# groups that are options of train.yaml, selected with `group=option` (or `+group=option` when not in the defaults)
TRAIN_GROUPS = {
    "data": "",
    "model": "",
    "callbacks": "",
    "logger": "",
    "trainer": "",
    "paths": "",
    "extras": "",
    "debug": "",
    "experiment": "+",
    "hparams_search": "",
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
    return cfg


def instantiate_all(node, data_spec) -> int:
    """Instantiate each `_target_` node found (the model gets a data_spec as train() passes it)."""
    count = 0
    if isinstance(node, DictConfig):
        if "_target_" in node:
            kwargs = {"data_spec": data_spec} if "modules" in str(node._target_) else {}
            obj = instantiate(node, **kwargs)
            assert obj is not None
            return 1
        for key in node:
            count += instantiate_all(node[key], data_spec)
    elif isinstance(node, ListConfig):
        for item in node:
            count += instantiate_all(item, data_spec)
    return count


def test_every_group_has_options():
    for group in TRAIN_GROUPS:
        if group in ("hparams_search",):
            continue
        assert options(group), f"conf/{group}/ has no option"


@pytest.mark.parametrize("group,option", [(g, o) for g in TRAIN_GROUPS for o in options(g)])
def test_train_group_option_composes_and_instantiates(group, option, tmp_path):
    prefix = TRAIN_GROUPS[group]
    cfg = compose_train([f"{prefix}{group}={option}"], tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    dm = instantiate(cfg.data)
    spec = dm.data_spec()
    assert spec["modalities"]
    if group in ("data", "model", "experiment", "debug"):
        model = instantiate(cfg.model, data_spec=spec)
        assert sum(p.numel() for p in model.parameters()) > 0
    for sub in ("callbacks", "logger"):
        instantiate_all(cfg.get(sub), spec)
    if cfg.trainer.accelerator == "cpu":  # GPU trainers are checked on a GPU machine (benchmarks/gpu_smoke)
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == (1 if cfg.trainer.get("fast_dev_run") else cfg.trainer.max_epochs)


@pytest.mark.parametrize("group", ["encoder", "fusion", "augment"])
def test_component_groups_instantiate(group):
    for option in options(group):
        cfg = OmegaConf.load(CONF / group / f"{option}.yaml")
        if group == "augment":
            with open_dict(cfg):
                cfg = OmegaConf.create({"data": {"preprocess": {"shape": [16, 64, 64]}}, **cfg})
            items = cfg.augment
            if items is None:
                continue
            OmegaConf.resolve(cfg)
            assert all(callable(instantiate(i)) for i in cfg.augment)
            continue
        obj = instantiate(cfg)
        assert obj is not None, f"{group}/{option}"


def test_primary_configs_compose():
    for name in sorted(p.stem for p in CONF.glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=name)
        assert cfg, name


def test_experiment_is_not_in_primary_defaults():
    text = (CONF / "train.yaml").read_text()
    assert "- experiment" not in text


def test_regular_install_finds_conf(tmp_path):
    """A non-editable install (wheel unpacked elsewhere) ships conf/ as package data and composes from any cwd."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
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
            str(tmp_path / "wheel"),
            str(repo),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "wheel").glob("liverfusion-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(tmp_path / "site"),
        "WANDB_MODE": "disabled",
        "HOME": str(tmp_path),
    }
    run = subprocess.run(
        [sys.executable, "-m", "liverfusion.train", "+experiment=simsiam_pretrain", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "task_name: simsiam_pretrain" in run.stdout
    import_path = subprocess.run(
        [sys.executable, "-c", "import liverfusion; print(liverfusion.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert str(tmp_path / "site") in import_path.stdout  # the wheel's copy was used, not the repository's


def test_tuning_variants_compose(tmp_path):
    """Every override of benchmarks/fusion_tuning.py composes with the preset, and a transform-list override
    builds a pipeline that keeps a case's (M, D, H, W) stack shape (one spatial draw for all phases)."""
    import sys

    import torch

    from liverfusion.data.transforms import build_transform

    sys.path.insert(0, str(CONF.parents[1] / "benchmarks"))
    try:
        import fusion_tuning
    finally:
        sys.path.pop(0)
    for name, overrides in fusion_tuning.VARIANTS.items():
        pre = fusion_tuning.preprocessing(name)
        cfg = compose_train(["+experiment=cgc_finetune", *pre, *overrides], tmp_path)
        OmegaConf.resolve(cfg)
        PreprocessConfig(**cfg.data.preprocess)  # a valid preprocessing for pre-training and fine-tune alike
        if any(o.startswith("data.train_transform=") for o in overrides):
            pipeline = build_transform(instantiate(cfg.data.train_transform))
            x = torch.rand(1, 16, 64, 64).expand(8, -1, -1, -1).clone()  # 8 identical phases
            outs = [torch.as_tensor(pipeline(x)) for _ in range(5)]
            for y in outs:
                assert tuple(y.shape) == tuple(x.shape), name
                assert torch.allclose(y, y[:1].expand_as(y)), f"{name}: phases of a case got different draws"
            assert any(not torch.allclose(y, x) for y in outs), (
                f"{name}: the augmentation never changed a case"
            )
