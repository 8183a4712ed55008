"""Lightning callbacks of liverfusion (pre-emption checkpoint, classifier W&B dashboards, the MDA pair grid)."""

from liverfusion.callbacks.pair_grid import PairGridLogger
from liverfusion.callbacks.preemption import PreemptionCheckpoint
from liverfusion.callbacks.wandb_classifier import WandbClassifierLogger

__all__ = ["PairGridLogger", "PreemptionCheckpoint", "WandbClassifierLogger"]
