"""Save ``last.ckpt`` when the job is told to stop (SIGTERM from SLURM pre-emption, ``kill``, Ctrl-C).

Lightning turns SIGTERM into a ``SIGTERMException`` after the current batch; this callback writes the state at that
point where ``python -m liverfusion.resume RUN_DIR`` looks first, so a pre-empted run loses no finished step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt", on_keyboard_interrupt: bool = True):
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.on_keyboard_interrupt = on_keyboard_interrupt

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        stop = isinstance(exception, SIGTERMException) or (
            self.on_keyboard_interrupt and isinstance(exception, KeyboardInterrupt)
        )
        if not stop or trainer.state.fn != "fit":
            return
        path = self.dirpath / self.filename
        trainer.save_checkpoint(path)  # Lightning writes through a transaction: never a half-written file
        log.warning(
            "stopped by %s at global step %d: state saved to %s",
            type(exception).__name__,
            trainer.global_step,
            path,
        )
