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
bootstrap confidence intervals, the robustness table (each modality dropped in turn) and the features
(:mod:`liverfusion.modules.held_out`); the linear probe's feature cache is :mod:`liverfusion.modules.feature_cache`.
W&B dashboards (confusion matrix, ROC, per-class and prediction tables, the model artifact) are logged by
``liverfusion.callbacks.WandbClassifierLogger``, not here.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

import liverfusion
from liverfusion.errors import ConfigError
from liverfusion.metrics import make_metric_collection
from liverfusion.models.classifier_net import EncodedModalities, FusionClassifierNet, build_fusion_classifier
from liverfusion.models.encoder_base import Encoder, plain
from liverfusion.models.encoder_factory import build_encoder
from liverfusion.models.fusion import FUSIONS, Fusion
from liverfusion.modules.encoder_loading import load_pretrained_network
from liverfusion.modules.feature_cache import FeatureCacheMixin
from liverfusion.modules.held_out import HeldOutEvaluation
from liverfusion.modules.schedule import build_optimizer, build_scheduler, split_decay
from liverfusion.utils.config_sections import check_section, model_config
from liverfusion.utils.evaluation_settings import SCORING_KEYS, scoring
from liverfusion.utils.plain import to_plain

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "liverfusion-classifier/1"
MODES = ("linear_probe", "partial", "full")
INITS = ("pretrained", "scratch")


def _encoder_factory(encoder: Any) -> Callable[..., Encoder] | Encoder:
    """A Hydra partial, an Encoder, or a plain config dict (as stored in checkpoints)."""
    encoder = to_plain(encoder)
    if isinstance(encoder, Mapping):
        cfg = {k: v for k, v in encoder.items() if not str(k).startswith("_")}
        cfg.pop("in_channels", None)
        return functools.partial(build_encoder, **cfg)
    return encoder


def _fusion_factory(fusion: Any) -> Callable[..., Fusion]:
    """A Hydra partial, or a ``fusion.config()`` dict (as stored in checkpoints): a partial of its class."""
    fusion = to_plain(fusion)
    if isinstance(fusion, Mapping):
        cfg = {k: v for k, v in fusion.items() if k not in ("num_modalities", "in_channels", "num_classes")}
        name = cfg.pop("name", None)
        if name not in FUSIONS:
            raise ConfigError(f"fusion name {name!r} is unknown; choose one of {sorted(FUSIONS)}")
        return functools.partial(FUSIONS[name], **cfg)
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


# a section's keys: (those every config states, those added since): a run configured before a key was added
# (its config_resolved.yaml, its checkpoint's hyper-parameters) lacks it, and gets the YAML's value for it
SECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pretrained": (("path", "strict_normalization", "strict_keys"), ()),
    "finetune": (("mode", "freeze", "encoder_lr_scale", "bn_eval"), ()),
    "optimizer": (("name", "lr", "weight_decay", "betas", "exclude_bn_bias"), ("momentum", "nesterov")),
    "scheduler": (("warmup_fraction", "min_lr_ratio"), ("warmup_steps",)),
    "loss": (("class_weighted", "label_smoothing"), ()),
    "modality_dropout": (("p", "min_keep"), ()),
    "feature_cache": (("enabled",), ()),
    "evaluation": (
        (*SCORING_KEYS, "save_features", "write"),
        (),
    ),
}


def checked_sections(given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The classifier's sections as plain dicts; unknown or missing keys are a ConfigError (check_section). A key
    added since (SECTIONS' second list) that an older run's config or checkpoint lacks is read from
    ``conf/model/classifier.yaml``: the one place a default lives, also for runs configured before it was added."""
    out: dict[str, dict[str, Any]] = {}
    yaml: dict[str, Any] | None = None
    for key, (required, added) in SECTIONS.items():
        section = check_section(key, to_plain(given[key]), required, added)
        absent = [k for k in added if k not in section]
        if absent:
            yaml = yaml or model_config("classifier")
            section.update({k: yaml[key][k] for k in absent})
        out[key] = section
    return out


class FusionClassifier(FeatureCacheMixin, HeldOutEvaluation, L.LightningModule):
    """Encoder + fusion block + head, trained with cross-entropy (optionally class-weighted).

    Every value comes from the config (``conf/model/classifier.yaml``; in Python, build the arguments with
    ``liverfusion.utils.config_sections.model_config("classifier", **overrides)``): the code has no defaults, and
    an unknown or missing key is a ConfigError.

    Args:
        encoder: Hydra partial of ``build_encoder`` (``in_channels`` is completed here), or a config dict.
        fusion: Hydra partial of a fusion block (``conf/fusion``), or a ``fusion.config()`` dict.
        data_spec: the datamodule's ``data_spec()`` (modalities, class names, preprocessing, input shape).
        init: ``pretrained`` (load ``pretrained.path``) or ``scratch`` (random weights, same model).
        pretrained: ``path`` (encoder.pt or a Lightning checkpoint), ``strict_normalization``, ``strict_keys``.
        finetune: ``mode`` (linear_probe | partial | full), ``freeze`` (module names for partial),
            ``encoder_lr_scale``, ``bn_eval`` (frozen parts keep BatchNorm statistics).
        optimizer / scheduler: ``name``, ``lr``, ``weight_decay``, ``betas``, ``exclude_bn_bias``, ``momentum``,
            ``nesterov`` / ``warmup_fraction`` or ``warmup_steps``, ``min_lr_ratio``.
        loss: ``class_weighted`` (inverse class frequency of the training split), ``label_smoothing``.
        modality_dropout: ``p`` per present modality per training case, ``min_keep``.
        feature_cache: ``enabled`` (auto | true | false): reuse frozen encoder outputs per case
            (:mod:`liverfusion.modules.feature_cache`).
        evaluation: test-time outputs (:mod:`liverfusion.modules.held_out`): ``n_boot``, ``alpha``, ``seed``,
            ``threshold``, ``robustness``, ``aggregate`` (null | mean | max per patient), ``save_features``,
            ``write``.
    """

    def __init__(
        self,
        encoder: Any,
        fusion: Any,
        data_spec: Mapping[str, Any],
        init: str,
        pretrained: Mapping[str, Any],
        finetune: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        loss: Mapping[str, Any],
        modality_dropout: Mapping[str, Any],
        feature_cache: Mapping[str, Any],
        evaluation: Mapping[str, Any],
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
        cfg = checked_sections(
            {
                "pretrained": pretrained,
                "finetune": finetune,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "loss": loss,
                "modality_dropout": modality_dropout,
                "feature_cache": feature_cache,
                "evaluation": evaluation,
            }
        )
        self.pretrained_cfg = cfg["pretrained"]
        self.finetune_cfg = cfg["finetune"]
        if self.finetune_cfg["mode"] not in MODES:
            raise ConfigError(f"model.finetune.mode={self.finetune_cfg['mode']!r}: choose one of {MODES}")
        self.optimizer_cfg = cfg["optimizer"]
        self.scheduler_cfg = cfg["scheduler"]
        self.loss_cfg = cfg["loss"]
        self.dropout_cfg = cfg["modality_dropout"]
        self.cache_cfg = cfg["feature_cache"]
        scores = {k: cfg["evaluation"][k] for k in SCORING_KEYS}  # the evaluation group's keys, checked there
        self.eval_cfg = {**cfg["evaluation"], **scoring(scores, where="model.evaluation")}

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
        self._reset_cache()
        self._reset_test_records()
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

    # ---- forward ----
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        return self.net(x, mask)

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
