"""Base self-supervised LightningModule (solo-learn's BaseMethod idea): optimiser with parameter groups,
lr scaled by the global batch, warm-up + cosine, epoch-level collapse metric with an alarm, a kNN monitor and an
optional online linear probe, and the ``encoder.pt`` export. Methods subclass it and implement ``ssl_step``.
"""

from __future__ import annotations

import abc
import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

import liverfusion
from liverfusion.models.collapse import L2NormalizedStd
from liverfusion.models.encoder_base import Encoder
from liverfusion.modules.knn import knn_predict
from liverfusion.modules.schedule import build_optimizer, build_scheduler, scaled_lr, split_decay
from liverfusion.utils.atomic import atomic_path

log = logging.getLogger(__name__)

ENCODER_FORMAT = "liverfusion-encoder/1"


def _plain(obj: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


class SSLModule(L.LightningModule, abc.ABC):
    def __init__(
        self,
        encoder: Encoder,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        knn: Mapping[str, Any] | None = None,
        probe: Mapping[str, Any] | None = None,
        collapse: Mapping[str, Any] | None = None,
        export: Mapping[str, Any] | None = None,
        data_spec: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.optimizer_cfg = {"name": "sgd", "base_lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
                              "exclude_bn_bias": False, "lr_reference_batch": 256, **(_plain(optimizer) or {})}
        self.scheduler_cfg = {"warmup_fraction": 0.0, "min_lr_ratio": 0.0, **(_plain(scheduler) or {})}
        self.knn_cfg = {"enabled": True, "k": 20, "temperature": 0.07, **(_plain(knn) or {})}
        self.probe_cfg = {"enabled": False, "lr": 0.1, **(_plain(probe) or {})}
        self.collapse_cfg = {"alarm_fraction": 0.5, "stop": False, **(_plain(collapse) or {})}
        self.export_cfg = {"filename": "encoder.pt", "wandb_artifact": True, **(_plain(export) or {})}
        self.data_spec = dict(_plain(data_spec) or {})
        self.num_classes = len(self.data_spec.get("class_names") or [])
        self.modalities = list(self.data_spec.get("modalities") or [])
        self.probe = (nn.Linear(self._probe_in_dim(), self.num_classes)
                      if self.probe_cfg["enabled"] and self.num_classes else None)
        self._knn_feats: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        self._knn_labels: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        self.encoder_path: Path | None = None
        self.save_hyperparameters(ignore=["encoder"])

    # ---- what a method implements ----
    @abc.abstractmethod
    def ssl_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (loss, projector output z for the collapse metric, pooled features of view 1 for the probe)."""

    @property
    @abc.abstractmethod
    def z_dim(self) -> int:
        """Width of the projector output z (the collapse metric's d)."""

    def method_parameter_groups(self) -> list[dict[str, Any]]:
        """Extra groups beyond the encoder (heads); ``fixed_lr`` groups skip the schedule."""
        return []

    # ---- training ----
    def _probe_in_dim(self) -> int:
        return self.encoder.feature_dim

    def setup(self, stage: str) -> None:
        self.z_std = L2NormalizedStd(self.z_dim).to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, z, feats = self.ssl_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite SimSiam loss {loss.item()} at global step {self.global_step} "
                f"(cases {list(batch.get('case_id', []))[:8]}): lower the lr or check the inputs")
        self.z_std.update(z)
        n = batch["view1"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        if self.probe is not None:
            labels = torch.as_tensor(batch["label"], device=self.device)
            keep = labels >= 0
            if keep.any():
                logits = self.probe(feats.detach()[keep])
                probe_loss = F.cross_entropy(logits, labels[keep])
                acc = (logits.argmax(1) == labels[keep]).float().mean()
                self.log("monitor/probe_loss", probe_loss, on_step=False, on_epoch=True, batch_size=int(keep.sum()))
                self.log("monitor/probe_train_acc", acc, on_step=False, on_epoch=True, batch_size=int(keep.sum()))
                loss = loss + probe_loss
        return loss

    def on_train_epoch_end(self) -> None:
        z_std = self.z_std.compute()
        self.z_std.reset()
        healthy = 1.0 / math.sqrt(self.z_dim)
        self.log("train/z_std", z_std, sync_dist=False)
        self.log("train/collapse", 1.0 - math.sqrt(self.z_dim) * z_std, sync_dist=False)
        if z_std < self.collapse_cfg["alarm_fraction"] * healthy:
            msg = (f"collapse alarm at epoch {self.current_epoch}: z_std {z_std:.4f} < "
                   f"{self.collapse_cfg['alarm_fraction']} / sqrt({self.z_dim}) = "
                   f"{self.collapse_cfg['alarm_fraction'] * healthy:.4f}")
            rank_zero_warn(msg)
            if self.collapse_cfg["stop"]:
                self.trainer.should_stop = True

    # ---- kNN monitor over frozen features (bank = labelled train cases, queries = val cases) ----
    @torch.no_grad()
    def case_features(self, image: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Pooled features of every modality of each case, concatenated (missing modalities -> zeros)."""
        n, m = image.shape[:2]
        pooled = self.encoder(image.reshape(n * m, 1, *image.shape[2:])).pooled.reshape(n, m, -1)
        pooled = pooled * present.unsqueeze(-1).to(pooled.dtype)
        return pooled.reshape(n, -1)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.knn_cfg["enabled"]:
            return
        feats = self.case_features(batch["image"], batch["present"])
        self._knn_feats[dataloader_idx].append(feats.float())
        self._knn_labels[dataloader_idx].append(torch.as_tensor(batch["label"], device=self.device))

    def on_validation_epoch_end(self) -> None:
        if not (self.knn_cfg["enabled"] and self._knn_feats[0] and self._knn_feats[1] and self.num_classes):
            return
        gathered = []
        for idx in (0, 1):
            f = torch.cat(self._knn_feats[idx])
            y = torch.cat(self._knn_labels[idx])
            if self.trainer.world_size > 1:  # ragged shards: gather is fine because sizes match by padding
                f = self.all_gather(f).reshape(-1, f.shape[-1])
                y = self.all_gather(y).reshape(-1)
            gathered.append((f, y))
            self._knn_feats[idx].clear()
            self._knn_labels[idx].clear()
        (bank, bank_y), (query, query_y) = gathered
        scores = knn_predict(bank, bank_y, query, self.num_classes, int(self.knn_cfg["k"]),
                             float(self.knn_cfg["temperature"]))
        self.log("monitor/knn_f1", multiclass_f1_score(scores, query_y, self.num_classes, average="macro"))
        self.log("monitor/knn_acc", multiclass_accuracy(scores, query_y, self.num_classes, average="micro"))

    # ---- optimisation ----
    def global_batch(self) -> tuple[int, int, int]:
        dm = getattr(self.trainer, "datamodule", None)
        batch = int(getattr(dm, "batch_size", 1) or 1)
        return batch, int(self.trainer.world_size), int(self.trainer.accumulate_grad_batches)

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        batch, world, accum = self.global_batch()
        lr = scaled_lr(float(cfg["base_lr"]), batch, world, accum, int(cfg["lr_reference_batch"]))
        wd = float(cfg["weight_decay"])
        groups: list[dict[str, Any]] = []
        decay, no_decay = split_decay(self.encoder.named_parameters(), bool(cfg["exclude_bn_bias"]))
        groups.append({"name": "encoder", "params": decay, "lr": lr, "weight_decay": wd})
        if no_decay:
            groups.append({"name": "encoder_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
        for g in self.method_parameter_groups():
            groups.append({"lr": lr, "weight_decay": wd, **g})
        if self.probe is not None:  # the probe is a monitor: its own lr, no weight decay, no schedule
            groups.append({"name": "probe", "params": list(self.probe.parameters()),
                           "lr": float(self.probe_cfg["lr"]), "weight_decay": 0.0, "fixed_lr": True})
        groups = [g for g in groups if g["params"]]
        optimizer = build_optimizer(groups, cfg)
        scheduler = build_scheduler(optimizer, int(self.trainer.estimated_stepping_batches), self.scheduler_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- export ----
    def encoder_payload(self) -> dict[str, Any]:
        return {
            "format": ENCODER_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
            "encoder_config": self.encoder.config(),
            "modalities": self.modalities,
            "input_shape": self.data_spec.get("input_shape"),
            "preprocess": self.data_spec.get("preprocess"),
            "dataset": self.data_spec.get("dataset"),
            "method": type(self).__name__,
            "seed": self.data_spec.get("seed"),
            "epochs": int(self.current_epoch),
            "global_step": int(self.global_step),
            "liverfusion_version": liverfusion.__version__,
        }

    def on_fit_end(self) -> None:
        self.export_encoder()

    @rank_zero_only
    def export_encoder(self) -> Path:
        ckpt_cb = self.trainer.checkpoint_callback
        folder = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else Path(
            self.trainer.default_root_dir)
        path = folder / self.export_cfg["filename"]
        buffer = io.BytesIO()
        torch.save(self.encoder_payload(), buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
        self.encoder_path = path
        log.info("encoder written to %s", path)
        print(f"encoder written to {path}")
        if self.export_cfg["wandb_artifact"]:
            self._log_artifact(path)
        return path

    def _log_artifact(self, path: Path) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for lg in self.trainer.loggers:
            if isinstance(lg, WandbLogger):
                import wandb

                art = wandb.Artifact(f"encoder-{lg.experiment.id}", type="model",
                                     metadata={k: v for k, v in self.encoder_payload().items() if k != "state_dict"})
                art.add_file(str(path))
                lg.experiment.log_artifact(art)
