"""Base self-supervised LightningModule (solo-learn's BaseMethod idea): optimiser with parameter groups,
lr scaled by the global batch, warm-up + cosine, epoch-level collapse metric with an alarm, a kNN monitor and an
optional online linear probe, and the ``encoder.pt`` export. Methods subclass it and implement ``ssl_step``.
"""

from __future__ import annotations

import abc
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torchmetrics.functional.classification import multiclass_f1_score

import liverfusion
from liverfusion.errors import LiverfusionError
from liverfusion.models.collapse import L2NormalizedStd, collapse_level
from liverfusion.models.encoder_base import Encoder
from liverfusion.modules.knn import knn_scores
from liverfusion.modules.schedule import build_optimizer, build_scheduler, scaled_lr, split_decay
from liverfusion.utils.checkpoint_io import save_atomic
from liverfusion.utils.hydra_utils import to_plain

log = logging.getLogger(__name__)

ENCODER_FORMAT = "liverfusion-encoder/1"
BANK, QUERY = 0, 1  # validation dataloader indices of the kNN monitor


class TrainingDivergedError(LiverfusionError, FloatingPointError):
    """The loss became NaN or infinite: names the step and the cases of the batch."""


def to_channels_last(module: nn.Module) -> nn.Module:
    """5-D (3D conv) weights in channels_last_3d (NDHWC, the layout cuDNN's and oneDNN's fast kernels prefer);
    activations follow the weights. Parameters of other ranks are left alone (2D slab encoders, heads)."""
    for p in module.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return module


class SSLModule(L.LightningModule, abc.ABC):
    """Shared training logic of the SSL methods.

    Args:
        encoder: the weight-sharing encoder (``liverfusion.models``), one modality volume per input.
        optimizer: ``name`` (sgd/adamw/adam), ``base_lr`` (scaled by global batch / ``lr_reference_batch``),
            ``momentum``, ``weight_decay``, ``exclude_bn_bias`` (no decay on 1-D parameters).
        scheduler: ``warmup_fraction`` or ``warmup_steps``, ``min_lr_ratio`` (cosine floor).
        knn: ``enabled``, ``k``, ``temperature``: the kNN monitor on frozen features.
        probe: ``enabled``, ``lr``: an online linear probe on detached features (a monitor, not a result).
        collapse: ``alarm_fraction`` (warn when z_std < fraction / sqrt(d)), ``stop`` (end training then).
        export: ``filename`` of the exported encoder, ``wandb_artifact``.
        data_spec: what the data module reports (modalities, classes, input shape, preprocessing, data set).
        channels_last: keep 3D conv weights in channels_last_3d (same numbers; a layout choice for speed).
    """

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
        channels_last: bool = False,
    ):
        super().__init__()
        self.encoder = encoder
        self.optimizer_cfg = {
            "name": "sgd",
            "base_lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "exclude_bn_bias": False,
            "lr_reference_batch": 256,
            **(to_plain(optimizer) or {}),
        }
        self.scheduler_cfg = {"warmup_fraction": 0.0, "min_lr_ratio": 0.0, **(to_plain(scheduler) or {})}
        self.knn_cfg = {"enabled": True, "k": 20, "temperature": 0.07, **(to_plain(knn) or {})}
        self.probe_cfg = {"enabled": False, "lr": 0.1, **(to_plain(probe) or {})}
        self.collapse_cfg = {"alarm_fraction": 0.5, "stop": False, **(to_plain(collapse) or {})}
        self.export_cfg = {"filename": "encoder.pt", "wandb_artifact": True, **(to_plain(export) or {})}
        self.data_spec = dict(to_plain(data_spec) or {})
        self.num_classes = len(self.data_spec.get("class_names") or [])
        self.modalities = list(self.data_spec.get("modalities") or [])
        self.channels_last = bool(channels_last)
        if self.channels_last:
            to_channels_last(self.encoder)
        self.probe = (
            nn.Linear(self.encoder.feature_dim, self.num_classes)
            if self.probe_cfg["enabled"] and self.num_classes
            else None
        )
        self.z_std = L2NormalizedStd(self.z_dim)
        self._val: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.encoder_path: Path | None = None
        self.save_hyperparameters(ignore=["encoder"])

    # ---- what a method implements ----
    @abc.abstractmethod
    def ssl_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (loss, projector outputs z of both views for the collapse metric, pooled features of view 1
        for the probe)."""

    @property
    @abc.abstractmethod
    def z_dim(self) -> int:
        """Width of the projector output z (the collapse metric's d)."""

    def method_parameter_groups(self) -> list[dict[str, Any]]:
        """Extra groups beyond the encoder (heads), each with a ``name``; ``fixed_lr`` groups skip the schedule."""
        return []

    # ---- helpers ----
    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last and x.ndim == 5 else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features of a batch of single-modality volumes (N, 1, D, H, W)."""
        return self.encoder(self.prepare_input(x)).pooled

    # ---- training ----
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, z, feats = self.ssl_step(batch)
        if not torch.isfinite(loss):
            cases = list(batch.get("case_id", []))
            raise TrainingDivergedError(
                f"non-finite {type(self).__name__} loss ({loss.item()}) at epoch {self.current_epoch}, global step "
                f"{self.global_step}, batch {batch_idx}; cases {cases[:8]}{' ...' if len(cases) > 8 else ''}: "
                "lower optimizer.base_lr, add warm-up, or check these inputs"
            )
        self.z_std.update(z)
        n = batch["view1"].shape[0]
        # no sync_dist on a progress-bar metric: rank 0's progress bar would start that all_reduce alone at epoch
        # end while the other ranks are in the collapse metric's all_gather (a deadlock under DDP)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        if self._trainer is not None and self.trainer.optimizers:
            self.log(
                "train/lr",
                self.trainer.optimizers[0].param_groups[0]["lr"],
                on_step=True,
                on_epoch=False,
                batch_size=n,
            )
        if self.probe is not None:
            loss = loss + self._probe_train_loss(feats, batch, n)
        return loss

    def _probe_train_loss(self, feats: torch.Tensor, batch: dict, n: int) -> torch.Tensor:
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

    def on_train_epoch_end(self) -> None:
        if float(self.z_std.count) == 0 and self.trainer.world_size == 1:
            return
        z_std = float(self.z_std.compute())  # all z of the epoch, all processes
        self.z_std.reset()
        d = self.z_dim
        self.log("train/z_std", z_std, sync_dist=False)
        self.log("train/collapse", float(collapse_level(z_std, d)), sync_dist=False)
        threshold = float(self.collapse_cfg["alarm_fraction"]) / math.sqrt(d)
        if z_std < threshold:
            rank_zero_warn(
                f"collapse alarm at epoch {self.current_epoch}: z_std {z_std:.4f} < "
                f"{self.collapse_cfg['alarm_fraction']} / sqrt({d}) = {threshold:.4f}"
                + ("; stopping (model.collapse.stop=true)" if self.collapse_cfg["stop"] else "")
            )
            if self.collapse_cfg["stop"]:
                self.trainer.should_stop = True

    # ---- monitors over frozen features: kNN (bank = labelled train cases, queries = val cases) + probe ----
    @torch.no_grad()
    def modality_features(self, image: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(N, M, F) pooled features of every modality of each case; missing modalities are zeros."""
        n, m = image.shape[:2]
        pooled = self.encode(image.reshape(n * m, 1, *image.shape[2:])).reshape(n, m, -1)
        return pooled * present.unsqueeze(-1).to(pooled.dtype)

    @torch.no_grad()
    def case_features(self, image: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Features of all modalities of each case, each l2-normalised, concatenated (N, M * F): the kNN input
        (see :func:`liverfusion.modules.knn.case_features`)."""
        return F.normalize(self.modality_features(image, present), dim=-1).flatten(1)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not (self.knn_cfg["enabled"] or self.probe is not None):
            return
        per_modality = self.modality_features(batch["image"], batch["present"])
        store = self._val.setdefault(dataloader_idx, {"feats": [], "labels": [], "index": [], "probe": []})
        store["feats"].append(F.normalize(per_modality, dim=-1).flatten(1).float())
        store["labels"].append(torch.as_tensor(batch["label"], device=self.device))
        store["index"].append(torch.as_tensor(batch["index"], device=self.device))
        if self.probe is not None and dataloader_idx == QUERY:
            present = batch["present"].to(per_modality.dtype)
            logits = self.probe(per_modality) * present.unsqueeze(-1)  # mean over the modalities a case has
            store["probe"].append(logits.sum(1) / present.sum(1, keepdim=True).clamp_min(1))

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
        width = self.encoder.feature_dim * max(1, len(self.modalities))
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

    # ---- optimisation ----
    def global_batch(self) -> tuple[int, int, int]:
        """(per-device batch, world size, accumulation): the factors of the lr scaling rule."""
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            loader = getattr(self.trainer, "train_dataloader", None)
            batch = getattr(loader, "batch_size", None)
        if batch is None:
            raise LiverfusionError("cannot scale the lr: no datamodule.batch_size or train loader batch size")
        return int(batch), int(self.trainer.world_size), int(self.trainer.accumulate_grad_batches)

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        total_steps = int(self.trainer.estimated_stepping_batches)  # loads the train loader first
        batch, world, accum = self.global_batch()
        lr = scaled_lr(float(cfg["base_lr"]), batch, world, accum, int(cfg["lr_reference_batch"]))
        wd = float(cfg["weight_decay"])
        exclude = bool(cfg["exclude_bn_bias"])
        named = [{"name": "encoder", "params": list(self.encoder.named_parameters())}]
        for g in self.method_parameter_groups():
            named.append({**g, "params": [(f"{g['name']}.{i}", p) for i, p in enumerate(g["params"])]})
        groups: list[dict[str, Any]] = []
        for g in named:
            decay, no_decay = split_decay(g["params"], exclude)
            extra = {k: v for k, v in g.items() if k not in ("params", "name")}
            groups.append({"lr": lr, "weight_decay": wd, **extra, "name": g["name"], "params": decay})
            groups.append(
                {"lr": lr, **extra, "weight_decay": 0.0, "name": f"{g['name']}_no_decay", "params": no_decay}
            )
        if self.probe is not None:  # the probe is a monitor: its own lr, no weight decay, no schedule
            groups.append(
                {
                    "name": "probe",
                    "params": list(self.probe.parameters()),
                    "lr": float(self.probe_cfg["lr"]),
                    "weight_decay": 0.0,
                    "fixed_lr": True,
                }
            )
        groups = [g for g in groups if g["params"]]
        optimizer = build_optimizer(groups, cfg)
        scheduler = build_scheduler(optimizer, total_steps, self.scheduler_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- export ----
    def run_seed(self) -> int | None:
        """The seed of this run: the data spec's, else the one ``seed_everything`` recorded in PL_GLOBAL_SEED."""
        seed = self.data_spec.get("seed", os.environ.get("PL_GLOBAL_SEED"))
        return int(seed) if seed is not None else None

    def encoder_payload(self) -> dict[str, Any]:
        return {
            "format": ENCODER_FORMAT,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()},
            "encoder_config": self.encoder.config(),
            "modalities": self.modalities,
            "input_shape": self.data_spec.get("input_shape"),
            "preprocess": self.data_spec.get("preprocess"),
            "dataset": self.data_spec.get("dataset"),
            "layout": self.data_spec.get("layout"),
            "method": type(self).__name__,
            "hparams": to_plain({k: v for k, v in self.hparams.items() if k != "data_spec"}),
            "seed": self.run_seed(),
            "epochs": int(self.current_epoch),
            "global_step": int(self.global_step),
            "liverfusion_version": liverfusion.__version__,
        }

    def on_fit_end(self) -> None:
        self.export_encoder()

    @rank_zero_only
    def export_encoder(self) -> Path:
        """Write ``encoder.pt`` next to the Lightning checkpoints (atomically) and upload it to W&B if on."""
        ckpt_cb = self.trainer.checkpoint_callback
        folder = (
            Path(ckpt_cb.dirpath)
            if ckpt_cb is not None and ckpt_cb.dirpath
            else Path(self.trainer.default_root_dir)
        )
        path = folder / self.export_cfg["filename"]
        # same-folder temp + rename, fsynced: a full disk leaves the previous encoder.pt intact and names the file
        save_atomic(self.encoder_payload(), path)
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

                meta = {k: v for k, v in self.encoder_payload().items() if k != "state_dict"}
                art = wandb.Artifact(f"encoder-{lg.experiment.id}", type="model", metadata=meta)
                art.add_file(str(path))
                lg.experiment.log_artifact(art)


def load_encoder_payload(path: str | Path) -> dict[str, Any]:
    """Read an exported ``encoder.pt`` safely (``weights_only``) and check its format marker."""
    from liverfusion.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"encoder file {path} cannot be read with weights_only=True: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
        raise CheckpointError(f"encoder file {path} is not a {ENCODER_FORMAT} export")
    return payload
