"""torch Datasets over cached cases. Items are dicts so ids travel with the tensors (pairs can be audited)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from liverfusion.data.cache import CachedCase


class CaseDataset(Dataset):
    """One item per case: ``image`` (M, D, H, W) float32, ``present`` (M,) bool, ``label`` (-1 = none), ids.

    ``transform`` gets the whole (M, D, H, W) stack, so a random spatial draw is shared by the co-registered
    modalities of a case.
    """

    def __init__(
        self, entries: Sequence[CachedCase], transform: Callable | None = None, in_memory: bool = True
    ):
        self.entries = list(entries)
        self.transform = transform
        self.arrays = [e.load() for e in self.entries] if in_memory else None

    def __len__(self) -> int:
        return len(self.entries)

    def array(self, index: int) -> np.ndarray:
        return self.arrays[index] if self.arrays is not None else self.entries[index].load(mmap=True)

    def __getitem__(self, index: int) -> dict:
        e = self.entries[index]
        x = torch.from_numpy(np.asarray(self.array(index), dtype=np.float32))
        present = torch.tensor(e.present, dtype=torch.bool)
        if self.transform is not None:
            x = torch.as_tensor(self.transform(x)).float()
        x = x * present.view(-1, 1, 1, 1)  # missing modalities stay exactly zero after augmentation
        return {
            "image": x.as_subclass(torch.Tensor),
            "present": present,
            "label": -1 if e.label is None else int(e.label),
            "case_id": e.case_id,
            "patient_id": e.patient_id,
            "index": index,
        }
