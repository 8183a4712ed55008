"""MDA: multi-modality data augmentation. A positive pair = two independently augmented views of the SAME case,
usually of two different modalities (phases), so a weight-sharing encoder learns what the phases have in common.

Policies: ``cross`` (two different modalities; uniform or weighted), ``same`` (one modality twice: plain SimSiam,
the ablation without MDA), ``mixed`` (cross with probability ``p_cross``, else same). Only modalities a case really
has are drawn (missing and filler-copy modalities are excluded).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from liverfusion.data.cache import CachedCase
from liverfusion.data.datamodule import MultiModalDataModule, _to_plain
from liverfusion.data.datasets import CaseDataset
from liverfusion.data.transforms import build_transform, reseed
from liverfusion.errors import ConfigError

log = logging.getLogger(__name__)

POLICIES = ("cross", "same", "mixed")


class PairSampler:
    """Draws the two modality indices of a pair from a case's available modalities."""

    def __init__(self, modalities: Sequence[str], policy: str = "cross", p_cross: float = 0.5,
                 weights: Mapping[str, float] | None = None, fallback_same: bool = False):
        if policy not in POLICIES:
            raise ConfigError(f"pairs.policy must be one of {POLICIES}, got {policy!r}")
        self.modalities = list(modalities)
        self.policy = policy
        self.p_cross = float(p_cross)
        unknown = set(weights or {}) - set(self.modalities)
        if unknown:
            raise ConfigError(f"pairs.weights names unknown modalities {sorted(unknown)}; have {self.modalities}")
        self.weights = np.array([float((weights or {}).get(m, 1.0)) for m in self.modalities])
        self.fallback_same = fallback_same

    def usable(self, present: Sequence[bool]) -> bool:
        return self.policy == "same" or sum(present) >= 2 or self.fallback_same

    def draw(self, present: Sequence[bool], generator: torch.Generator | None = None) -> tuple[int, int]:
        idx = [i for i, p in enumerate(present) if p]
        w = torch.tensor(self.weights[idx], dtype=torch.float64)
        cross = self.policy == "cross" or (
            self.policy == "mixed" and torch.rand(1, generator=generator).item() < self.p_cross)
        if cross and len(idx) >= 2:
            a, b = torch.multinomial(w, 2, replacement=False, generator=generator).tolist()
            return idx[a], idx[b]
        a = torch.multinomial(w, 1, generator=generator).item()
        return idx[a], idx[a]


class PairDataset(Dataset):
    """Items: ``view1``/``view2`` (1, D, H, W), their modality indices, case/patient ids and label."""

    def __init__(self, base: CaseDataset, sampler: PairSampler, transform: Any = None):
        self.base = base
        self.sampler = sampler
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def _view(self, x: np.ndarray, m: int) -> torch.Tensor:
        v = torch.from_numpy(np.asarray(x[m : m + 1], dtype=np.float32))
        if self.transform is not None:
            reseed(self.transform)
            v = torch.as_tensor(self.transform(v)).float()
        return v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v

    def __getitem__(self, index: int) -> dict:
        e: CachedCase = self.base.entries[index]
        m1, m2 = self.sampler.draw(e.present)
        x = self.base.array(index)
        return {
            "view1": self._view(x, m1),
            "view2": self._view(x, m2),
            "modality1": m1,
            "modality2": m2,
            "label": -1 if e.label is None else int(e.label),
            "case_id": e.case_id,
            "patient_id": e.patient_id,
        }


class MDADataModule(MultiModalDataModule):
    """Pre-training pairs from the training (+ unlabelled) patients; val/test patients are never seen.

    The validation loaders serve the kNN monitor: 0 = memory bank (labelled training cases, all modalities, no
    augmentation), 1 = queries (labelled validation cases).
    """

    def __init__(self, *args: Any, pairs: Mapping[str, Any] | None = None, augment: Any = None,
                 pretrain_parts: Sequence[str] = ("train", "unlabelled"), drop_last: bool = True,
                 monitor: bool = True, **kwargs: Any):
        kwargs.pop("train_transform", None)
        kwargs.pop("balanced_sampler", None)
        super().__init__(*args, **kwargs)
        pairs = dict(_to_plain(pairs) or {})
        self.sampler = PairSampler(self.modalities, **pairs)
        self.augment = build_transform(augment)
        self.pretrain_parts = list(pretrain_parts)
        if "test" in self.pretrain_parts:
            raise ConfigError("pretrain_parts must not include 'test': pre-training never sees test patients")
        self.drop_last = drop_last
        self.monitor = monitor
        self.left_out: list[str] = []

    def pretrain_entries(self) -> list[CachedCase]:
        entries = [e for part in self.pretrain_parts for e in self.part_entries(part)]
        usable = [e for e in entries if self.sampler.usable(e.present)]
        self.left_out = sorted(e.case_id for e in entries if not self.sampler.usable(e.present))
        if entries and not usable:
            raise ConfigError(
                f"pairs.policy={self.sampler.policy!r} needs two modalities per case, but every case of "
                f"{self.layout.name!r} has one ({self.modalities}); use pairs.policy=same or "
                "pairs.fallback_same=true")
        if self.left_out:
            log.warning("%d case(s) with a single modality left out of cross-modality pairs: %s",
                        len(self.left_out), self.left_out[:10])
        return usable

    def pair_dataset(self) -> PairDataset:
        base = CaseDataset(self.pretrain_entries(), in_memory=self.in_memory)
        return PairDataset(base, self.sampler, self.augment)

    def train_dataloader(self) -> DataLoader:
        ds = self.pair_dataset()
        if len(ds) < self.batch_size and self.drop_last:
            raise ConfigError(f"only {len(ds)} pre-training cases for batch_size={self.batch_size} with drop_last")
        return self._loader(ds, shuffle=True, drop_last=self.drop_last)

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
