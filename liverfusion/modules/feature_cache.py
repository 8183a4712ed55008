"""Frozen encoder outputs kept per case, so a linear probe trains its fusion block without re-encoding images.

A mixin of :class:`liverfusion.modules.classifier.FusionClassifier` (it reads the classifier's ``cache_cfg``,
``net``, ``encoder_frozen`` and ``trainer``). ``feature_cache.enabled``: ``auto`` caches when the encoder is frozen,
the fusion shares it (not early fusion) and nothing is augmented; ``true`` insists (and says why it cannot);
``false`` never caches. Once every case of a split is cached the datamodule is told, so it stops loading images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from liverfusion.errors import ConfigError
from liverfusion.models.classifier_net import EncodedModalities


class FeatureCacheMixin:
    """``encode`` served from a per-(kind, case) cache of pooled features and maps (kind: ``train`` or ``eval``)."""

    def _reset_cache(self) -> None:
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_on = False

    def _want_cache(self, dm: Any) -> bool:
        enabled = self.cache_cfg["enabled"]
        possible = self.encoder_frozen and self.net.mode == "shared"
        if enabled in (False, "false", "off"):
            return False
        augmented = dm is not None and getattr(dm, "train_transform", None) is not None
        if enabled in (True, "true", "on"):
            if not possible:
                raise ConfigError(
                    "model.feature_cache.enabled=true needs a frozen encoder (finetune.mode=linear_probe) and a "
                    "shared-encoder fusion (not early)"
                )
            if augmented:
                raise ConfigError(
                    "model.feature_cache.enabled=true with data.train_transform: augmented views "
                    "change every epoch, so cached features would be wrong"
                )
            return True
        return possible and not augmented

    def encode(self, batch: Mapping[str, Any], kind: str) -> EncodedModalities:
        """Encoder outputs of a batch; frozen encoders run without a graph and may serve from the cache."""
        x, present = batch["image"], batch["present"]
        if not self._cache_on:
            if self.encoder_frozen:
                with torch.no_grad():
                    return self.net.encode(x, present)
            return self.net.encode(x, present)
        ids = list(batch["case_id"])
        uncached = [i for i, c in enumerate(ids) if (kind, c) not in self._cache]
        if uncached:
            with torch.no_grad():
                enc = self.net.encode(x[uncached], present[uncached])
            for j, i in enumerate(uncached):
                self._cache[(kind, ids[i])] = (enc.pooled[j].detach().cpu(), enc.maps[j].detach().cpu())
        pooled = torch.stack([self._cache[(kind, c)][0] for c in ids]).to(x.device)
        maps = torch.stack([self._cache[(kind, c)][1] for c in ids]).to(x.device)
        return EncodedModalities(pooled, maps, present)

    def _forget_cached(self, kind: str) -> None:
        """Drop the cached features of ``kind`` (the test loop may run on reloaded weights)."""
        self._cache = {k: v for k, v in self._cache.items() if k[0] != kind}

    def on_train_epoch_end(self) -> None:
        self._offer_cache("train", "train")

    def _offer_cache(self, part: str, kind: str) -> None:
        """Tell the datamodule which cases' features are cached, so it can stop loading their images."""
        dm = getattr(self.trainer, "datamodule", None)
        if self._cache_on and hasattr(dm, "features_cached"):
            dm.features_cached(part, {c for k, c in self._cache if k == kind})
