"""Every config file composes, and every `_target_` in it instantiates (Hydra compose API, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from liverfusion.data.preprocess import PreprocessConfig
from liverfusion.utils.hydra_utils import CONFIG_DIR, LATE_GROUPS, normalize_overrides

CONF = Path(CONFIG_DIR)
# groups that are options of train.yaml, selected with `group=option`; the late groups (experiment, hparams_search,
# debug) are appended after the defaults, with or without `+` (normalize_overrides, as the CLIs do)
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
PLACEHOLDER_DATA = {"template", "prepared"}
"""Data configs to copy and fill in (their ??? keys), composed and checked in tests/test_own_data.py."""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=normalize_overrides("train", overrides), return_hydra_config=False
        )
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
    if group == "data" and option in PLACEHOLDER_DATA:
        missing = [
            k for k in ("root", "modalities", "class_names") if OmegaConf.is_missing(cfg.data.layout, k)
        ]
        assert missing == ["root", "modalities", "class_names"], missing  # to fill in, and nothing else
        return
    OmegaConf.resolve(cfg)  # every interpolation resolves
    dm = instantiate(cfg.data)
    spec = dm.data_spec()
    assert spec["modalities"]
    if group in ("data", "model", "experiment", "debug"):
        model_cfg = cfg.model
        if not spec.get("class_names"):  # an unlabelled data set (CHAOS) is for pre-training: the classifier
            assert group == "data"  # default refuses it, an SSL model takes it
            model_cfg = compose_train([f"{prefix}{group}={option}", "model=simsiam"], tmp_path).model
        model = instantiate(model_cfg, data_spec=spec)
        assert sum(p.numel() for p in model.parameters()) > 0
    for sub in ("callbacks", "logger"):
        instantiate_all(cfg.get(sub), spec)
    if cfg.trainer.accelerator == "cpu":  # GPU trainers are checked on a GPU machine (benchmarks/gpu_smoke)
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == (1 if cfg.trainer.get("fast_dev_run") else cfg.trainer.max_epochs)


@pytest.mark.parametrize("group", ["encoder", "fusion"])
def test_component_groups_instantiate(group):
    for option in options(group):
        obj = instantiate(OmegaConf.load(CONF / group / f"{option}.yaml"))
        assert obj is not None, f"{group}/{option}"


@pytest.mark.parametrize("option", options("augment"))
def test_augment_options_instantiate(option, tmp_path):
    """Each augment option composed as a user selects it (its defaults list brings the shared recipe): the loader
    part and, where there is one, the batched device part build callables."""
    cfg = compose_train([f"+augment={option}"], tmp_path)
    OmegaConf.resolve(cfg)
    if cfg.data.augment is None:
        assert option == "none"
        return
    for key in ("augment", "batch_augment"):
        if cfg.data.get(key) is not None:
            part = instantiate(cfg.data[key])
            if option == "mda_device" and key == "augment":  # the loader only gathers: nothing per view
                assert part == []
                continue
            assert part and all(callable(t) for t in part), f"{option}: data.{key}"


def test_primary_configs_compose():
    for name in sorted(p.stem for p in CONF.glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=name)
        assert cfg, name


def test_late_groups_are_not_in_primary_defaults():
    """experiment, hparams_search and debug are appended by the entry points (in that order), never selected in
    train.yaml's defaults: so `+experiment=x` (the front door) works and a debug preset composes last."""
    defaults = OmegaConf.load(CONF / "train.yaml").defaults
    selected = {next(iter(d)) for d in defaults if isinstance(d, DictConfig)}
    assert selected and not selected & set(LATE_GROUPS), selected


def _leaves(node, prefix: str = "") -> dict:
    """Every leaf of a plain config tree as ``dotted.key -> value``."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def debug_values(preset: str) -> dict:
    """What a debug preset sets (its shared building block _debug.yaml first), without its defaults list."""
    values: dict = {}
    for name in ("_debug", preset):
        tree = OmegaConf.to_container(OmegaConf.load(CONF / "debug" / f"{name}.yaml"))
        tree.pop("defaults", None)
        values.update(_leaves(tree))
    return values


@pytest.mark.parametrize("experiment", options("experiment"))
def test_debug_presets_win_over_every_experiment_in_either_order(experiment):
    """Each debug preset's every value survives composition with each experiment, typed before or after it, with
    or without `+`; the run folder is under logs/debug/ and the preset's logger is the one chosen."""
    presets = options("debug")
    assert {"fast", "overfit", "limit", "profiler"} <= set(presets)
    for preset in presets:
        want = debug_values(preset)
        logger = next(
            d[next(iter(d))]
            for d in OmegaConf.load(CONF / "debug" / f"{preset}.yaml").defaults
            if isinstance(d, DictConfig) and "logger" in next(iter(d))
        )
        for order in (
            [f"+experiment={experiment}", f"debug={preset}"],
            [f"debug={preset}", f"+experiment={experiment}"],
            [f"+debug={preset}", f"experiment={experiment}"],
        ):
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose(
                    "train", overrides=normalize_overrides("train", order), return_hydra_config=True
                )
            got = OmegaConf.to_container(cfg, resolve=False)
            for key, value in want.items():
                node = got
                for part in key.split("."):
                    node = node[part]
                assert node == value, f"{order}: {key} = {node!r}, the preset says {value!r}"
            assert cfg.hydra.runtime.choices.logger == logger, order
            assert cfg.hydra.runtime.choices.experiment == experiment
            assert "/debug/" in str(got["hydra"]["run"]["dir"])


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
    import torch

    from benchmarks import fusion_tuning
    from liverfusion.data.transforms import build_transform

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


def _one_batch_overrides(tiny_phantom: Path, tmp_path: Path, experiment: str) -> list[str]:
    """Tiny shapes for one experiment: the session's phantom in whichever layout the experiment reads."""
    from tests.helpers import tiny_phantom_overrides

    base = [
        "data.num_workers=0",
        "data.prep_workers=0",
        "data.batch_size=4",
        "data.preprocess.shape=[16,32,32]",
    ]
    data = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    reads_lldmmri = (
        any(
            isinstance(d, DictConfig) and d.get("override /data") == "lldmmri"
            for d in (data.get("defaults") or [])
        )
        or experiment == "cgc_lldmmri"
    )
    if reads_lldmmri:  # the phantom is written in the LLD-MMRI layout: the real reader reads it
        return [*base, f"data.layout.root={tiny_phantom}", f"paths.cache_dir={tmp_path / 'cache'}"]
    return [*tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"), *base]


SLOW_ONE_BATCH = {"lldmmri_baseline", "simsiam_pretrain_gpu"}
"""ResNet-18 variants of a family that runs fast here (cgc_lldmmri, simsiam_pretrain): 15 s each on 2 cores."""


@pytest.mark.parametrize(
    "experiment",
    [pytest.param(e, marks=pytest.mark.slow) if e in SLOW_ONE_BATCH else e for e in options("experiment")],
)
def test_every_experiment_runs_one_batch_with_debug_fast(experiment, tiny_phantom, tmp_path):
    """`debug=fast` (Lightning's fast_dev_run: one train and one validation batch) runs every experiment end to end
    on the tiny phantom; classifiers start from scratch (no encoder.pt needed)."""
    from liverfusion.train import train

    cfg = compose_train(
        [
            f"+experiment={experiment}",
            "debug=fast",
            *_one_batch_overrides(tiny_phantom, tmp_path, experiment),
        ],
        tmp_path,
    )
    with open_dict(cfg):
        if "init" in cfg.model:
            cfg.model.init = "scratch"
        cfg.extras.print_config = False
    assert cfg.trainer.fast_dev_run is True and cfg.data.num_workers == 0
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished, experiment
    losses = {k: v for k, v in metrics.items() if "loss" in k}
    assert losses and all(v == v for v in losses.values()), f"{experiment}: no finite loss logged ({metrics})"
