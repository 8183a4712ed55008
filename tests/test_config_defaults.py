"""The YAML is the one place a default is read: every option of every config group, composed into the training
config, states in each ``_target_`` node of ours every parameter that has a default in code.

A node's target is one of our classes or functions (``liverfusion.*``, ``hydra_plugins.liverfusion_plugins.*``);
Lightning, MONAI and Optuna targets keep their libraries' defaults. A class's parameters include those of our base
classes that it hands ``**kwargs`` to (less what it passes them itself). A parameter the framework passes at
instantiate time is listed in FRAMEWORK with why. The cheap objects are also instantiated from the YAML alone (the
models with a tiny encoder, the data modules without setup), so the YAML is what they accept.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from liverfusion.data.datamodule import ClassificationDataModule
from liverfusion.models.encoder_factory import ENCODERS
from liverfusion.utils.hydra_utils import CONFIG_DIR, normalize_overrides

CONF = Path(CONFIG_DIR)
OURS = ("liverfusion.", "hydra_plugins.liverfusion_plugins.")


def _plain(group: str) -> Callable[[str], list[str]]:
    return lambda option: [f"{group}={option}"]


# group -> how the training config selects one of its options
SELECT: dict[str, Callable[[str], list[str]]] = {
    **{g: _plain(g) for g in ("data", "model", "callbacks", "logger", "trainer", "paths", "extras", "debug")},
    "hparams_search": _plain("hparams_search"),
    "experiment": lambda o: [f"+experiment={o}"],
    "encoder": lambda o: ["model=classifier", f"encoder@model.encoder={o}"],
    "fusion": lambda o: ["model=classifier", f"fusion@model.fusion={o}"],
    "augment": lambda o: ["+experiment=simsiam_pretrain", f"augment={o}"],
    "hydra/sweeper": lambda o: [f"hydra/sweeper={o}"],
    "hydra/launcher": lambda o: [f"hydra/launcher={o}"],
}

# parameter -> (targets it is passed to, why the YAML does not state it)
FRAMEWORK: dict[str, tuple[tuple[str, ...], str]] = {
    "data_spec": (
        ("liverfusion.modules.",),
        "train and evaluate instantiate the model with the data module's data_spec() (what the data set is)",
    ),
    "predict_part": (
        ("liverfusion.data.datamodule.ClassificationDataModule",),
        "evaluate and predict set data.predict_part to the split they serve; a training run serves none",
    ),
    "spatial_dims": (
        ("liverfusion.models.build_encoder",),
        "build_encoder fixes it by the encoder's name (resnet3d: 3); a config may not set it",
    ),
}

# (target, parameter) -> the line to add: gaps in files outside this check's change, to close there. Each must still
# be a gap (test_pending_gaps_are_still_gaps says when one is closed, so its entry goes).
PENDING: dict[tuple[str, str], str] = {}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def resolve_target(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _super_call(cls: type) -> tuple[int, set[str], bool] | None:
    """How ``cls.__init__`` calls ``super().__init__``: (arguments passed by position, keyword names, whether it
    hands on ``**kwargs``); None without such a call."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if (
            isinstance(node, ast.Call)
            and isinstance(func, ast.Attribute)
            and func.attr == "__init__"
            and isinstance(func.value, ast.Call)
            and getattr(func.value.func, "id", None) == "super"
        ):
            positional = sum(not isinstance(a, ast.Starred) for a in node.args)
            return (
                positional,
                {k.arg for k in node.keywords if k.arg},
                any(k.arg is None for k in node.keywords),
            )
    return None


def code_defaults(target: Any) -> list[str]:
    """Parameters of ``target`` with a default in code, following ``**kwargs`` into our base classes."""
    if not inspect.isclass(target):
        sig = inspect.signature(target)
        return [n for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty]
    found: list[str] = []
    passed: set[str] = set()  # given by a subclass, not by the config
    n_positional = 0
    for klass in (k for k in target.__mro__ if "__init__" in k.__dict__):
        if klass is not target and not klass.__module__.startswith(OURS):
            break
        params = [p for n, p in inspect.signature(klass.__init__).parameters.items() if n != "self"]
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        by_position = [p.name for p in named if p.kind is p.POSITIONAL_OR_KEYWORD][:n_positional]
        for p in named:
            if p.name in passed or p.name in by_position or p.name in found:
                continue
            if p.default is not inspect.Parameter.empty:
                found.append(p.name)
        call = _super_call(klass)
        if call is None or not call[2] or not any(p.kind is p.VAR_KEYWORD for p in params):
            break
        n_positional, keywords, _ = call
        passed |= keywords | {p.name for p in named}
    return found


def unstated(target_path: str, node: dict) -> list[str]:
    """The parameters with a code default that ``node`` does not state (framework-passed ones aside)."""
    names = code_defaults(resolve_target(target_path))
    if target_path == "liverfusion.models.build_encoder":  # the name picks the class that takes the rest
        names += code_defaults(ENCODERS[node.get("name", "resnet3d")])
    framework = {p for p, (targets, _) in FRAMEWORK.items() if target_path.startswith(targets)}
    return [n for n in dict.fromkeys(names) if n not in node and n not in framework]


def our_nodes(tree: Any, path: str = "") -> list[tuple[str, dict]]:
    """(dotted path, node) of every ``_target_`` node naming our code."""
    out = []
    if isinstance(tree, dict):
        if str(tree.get("_target_", "")).startswith(OURS):
            out.append((path, tree))
        for key, value in tree.items():
            out += our_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            out += our_nodes(item, f"{path}[{i}]")
    return out


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=normalize_overrides("train", overrides), return_hydra_config=True)


def files_of(cfg, node_path: str) -> list[str]:
    """The chosen config files that may state ``node_path`` (their package is a prefix of it, or global)."""
    out = []
    for key, option in cfg.hydra.runtime.choices.items():
        if option is None or not (CONF / key.split("@")[0] / f"{option}.yaml").is_file():
            continue
        file = CONF / key.split("@")[0] / f"{option}.yaml"
        header = file.read_text().split("\n", 1)[0]
        package = header.removeprefix("# @package ").strip() if header.startswith("# @package") else None
        package = (
            package if package is not None else key.split("@")[1] if "@" in key else key.replace("/", ".")
        )
        if package == "_global_" or node_path == package or node_path.startswith(f"{package}."):
            out.append(str(file.relative_to(CONF.parent)))
    return out


@functools.cache
def gaps() -> dict[tuple[str, str], list[str]]:
    """(target, parameter) -> where it is not stated, over every option of every group."""
    found: dict[tuple[str, str], list[str]] = {}
    for group, select in SELECT.items():
        for option in options(group):
            cfg = compose_train(select(option))
            tree = OmegaConf.to_container(cfg, resolve=False)
            for path, node in our_nodes(tree):
                for name in unstated(node["_target_"], node):
                    where = f"{group}={option}: {path} ({', '.join(files_of(cfg, path))})"
                    found.setdefault((node["_target_"], name), []).append(where)
    return found


def test_every_group_with_a_target_is_checked():
    """A new config group of ours is not skipped silently: each folder holding a ``_target_`` has a SELECT entry."""
    groups = {
        str(p.parent.relative_to(CONF))
        for p in CONF.rglob("*.yaml")
        if p.parent != CONF and "_target_:" in p.read_text()
    }
    assert groups <= set(SELECT), sorted(groups - set(SELECT))


def test_every_code_default_is_stated_in_the_yaml():
    missing = {k: v for k, v in gaps().items() if k not in PENDING}
    lines = [
        f"{target}: parameter {name!r} not stated in "
        + "; ".join(where[:3])
        + (" ..." if len(where) > 3 else "")
        for (target, name), where in missing.items()
    ]
    assert not missing, "add each parameter with the code's value:\n" + "\n".join(lines)


def test_pending_gaps_are_still_gaps():
    closed = [k for k in PENDING if k not in gaps()]
    assert not closed, f"stated now, remove from PENDING: {closed}"


def test_the_check_finds_a_default_the_yaml_does_not_state():
    """A default added in code (here on a data module subclass) and not in the YAML is reported; one passed on by
    the subclass itself is not."""

    class Knobbed(ClassificationDataModule):
        def __init__(self, *args: Any, new_knob: int = 3, **kwargs: Any):
            super().__init__(*args, predict_part="test", **kwargs)

    cfg = compose_train(["data=phantom"])
    node = OmegaConf.to_container(cfg.data, resolve=False)
    found = code_defaults(Knobbed)
    assert found == ["new_knob"], found  # the base has none left; predict_part the subclass passes itself
    target = "liverfusion.data.datamodule.ClassificationDataModule"
    reported = [n for n in found if n not in node and n not in FRAMEWORK and (target, n) not in PENDING]
    assert reported == ["new_knob"], reported


DATA_MODULES = ("liverfusion.data.datamodule.ClassificationDataModule", "liverfusion.data.mda.MDADataModule")


@pytest.mark.parametrize("target", DATA_MODULES)
def test_data_modules_take_every_value_from_the_yaml(target):
    """A data module keyword has no default in code (the YAML states it): one that regains a default fails here,
    even where the YAML states it too. Only a key the framework passes (FRAMEWORK) or a PENDING gap keeps one."""
    allowed = {p for p, (targets, _) in FRAMEWORK.items() if target.startswith(targets)}
    allowed |= {name for t, name in PENDING if t == target}
    found = code_defaults(resolve_target(target))
    assert not [n for n in found if n not in allowed], f"{target}: drop the code default of {found}"
    assert "batch_size" in resolve_target(target).required_keys()


def test_a_missing_data_key_is_a_config_error_naming_it(tmp_path):
    """Built from a config lacking a key (or in Python without it), the module names the key and where the values
    live, instead of Python's TypeError from deep in the ``__init__`` chain."""
    from hydra.errors import InstantiationException

    from liverfusion.data.mda import MDADataModule
    from liverfusion.errors import ConfigError

    for overrides, key in ((["data=phantom"], "batch_size"), (["+experiment=simsiam_pretrain"], "monitor")):
        cfg = _with_paths(compose_train(overrides), tmp_path)
        with open_dict(cfg):
            del cfg.data[key]
        with pytest.raises(InstantiationException) as info:
            instantiate(cfg.data)
        cause = info.value.__cause__
        assert isinstance(cause, ConfigError) and f"[{key!r}]" in str(cause), cause
        assert "conf/data" in cause.fix and "from_yaml" in cause.fix
    for cls in (ClassificationDataModule, MDADataModule):
        with pytest.raises(ConfigError, match=r"missing key\(s\) \['cache_dir'\]"):
            cls.from_yaml("phantom", data_dir=tmp_path)  # cache_dir interpolates the run's paths: not taken


def test_from_yaml_builds_what_the_composed_config_builds(tmp_path):
    """``from_yaml`` (the Python way in) reads the values a run composes: the data set's file over _base.yaml, and
    for the MDA module the pre-training experiment's own keys."""
    from liverfusion.data.mda import MDADataModule

    for cls, overrides in (
        (ClassificationDataModule, ["data=phantom"]),
        (MDADataModule, ["+experiment=simsiam_pretrain"]),
    ):
        cfg = _with_paths(compose_train(overrides), tmp_path)
        run = instantiate(cfg.data)
        built = cls.from_yaml("phantom", data_dir=cfg.paths.data_dir, cache_dir=cfg.paths.cache_dir)
        assert type(built) is type(run) and built.layout.describe() == run.layout.describe()
        assert built.split_cfg == {**run.split_cfg, "save_to": None}  # no run folder to write the split into
        keys = [
            "batch_size",
            "eval_batch_size",
            "num_workers",
            "prep_workers",
            "fold",
            "cache_dir",
            "drop_last",
        ]
        keys += ["pretrain_parts", "monitor"] if cls is MDADataModule else ["balanced_sampler", "eval_crop"]
        for key in keys:
            assert getattr(built, key) == getattr(run, key), key
        assert built.preprocess == run.preprocess
        if cls is MDADataModule:
            assert vars(built.sampler).keys() == vars(run.sampler).keys()
            assert built.sampler.policy == run.sampler.policy and built.sampler.p_cross == run.sampler.p_cross


def test_a_base_class_fixing_arguments_is_followed():
    """FolderLayout passes modalities and class names to Layout itself; the rest of Layout's defaults it hands on."""
    from liverfusion.data.layouts import FolderLayout

    found = code_defaults(FolderLayout)
    assert "modalities" not in found and "class_names" not in found
    assert {"case_regex", "patient_regex", "clinical", "detect_duplicates"} <= set(found)


def _with_paths(cfg, tmp_path: Path):
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.mark.parametrize("option", [o for o in options("data") if o not in ("template", "prepared")])
def test_each_data_module_accepts_its_yaml(option, tmp_path):
    cfg = _with_paths(compose_train([f"data={option}"]), tmp_path)
    dm = instantiate(cfg.data)  # no setup: nothing is read or generated
    assert dm.split_cfg == OmegaConf.to_container(cfg.data.split, resolve=True)
    assert dm.batch_size == cfg.data.batch_size and dm.progress is cfg.data.progress


TINY = ["model.encoder.widths=[4,8,8,8]"]
SPEC = {
    "dataset": "toy",
    "modalities": ["T2WI", "DWI", "C+A"],
    "class_names": ["a", "b"],
    "input_shape": [16, 32, 32],
    "preprocess": {"shape": [16, 32, 32], "normalize": "median"},
}


@pytest.mark.parametrize(
    "overrides",
    [[f"model={m}"] for m in options("model")]
    + [SELECT["fusion"](f) for f in options("fusion")]
    + [SELECT["encoder"](e) for e in options("encoder")],
    ids=lambda o: " ".join(o),
)
def test_each_model_accepts_its_yaml(overrides, tmp_path):
    cfg = _with_paths(compose_train([*overrides, *TINY]), tmp_path)
    model = instantiate(cfg.model, data_spec=SPEC)
    assert sum(p.numel() for p in model.parameters()) > 0
    held = model.cfg if hasattr(model, "cfg") else dict(model.hparams)  # SSL methods | the classifier
    stated = OmegaConf.to_container(cfg.model, resolve=True)
    sections = [
        k for k, v in stated.items() if isinstance(v, dict) and k not in ("encoder", "fusion", "backbone")
    ]
    assert sections
    for name in sections:
        assert held[name] == stated[name], name  # the YAML's values, nothing added or changed in code
