"""The fusion classifier as a LightningModule: shared encoder (pre-trained or scratch) + fusion block + head.

Modes (``finetune.mode``):
- ``linear_probe``: the encoder is frozen and its BatchNorm layers stay in eval mode; only fusion + head learn.
  With no training augmentation the encoder outputs of each case are computed once and cached
  (``feature_cache``), which makes probing a CGC block on CPU a matter of seconds per epoch.
- ``partial``: the encoder modules named in ``finetune.freeze`` (e.g. ``[conv1, bn1, layer1, layer2]``) are frozen
  (BN in eval), the rest trains at ``lr * encoder_lr_scale``.
- ``full``: the whole encoder trains at ``lr * encoder_lr_scale`` (a lower lr keeps pre-trained features).

Every checkpoint carries what inference needs under ``checkpoint["liverfusion"]`` (architecture configs,
modality names and order, class names, input shape, preprocessing, evaluation crop, where the encoder came from),
so ``python -m liverfusion.evaluate`` never depends on the user's memory of the training config.
The test split is touched once: ``test_step`` collects predictions and ``on_test_epoch_end`` writes them with
bootstrap confidence intervals, the robustness table (each modality dropped in turn) and the features.
W&B dashboards (confusion matrix, ROC, per-class and prediction tables, the model artifact) are logged by
``liverfusion.callbacks.WandbClassifierLogger``, not here.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import liverfusion
from liverfusion.errors import ConfigError
from liverfusion.metrics import make_metric_collection
from liverfusion.models.classifier_net import EncodedModalities, FusionClassifierNet, build_fusion_classifier
from liverfusion.models.encoder_base import Encoder, plain
from liverfusion.models.encoder_factory import build_encoder
from liverfusion.models.fusion import Fusion, build_fusion
from liverfusion.modules.encoder_loading import load_pretrained_network
from liverfusion.modules.schedule import build_optimizer, build_scheduler, split_decay
from liverfusion.utils.hydra_utils import to_plain

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "liverfusion-classifier/1"
MODES = ("linear_probe", "partial", "full")
INITS = ("pretrained", "scratch")


def _merged(defaults: Mapping[str, Any], given: Any, name: str) -> dict[str, Any]:
    given = dict(to_plain(given) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"model.{name} has unknown key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def _encoder_factory(encoder: Any) -> Callable[..., Encoder] | Encoder:
    """A Hydra partial, an Encoder, or a plain config dict (as stored in checkpoints)."""
    encoder = to_plain(encoder)
    if isinstance(encoder, Mapping):
        cfg = {k: v for k, v in encoder.items() if not str(k).startswith("_")}
        cfg.pop("in_channels", None)
        return functools.partial(build_encoder, **cfg)
    return encoder


def _fusion_factory(fusion: Any) -> Callable[..., Fusion]:
    fusion = to_plain(fusion)
    if isinstance(fusion, Mapping):
        cfg = {k: v for k, v in fusion.items() if k not in ("num_modalities", "in_channels", "num_classes")}
        return functools.partial(build_fusion, **cfg)
    return fusion


def modality_dropout(present: torch.Tensor, p: float, min_keep: int = 1, generator=None) -> torch.Tensor:
    """Drop each present modality with probability ``p``, keeping at least ``min_keep`` per case (when it has them).

    Returns the new (N, M) bool mask; modalities that were absent stay absent.
    """
    if p <= 0:
        return present
    n, m = present.shape
    rnd = torch.rand(n, m, device=present.device, generator=generator)
    keep = present & (rnd >= p)
    need = torch.clamp(present.sum(1), max=min_keep)  # how many must survive per case
    # rescue the present modalities with the highest random scores where too few survived
    scores = torch.where(present, torch.rand(n, m, device=present.device, generator=generator), -1.0)
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)
    forced = present & (rank < need[:, None]) & (keep.sum(1) < need)[:, None]
    return keep | forced


class FusionClassifier(L.LightningModule):
    """Encoder + fusion block + head, trained with cross-entropy (optionally class-weighted).

    Args:
        encoder: Hydra partial of ``build_encoder`` (``in_channels`` is completed here), or a config dict.
        fusion: Hydra partial of a fusion block (``conf/fusion``), or a ``fusion.config()`` dict.
        data_spec: the datamodule's ``data_spec()`` (modalities, class names, preprocessing, input shape).
        init: ``pretrained`` (load ``pretrained.path``) or ``scratch`` (random weights, same model).
        pretrained: ``path`` (encoder.pt or a Lightning checkpoint), ``strict_normalization``, ``strict_keys``.
        finetune: ``mode`` (linear_probe | partial | full), ``freeze`` (module names for partial),
            ``encoder_lr_scale``, ``bn_eval`` (frozen parts keep BatchNorm statistics).
        optimizer / scheduler: ``name``, ``lr``, ``weight_decay``, ``betas``, ``exclude_bn_bias`` /
            ``warmup_fraction`` or ``warmup_steps``, ``min_lr_ratio``.
        loss: ``class_weighted`` (inverse class frequency of the training split), ``label_smoothing``.
        modality_dropout: ``p`` per present modality per training case, ``min_keep``.
        feature_cache: ``enabled`` (auto | true | false): reuse frozen encoder outputs per case.
        evaluation: test-time outputs: ``n_boot``, ``alpha``, ``seed``, ``threshold``, ``robustness``,
            ``aggregate`` (null | mean | max per patient), ``save_features``.
    """

    def __init__(
        self,
        encoder: Any,
        fusion: Any,
        data_spec: Mapping[str, Any],
        init: str = "scratch",
        pretrained: Mapping[str, Any] | None = None,
        finetune: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        modality_dropout: Mapping[str, Any] | None = None,
        feature_cache: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        spec = dict(to_plain(data_spec) or {})
        for key in ("modalities", "class_names"):
            if not spec.get(key):
                raise ConfigError(f"the classifier needs data_spec[{key!r}] from a labelled data set")
        self.data_spec = spec
        self.modalities = list(spec["modalities"])
        self.class_names = list(spec["class_names"])
        if len(self.class_names) < 2:
            raise ConfigError(f"a classifier needs >= 2 classes, the data has {self.class_names}")
        if init not in INITS:
            raise ConfigError(f"model.init={init!r}: choose one of {INITS}")
        self.init_mode = init
        self.pretrained_cfg = _merged(
            {"path": None, "strict_normalization": True, "strict_keys": True}, pretrained, "pretrained"
        )
        self.finetune_cfg = _merged(
            {"mode": "full", "freeze": [], "encoder_lr_scale": 0.1, "bn_eval": True}, finetune, "finetune"
        )
        if self.finetune_cfg["mode"] not in MODES:
            raise ConfigError(f"model.finetune.mode={self.finetune_cfg['mode']!r}: choose one of {MODES}")
        self.optimizer_cfg = _merged(
            {
                "name": "adamw",
                "lr": 1e-3,
                "weight_decay": 0.05,
                "betas": [0.9, 0.999],
                "momentum": 0.9,
                "nesterov": False,
                "exclude_bn_bias": True,
            },
            optimizer,
            "optimizer",
        )
        self.scheduler_cfg = _merged(
            {"warmup_fraction": 0.0, "warmup_steps": None, "min_lr_ratio": 0.0}, scheduler, "scheduler"
        )
        self.loss_cfg = _merged({"class_weighted": False, "label_smoothing": 0.0}, loss, "loss")
        self.dropout_cfg = _merged({"p": 0.0, "min_keep": 1}, modality_dropout, "modality_dropout")
        self.cache_cfg = _merged({"enabled": "auto"}, feature_cache, "feature_cache")
        self.eval_cfg = _merged(
            {
                "n_boot": 1000,
                "alpha": 0.05,
                "seed": 0,
                "threshold": 0.5,
                "robustness": True,
                "aggregate": None,
                "save_features": True,
                "write": True,
            },
            evaluation,
            "evaluation",
        )

        self.net: FusionClassifierNet = build_fusion_classifier(
            _encoder_factory(encoder), _fusion_factory(fusion), self.modalities, len(self.class_names)
        )
        self.load_report: dict[str, Any] | None = None
        if init == "pretrained" and self.pretrained_cfg["path"]:
            path = self.pretrained_cfg["path"]
            # the encoder, and the fusion block (class head aside) when the file holds the same one (stack runs)
            report = load_pretrained_network(
                self.net,
                path,
                self.data_spec,
                strict_normalization=bool(self.pretrained_cfg["strict_normalization"]),
                strict_keys=bool(self.pretrained_cfg["strict_keys"]),
            )
            self.load_report = report.as_dict()
        self.frozen_modules = self._apply_freeze()
        self.class_weights: torch.Tensor | None = None
        self.val_metrics = make_metric_collection(len(self.class_names), prefix="val/")
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_on = False
        self._test_records: list[dict[str, Any]] = []
        self.test_summary: dict[str, Any] | None = None
        self.test_predictions: Any = None  # the last test loop's PredictionSet
        self.save_hyperparameters(
            plain(
                {
                    "encoder": self.net.encoder.config(),
                    "fusion": self.net.fusion.config(),
                    "init": init,
                    "pretrained": self.pretrained_cfg,
                    "finetune": self.finetune_cfg,
                    "optimizer": self.optimizer_cfg,
                    "scheduler": self.scheduler_cfg,
                    "loss": self.loss_cfg,
                    "modality_dropout": self.dropout_cfg,
                    "feature_cache": self.cache_cfg,
                    "evaluation": self.eval_cfg,
                    "data_spec": self.data_spec,
                }
            )
        )

    # ---- freezing ----
    def _apply_freeze(self) -> list[str]:
        """Set requires_grad per mode; return the names of encoder modules kept frozen (BN in eval)."""
        enc = self.net.encoder
        mode = self.finetune_cfg["mode"]
        if mode == "linear_probe":
            enc.requires_grad_(False)
            return [""]
        if mode == "partial":
            names = list(self.finetune_cfg["freeze"] or [])
            if not names:
                raise ConfigError(
                    "model.finetune.mode=partial needs finetune.freeze, e.g. [conv1, bn1, layer1]"
                )
            children = dict(enc.named_children())
            unknown = [n for n in names if n not in children]
            if unknown:
                raise ConfigError(
                    f"model.finetune.freeze names {unknown} are not encoder modules; have {sorted(children)}"
                )
            for n in names:
                children[n].requires_grad_(False)
            return names
        return []

    @property
    def encoder_frozen(self) -> bool:
        return self.finetune_cfg["mode"] == "linear_probe"

    def train(self, mode: bool = True):
        """Lightning calls train() every epoch: frozen encoder parts go straight back to eval (BN statistics)."""
        super().train(mode)
        if mode and self.finetune_cfg["bn_eval"]:
            for name in self.frozen_modules:
                (self.net.encoder if name == "" else getattr(self.net.encoder, name)).eval()
        return self

    # ---- data-dependent setup ----
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_mode == "pretrained" and self.load_report is None:
            # checked here, not in __init__, so configs compose and checkpoints load without the file
            raise ConfigError(
                "model.init=pretrained needs model.pretrained.path (an encoder.pt export or a Lightning "
                "checkpoint of a pre-training run); use model.init=scratch to train from random weights"
            )
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.loss_cfg["class_weighted"] and dm is not None:
            counts = torch.tensor(dm.class_counts(), dtype=torch.float32)
            if (counts == 0).any():
                absent = [c for c, n in zip(self.class_names, counts.tolist()) if n == 0]
                warnings.warn(f"classes {absent} have no training case: their loss weight is 0", stacklevel=2)
            weights = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp_min(1)), 0.0)
            self.class_weights = weights
            log.info("class weights %s", dict(zip(self.class_names, weights.tolist())))
        self._cache_on = self._want_cache(dm)

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

    # ---- forward ----
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        return self.net(x, mask)

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

    def fuse(self, enc: EncodedModalities, mask: torch.Tensor):
        maps = enc.maps if self.net.fusion.consumes == "map" else None
        if (
            self.net.mode == "early"
        ):  # early fusion has one slot: the mask only says whether anything is there
            mask = mask.any(dim=1, keepdim=True)
        return self.net.fusion(maps, enc.pooled, mask)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(
            logits, labels, weight=weight, label_smoothing=float(self.loss_cfg["label_smoothing"])
        )

    # ---- loops ----
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = torch.as_tensor(batch["label"], device=self.device)
        present = batch["present"]
        mask = modality_dropout(present, float(self.dropout_cfg["p"]), int(self.dropout_cfg["min_keep"]))
        if self.net.mode == "early" and mask is not present:  # early fusion: dropped phases are zeroed inputs
            out = self.net(batch["image"], mask)
            logits = out.logits
        else:
            logits = self.fuse(self.encode(batch, "train"), mask).logits
        loss = self._loss(logits, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite classification loss at step {self.global_step} (cases {list(batch['case_id'])[:8]})"
            )
        n = labels.shape[0]
        acc = (logits.argmax(1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self._offer_cache("train", "train")

    def _offer_cache(self, part: str, kind: str) -> None:
        """Tell the datamodule which cases' features are cached, so it can stop loading their images."""
        dm = getattr(self.trainer, "datamodule", None)
        if self._cache_on and hasattr(dm, "features_cached"):
            dm.features_cached(part, {c for k, c in self._cache if k == kind})

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        labels = torch.as_tensor(batch["label"], device=self.device)
        logits = self.fuse(self.encode(batch, "eval"), batch["present"]).logits
        self.log(
            "val/loss", self._loss(logits, labels), on_epoch=True, batch_size=labels.shape[0], sync_dist=True
        )
        probs = logits.float().softmax(dim=1)
        self.val_metrics.update(probs, labels)
        return {"probs": probs.detach()}  # for callbacks (W&B confusion matrix / ROC)

    def on_validation_epoch_end(self) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*samples in targets.*")
            values = self.val_metrics.compute()
        self.log_dict({k: v.float() for k, v in values.items()}, prog_bar=False)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self._offer_cache("val", "eval")

    def on_test_start(self) -> None:
        self._test_records = []
        self._cache = {
            k: v for k, v in self._cache.items() if k[0] != "eval"
        }  # weights may have been reloaded

    def test_step(self, batch: dict, batch_idx: int) -> None:
        from liverfusion.evaluation import batch_predictions

        self._test_records.append(
            batch_predictions(
                self.net,
                batch,
                robustness=bool(self.eval_cfg["robustness"]),
                encoded=self.encode(batch, "eval"),
            )
        )

    def on_test_epoch_end(self) -> None:
        from liverfusion.evaluation import HEADLINE_METRICS, PredictionSet, write_evaluation

        records = self._test_records
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        preds = PredictionSet.from_records(records, self.class_names, self.modalities)
        self._test_records = []
        summary = {"n_cases": len(preds.case_ids)}
        if self.trainer.is_global_zero and self.eval_cfg["write"]:
            out_dir = Path(self.trainer.default_root_dir) / "test"
            summary = write_evaluation(
                preds,
                out_dir,
                n_boot=int(self.eval_cfg["n_boot"]),
                alpha=float(self.eval_cfg["alpha"]),
                seed=int(self.eval_cfg["seed"]),
                threshold=float(self.eval_cfg["threshold"]),
                aggregate=self.eval_cfg["aggregate"],
                save_features=bool(self.eval_cfg["save_features"]),
                extra=self.run_summary(),
            )
        self.test_summary = summary
        self.test_predictions = preds  # W&B tables: liverfusion.callbacks.WandbClassifierLogger
        point = preds.point_metrics(threshold=float(self.eval_cfg["threshold"]))
        headline = {k: v for k, v in point.items() if k in HEADLINE_METRICS or k.startswith("binary/")}
        self.log_dict({f"test/{k}": float(v) for k, v in headline.items() if np.isfinite(v)}, sync_dist=False)

    def run_summary(self) -> dict[str, Any]:
        """What a report needs to know about this run besides its predictions."""
        from liverfusion.utils.run_folder import relative_in_run

        cb = self.trainer.checkpoint_callback if self._trainer is not None else None
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        score = getattr(cb, "best_model_score", None) if cb is not None else None
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        splits = {}
        if getattr(dm, "partition", None):
            from liverfusion.data.datamodule import summarize_entries

            splits = {
                part: summarize_entries(dm.part_entries(part), self.class_names)
                for part in ("train", "val", "test")
                if part in dm.partition
            }
        return plain(
            {
                "fold": getattr(dm, "fold", None),
                "splits": splits,
                "best_checkpoint": relative_in_run(self.trainer.default_root_dir, best) if best else None,
                "selection_metric": getattr(cb, "monitor", None) if cb is not None else None,
                "selection_score": None if score is None else float(score),
                "init": self.init_mode,
                "finetune_mode": self.finetune_cfg["mode"],
                "fusion": self.net.fusion.name,
                "pretrained": self.load_report,
                "epochs": int(self.current_epoch),
                "label_fraction": getattr(dm, "label_fraction", None),
            }
        )

    # ---- optimisation ----
    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
        enc_lr = lr * float(self.finetune_cfg["encoder_lr_scale"])
        ex = bool(cfg["exclude_bn_bias"])
        groups: list[dict[str, Any]] = []
        for name, module, group_lr in (
            ("encoder", self.net.encoder, enc_lr),
            ("fusion", self.net.fusion, lr),
        ):
            decay, no_decay = split_decay(module.named_parameters(), ex)
            groups.append({"name": name, "params": decay, "lr": group_lr, "weight_decay": wd})
            groups.append(
                {"name": f"{name}_no_decay", "params": no_decay, "lr": group_lr, "weight_decay": 0.0}
            )
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError("nothing to train: every parameter is frozen")
        optimizer = build_optimizer(groups, cfg)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, total, self.scheduler_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ----
    def inference_meta(self) -> dict[str, Any]:
        """Everything inference needs, as plain types (loadable with weights_only=True)."""
        spec = self.data_spec
        return plain(
            {
                "format": CLASSIFIER_FORMAT,
                "encoder_config": self.net.encoder.config(),
                "fusion_config": self.net.fusion.config(),
                "mode": self.net.mode,
                "modalities": self.modalities,
                "class_names": self.class_names,
                "input_shape": spec.get("input_shape"),
                "network_input_shape": spec.get("network_input_shape", spec.get("input_shape")),
                "preprocess": spec.get("preprocess"),
                "eval_crop": spec.get("eval_crop"),
                "dataset": spec.get("dataset"),
                "layout": spec.get("layout"),
                "split": spec.get("split"),
                "fold": spec.get("fold"),
                "init": self.init_mode,
                "pretrained": self.load_report,
                "finetune": self.finetune_cfg,
                "evaluation": self.eval_cfg,
                "liverfusion_version": liverfusion.__version__,
            }
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["liverfusion"] = self.inference_meta()


def freeze_report(module: nn.Module) -> dict[str, int]:
    """Trainable vs frozen parameter counts (for logs and tests)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}
