"""Hydra glue shared by the entry points: config path, resolvers, instantiation of callback/logger groups.

The configs are searched in ``./conf``, then ``LIVERFUSION_CONFIG_DIR``, then the package (``CONFIG_DIR``); the
late groups (experiment, hparams_search, debug) are taken with or without ``+`` (``normalize_overrides``). Both are
explained in :mod:`liverfusion.utils.search_path`; compose-API callers get the command line's behaviour with
``compose(config_name, overrides=normalize_overrides(config_name, overrides))``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from liverfusion.utils.search_path import LATE_GROUPS, normalize_overrides, user_config_dirs

log = logging.getLogger(__name__)


CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
"""conf/ ships inside the package, so it is found from any working directory and from a regular install."""

__all__ = [
    "CONFIG_DIR",
    "LATE_GROUPS",
    "apply_extras",
    "close_loggers",
    "instantiate_group",
    "normalize_overrides",
    "register_resolvers",
    "save_resolved_config",
    "user_config_dirs",
]


def register_resolvers() -> None:
    """Only resolvers that compute from config values; never one that runs code (no ``eval``)."""
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", lambda x: len(x))


register_resolvers()


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks/loggers group (a dict of named configs)."""
    out: list[Any] = []
    if not cfg:
        return out
    for name, sub in cfg.items():
        if isinstance(sub, DictConfig) and "_target_" in sub:
            log.debug("instantiating %s <%s>", name, sub._target_)
            out.append(instantiate(sub))
    return out


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """The fully resolved config beside the run's outputs: the run is reproducible from it + its seed. Its own
    paths are relative to the run folder and the salt is masked (``liverfusion.utils.run_folder``)."""
    from liverfusion.utils.run_folder import save_run_config

    return save_run_config(cfg, output_dir)


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("torch_threads"):
        import torch

        torch.set_num_threads(int(extras.torch_threads))
    if extras.get("matmul_precision"):
        import torch

        torch.set_float32_matmul_precision(str(extras.matmul_precision))
    if extras.get("print_config") and os.environ.get("LOCAL_RANK", "0") == "0":
        from liverfusion.utils.console import print_config

        print_config(cfg, extras.get("print_config"))  # summary (default) | full | false


def close_loggers() -> None:
    """Finish the W&B run of this job, so each multirun job gets its own run."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:  # pragma: no cover
        pass
