"""Aggregate cross-validation runs (one multirun, or several for ablations) into ``results.md``, CSV tables,
figures and a model card; ``liverfusion.report`` is its command line.

Per arm: mean +- sample std over runs of every headline metric; the pooled predictions with bootstrap 95 % CIs
(out-of-fold when the runs' test cases are disjoint, as in nested CV; the fold-model ensemble when they share one
fixed test split); confusion matrix, ROC, per-fold scores. Across arms: paired comparisons on common cases (paired
bootstrap; DeLong for binary AUROC) and a t-SNE of the test features (e.g. pretrained vs scratch encoder).

One concept per module: ``runs`` (discovery, arms, names), ``tables`` (pooling, metric rows, comparisons),
``calibration``, ``plots``, ``markdown`` (``results.md``), ``model_card``, ``wandb_upload`` and ``build``
(``make_report``, which runs them in order).
"""

from liverfusion.reporting.build import make_report
from liverfusion.reporting.model_card import fill_model_card, neutral_card
from liverfusion.reporting.runs import Arm, Run, file_slug, find_runs, group_runs
from liverfusion.reporting.tables import pooled_predictions

__all__ = [
    "Arm",
    "Run",
    "file_slug",
    "fill_model_card",
    "find_runs",
    "group_runs",
    "make_report",
    "neutral_card",
    "pooled_predictions",
]
