"""The data modules under their historical import path: ``liverfusion.data.datamodule.ClassificationDataModule`` is
the ``_target_`` that configs and checkpoints name. Each lives in its own module: the base in
:mod:`liverfusion.data.multimodal`, the classification module in :mod:`liverfusion.data.classification`, the MDA
pre-training module in :mod:`liverfusion.data.mda`."""

from liverfusion.data.classification import PREDICT_PARTS, ClassificationDataModule
from liverfusion.data.multimodal import SPLIT_KEYS, MultiModalDataModule, check_value, summarize_entries

__all__ = [
    "PREDICT_PARTS",
    "SPLIT_KEYS",
    "ClassificationDataModule",
    "MultiModalDataModule",
    "check_value",
    "summarize_entries",
]
