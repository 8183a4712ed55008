"""The classification data module: labelled cases of each split for the fusion classifier, with the training
augmentation, the evaluation crop, a class-balanced sampler, and image-free serving once the model caches frozen
encoder features. The base (scan, split, cache) is :class:`liverfusion.data.multimodal.MultiModalDataModule`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from liverfusion.data.datasets import CaseDataset
from liverfusion.data.multimodal import MultiModalDataModule, check_value
from liverfusion.data.transforms import build_transform, reseed
from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.plain import to_plain

log = logging.getLogger(__name__)

__all__ = ["PREDICT_PARTS", "ClassificationDataModule"]


class _Reseeded:
    """Re-seeds a MONAI random pipeline from torch's generator before each call, so augmentation is reproducible
    under ``seed_everything(workers=True)`` and differs between DataLoader workers."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        reseed(self.transform)
        return self.transform(x)


PREDICT_PARTS = ("train", "val", "test", "all")


class _FeatureCachedView(Dataset):
    """A CaseDataset whose items drop the image once the model holds every case's (frozen) encoder features.

    Loading, converting and collating (M, D, H, W) stacks costs more than probing a fusion block on cached
    features; ``image_free`` is switched on by :meth:`ClassificationDataModule.features_cached`.
    """

    def __init__(self, base: CaseDataset):
        self.base = base
        self.entries = base.entries
        self.image_free = False

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        if not self.image_free:
            return self.base[index]
        e = self.entries[index]
        return {
            "image": torch.zeros(len(e.present), 1, 1, 1),  # no volume: the model reads its feature cache
            "present": torch.tensor(e.present, dtype=torch.bool),
            "label": -1 if e.label is None else int(e.label),
            "case_id": e.case_id,
            "patient_id": e.patient_id,
            "index": index,
        }


class ClassificationDataModule(MultiModalDataModule):
    """Labelled cases of each split for the fusion classifier.

    Args (beyond the base class):
        train_transform: a list of MONAI/torchio transforms (Hydra ``_target_`` items) or a callable, applied to
            the whole (M, D, H, W) stack of a training case: one random spatial draw for all co-registered
            modalities (the LLD-MMRI baseline flips and rotates every phase identically).
        eval_crop: centre crop (D, H, W) for validation, test and prediction (the counterpart of a random training
            crop), or null. Recorded in ``data_spec`` so checkpoints carry it.
        balanced_sampler: draw training cases with probability inversely proportional to their class frequency.
        drop_last: drop the last incomplete training batch (BatchNorm dislikes a batch of one).
        predict_part: the split that ``predict_dataloader`` serves: train, val, test, or ``all`` (every case of
            the data set, labelled or not, with no split made: a separate cohort).

    Like the base class's, these keywords have no defaults (the YAML states them), except ``predict_part``, which
    evaluate and predict set to the split they serve (tests/test_config_defaults.py lists it).
    """

    def __init__(
        self,
        *args: Any,
        train_transform: Any,
        balanced_sampler: bool,
        drop_last: bool,
        eval_crop: Sequence[int] | None,
        predict_part: str = "test",
        **kwargs: Any,
    ):
        if predict_part not in PREDICT_PARTS:
            raise ConfigError(f"data.predict_part={predict_part!r}: choose one of {PREDICT_PARTS}")
        self.predict_part = predict_part  # set first: the base reads no split file for a whole cohort ("all")
        super().__init__(*args, **kwargs)
        items = to_plain(train_transform)
        built = build_transform(items)
        self.train_transform = _Reseeded(built) if built is not None else None
        crop = to_plain(eval_crop)
        if crop is not None and (len(crop) != 3 or min(int(c) for c in crop) < 1):
            raise ConfigError(f"data.eval_crop must be null or 3 positive sizes (D, H, W), got {crop}")
        self.eval_crop = [int(c) for c in crop] if crop is not None else None
        self.eval_transform = None
        if self.eval_crop is not None:
            from monai.transforms import CenterSpatialCrop

            self.eval_transform = CenterSpatialCrop(roi_size=self.eval_crop)
        self.balanced_sampler = check_value("data.balanced_sampler", balanced_sampler, "bool")
        self.drop_last = check_value("data.drop_last", drop_last, "bool")
        self._views: dict[str, _FeatureCachedView] = {}

    def data_spec(self) -> dict[str, Any]:
        spec = super().data_spec()
        spec["eval_crop"] = self.eval_crop
        spec["network_input_shape"] = self.eval_crop or list(self.input_shape)
        return spec

    def _uses_split(self) -> bool:
        return self.predict_part != "all"

    def setup(self, stage: str | None = None) -> None:
        if self.predict_part != "all":
            super().setup(stage)
            return
        if self.entries:
            return
        # a separate cohort: every case, no split (its labelled patients may be too few to fold)
        cached = self._scan_and_cache()
        self.partition = {"all": sorted({e.patient_id for e in cached})}

    def dataset(self, part: str, train: bool = False, labelled_only: bool = True) -> CaseDataset:
        entries = self.part_entries(part, labelled_only=labelled_only)
        if not entries:
            raise DataError(
                f"split {part!r} of fold {self.fold} has no {'labelled ' if labelled_only else ''}cases"
            )
        transform = self.train_transform if train else self.eval_transform
        return CaseDataset(entries, transform=transform, in_memory=self.in_memory)

    def class_counts(self) -> list[int]:
        counts = [0] * self.num_classes
        for e in self.part_entries("train", labelled_only=True):
            counts[e.label] += 1
        return counts

    def features_cached(self, part: str, case_ids: set[str]) -> bool:
        """The model holds frozen features of ``case_ids``: if they cover the served ``part`` (train / val) and it
        is not augmented, serve it without images from now on. Returns whether images are now skipped."""
        view = self._views.get(part)
        if view is None or (part == "train" and self.train_transform is not None):
            return False
        if not view.image_free and all(e.case_id in case_ids for e in view.entries):
            view.image_free = True
            log.info(
                "%s split: encoder features cached for all %d cases; images no longer loaded", part, len(view)
            )
        return view.image_free

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train", train=True)
        self._views["train"] = ds = _FeatureCachedView(ds)
        sampler = None
        if self.balanced_sampler:
            counts = self.class_counts()
            weights = [1.0 / counts[e.label] for e in ds.entries]
            sampler = WeightedRandomSampler(weights, num_samples=len(ds), replacement=True)
        drop_last = self.drop_last and len(ds) > self.batch_size
        return self._loader(ds, shuffle=True, drop_last=drop_last, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        self._views["val"] = ds = _FeatureCachedView(self.dataset("val"))
        return self._loader(ds, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Every case of ``predict_part``, unlabelled ones included (label -1)."""
        ds = self.dataset(self.predict_part, labelled_only=False)
        return self._loader(ds, shuffle=False, batch_size=self.eval_batch_size)
