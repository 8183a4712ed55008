"""Lightning callbacks of liverfusion (pre-emption checkpoint, classifier W&B dashboards)."""

from liverfusion.callbacks.preemption import PreemptionCheckpoint
from liverfusion.callbacks.wandb_classifier import WandbClassifierLogger

__all__ = ["PreemptionCheckpoint", "WandbClassifierLogger"]
