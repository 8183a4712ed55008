"""MDA: multi-modality data augmentation. A positive pair = two independently augmented views of the SAME case,
usually of two different modalities (phases), so a weight-sharing encoder learns what the phases have in common.

Policies (``data.pairs.policy``), each a list of views of one case (``batch["views"]``):
- ``cross`` (the paper's MDA: two different modalities; uniform or weighted), ``same`` (one modality twice: plain
  SimSiam, the ablation without MDA), ``mixed`` (cross with probability ``p_cross``, else same);
- ``hybrid``: three views, anchor modality a, another modality b, and a again: (0, 1) is a cross-phase pair (what
  the phases share), (0, 2) a same-phase pair (what phase a adds); the method trains one part of the embedding on
  each (DeCUR / FactorCL split shared and specific parts);
- ``stack``: two views, each the whole multi-phase stack of the case (M channels, absent phases zero). A view's
  spatial augmentation is shared by all its phases, so cross-phase contrast survives; intensity augmentation is
  drawn per phase; the two views are independent. What is pre-trained is the network that sees all phases.
Only modalities a case really has are drawn (missing and filler-copy modalities are excluded). Views are always built
from one case, so they can never mix patients; case and patient ids travel in the batch so that this can be audited.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, default_collate

from liverfusion.data.batched_monai import BatchRandScaleCropResize
from liverfusion.data.cache import CachedCase
from liverfusion.data.datamodule import MultiModalDataModule, check_value
from liverfusion.data.datasets import CaseDataset
from liverfusion.data.transforms import (
    BatchRandAffine,
    BatchRandFlip,
    build_batch_transform,
    build_transform,
    reseed,
)
from liverfusion.errors import ConfigError
from liverfusion.utils.config_sections import merge_sections, model_config
from liverfusion.utils.plain import to_plain

log = logging.getLogger(__name__)

POLICIES = ("cross", "same", "mixed", "hybrid", "stack")
STACK = -1  # view_modalities value of a stack view (all modalities at once)
PRETRAIN_PARTS = ("train", "unlabelled")
PAIR_KEYS = ("policy", "p_cross", "weights", "fallback_same")
_CLASSIFICATION_KEYS = (
    "train_transform",
    "balanced_sampler",
    "eval_crop",
)  # in conf/data/_base.yaml, not taken here


class PairSampler:
    """Draws the two modality indices of a pair from a case's available modalities.

    ``weights`` (modality name -> relative weight, default 1) bias which phases are drawn; under ``cross`` the
    second modality is drawn from the remaining ones with the same weights.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        policy: str = "cross",
        p_cross: float = 0.5,
        weights: Mapping[str, float] | None = None,
        fallback_same: bool = False,
    ):
        if policy not in POLICIES:
            raise ConfigError(f"data.pairs.policy: unknown policy {policy!r}; choose one of {list(POLICIES)}")
        if policy in ("hybrid", "stack") and len(modalities) < 2:
            raise ConfigError(
                f"data.pairs.policy={policy!r} needs a data set with two or more modalities, this one has "
                f"{list(modalities)}; use pairs.policy=same"
            )
        self.p_cross = check_value("data.pairs.p_cross", p_cross, "float", 0, 1)
        self.modalities = list(modalities)
        self.policy = policy
        weights = dict(to_plain(weights) or {})
        unknown = set(weights) - set(self.modalities)
        if unknown:
            raise ConfigError(
                f"pairs.weights names unknown modalities {sorted(unknown)}; have {self.modalities}"
            )
        weights = {m: check_value(f"data.pairs.weights.{m}", w, "float", low=0) for m, w in weights.items()}
        self.weights = np.array([weights.get(m, 1.0) for m in self.modalities])
        self.fallback_same = check_value("data.pairs.fallback_same", fallback_same, "bool")

    def drawable(self, present: Sequence[bool]) -> list[int]:
        """Indices of the modalities a case has and that may be drawn (weight > 0)."""
        return [i for i, p in enumerate(present) if p and self.weights[i] > 0]

    def usable(self, present: Sequence[bool]) -> bool:
        """Whether the case can give a pair under this policy (else it is left out and counted)."""
        n = len(self.drawable(present))
        if self.policy in ("same", "stack"):
            return n >= 1
        return n >= 2 or (n == 1 and self.fallback_same)

    @property
    def num_views(self) -> int:
        return 3 if self.policy == "hybrid" else 2

    def draw_views(
        self, present: Sequence[bool], generator: torch.Generator | None = None
    ) -> tuple[int, ...]:
        """The modality index of each view (:data:`STACK` for a stack view)."""
        if self.policy == "stack":
            return (STACK, STACK)
        if self.policy == "hybrid":
            a, b = PairSampler.draw(self, present, generator, cross=True)
            return (a, b, a)
        return self.draw(present, generator)

    def draw(
        self, present: Sequence[bool], generator: torch.Generator | None = None, cross: bool | None = None
    ) -> tuple[int, int]:
        idx = self.drawable(present)
        if not idx:
            raise ValueError(f"no drawable modality among present={list(present)}")
        w = torch.tensor(self.weights[idx], dtype=torch.float64)
        if cross is None:
            cross = self.policy == "cross" or (
                self.policy == "mixed" and torch.rand(1, generator=generator).item() < self.p_cross
            )
        if cross and len(idx) >= 2:
            a, b = torch.multinomial(w, 2, replacement=False, generator=generator).tolist()
            return idx[a], idx[b]
        a = int(torch.multinomial(w, 1, generator=generator).item())
        return idx[a], idx[a]


def split_spatial(transform: Any) -> tuple[Any, Any]:
    """(spatial part, intensity part) of a per-view pipeline, for ``stack`` views: the spatial part runs once on the
    whole stack (one draw shared by its phases), the intensity part per phase. Spatial items must come first."""
    if transform is None:
        return None, None
    items = list(transform.transforms) if isinstance(transform, Compose) else [transform]
    kinds = [_is_spatial(t) for t in items]
    if any(later and not earlier for earlier, later in zip(kinds, kinds[1:])):
        names = [type(t).__name__ for t in items]
        raise ConfigError(
            f"data.augment {names}: policy stack applies the spatial transforms to the whole stack and the "
            "intensity transforms per phase, so every spatial transform must come before the intensity ones"
        )
    spatial = [t for t, k in zip(items, kinds) if k]
    intensity = [t for t, k in zip(items, kinds) if not k]
    return (Compose(spatial) if spatial else None), (Compose(intensity) if intensity else None)


def _is_spatial(t: Any) -> bool:
    """MONAI's spatial and crop/pad transforms, torchio's SpatialTransform, liverfusion's batched flip / affine /
    crop + resize."""
    module = type(t).__module__
    if module.startswith(("monai.transforms.spatial", "monai.transforms.croppad")):
        return True
    if module.startswith("torchio"):
        import torchio

        return isinstance(t, torchio.transforms.SpatialTransform)
    return isinstance(t, BatchRandFlip | BatchRandAffine | BatchRandScaleCropResize)


class ViewDataset(Dataset):
    """Items: ``views`` (a list of (C, D, H, W) tensors, C = 1 per modality view, C = M per stack view),
    ``view_modalities`` (the modality of each view, -1 for a stack), ``present`` (M,), case/patient ids, label."""

    def __init__(self, base: CaseDataset, sampler: PairSampler, transform: Any = None):
        self.base = base
        self.sampler = sampler
        self.transform = transform
        self.spatial, self.intensity = split_spatial(transform) if sampler.policy == "stack" else (None, None)

    def __len__(self) -> int:
        return len(self.base)

    def _view(self, x: np.ndarray, m: int) -> torch.Tensor:
        v = torch.from_numpy(np.asarray(x[m : m + 1], dtype=np.float32))
        return _augmented(v, self.transform)

    def _stack(self, x: np.ndarray, present: Sequence[bool]) -> torch.Tensor:
        keep = torch.tensor(list(present), dtype=torch.float32).view(-1, 1, 1, 1)
        v = _augmented(torch.from_numpy(np.asarray(x, dtype=np.float32)) * keep, self.spatial)
        if self.intensity is not None:  # each phase its own draw; absent phases stay zero
            v = torch.cat(
                [
                    _augmented(v[m : m + 1], self.intensity) if p else v[m : m + 1]
                    for m, p in enumerate(present)
                ]
            )
        return v

    def __getitem__(self, index: int) -> dict:
        e: CachedCase = self.base.entries[index]
        chosen = self.sampler.draw_views(e.present)
        x = self.base.array(index)
        views = [self._stack(x, e.present) if m == STACK else self._view(x, m) for m in chosen]
        return {
            "views": views,
            "view_modalities": torch.tensor(chosen, dtype=torch.long),
            "present": torch.tensor(list(e.present), dtype=torch.bool),
            "label": -1 if e.label is None else int(e.label),
            "case_id": e.case_id,
            "patient_id": e.patient_id,
            "index": index,
        }


def _augmented(v: torch.Tensor, transform: Any) -> torch.Tensor:
    if transform is not None:
        reseed(transform)
        v = torch.as_tensor(transform(v)).float()
    return v.as_subclass(torch.Tensor)


def collate_views(items: list[dict]) -> dict:
    """Default collate, except that ``view_modalities`` becomes one (N,) tensor per view, like ``views``."""
    batch = default_collate(items)
    batch["view_modalities"] = list(batch["view_modalities"].unbind(1))
    return batch


class MDADataModule(MultiModalDataModule):
    """Pre-training pairs from the training (+ unlabelled) patients; val/test patients are never seen.

    Args (beyond :class:`MultiModalDataModule`):
        pairs: :class:`PairSampler` arguments (``policy``, ``p_cross``, ``weights``, ``fallback_same``).
        augment: per-view MONAI/torchio transforms (a list, run in the loader workers).
        batch_augment: batched tensor transforms (``liverfusion.data.transforms.Batch*``) applied to each view
            of a training batch after it reaches the device, with per-sample draws.
        pretrain_parts: which patients give pairs: ``train`` and/or ``unlabelled`` (never val or test).
        drop_last: drop the last incomplete batch (BatchNorm of the SimSiam heads needs full batches).
        monitor: serve the kNN monitor's loaders: 0 = memory bank (labelled training cases, all modalities,
            no augmentation), 1 = queries (labelled validation cases).

    These keys are stated by the pre-training experiment (``conf/experiment/simsiam_pretrain.yaml``'s ``data``
    section, which names this class) and the ``augment`` group; :meth:`yaml_arguments` reads them from there.
    """

    @classmethod
    def yaml_arguments(cls, name: str) -> dict[str, Any]:
        """The data set's YAML (less the classification keys) with the pre-training experiment's ``data`` section
        over it (this module's own keys, and its batch size), as ``+experiment=simsiam_pretrain`` composes them;
        no augmentation (``conf/augment/none.yaml``) unless the caller passes one."""
        args = super().yaml_arguments(name)
        for key in _CLASSIFICATION_KEYS:
            args.pop(key, None)
        experiment = model_config("simsiam_pretrain", group="experiment")["data"]
        experiment.pop("_target_", None)
        return merge_sections(args, {**experiment, **model_config("none", group="augment")})

    def __init__(
        self,
        *args: Any,
        pairs: Mapping[str, Any],
        augment: Any,
        batch_augment: Any,
        pretrain_parts: Sequence[str],
        drop_last: bool,
        monitor: bool,
        **kwargs: Any,
    ):
        for key in _CLASSIFICATION_KEYS:  # conf/data/_base.yaml serves both modules
            kwargs.pop(key, None)
        super().__init__(*args, **kwargs)
        pairs = dict(to_plain(pairs) or {})
        unknown = sorted(set(pairs) - set(PAIR_KEYS))
        if unknown:
            raise ConfigError(f"data.pairs: unknown key(s) {unknown}; known keys: {list(PAIR_KEYS)}")
        self.sampler = PairSampler(self.modalities, **pairs)
        self.augment = build_transform(augment)
        self.batch_augment = build_batch_transform(batch_augment)
        self.pretrain_parts = [pretrain_parts] if isinstance(pretrain_parts, str) else list(pretrain_parts)
        bad = [p for p in self.pretrain_parts if p not in PRETRAIN_PARTS]
        if bad or not self.pretrain_parts:
            raise ConfigError(
                f"data.pretrain_parts={self.pretrain_parts}: pre-training may use one or both of "
                f"{list(PRETRAIN_PARTS)} only, so validation and test patients stay unseen"
            )
        self.drop_last = check_value("data.drop_last", drop_last, "bool")
        self.monitor = check_value("data.monitor", monitor, "bool")
        self.left_out: list[str] = []
        self._generator: torch.Generator | None = None
        self._warned = False

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.pretrain_entries()  # fail before training when the policy cannot work on this data set

    def pretrain_entries(self) -> list[CachedCase]:
        entries = [e for part in self.pretrain_parts for e in self.part_entries(part)]
        usable = [e for e in entries if self.sampler.usable(e.present)]
        self.left_out = sorted(e.case_id for e in entries if not self.sampler.usable(e.present))
        if entries and not usable:
            raise ConfigError(
                f"pairs.policy={self.sampler.policy!r} needs two modalities per case, but no case of "
                f"{self.layout.name!r} has two (modalities: {self.modalities}); use pairs.policy=same or "
                "pairs.fallback_same=true"
            )
        if not entries:
            raise ConfigError(f"no pre-training cases in {self.pretrain_parts} of fold {self.fold}")
        if self.left_out and not self._warned:
            self._warned = True
            log.warning(
                "%d case(s) with fewer than two modalities left out of %s pairs: %s%s",
                len(self.left_out),
                self.sampler.policy,
                self.left_out[:10],
                " ..." if len(self.left_out) > 10 else "",
            )
        return usable

    def pretrain_summary(self) -> dict[str, Any]:
        """Counts for the log and the run record: cases/patients that give pairs and how many were left out."""
        usable = self.pretrain_entries()
        return {
            "cases": len(usable),
            "patients": len({e.patient_id for e in usable}),
            "left_out": len(self.left_out),
            "policy": self.sampler.policy,
        }

    @property
    def view_plan(self) -> dict[str, Any]:
        """What a batch's views mean, for the SSL module to check it can use them (see the module docstring)."""
        kind = "stack" if self.sampler.policy == "stack" else "modality"
        return {"policy": self.sampler.policy, "views": self.sampler.num_views, "kind": kind}

    def pair_dataset(self) -> ViewDataset:
        base = CaseDataset(self.pretrain_entries(), in_memory=self.in_memory)
        return ViewDataset(base, self.sampler, self.augment)

    def train_dataloader(self) -> DataLoader:
        ds = self.pair_dataset()
        if len(ds) < self.batch_size and self.drop_last:
            raise ConfigError(
                f"only {len(ds)} pre-training cases for batch_size={self.batch_size} with drop_last"
            )
        return self._loader(ds, shuffle=True, drop_last=self.drop_last, collate_fn=collate_views)

    def monitor_datasets(self) -> tuple[CaseDataset, CaseDataset] | None:
        bank = self.part_entries("train", labelled_only=True)
        query = self.part_entries("val", labelled_only=True)
        if not (self.monitor and bank and query):
            return None
        return CaseDataset(bank, in_memory=self.in_memory), CaseDataset(query, in_memory=self.in_memory)

    def val_dataloader(self) -> list[DataLoader]:
        sets = self.monitor_datasets()
        if sets is None:
            return []
        return [self._loader(s, shuffle=False, batch_size=self.eval_batch_size) for s in sets]

    # ---- batched augmentation on the device ----
    def batch_generator(self) -> torch.Generator:
        """CPU generator for the batched draws: seeded from torch's seed and the rank, so runs reproduce under
        ``seed_everything`` and the ranks of a DDP job draw differently."""
        if self._generator is None:
            rank = int(getattr(self.trainer, "global_rank", 0) or 0) if self.trainer is not None else 0
            self._generator = torch.Generator().manual_seed((torch.initial_seed() + 1_000_003 * rank) % 2**63)
        return self._generator

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is None or self.trainer.training
        if self.batch_augment is not None and training and isinstance(batch, dict) and "views" in batch:
            g = self.batch_generator()
            stack = self.sampler.policy == "stack"
            # one call per view: independent draws
            batch["views"] = [self._batch_view(v, g, stack, batch["present"]) for v in batch["views"]]
        return batch

    def _batch_view(
        self, v: torch.Tensor, g: torch.Generator, stack: bool, present: torch.Tensor
    ) -> torch.Tensor:
        """A stack view: spatial transforms on the whole stack (shared by its phases), intensity ones per phase."""
        if not stack:
            return self.batch_augment(v, generator=g)
        n, m = v.shape[:2]
        for t in self.batch_augment.transforms:
            v = (
                t(v, generator=g)
                if _is_spatial(t)
                else t(v.reshape(n * m, 1, *v.shape[2:]), generator=g).view_as(v)
            )
        return v * present.view(n, m, 1, 1, 1).to(v.dtype)
