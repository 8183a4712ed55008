"""W&B dashboards of the fusion classifier, in one callback (a no-op without a ``WandbLogger`` or another module).

Logged (keys):

- every ``every_n_val_epochs``-th validation epoch (not the sanity check): ``val/confusion_matrix`` and
  ``val/roc`` (W&B custom charts; their data tables are ``val/confusion_matrix_table`` and ``val/roc_table``) and
  ``val/per_class`` (per class: support, sensitivity, specificity, precision, F1);
- after the test loop: ``test/confusion_matrix``, ``test/roc``, ``test/per_class``, ``test/metrics_ci`` (every
  metric with its bootstrap CI, from ``test/metrics.json``), ``test/robustness`` (each modality dropped in turn) and
  ``test/predictions`` (case id, patient id, class probabilities, prediction, label);
- at the end of fit: the best checkpoint (``last`` when none was selected) as a W&B artifact
  ``classifier-<run id>`` of type ``model`` whose metadata is the module's ``inference_meta()``.

Privacy (``privacy: ${privacy}``, salt ``${privacy_salt}``): case and patient ids in every table are salted hashes
(:func:`liverfusion.utils.privacy.public_ids`), no image is ever logged by this callback, and the checkpoint
artifact is uploaded only when the checkpoint holds no raw id. The salt itself is never logged.
Confusion matrices and ROC curves are computed with torchmetrics (``liverfusion.metrics``), not by W&B's helpers.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torchmetrics.functional.classification as tmf

from liverfusion.metrics import UndefinedMetricWarning, classification_metrics, confusion_matrix
from liverfusion.utils.privacy import ids_in_text, public_ids

log = logging.getLogger(__name__)

PER_CLASS_COLUMNS = ["class", "support", "sensitivity", "specificity", "precision", "f1"]


# ---------------------------------------------------------------------------------------------------------------
# helpers (plain functions: unit-tested without a trainer)
# ---------------------------------------------------------------------------------------------------------------
def per_class_rows(probs: Any, labels: Any, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class: support, sensitivity (recall), specificity, precision and F1 of the arg-max prediction.

    Sensitivity / specificity come from :func:`classification_metrics` (NaN where undefined: no positives / no
    negatives); precision and F1 from torchmetrics (0 for a class that is never predicted).
    """
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    k = len(class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        base = classification_metrics(p, y, class_names)
    precision = tmf.multiclass_precision(p, y, num_classes=k, average=None, zero_division=0).tolist()
    f1 = tmf.multiclass_f1_score(p, y, num_classes=k, average=None, zero_division=0).tolist()
    support = torch.bincount(y, minlength=k).tolist()
    return [
        {
            "class": c,
            "support": int(support[i]),
            "sensitivity": base[f"sensitivity/{c}"],
            "specificity": base[f"specificity/{c}"],
            "precision": float(precision[i]),
            "f1": float(f1[i]),
        }
        for i, c in enumerate(class_names)
    ]


def confusion_rows(probs: Any, labels: Any, class_names: Sequence[str]) -> list[list[Any]]:
    """``[actual, predicted, count]`` for every pair of classes (the data of W&B's confusion-matrix chart)."""
    cm = confusion_matrix(probs, labels, num_classes=len(class_names))
    return [[a, b, int(cm[i, j])] for i, a in enumerate(class_names) for j, b in enumerate(class_names)]


def roc_rows(probs: Any, labels: Any, class_names: Sequence[str]) -> list[list[Any]]:
    """``[class, fpr, tpr]`` points of the one-vs-rest ROC curve of every class with positives and negatives.

    Computed with torchmetrics (exact thresholds); a class absent from the labels has no curve (its AUROC is
    undefined), instead of W&B's ``roc_curve``, which mislabels columns when a class is absent.
    """
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    rows: list[list[Any]] = []
    for i, c in enumerate(class_names):
        pos = y == i
        if not pos.any() or pos.all():
            continue
        fpr, tpr, _ = tmf.binary_roc(p[:, i], pos.long(), thresholds=None)
        rows += [[c, round(float(f), 4), round(float(t), 4)] for f, t in zip(fpr.tolist(), tpr.tolist())]
    return rows


def prediction_rows(preds: Any, privacy: bool, salt: str = "") -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the predictions table of a :class:`~liverfusion.evaluate.PredictionSet`.

    Under ``privacy`` case and patient ids are salted hashes; the probabilities, prediction and label are kept.
    """
    names = list(preds.class_names)
    columns = ["case_id", "patient_id", *[f"p_{c}" for c in names], "prediction", "label"]
    cases = public_ids(preds.case_ids, privacy, salt)
    patients = public_ids(preds.patient_ids, privacy, salt)
    predicted = preds.probs.argmax(axis=1)
    rows = []
    for i in range(len(cases)):
        label = int(preds.labels[i])
        rows.append(
            [
                cases[i],
                patients[i],
                *[float(v) for v in preds.probs[i]],
                names[int(predicted[i])],
                names[label] if label >= 0 else "",
            ]
        )
    return columns, rows


def _rows_table(rows: Sequence[dict[str, Any]]):
    import wandb

    columns = list(rows[0]) if rows else list(PER_CLASS_COLUMNS)
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])


def ids_in_checkpoint(path: str | Path, ids: Sequence[str]) -> list[str]:
    """The ids of ``ids`` that occur in the non-tensor content (keys, strings) of a checkpoint file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    strings: list[str] = []
    stack: list[Any] = [ckpt]
    while stack:
        obj = stack.pop()
        if isinstance(obj, str):
            strings.append(obj)
        elif isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set):
            stack += list(obj)
    return ids_in_text(strings, ids)


# ---------------------------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------------------------
class WandbClassifierLogger(L.Callback):
    """Validation / test dashboards and the model artifact of :class:`~liverfusion.modules.classifier.FusionClassifier`.

    Args:
        privacy: hash case / patient ids in tables (salted with ``salt``) and log no images.
        salt: the privacy salt (``${privacy_salt}``); never logged.
        every_n_val_epochs: validation charts every n-th validation epoch (0: never).
        log_test: the test tables after the test loop.
        log_model: the best checkpoint as a ``model`` artifact at the end of fit.
    """

    def __init__(
        self,
        privacy: bool = False,
        salt: str = "",
        every_n_val_epochs: int = 1,
        log_test: bool = True,
        log_model: bool = True,
    ):
        self.privacy = bool(privacy)
        self.salt = str(salt or "")
        self.every_n_val_epochs = int(every_n_val_epochs)
        self.log_test = bool(log_test)
        self.log_model = bool(log_model)
        self._val_probs: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._val_epochs = 0
        self.logged_keys: list[str] = []
        self.artifact_name: str | None = None

    def __repr__(self) -> str:  # the salt stays out of logs and printed configs
        return f"{type(self).__name__}(privacy={self.privacy}, every_n_val_epochs={self.every_n_val_epochs})"

    # ---- plumbing ----
    @staticmethod
    def wandb_loggers(trainer: L.Trainer) -> list[Any]:
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _enabled(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        from liverfusion.modules.classifier import FusionClassifier

        return isinstance(pl_module, FusionClassifier) and bool(self.wandb_loggers(trainer))

    def _log(self, trainer: L.Trainer, payload: dict[str, Any]) -> None:
        if not payload or not trainer.is_global_zero:
            return
        if self.privacy:  # defence in depth: nothing image-like leaves under privacy
            import wandb

            payload = {k: v for k, v in payload.items() if not isinstance(v, wandb.Image)}
        payload = {**payload, "trainer/global_step": trainer.global_step}  # the loggers' x axis
        for lg in self.wandb_loggers(trainer):
            lg.experiment.log(payload)
        self.logged_keys += [k for k in payload if k not in self.logged_keys]

    def charts(self, stage: str, probs: Any, labels: Any, class_names: Sequence[str]) -> dict[str, Any]:
        """Confusion matrix and ROC (custom charts) and the per-class table of one prediction set."""
        import wandb

        names = list(class_names)
        cm = wandb.Table(
            columns=["Actual", "Predicted", "nPredictions"], data=confusion_rows(probs, labels, names)
        )
        out: dict[str, Any] = {
            f"{stage}/confusion_matrix": wandb.plot.plot_table(
                "wandb/confusion_matrix/v1",
                cm,
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": f"{stage} confusion matrix"},
            ),
            f"{stage}/per_class": _rows_table(per_class_rows(probs, labels, names)),
        }
        roc = roc_rows(probs, labels, names)
        if roc:
            out[f"{stage}/roc"] = wandb.plot.plot_table(
                "wandb/area-under-curve/v0",
                wandb.Table(columns=["class", "fpr", "tpr"], data=roc),
                {"x": "fpr", "y": "tpr", "class": "class"},
                {
                    "title": f"{stage} ROC (one-vs-rest)",
                    "x-axis-title": "False positive rate",
                    "y-axis-title": "True positive rate",
                },
            )
        return out

    # ---- validation ----
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_probs, self._val_labels = [], []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or "probs" not in outputs:
            return
        if not self._enabled(trainer, pl_module):
            return
        self._val_probs.append(outputs["probs"].detach().float().cpu())
        self._val_labels.append(torch.as_tensor(batch["label"]).detach().cpu().long())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._enabled(trainer, pl_module):
            return
        k = len(pl_module.class_names)
        probs = torch.cat(self._val_probs) if self._val_probs else torch.empty(0, k)
        labels = torch.cat(self._val_labels) if self._val_labels else torch.empty(0, dtype=torch.long)
        self._val_probs, self._val_labels = [], []
        if trainer.world_size > 1:  # every rank takes part, rank 0 logs
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (probs, labels))
            probs = torch.cat([g[0] for g in gathered])
            labels = torch.cat([g[1] for g in gathered])
        self._val_epochs += 1
        n = self.every_n_val_epochs
        if n <= 0 or (self._val_epochs - 1) % n or not trainer.is_global_zero:
            return
        keep = labels >= 0
        if not keep.any():
            return
        probs = probs[keep].double()
        probs = probs / probs.sum(dim=1, keepdim=True)
        payload = self.charts("val", probs, labels[keep], pl_module.class_names)
        payload["epoch"] = trainer.current_epoch
        self._log(trainer, payload)

    # ---- test ----
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the module's ``on_test_epoch_end`` wrote ``<run>/test/``: the test tables."""
        if not self.log_test or not trainer.is_global_zero or not self._enabled(trainer, pl_module):
            return
        preds = getattr(pl_module, "test_predictions", None)
        if preds is None:
            return
        self._log(trainer, self.test_tables(preds, Path(trainer.default_root_dir) / "test"))

    def test_tables(self, preds: Any, out_dir: Path | None = None) -> dict[str, Any]:
        """The test payload: charts and per-class table (labelled cases), predictions, CIs and robustness."""
        import wandb

        payload: dict[str, Any] = {}
        if preds.has_labels:
            sub = preds.subset(preds.labelled)
            probs = sub.probs / sub.probs.sum(axis=1, keepdims=True)
            payload.update(self.charts("test", probs, sub.labels, preds.class_names))
        columns, rows = prediction_rows(preds, self.privacy, self.salt)
        payload["test/predictions"] = wandb.Table(columns=columns, data=rows)
        if out_dir is not None and (out_dir / "metrics.json").is_file():
            metrics = json.loads((out_dir / "metrics.json").read_text())
            rows = [[k, v["point"], v["low"], v["high"]] for k, v in metrics.items()]
            payload["test/metrics_ci"] = wandb.Table(
                columns=["metric", "value", "ci_low", "ci_high"], data=rows
            )
        if out_dir is not None and (out_dir / "robustness.csv").is_file():
            with (out_dir / "robustness.csv").open() as f:
                table = list(csv.reader(f))
            if table:
                payload["test/robustness"] = wandb.Table(columns=table[0], data=table[1:])
        return payload

    # ---- model artifact ----
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_model or not trainer.is_global_zero or not self._enabled(trainer, pl_module):
            return
        cb = trainer.checkpoint_callback
        path = (getattr(cb, "best_model_path", "") or getattr(cb, "last_model_path", "")) if cb else ""
        if not path or not Path(path).is_file():
            log.info("no checkpoint file to log as a W&B artifact")
            return
        path = Path(path)
        if self.privacy:
            dm = getattr(trainer, "datamodule", None)
            ids = sorted(
                {c.case_id for c in getattr(dm, "cases", [])}
                | {c.patient_id for c in getattr(dm, "cases", [])}
            )
            found = ids_in_checkpoint(path, ids)
            if found:
                log.warning(
                    "privacy: the checkpoint %s holds %d raw case/patient id(s): not uploaded as a W&B artifact",
                    path.name,
                    len(found),
                )
                return
        import wandb

        meta = pl_module.inference_meta()
        score = getattr(cb, "best_model_score", None)
        meta["checkpoint"] = path.name
        meta["selection_metric"] = getattr(cb, "monitor", None)
        meta["selection_score"] = None if score is None else float(score)
        for lg in self.wandb_loggers(trainer):
            name = f"classifier-{lg.experiment.id}"
            art = wandb.Artifact(name, type="model", metadata=meta)
            art.add_file(str(path), name=path.name)
            aliases = ["best", "latest"] if getattr(cb, "best_model_path", "") else ["latest"]
            lg.experiment.log_artifact(art, aliases=aliases)
            self.artifact_name = name
