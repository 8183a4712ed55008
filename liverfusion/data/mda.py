"""MDA: multi-modality data augmentation. A positive pair = two independently augmented views of the SAME case,
usually of two different modalities (phases), so a weight-sharing encoder learns what the phases have in common.

Policies: ``cross`` (two different modalities; uniform or weighted), ``same`` (one modality twice: plain SimSiam,
the ablation without MDA), ``mixed`` (cross with probability ``p_cross``, else same). Only modalities a case really
has are drawn (missing and filler-copy modalities are excluded). A pair is always built from one case, so it can
never mix patients; case and patient ids travel in the batch so that this can be audited.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from liverfusion.data.cache import CachedCase
from liverfusion.data.datamodule import MultiModalDataModule, check_value
from liverfusion.data.datasets import CaseDataset
from liverfusion.data.transforms import build_batch_transform, build_transform, reseed
from liverfusion.errors import ConfigError
from liverfusion.utils.hydra_utils import to_plain

log = logging.getLogger(__name__)

POLICIES = ("cross", "same", "mixed")
PRETRAIN_PARTS = ("train", "unlabelled")
PAIR_KEYS = ("policy", "p_cross", "weights", "fallback_same")


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
            raise ConfigError(f"pairs.policy must be one of {POLICIES}, got {policy!r}")
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
        if self.policy == "same":
            return n >= 1
        return n >= 2 or (n == 1 and self.fallback_same)

    def draw(self, present: Sequence[bool], generator: torch.Generator | None = None) -> tuple[int, int]:
        idx = self.drawable(present)
        if not idx:
            raise ValueError(f"no drawable modality among present={list(present)}")
        w = torch.tensor(self.weights[idx], dtype=torch.float64)
        cross = self.policy == "cross" or (
            self.policy == "mixed" and torch.rand(1, generator=generator).item() < self.p_cross
        )
        if cross and len(idx) >= 2:
            a, b = torch.multinomial(w, 2, replacement=False, generator=generator).tolist()
            return idx[a], idx[b]
        a = int(torch.multinomial(w, 1, generator=generator).item())
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
        return v.as_subclass(torch.Tensor)

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
            "index": index,
        }


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
    """

    def __init__(
        self,
        *args: Any,
        pairs: Mapping[str, Any] | None = None,
        augment: Any = None,
        batch_augment: Any = None,
        pretrain_parts: Sequence[str] = PRETRAIN_PARTS,
        drop_last: bool = True,
        monitor: bool = True,
        **kwargs: Any,
    ):
        kwargs.pop("train_transform", None)
        kwargs.pop("balanced_sampler", None)
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

    def pair_dataset(self) -> PairDataset:
        base = CaseDataset(self.pretrain_entries(), in_memory=self.in_memory)
        return PairDataset(base, self.sampler, self.augment)

    def train_dataloader(self) -> DataLoader:
        ds = self.pair_dataset()
        if len(ds) < self.batch_size and self.drop_last:
            raise ConfigError(
                f"only {len(ds)} pre-training cases for batch_size={self.batch_size} with drop_last"
            )
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
        if self.batch_augment is not None and training and isinstance(batch, dict) and "view1" in batch:
            g = self.batch_generator()
            batch["view1"] = self.batch_augment(batch["view1"], generator=g)  # two calls: independent draws
            batch["view2"] = self.batch_augment(batch["view2"], generator=g)
        return batch
