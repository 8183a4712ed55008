"""Base self-supervised LightningModule (solo-learn's BaseMethod idea, our own code): a backbone (the shared
encoder, or encoder + fusion block on whole stacks), the objective's loop over the batch's list of views (every
pair, or the hybrid shared/specific split), an optional phase-ID head, optimiser with parameter groups, lr scaled by
the global batch, warm-up + cosine, and the ``encoder.pt`` export. Its parts live beside it: the accepted config
and views (``ssl_config``), the collapse metric and its alarm (``ssl_health.CollapseWatch``), the kNN monitor and
the online linear probe (``ssl_monitor.OnlineMonitor``), the file format (``encoder_file``). Methods (SimSiam, BYOL,
VICReg) subclass it and implement their heads and their loss on one pair of views; docs/extending.md, "Adding an
SSL method".
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from liverfusion.errors import ConfigError, LiverfusionError
from liverfusion.models.ssl_backbone import build_backbone, fusion_config
from liverfusion.modules.encoder_file import encoder_payload, log_encoder_artifact, write_encoder_file
from liverfusion.modules.schedule import build_optimizer, build_scheduler, scaled_lr, split_decay
from liverfusion.modules.ssl_config import (
    OBJECTIVES,
    Schema,
    check_view_plan,
    checked_config,
    checked_views,
)
from liverfusion.modules.ssl_health import (
    COLLAPSE_KINDS,
    CollapseWatch,
    TrainingDivergedError,
    collapse_metric,
)
from liverfusion.modules.ssl_monitor import OnlineMonitor
from liverfusion.utils.plain import to_plain

log = logging.getLogger(__name__)


def to_channels_last(module: nn.Module) -> nn.Module:
    """5-D (3D conv) weights in channels_last_3d (NDHWC, the layout cuDNN's and oneDNN's fast kernels prefer);
    activations follow the weights. Parameters of other ranks are left alone (2D slab encoders, heads)."""
    for p in module.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return module


class SSLStepOutput(NamedTuple):
    """``loss``; ``z``: per embedding part ("all", or "shared"/"specific"), the embeddings of its views for the
    collapse metric; ``feats``: pooled features of view 0 (the online probe's input)."""

    loss: torch.Tensor
    z: dict[str, torch.Tensor]
    feats: torch.Tensor


class SSLModule(OnlineMonitor, CollapseWatch, L.LightningModule, abc.ABC):
    """Shared training logic of the SSL methods (subclass it; see docs/extending.md, "Adding an SSL method").

    Every value comes from the config (``conf/model/<method>.yaml``, shared sections in ``conf/model/_ssl.yaml``);
    unknown and missing keys are a ConfigError. Sections:

    - ``backbone``: ``kind`` (modality: the shared encoder, one phase per view | stack: encoder + fusion block on
      whole stacks) and ``fusion`` (stack only: a ``conf/fusion`` preset); see ``liverfusion.models.ssl_backbone``.
    - ``objective``: ``name`` (pair: the method's loss on every pair of views, averaged | hybrid: the pooled
      vector is split, the first ``shared_fraction`` of its dims trained on (view 0, view 1), the cross-phase pair,
      the rest on (view 0, view 2), the same-phase pair; each part has its own heads) and ``shared_fraction``.
    - ``phase_head``: ``weight`` > 0 adds a linear phase-ID classifier on the pooled features of every view
      (cross-entropy against ``batch["view_modalities"]``, times the weight; logs ``monitor/phase_acc``).
    - ``optimizer``: ``name`` (sgd/adamw/adam), ``base_lr`` (scaled by global batch / ``lr_reference_batch``),
      ``momentum``, ``weight_decay``, ``exclude_bn_bias`` (no decay on 1-D parameters); optional ``nesterov``,
      ``betas``.
    - ``scheduler``: ``warmup_fraction`` (or optional ``warmup_steps``), ``min_lr_ratio`` (cosine floor).
    - ``knn``: ``enabled``, ``k``, ``temperature``: the kNN monitor on frozen features.
    - ``probe``: ``enabled``, ``lr``: an online linear probe on detached features (a monitor, not a result).
    - ``collapse``: ``alarm_fraction`` (warn when z_std < fraction x a healthy std), ``stop`` (end training then).
    - ``export``: ``filename`` of the exported encoder, ``wandb_artifact``.
    - ``channels_last``: keep 3D conv weights in channels_last_3d (same numbers; a layout choice for speed).

    ``data_spec`` is what the data module reports (modalities, classes, input shape, preprocessing, data set).

    A method sets ``SCHEMA`` (its own sections), ``collapse_kind`` and implements :meth:`build_heads`,
    :meth:`view_outputs`, :meth:`pair_loss` and :attr:`z_dim`.
    """

    SCHEMA: ClassVar[Schema] = {}

    def __init__(
        self,
        encoder: nn.Module | Callable[..., nn.Module],
        data_spec: Mapping[str, Any] | None = None,
        **config: Any,
    ):
        super().__init__()
        self.cfg = checked_config(type(self), config)
        self.optimizer_cfg = self.cfg["optimizer"]
        self.scheduler_cfg = self.cfg["scheduler"]
        self.knn_cfg = self.cfg["knn"]
        self.probe_cfg = self.cfg["probe"]
        self.collapse_cfg = self.cfg["collapse"]
        self.export_cfg = self.cfg["export"]
        self.data_spec = dict(to_plain(data_spec) or {})
        self.num_classes = len(self.data_spec.get("class_names") or [])
        self.modalities = list(self.data_spec.get("modalities") or [])
        self.channels_last = bool(self.cfg["channels_last"])

        bb = self.cfg["backbone"]
        backbone = build_backbone(bb["kind"], encoder, bb["fusion"], self.modalities)
        # the backbone is a view on modules registered right here, so checkpoint keys stay ``encoder.*`` (and
        # ``fusion.*`` for stacks): what encoder_loading and earlier checkpoints expect
        self.__dict__["backbone"] = backbone
        self.encoder = backbone.encoder
        if backbone.fusion is not None:
            self.fusion = backbone.fusion
        if self.channels_last:
            to_channels_last(backbone)
        feature_dim = backbone.feature_dim

        obj = self.cfg["objective"]
        self.objective = str(obj["name"])
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"model.objective.name={self.objective!r} is unknown; choose one of {list(OBJECTIVES)}"
            )
        self.part_slices: dict[str, slice | None] = {"all": None}
        if self.objective == "hybrid":
            shared = round(float(obj["shared_fraction"]) * feature_dim)
            if not 1 <= shared <= feature_dim - 1:
                raise ConfigError(
                    f"model.objective.shared_fraction={obj['shared_fraction']} gives {shared} of {feature_dim} "
                    "feature dims to the shared part; both parts need at least one: pick a value in (0, 1)"
                )
            self.part_slices = {"shared": slice(0, shared), "specific": slice(shared, feature_dim)}

        weight = float(self.cfg["phase_head"]["weight"])
        if weight < 0:
            raise ConfigError(
                f"model.phase_head.weight={weight}: must be >= 0 (0 turns the phase-ID head off)"
            )
        self.phase_weight = weight
        self.phase_head: nn.Linear | None = None
        if weight > 0:
            if backbone.kind == "stack":
                raise ConfigError(
                    "model.phase_head.weight > 0 needs one phase per view, but model.backbone.kind=stack sees all "
                    "phases at once; set model.phase_head.weight=0"
                )
            if len(self.modalities) < 2:
                raise ConfigError(
                    f"model.phase_head needs a data set with two or more modalities, this one has {self.modalities}"
                )
            self.phase_head = nn.Linear(feature_dim, len(self.modalities))
        self.probe = (
            nn.Linear(feature_dim, self.num_classes)
            if self.probe_cfg["enabled"] and self.num_classes
            else None
        )

        if self.collapse_kind not in COLLAPSE_KINDS:
            raise ConfigError(
                f"{type(self).__name__}.collapse_kind={self.collapse_kind!r}: one of {COLLAPSE_KINDS}"
            )
        self._heads: dict[str, dict[str, nn.Module]] = {}
        for part, sl in self.part_slices.items():
            dim = feature_dim if sl is None else sl.stop - sl.start
            heads = dict(self.build_heads(dim, part))
            self._heads[part] = heads
            if part == "all":  # top-level names, as earlier checkpoints have them (projector.*, predictor.*)
                for name, module in heads.items():
                    self.add_module(name, module)
            else:
                self.add_module(f"{part}_heads", nn.ModuleDict(heads))
        self.collapse_metrics = nn.ModuleDict(
            {part: collapse_metric(self.collapse_kind, self.z_dim) for part in self.part_slices}
        )
        self.step_logs: dict[str, torch.Tensor] = {}
        self._val: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.encoder_path: Path | None = None
        hparams = dict(self.cfg)
        hparams["backbone"] = {
            "kind": backbone.kind,
            "fusion": None if backbone.fusion is None else fusion_config(backbone.fusion),
        }
        config_of = getattr(self.encoder, "config", None)
        hparams["encoder_config"] = config_of() if callable(config_of) else None
        hparams["data_spec"] = self.data_spec
        self.save_hyperparameters(to_plain(hparams))

    # ---- what a method implements ----
    @abc.abstractmethod
    def build_heads(self, in_dim: int, part: str) -> dict[str, nn.Module]:
        """The heads of one embedding part ({"projector": ..., "predictor": ...}), reading ``in_dim`` features;
        called once per part ("all", or "shared" and "specific" for the hybrid objective)."""

    @abc.abstractmethod
    def view_outputs(self, part: str, f: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        """What the loss needs of one view's features ``f`` (N, in_dim) of ``part``, e.g. {"z": ..., "p": ...};
        ``"z"`` feeds the collapse metric (override :meth:`collapse_embedding` otherwise)."""

    @abc.abstractmethod
    def pair_loss(self, part: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        """The method's symmetric loss on one positive pair of views (outputs of :meth:`view_outputs`)."""

    @property
    @abc.abstractmethod
    def z_dim(self) -> int:
        """Width of the embedding the collapse metric reads (the metric's d)."""

    def fixed_lr_heads(self) -> set[str]:
        """Names of heads whose lr stays at the initial value (SimSiam's predictor)."""
        return set()

    def prepare_targets(self, views: list[torch.Tensor], present: torch.Tensor | None) -> None:
        """Called once per step after the views are encoded (the momentum base runs its teacher here)."""

    def heads(self, part: str) -> dict[str, nn.Module]:
        """The heads :meth:`build_heads` made for ``part``."""
        return self._heads[part]

    def method_parameter_groups(self) -> list[dict[str, Any]]:
        """One group per head name (all parts together), each with a ``name``; ``fixed_lr`` groups skip the
        schedule. The fusion block of a stack backbone and the phase head train like the encoder."""
        groups: list[dict[str, Any]] = []
        if self.backbone.fusion is not None:
            groups.append({"name": "fusion", "params": list(self.backbone.fusion.parameters())})
        names = list(dict.fromkeys(n for heads in self._heads.values() for n in heads))
        fixed = self.fixed_lr_heads()
        for name in names:
            params = [p for heads in self._heads.values() if name in heads for p in heads[name].parameters()]
            groups.append({"name": name, "params": params, **({"fixed_lr": True} if name in fixed else {})})
        if self.phase_head is not None:
            groups.append({"name": "phase_head", "params": list(self.phase_head.parameters())})
        return groups

    # ---- helpers ----
    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last and x.ndim == 5 else x

    def encode(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone features (N, F) of one view: (N, 1, D, H, W) phases or (N, M, D, H, W) stacks."""
        return self.backbone.encode(self.prepare_input(x), present)

    def objective_pairs(self, num_views: int) -> dict[str, list[tuple[int, int]]]:
        """Per embedding part, the pairs of views its loss is computed on."""
        if self.objective == "hybrid":
            return {"shared": [(0, 1)], "specific": [(0, 2)]}
        return {"all": list(itertools.combinations(range(num_views), 2))}

    def check_view_plan(self, plan: Mapping[str, Any]) -> None:
        """Refuse a data module whose views this module cannot use (``dm.view_plan``), before training."""
        check_view_plan(plan, self.backbone.kind, self.objective)

    def checked_views(self, batch: Mapping[str, Any]) -> list[torch.Tensor]:
        """``batch["views"]``, refused (ConfigError) when this module cannot use that layout."""
        return checked_views(batch, self.backbone.kind, self.objective, len(self.modalities))

    # ---- training ----
    def ssl_step(self, batch: dict) -> SSLStepOutput:
        """Encode every view (one pass per view: BatchNorm statistics are per view, as in the papers), then the
        method's loss on the objective's pairs (their mean), plus the phase-ID loss when on."""
        self.step_logs = {}
        views = self.checked_views(batch)
        present = batch.get("present")
        feats = [self.encode(v, present) for v in views]
        self.prepare_targets(views, present)
        losses: list[torch.Tensor] = []
        z: dict[str, torch.Tensor] = {}
        for part, pairs in self.objective_pairs(len(views)).items():
            sl = self.part_slices[part]
            needed = sorted({i for pair in pairs for i in pair})
            outs = {
                i: self.view_outputs(part, feats[i] if sl is None else feats[i][:, sl], i) for i in needed
            }
            losses += [self.pair_loss(part, outs[a], outs[b]) for a, b in pairs]
            z[part] = torch.cat([self.collapse_embedding(outs[i]) for i in needed])
            if len(self.part_slices) > 1:
                self.step_logs[f"train/loss_{part}"] = sum(losses[-len(pairs) :]).detach() / len(pairs)
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        if self.phase_head is not None:
            loss = loss + self.phase_weight * self._phase_loss(feats, batch)
        return SSLStepOutput(loss, z, feats[0])

    def _phase_loss(self, feats: list[torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
        mods = batch.get("view_modalities")
        if not isinstance(mods, list | tuple) or len(mods) != len(feats):
            raise ConfigError(
                "model.phase_head needs batch['view_modalities'], one (N,) tensor per view (liverfusion.data.mda)"
            )
        target = torch.cat([torch.as_tensor(m, device=feats[0].device).long().reshape(-1) for m in mods])
        if bool((target < 0).any()) or bool((target >= len(self.modalities)).any()):
            raise ConfigError(
                f"model.phase_head: view_modalities must be 0..{len(self.modalities) - 1} (one phase per view), "
                f"got {sorted(set(target.tolist()))}; stack views have no single phase: set model.phase_head.weight=0"
            )
        logits = self.phase_head(torch.cat(feats))
        ce = F.cross_entropy(logits, target)
        self.step_logs["train/phase_loss"] = ce.detach()
        self.step_logs["monitor/phase_acc"] = (logits.argmax(1) == target).float().mean().detach()
        return ce

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, z, feats = self.ssl_step(batch)
        if not torch.isfinite(loss):
            cases = list(batch.get("case_id", []))
            raise TrainingDivergedError(
                f"non-finite {type(self).__name__} loss ({loss.item()}) at epoch {self.current_epoch}, global step "
                f"{self.global_step}, batch {batch_idx}; cases {cases[:8]}{' ...' if len(cases) > 8 else ''}: "
                "lower optimizer.base_lr, add warm-up, or check these inputs"
            )
        for part, emb in z.items():
            self.collapse_metrics[part].update(emb)
        n = batch["views"][0].shape[0]
        # no sync_dist on a progress-bar metric: rank 0's progress bar would start that all_reduce alone at epoch
        # end while the other ranks are in the collapse metric's all_gather (a deadlock under DDP)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for key, value in self.step_logs.items():
            self.log(key, value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        if self._trainer is not None and self.trainer.optimizers:
            self.log(
                "train/lr",
                self.trainer.optimizers[0].param_groups[0]["lr"],
                on_step=True,
                on_epoch=False,
                batch_size=n,
            )
        if self.probe is not None:
            loss = loss + self.probe_train_loss(feats, batch, n)
        return loss

    def setup(self, stage: str) -> None:
        """Check the data module's ``view_plan`` (when it has one) before the first batch."""
        if stage != "fit" or self._trainer is None:
            return
        plan = getattr(getattr(self.trainer, "datamodule", None), "view_plan", None)
        if isinstance(plan, Mapping):
            self.check_view_plan(plan)

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
        """This run's ``encoder.pt`` dict (:func:`liverfusion.modules.encoder_file.encoder_payload`)."""
        return encoder_payload(
            self.encoder,
            method=type(self).__name__,
            modalities=self.modalities,
            data_spec=self.data_spec,
            backbone_keys=self.backbone.export(),  # stack runs: fusion_state_dict + fusion_config too
            hparams={k: v for k, v in self.hparams.items() if k != "data_spec"},
            seed=self.run_seed(),
            epochs=self.current_epoch,
            global_step=self.global_step,
        )

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
        payload = self.encoder_payload()
        write_encoder_file(payload, path)
        self.encoder_path = path
        log.info("encoder written to %s", path)
        print(f"encoder written to {path}")
        if self.export_cfg["wandb_artifact"]:
            log_encoder_artifact(self.trainer.loggers, path, payload)
        return path
