"""The example-pair grid of :mod:`liverfusion.viz.pairs`, logged to W&B when pre-training starts (images only where
:func:`liverfusion.utils.privacy.images_allowed` lets them leave the machine)."""

from __future__ import annotations

import logging

import lightning as L

from liverfusion.utils.privacy import images_allowed
from liverfusion.viz.pairs import draw_pairs, figure_array, pairs_figure

log = logging.getLogger(__name__)


class PairGridLogger(L.Callback):
    """Logs the example-pair grid to W&B when pre-training starts (only when a WandbLogger is attached).

    Args:
        n: number of pairs. per_row: pairs per band of rows. seed: which cases and augmentations are shown.
        log_images: true, false or ``auto`` (no images when the data set's layout is ``clinical``).
        key: the W&B key.
    """

    def __init__(
        self,
        n: int = 8,
        per_row: int = 4,
        seed: int = 0,
        log_images: bool | str = "auto",
        key: str = "pairs/examples",
    ):
        self.n, self.per_row, self.seed, self.log_images, self.key = (
            int(n),
            int(per_row),
            int(seed),
            log_images,
            key,
        )
        self.logged = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers or not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        clinical = bool(getattr(getattr(dm, "layout", None), "clinical", False))
        if not images_allowed(self.log_images, clinical):
            log.info(
                "example pairs not logged: the data set is marked clinical (log_images=%s)", self.log_images
            )
            return
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "sampler"):
            return
        items = draw_pairs(dataset, self.n, self.seed)
        modalities = list(getattr(dm, "modalities", []) or pl_module.modalities)
        policy = getattr(getattr(dataset, "sampler", None), "policy", "")
        fig = pairs_figure(items, modalities, f"MDA pairs ({policy})", self.per_row)
        for lg in wandb_loggers:
            lg.log_image(
                key=self.key, images=[figure_array(fig)], caption=[f"{len(items)} pairs, policy {policy}"]
            )
        self.logged = True
