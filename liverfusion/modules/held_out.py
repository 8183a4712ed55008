"""The classifier's test loop: the held-out split is touched once, and what it gives is written to ``<run>/test/``.

A mixin of :class:`liverfusion.modules.classifier.FusionClassifier` (it reads the classifier's ``eval_cfg``,
``net``, ``encode``, class and modality names). ``test_step`` collects predictions (each modality dropped in turn
too, for the robustness table); ``on_test_epoch_end`` gathers them over ranks and writes predictions, metrics with
bootstrap confidence intervals, the robustness table and the features (``liverfusion.evaluation``), with
:meth:`run_summary` beside them for reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from liverfusion.models.encoder_base import plain


class HeldOutEvaluation:
    """Lightning's test hooks of the classifier; the results stay on ``test_summary`` / ``test_predictions``."""

    def _reset_test_records(self) -> None:
        self._test_records: list[dict[str, Any]] = []
        self.test_summary: dict[str, Any] | None = None
        self.test_predictions: Any = None  # the last test loop's PredictionSet

    def on_test_start(self) -> None:
        self._test_records = []
        self._forget_cached("eval")  # weights may have been reloaded

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
