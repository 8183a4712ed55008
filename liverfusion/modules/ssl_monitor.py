"""The online monitors of an SSL run, on frozen features of whole cases: a kNN classifier (bank = labelled train
cases, queries = validation cases) and an optional linear probe trained on detached features. Monitors, not
results: they say whether the features are learning something, epoch by epoch, without touching the encoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_f1_score

from liverfusion.metrics.knn import case_vectors, knn_scores

BANK, QUERY = 0, 1  # validation dataloader indices of the kNN monitor


class OnlineMonitor:
    """The kNN monitor and the online probe of ``SSLModule`` (a mixin): ``validation_step`` collects case
    features per validation loader, ``on_validation_epoch_end`` gathers them from every process and logs
    ``monitor/knn_*`` and ``monitor/probe_f1``; :meth:`probe_train_loss` trains the probe during training steps.

    Reads ``backbone``, ``prepare_input``, ``knn_cfg``, ``probe`` (an ``nn.Linear`` or None), ``num_classes``,
    ``modalities`` and ``_val`` (the collected features) of the module.
    """

    backbone: Any
    prepare_input: Callable[[torch.Tensor], torch.Tensor]
    knn_cfg: dict[str, Any]
    probe: nn.Linear | None
    num_classes: int
    modalities: list[str]
    _val: dict[int, dict[str, list[torch.Tensor]]]

    @torch.no_grad()
    def monitor_features(
        self, image: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, S, F) features of whole cases and their (N, S) mask: every modality on its own for the modality
        backbone (missing ones zero), one fused slot for a stack backbone."""
        return self.backbone.monitor_features(image, present, self.prepare_input)

    def probe_train_loss(self, feats: torch.Tensor, batch: dict, n: int) -> torch.Tensor:
        """Cross-entropy of the linear probe on detached features of labelled cases (0 when none is labelled)."""
        labels = torch.as_tensor(batch["label"], device=feats.device)
        keep = labels >= 0
        logits = self.probe(feats.detach()[keep])
        if not bool(keep.any()):
            return logits.sum() * 0.0  # keeps the probe in the graph (DDP expects every parameter used)
        probe_loss = F.cross_entropy(logits, labels[keep])
        acc = (logits.argmax(1) == labels[keep]).float().mean()
        k = int(keep.sum())
        self.log(
            "monitor/probe_train_loss", probe_loss, on_step=False, on_epoch=True, batch_size=k, sync_dist=True
        )
        self.log("monitor/probe_train_acc", acc, on_step=False, on_epoch=True, batch_size=k, sync_dist=True)
        return probe_loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not (self.knn_cfg["enabled"] or self.probe is not None):
            return
        per_slot, mask = self.monitor_features(batch["image"], batch["present"])
        store = self._val.setdefault(dataloader_idx, {"feats": [], "labels": [], "index": [], "probe": []})
        store["feats"].append(case_vectors(per_slot, mask).float())  # the kNN input
        store["labels"].append(torch.as_tensor(batch["label"], device=self.device))
        store["index"].append(torch.as_tensor(batch["index"], device=self.device))
        if self.probe is not None and dataloader_idx == QUERY:
            weights = mask.to(per_slot.dtype)
            logits = self.probe(per_slot) * weights.unsqueeze(
                -1
            )  # mean over the slots (modalities) a case has
            store["probe"].append(logits.sum(1) / weights.sum(1, keepdim=True).clamp_min(1))

    def gather_unique(self, tensors: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """All processes' rows, each dataset item once.

        Shards may differ in length, and DistributedSampler pads them by repeating items, so rows are padded to
        a common length for ``all_gather``, trimmed back, and de-duplicated by the dataset index.
        """
        if self.trainer.world_size > 1:
            sizes = self.all_gather(torch.tensor([index.shape[0]], device=self.device)).flatten().tolist()
            longest = max(sizes)

            def gather(t: torch.Tensor) -> torch.Tensor:
                padded = F.pad(t, [0, 0] * (t.ndim - 1) + [0, longest - t.shape[0]])
                g = self.all_gather(padded)  # (world, longest, ...)
                return torch.cat([g[r, : sizes[r]] for r in range(len(sizes))])

            tensors = [gather(t) for t in tensors]
            index = gather(index)
        order = torch.argsort(index, stable=True)
        index = index[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        return [t[order][first] for t in tensors]

    def _collected(self, idx: int, with_probe: bool = False) -> list[torch.Tensor]:
        store = self._val.get(idx) or {}
        width = self.backbone.monitor_width(len(self.modalities))
        feats = torch.cat(store["feats"]) if store.get("feats") else torch.zeros(0, width, device=self.device)
        labels = (
            torch.cat(store["labels"])
            if store.get("labels")
            else torch.zeros(0, dtype=torch.long, device=self.device)
        )
        index = (
            torch.cat(store["index"])
            if store.get("index")
            else torch.zeros(0, dtype=torch.long, device=self.device)
        )
        out = [feats, labels.long()]
        if with_probe:
            out.append(
                torch.cat(store["probe"])
                if store.get("probe")
                else torch.zeros(0, self.num_classes, device=self.device)
            )
        return self.gather_unique(out, index.long())

    def on_validation_epoch_end(self) -> None:
        nothing_here = not self._val and self.trainer.world_size == 1  # under DDP every rank must gather
        if not self.num_classes or not (self.knn_cfg["enabled"] or self.probe is not None) or nothing_here:
            self._val.clear()
            return
        bank, bank_y = self._collected(BANK)
        query, query_y, *probe = self._collected(QUERY, with_probe=self.probe is not None)
        self._val.clear()
        if len(bank) == 0 or len(query) == 0:
            return
        self.log("monitor/knn_bank", float(len(bank)))  # each case once, whatever the sharding across ranks
        self.log("monitor/knn_queries", float(len(query)))
        if self.knn_cfg["enabled"]:
            scores = knn_scores(
                bank,
                bank_y,
                query,
                query_y,
                self.num_classes,
                int(self.knn_cfg["k"]),
                float(self.knn_cfg["temperature"]),
            )
            self.log("monitor/knn_f1", scores["f1"])
            self.log("monitor/knn_acc", scores["acc"])
        if probe:
            self.log(
                "monitor/probe_f1", multiclass_f1_score(probe[0], query_y, self.num_classes, average="macro")
            )
