"""Lightning callbacks of liverfusion (pre-emption checkpoint)."""

from liverfusion.callbacks.preemption import PreemptionCheckpoint

__all__ = ["PreemptionCheckpoint"]
