"""The LightningDataModule base: it scans a layout, checks and splits it by patient, caches preprocessing, and
serves cases; the classification (:mod:`liverfusion.data.classification`) and MDA pre-training
(:mod:`liverfusion.data.mda`) modules only add their datasets and loaders. Configs and checkpoints name them by
their historical path, :mod:`liverfusion.data.datamodule`."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from liverfusion.data.cache import CachedCase, PreprocessedCache
from liverfusion.data.case import Case
from liverfusion.data.layouts.base import Layout
from liverfusion.data.preprocess import PreprocessConfig
from liverfusion.data.splits import (
    Splits,
    check_cases_against_splits,
    check_coverage,
    make_splits,
    splits_from_case_lists,
)
from liverfusion.errors import ConfigError
from liverfusion.utils.config_sections import check_section, check_value, merge_sections, model_config
from liverfusion.utils.plain import to_plain

log = logging.getLogger(__name__)

SPLIT_KEYS = (
    "n_folds",
    "test_fraction",
    "seed",
    "stratify",
    "file",
    "allow_missing",
    "release_folds",
    "save_to",
)


def split_defaults() -> dict[str, Any]:
    """``data.split`` as conf/data/_base.yaml states it (the one place its defaults live). A value that points into
    the run folder (``save_to: ${paths.output_dir}/splits.json``) is null here: outside a run there is none, so a
    module built in Python writes no split file unless told where."""
    from omegaconf import OmegaConf

    node = OmegaConf.create(model_config("_base", group="data")["split"])
    return {k: None if OmegaConf.is_interpolation(node, k) else node[k] for k in SPLIT_KEYS}


def _without_interpolations(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` less each value (in it or a section of it) that interpolates the run's config: outside a run there
    is nothing to resolve it against."""
    return {
        k: _without_interpolations(v) if isinstance(v, dict) else v
        for k, v in cfg.items()
        if not (isinstance(v, str) and "${" in v)
    }


class MultiModalDataModule(L.LightningDataModule):
    """Base data module.

    Args:
        layout: a :class:`Layout` (Hydra instantiates it from ``data.layout``).
        preprocess: :class:`PreprocessConfig` fields.
        split: ``n_folds``, ``test_fraction``, ``seed``, ``stratify``; ``file`` (reuse a saved split);
            ``release_folds`` (LLD-MMRI ``train_foldK``/``val_foldK`` lists); ``save_to`` (where to write it).
        fold: which fold this run uses.
        label_fraction: share of the training patients whose labels are kept (label-efficiency studies); the rest
            of the training patients still serve pre-training.

    Every value comes from ``conf/data/*.yaml`` (``_base.yaml`` states each key): the keywords have no defaults
    here, and a missing one is a ConfigError naming it (:meth:`__new__`). A module built in Python reads the same
    YAML through :meth:`from_yaml`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> MultiModalDataModule:
        """A keyword the YAML states but the call lacks is one ConfigError naming every such key and where they
        live (Python's TypeError names the parameters of whichever ``__init__`` of the chain lacks them). A call
        with no arguments at all is pickle or copy rebuilding an instance: nothing to check."""
        if args or kwargs:
            missing = [k for k in cls.required_keys() if k not in kwargs]
            if missing:
                raise ConfigError(
                    f"data: missing key(s) {missing} for {cls.__name__}; the YAML states every data key "
                    "(conf/data/_base.yaml; a pre-training module's own: conf/experiment/simsiam_pretrain.yaml)",
                    fix=f"build the data module from conf/data (compose data=<name>, or {cls.__name__}.from_yaml"
                    "(<name>, ...))",
                )
        return super().__new__(cls)

    @classmethod
    def required_keys(cls) -> list[str]:
        """The keyword-only parameters without a default of this class and the data module classes it hands
        ``**kwargs`` to: what a config must state."""
        keys: list[str] = []
        for klass in cls.__mro__:
            if "__init__" not in klass.__dict__ or not issubclass(klass, MultiModalDataModule):
                continue
            params = inspect.signature(klass.__init__).parameters.values()
            keys += [
                p.name
                for p in params
                if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in keys
            ]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return keys

    @classmethod
    def yaml_arguments(cls, name: str) -> dict[str, Any]:
        """This module's arguments as the YAML states them for data set ``name``: ``conf/data/<name>.yaml`` over
        ``_base.yaml``, unresolved (``layout`` a ``_target_`` node). A subclass adds the sections its own configs
        add."""
        return model_config(name, group="data")

    @classmethod
    def from_yaml(
        cls,
        name: str = "phantom",
        *,
        data_dir: str | Path | None = None,
        **overrides: Any,
    ) -> MultiModalDataModule:
        """The module as ``data=<name>`` builds it, from the YAML's values (:meth:`yaml_arguments`) with
        ``overrides`` merged per section (``preprocess={"shape": ...}`` updates that section).

        A value that points into a run (``cache_dir: ${paths.cache_dir}``, ``split.save_to``) is left out: pass
        ``cache_dir`` (else the missing key is named); the split then writes no file unless ``split.save_to`` is
        given. ``layout``: a :class:`Layout`, or else the YAML's node is instantiated, its ``${paths.data_dir}``
        being ``data_dir``.
        """
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from omegaconf.errors import InterpolationResolutionError

        args = cls.yaml_arguments(name)
        layout = overrides.pop("layout", None)
        node = args.pop("layout", None)
        args = merge_sections(_without_interpolations(args), overrides)
        if layout is None:
            if node is None:
                raise ConfigError(f"data={name!r} has no layout node; pass layout=<a Layout>")
            paths = {"data_dir": str(data_dir)} if data_dir is not None else {}
            tree = OmegaConf.create({"paths": paths, "layout": node})
            try:
                node = OmegaConf.to_container(tree.layout, resolve=True)
            except InterpolationResolutionError as err:
                raise ConfigError(
                    f"data={name!r}: data.layout interpolates a value outside it ({str(err).splitlines()[0]})",
                    fix="pass data_dir=<the folder holding the data sets>, or layout=<a Layout>",
                ) from err
            layout = instantiate(node)
        return cls(layout, **args)

    def __init__(
        self,
        layout: Layout,
        *,
        preprocess: Mapping[str, Any] | PreprocessConfig,
        split: Mapping[str, Any],
        fold: int,
        cache_dir: str | Path,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        prep_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        in_memory: bool,
        label_fraction: float,
        progress: bool,
    ):
        super().__init__()
        self.layout = layout
        # prepare_data's scan, for this process's setup
        self._prepared: tuple[list[Case], list, list[CachedCase]] | None = None
        pre = to_plain(preprocess) or {}
        self.preprocess = pre if isinstance(pre, PreprocessConfig) else PreprocessConfig.from_dict(pre)
        self.split_cfg = self._check_split(to_plain(split) or {})
        self.cache_dir = Path(cache_dir)
        self.batch_size = check_value("data.batch_size", batch_size, "int", low=1)
        eval_bs = check_value("data.eval_batch_size", eval_batch_size, "int", low=1, optional=True)
        self.eval_batch_size = eval_bs or self.batch_size
        self.num_workers = check_value("data.num_workers", num_workers, "int", low=0)
        self.prep_workers = check_value("data.prep_workers", prep_workers, "int", low=0)
        self.pin_memory = check_value("data.pin_memory", pin_memory, "bool")
        self.persistent_workers = check_value("data.persistent_workers", persistent_workers, "bool")
        self.persistent_workers = self.persistent_workers and self.num_workers > 0
        self.in_memory = check_value("data.in_memory", in_memory, "bool")
        self.label_fraction = check_value("data.label_fraction", label_fraction, "float", 0, 1, low_open=True)
        self.progress = progress
        # a user's split file is read now: a bad file or a fold it lacks fails before any data is read
        self.split_file: Splits | None = None
        if self.split_cfg["file"] and self._uses_split():
            self.split_file = Splits.load(self.split_cfg["file"])
        n_folds = self.split_file.n_folds if self.split_file else self.split_cfg["n_folds"]
        self.fold = check_value("data.fold", fold, "int", 0, n_folds - 1)
        self.cases: list[Case] = []
        self.entries: dict[str, CachedCase] = {}
        self.splits: Splits | None = None
        self.partition: dict[str, list[str]] = {}

    @staticmethod
    def _check_split(given: Mapping[str, Any]) -> dict[str, Any]:
        """``data.split``: known keys only, each in range; a key not given (a module built in Python with part of
        the section) has the value conf/data/_base.yaml states (:func:`split_defaults`)."""
        if not isinstance(given, Mapping):
            raise ConfigError(f"data.split must be a mapping with keys {list(SPLIT_KEYS)}, got {given!r}")
        given = check_section("split", given, (), SPLIT_KEYS, where="data")
        absent = [k for k in SPLIT_KEYS if k not in given]
        cfg = {**split_defaults(), **given} if absent else given
        cfg["n_folds"] = check_value("data.split.n_folds", cfg["n_folds"], "int", low=2)
        cfg["test_fraction"] = check_value(
            "data.split.test_fraction", cfg["test_fraction"], "float", 0, 1, high_open=True
        )
        cfg["seed"] = check_value("data.split.seed", cfg["seed"], "int", 0, 2**32 - 1)
        for key in ("stratify", "allow_missing", "release_folds"):
            cfg[key] = check_value(f"data.split.{key}", cfg[key], "bool")
        for key in ("file", "save_to"):
            if cfg[key] is not None and not isinstance(cfg[key], (str, Path)):
                raise ConfigError(f"data.split.{key}={cfg[key]!r}: must be a path or null")
        if cfg["file"]:
            cfg["file"] = str(Path(cfg["file"]).expanduser().resolve())
            if cfg["release_folds"]:
                raise ConfigError(
                    "data.split.file and data.split.release_folds=true: choose one source of folds"
                )
        return cfg

    def _uses_split(self) -> bool:
        """Whether this module splits the patients (a separate cohort served whole does not)."""
        return True

    # ---- facts other parts need (the classifier's checkpoint metadata, the encoder export) ----
    @property
    def modalities(self) -> list[str]:
        return list(self.layout.modalities)

    @property
    def class_names(self) -> list[str]:
        return list(self.layout.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.layout.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.preprocess.shape)

    def data_spec(self) -> dict[str, Any]:
        """What a downstream model must agree with: layout, modalities, classes, preprocessing."""
        return {
            "dataset": self.layout.name,
            "layout": self.layout.describe(),
            "modalities": self.modalities,
            "class_names": self.class_names,
            "input_shape": list(self.input_shape),
            "preprocess": self.preprocess.as_dict(),
            "split": self.split_spec(),
            "fold": self.fold,
        }

    def split_spec(self) -> dict[str, Any]:
        """The split settings that rebuild this run's patient split (evaluation re-applies them): with a split
        file, its absolute path and its fold count, so the same test patients are used again."""
        spec = {
            k: self.split_cfg[k] for k in ("n_folds", "test_fraction", "seed", "stratify", "release_folds")
        }
        if self.split_cfg["file"]:
            spec["file"] = self.split_cfg["file"]
            spec["allow_missing"] = self.split_cfg["allow_missing"]
            if self.split_file is not None:
                spec["n_folds"] = self.split_file.n_folds
        return spec

    # ---- Lightning hooks ----
    def _cache(self) -> PreprocessedCache:
        return PreprocessedCache(self.cache_dir, self.layout.name, self.modalities, self.preprocess)

    def prepare_data(self) -> None:
        """Rank 0 decodes and caches every case once; its scan serves this process's ``setup`` (a data set is
        listed and checked once per run, not twice)."""
        cases = self.layout.scan()
        cached = self._cache().build(cases, workers=self.prep_workers, progress=self.progress)
        self._prepared = (cases, list(self.layout.skipped), cached)

    def setup(self, stage: str | None = None) -> None:
        if self.entries:
            return
        self._scan_and_cache()
        self.splits = self._make_splits()
        part = self.splits.partition(self.fold)
        check_cases_against_splits(self.cases, part, path=self.split_cfg["file"])
        part["unlabelled"] = list(self.splits.unlabelled)
        self.partition = part
        if self.split_cfg.get("save_to"):
            self.splits.save(self.split_cfg["save_to"])

    def _scan_and_cache(self) -> list[CachedCase]:
        """Scan the layout (its skipped cases warned about) and cache every case: fills ``cases`` and ``entries``."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            self.cases, skipped, cached = prepared
        else:
            self.cases = self.layout.scan()
            skipped = self.layout.skipped
        for case_id, why in skipped:
            log.warning("case %s left out: %s", case_id, why)
        if prepared is None:
            cached = self._cache().build(self.cases, workers=self.prep_workers, progress=self.progress)
        self.entries = {e.case_id: e for e in cached}
        return cached

    def _make_splits(self) -> Splits:
        cfg = self.split_cfg
        if self.split_file is not None:
            check_coverage(self.cases, self.split_file, cfg["file"], allow_missing=cfg["allow_missing"])
            return self.split_file
        if cfg.get("release_folds"):
            from liverfusion.data.layouts.lldmmri import read_label_lines

            if not hasattr(self.layout, "fold_file"):
                raise ConfigError("split.release_folds needs a layout with fold files (LLD-MMRI)")
            n = int(cfg["n_folds"])
            train = [[c for c, _ in read_label_lines(self.layout.fold_file("train", k))] for k in range(n)]
            val = [[c for c, _ in read_label_lines(self.layout.fold_file("val", k))] for k in range(n)]
            return splits_from_case_lists(self.cases, train, val, seed=int(cfg["seed"]))
        return make_splits(
            self.cases,
            n_folds=int(cfg["n_folds"]),
            test_fraction=float(cfg["test_fraction"]),
            seed=int(cfg["seed"]),
            stratify=bool(cfg["stratify"]),
        )

    # ---- case selection ----
    def part_entries(self, part: str, labelled_only: bool = False) -> list[CachedCase]:
        if not self.partition:
            raise RuntimeError("call setup() first")
        patients = set(self.partition[part])
        chosen = [e for e in self.entries.values() if e.patient_id in patients]
        if part == "train" and self.label_fraction < 1.0:
            chosen = self._subsample_labels(chosen)
        if labelled_only:
            chosen = [e for e in chosen if e.label is not None]
        return sorted(chosen, key=lambda e: e.case_id)

    def _subsample_labels(self, entries: list[CachedCase]) -> list[CachedCase]:
        """Keep labels of a stratified ``label_fraction`` of training patients; the others become unlabelled."""
        from liverfusion.data.splits import patient_labels

        cases = [c for c in self.cases if c.case_id in {e.case_id for e in entries}]
        plabels = patient_labels(cases)
        g = torch.Generator().manual_seed(int(self.split_cfg["seed"]) + 7919 * (self.fold + 1))
        keep: set[str] = set()
        for cls in sorted({y for y in plabels.values() if y is not None}):
            members = sorted(p for p, y in plabels.items() if y == cls)
            n = max(1, round(self.label_fraction * len(members)))
            order = torch.randperm(len(members), generator=g).tolist()
            keep |= {members[i] for i in order[:n]}
        out = []
        for e in entries:
            if e.patient_id in keep or e.label is None:
                out.append(e)
            else:
                out.append(CachedCase(e.case_id, e.patient_id, None, e.present, e.path, e.meta))
        return out

    def _loader(
        self, dataset, shuffle: bool, drop_last: bool = False, sampler=None, batch_size=None, collate_fn=None
    ) -> DataLoader:
        # torchdata's StatefulDataLoader: Lightning checkpoints its position, so a run killed mid-epoch resumes
        # with the remaining batches of that epoch in the original order (not a restarted, truncated epoch)
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=drop_last,
            collate_fn=collate_fn,
        )


def summarize_entries(entries: Sequence[CachedCase], class_names: Sequence[str]) -> dict[str, Any]:
    """Cases, patients, labelled cases per class and unlabelled cases of one split (for logs, reports and the
    model card; with ``label_fraction < 1`` the withheld training labels count as unlabelled)."""
    counts = [0] * len(class_names)
    unlabelled = 0
    for e in entries:
        if e.label is None:
            unlabelled += 1
        else:
            counts[e.label] += 1
    return {
        "cases": len(entries),
        "patients": len({e.patient_id for e in entries}),
        "per_class": dict(zip(class_names, counts)),
        "unlabelled": unlabelled,
    }
