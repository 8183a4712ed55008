"""Shape-static inference of a classifier network or fold ensemble: what ``torch.export`` traces (``export``) and
what Grad-CAM hooks (``explain``). Every modality volume is encoded and the absent ones are zeroed, where the
training network encodes only the present ones (a data-dependent shape that cannot be traced); with the encoder in
eval mode each volume is encoded on its own, so the logits are the same."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from liverfusion.models.fusion import mask_modalities


class DenseClassifier(nn.Module):
    """One classifier network with shape-static inference: every modality volume is encoded, absent ones zeroed
    (the training network indexes the present ones, a data-dependent shape ``torch.export`` cannot trace)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.encoder, self.fusion, self.mode = net.encoder, net.fusion, net.mode
        keep = torch.ones(len(net.modalities), dtype=torch.bool)
        used = net.fusion.used_modalities()
        if used is not None:
            keep[:] = False
            keep[used] = True
        self.register_buffer("keep", keep)

    def forward(self, image: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        if self.mode == "early":
            out = self.encoder(mask_modalities(image, present))
            pooled, maps, mask = out.pooled[:, None], out.map[:, None], present.any(dim=1, keepdim=True)
        else:
            n, m = present.shape
            selected = present & self.keep
            out = self.encoder(image.reshape(n * m, 1, *image.shape[2:]))
            pooled = out.pooled.reshape(n, m, -1) * selected[..., None].to(out.pooled.dtype)
            maps = out.map.reshape(n, m, *out.map.shape[1:]) * selected.view(n, m, 1, 1, 1, 1).to(
                out.map.dtype
            )
            mask = present
        return self.fusion(maps if self.fusion.consumes == "map" else None, pooled, mask).logits


class EnsembleLogProbs(nn.Module):
    """The members' mean probability, as log-probabilities (one member: its log-softmax)."""

    def __init__(self, nets: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(DenseClassifier(n) for n in nets)

    def forward(self, image: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        parts = torch.stack([m(image, present).float().log_softmax(dim=1) for m in self.members])
        return torch.logsumexp(parts, dim=0) - torch.log(torch.tensor(float(len(self.members))))
