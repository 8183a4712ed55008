"""Result figures (matplotlib, Agg canvas, atomic writes)."""

from liverfusion.viz.plots import plot_confusion_matrix, plot_embedding, plot_per_fold, plot_roc

__all__ = ["plot_confusion_matrix", "plot_embedding", "plot_per_fold", "plot_roc"]
