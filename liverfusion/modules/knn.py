"""Case vectors of a live encoder for the kNN monitor (``benchmarks/pretrain_knn.py``): each modality encoded on its
own, then the one case-vector formula of :mod:`liverfusion.metrics.knn`, where the kNN classifier itself lives."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from liverfusion.metrics.knn import case_vectors, knn_predict, knn_scores

__all__ = ["case_features", "encode_loader", "knn_predict", "knn_scores"]


@torch.no_grad()
def case_features(
    encoder: torch.nn.Module, image: torch.Tensor, present: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """(N, M * F): the case vectors (:func:`~liverfusion.metrics.knn.case_vectors`) of the pooled features of each
    modality of each case; missing modalities are zeros."""
    n, m = image.shape[:2]
    x = image.reshape(n * m, 1, *image.shape[2:])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return case_vectors(encoder(x).pooled.reshape(n, m, -1).float(), present)


@torch.no_grad()
def encode_loader(
    encoder: torch.nn.Module, batches: Iterable[dict], channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Case features and labels of every batch of a case loader (``image``, ``present``, ``label``)."""
    feats, labels = [], []
    was_training = encoder.training
    encoder.eval()
    try:
        for batch in batches:
            feats.append(case_features(encoder, batch["image"], batch["present"], channels_last))
            labels.append(torch.as_tensor(batch["label"]))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
