"""Example MDA positive pairs as a PNG grid: the centre slice of both views of n cases, with their modality names
and patient ids, so a person can see what the encoder is asked to match.

Command line (Hydra, composes the same data config as pre-training)::

    python -m liverfusion.viz.pairs data=phantom n=8
    python -m liverfusion.viz.pairs experiment=simsiam_same_modality out=/tmp/same.png

The same grid is logged to W&B at the start of pre-training by
:class:`liverfusion.callbacks.pair_grid.PairGridLogger` (a Lightning callback).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig

from liverfusion.errors import ConfigError
from liverfusion.utils.atomic import atomic_path
from liverfusion.utils.cli import cli_errors, hydra_cli
from liverfusion.utils.hydra_utils import CONFIG_DIR
from liverfusion.utils.privacy import images_allowed

log = logging.getLogger(__name__)


def draw_pairs(dataset: Any, n: int = 8, seed: int = 0) -> list[dict]:
    """``n`` items of a :class:`~liverfusion.data.mda.ViewDataset`, cases chosen and augmented under ``seed``.

    Torch's global generator is forked, so drawing examples does not change the training run's random stream.
    """
    if len(dataset) == 0:
        raise ConfigError("the pair dataset is empty: nothing to show")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        order = torch.randperm(len(dataset))[: int(n)].tolist()
        return [dataset[i] for i in order]


def _centre_slice(view: torch.Tensor) -> np.ndarray:
    v = torch.as_tensor(view).float()
    v = v[0] if v.ndim == 4 else v  # (1, D, H, W) -> (D, H, W)
    return v[v.shape[0] // 2].cpu().numpy()


def pairs_figure(
    items: Sequence[dict], modalities: Sequence[str], title: str = "MDA positive pairs", per_row: int = 4
) -> Figure:
    """Each pair is a column of two panels (view 1 above view 2), ``per_row`` pairs per band of rows."""
    n = len(items)
    if n == 0:
        raise ValueError("no pairs to draw")
    per_row = max(1, min(int(per_row), n))
    bands = -(-n // per_row)
    fig = Figure(figsize=(2.3 * per_row, 4.9 * bands + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * bands, per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, item in enumerate(items):
        band, col = divmod(k, per_row)
        for row in range(2):  # the first two views (a hybrid item's third is the anchor's phase again)
            ax = axes[2 * band + row, col]
            img = _centre_slice(item["views"][row])
            lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            m = int(item["view_modalities"][row])
            name = modalities[m] if 0 <= m < len(modalities) else f"stack ({modalities[0]})"
            case = "" if item["case_id"] == item["patient_id"] else f" (case {item['case_id']})"
            header = f"patient {item['patient_id']}{case}\n" if row == 0 else ""
            ax.set_title(f"{header}view {row + 1}: {name}", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def save_pairs_png(
    items: Sequence[dict],
    modalities: Sequence[str],
    path: str | Path,
    title: str = "MDA positive pairs",
    per_row: int = 4,
    dpi: int = 110,
) -> Path:
    """Write the grid to ``path`` atomically and return it."""
    fig = pairs_figure(items, modalities, title, per_row)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def figure_array(fig: Figure) -> np.ndarray:
    """RGB uint8 array of a figure (for loggers that take images)."""
    canvas = fig.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def make_grid(cfg: DictConfig) -> Path:
    """Compose the pre-training data module from ``cfg``, draw ``cfg.n`` pairs and write the PNG to ``cfg.out``."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    if not hasattr(dm, "pair_dataset"):
        raise ConfigError(f"data._target_ {cfg.data._target_} does not make pairs: use an MDA data module")
    if dm.layout.clinical and not images_allowed(cfg.get("log_images", "auto"), True):
        raise ConfigError(
            f"data set {dm.layout.name!r} is marked clinical: pass log_images=true to draw it anyway "
            "(the PNG stays on this machine)"
        )
    dm.setup("fit")
    items = draw_pairs(dm.pair_dataset(), int(cfg.n), int(cfg.get("seed_pairs", 0)))
    title = f"{dm.layout.name}: MDA pairs, policy {dm.sampler.policy}"
    return save_pairs_png(items, dm.modalities, cfg.out, title, int(cfg.per_row))


@hydra_cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="viz_pairs")
@cli_errors
def main(cfg: DictConfig) -> None:
    """Errors end with one line and exit status 2 (``liverfusion.utils.cli``)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    path = make_grid(cfg)
    print(f"pairs written to {path}")


if __name__ == "__main__":
    main()
