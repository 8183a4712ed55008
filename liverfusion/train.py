"""The one training entry point: ``python -m liverfusion.train +experiment=simsiam_pretrain``.

``train(cfg)`` is a plain function (tests and sweeps call it); ``main`` is only the ``@hydra.main`` wrapper.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from liverfusion.errors import ConfigError
from liverfusion.utils.atomic import atomic_write_text
from liverfusion.utils.cli import cli_errors, hydra_cli
from liverfusion.utils.hydra_utils import (
    CONFIG_DIR,
    apply_extras,
    close_loggers,
    instantiate_group,
    save_resolved_config,
)
from liverfusion.utils.privacy import guard_run, without_secrets

log = logging.getLogger(__name__)


def _output_dir(cfg: DictConfig) -> Path:
    try:
        out = cfg.paths.output_dir
    except Exception:  # ${hydra:...} outside a Hydra run: compose-API callers set paths.output_dir themselves
        out = None
    if out is None:
        out = HydraConfig.get().runtime.output_dir
    return Path(out)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Instantiate data, model, callbacks, loggers and trainer from ``_target_`` configs; fit; optionally test.

    Returns the metrics (floats) and the objects, and always closes the loggers.
    """
    output_dir = _output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_trainer_values(cfg)
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    save_resolved_config(cfg, output_dir)

    try:
        log.info("data <%s>", cfg.data._target_)
        datamodule = instantiate(cfg.data)
        _check_pairing(cfg)
        log.info("model <%s>", cfg.model._target_)
        model = instantiate(cfg.model, data_spec=datamodule.data_spec())
        if cfg.get("compile"):
            model = torch.compile(model)
        callbacks = instantiate_group(cfg.get("callbacks"))
        if cfg.get("privacy"):
            guard_run(cfg, datamodule, callbacks, to_wandb=bool(_wandb_configs(cfg)))
            _quiet_wandb_console(cfg)
        loggers = instantiate_group(cfg.get("logger"))
        if not loggers:  # nothing to log lr into (logger=none, debug=fast)
            callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
        for lg in loggers:
            if hasattr(lg, "log_hyperparams"):
                # the salt (privacy_salt, callbacks.*.salt) would let anyone re-identify hashed ids
                lg.log_hyperparams(without_secrets(OmegaConf.to_container(cfg, resolve=True)))
            if isinstance(lg, WandbLogger):  # resume continues the same run id (online)
                atomic_write_text(output_dir / "wandb_run_id.txt", str(lg.experiment.id))
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        objects = {
            "cfg": cfg,
            "datamodule": datamodule,
            "model": model,
            "trainer": trainer,
            "output_dir": output_dir,
        }

        if cfg.get("ckpt_path"):
            _check_ckpt_path(str(cfg.ckpt_path), model)
        if cfg.get("train", True):
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):
            ckpt = "best" if cfg.get("train", True) and _has_best(trainer) else cfg.get("ckpt_path")
            if ckpt is not None:
                _test_saved_weights(trainer)
            trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    finally:
        close_loggers()
    return metrics, objects


def _check_pairing(cfg: DictConfig) -> None:
    """An SSL method needs a data module that yields views, a classifier one that yields labelled cases: refuse a
    mismatched pair (e.g. ``model=simsiam`` without its experiment) now, not after the data set is built."""
    from hydra.utils import get_class

    from liverfusion.data.mda import MDADataModule
    from liverfusion.modules.ssl_base import SSLModule

    ssl_model = issubclass(get_class(cfg.model._target_), SSLModule)
    view_data = issubclass(get_class(cfg.data._target_), MDADataModule)
    if ssl_model != view_data:
        raise ConfigError(
            f"model <{cfg.model._target_}> "
            + (
                "is an SSL method and needs a data module that yields views"
                if ssl_model
                else "is a classifier"
            )
            + f", but data <{cfg.data._target_}> "
            + ("yields labelled cases" if ssl_model else "yields SSL views"),
            fix="pick an experiment that pairs them: +experiment=simsiam_pretrain (or byol_pretrain, vicreg_pretrain,"
            " hybrid_pretrain, stack_pretrain) to pre-train, +experiment=cgc_finetune to classify",
        )


def _check_ckpt_path(path: str, model: Any) -> None:
    """``ckpt_path`` must be a safe checkpoint of the model being trained: read it as data first (a pickle payload
    or interpolating metadata is refused by name), then compare its kind and weight names with the model's."""
    from liverfusion.modules.encoder_file import checkpoint_kind
    from liverfusion.utils.checkpoint_io import safe_load

    obj = safe_load(path)
    kind = checkpoint_kind(obj)
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "pytorch-lightning_version" not in obj:
        raise ConfigError(
            f"ckpt_path {path}: a {kind} file, not a Lightning checkpoint to resume",
            fix="an encoder.pt initialises a classifier through model.pretrained.path",
        )
    ours = set(model.state_dict())
    if set(state) != ours:
        want = type(model).__name__
        raise ConfigError(
            f"ckpt_path {path}: a {kind} checkpoint whose weights do not fit this run's {want} "
            f"({len(set(state) - ours)} unexpected, {len(ours - set(state))} missing keys)",
            fix="pass a checkpoint of the same experiment; to fine-tune from a pre-training run use "
            "model.pretrained.path=<run>/checkpoints/encoder.pt",
        )


def _test_saved_weights(trainer: L.Trainer) -> None:
    """Test the weights a checkpoint holds. Lightning's weight averaging (``EMAWeightAveraging``, SWA) saves the
    averaged weights as the checkpoint's ``state_dict``: what validation scored, model selection chose and
    ``liverfusion.evaluate`` loads. Left attached, the callback would restore the raw weights stored beside them
    when the same trainer tests that checkpoint, so the run's test would score another model."""
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning < 2.5 has no weight averaging callback
        return
    kept = [cb for cb in trainer.callbacks if not isinstance(cb, WeightAveraging)]
    if len(kept) < len(trainer.callbacks):
        log.info(
            "testing the checkpoint's averaged weights (weight averaging callback detached for the test)"
        )
        trainer.callbacks = kept


def _check_trainer_values(cfg: DictConfig) -> None:
    """Epoch and step counts Lightning would reject deep inside (or silently accept as 'train nothing')."""
    t = cfg.get("trainer") or {}
    for key in ("max_epochs", "max_steps"):
        value = t.get(key)
        if value is None or value == -1:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(
                f"trainer.{key}={value!r}: expected a positive integer (or -1 for no limit)",
                fix=f"set trainer.{key} to e.g. 20",
            )


def _wandb_configs(cfg: DictConfig) -> list[DictConfig]:
    """The W&B logger entries of the logger group (none: nothing leaves the machine through W&B)."""
    return [
        sub
        for sub in (cfg.get("logger") or {}).values()
        if isinstance(sub, DictConfig) and str(sub.get("_target_", "")).endswith("WandbLogger")
    ]


def _quiet_wandb_console(cfg: DictConfig) -> None:
    """Privacy: W&B does not capture the console (``output.log`` would carry case ids of warnings to W&B)."""
    for sub in _wandb_configs(cfg):
        with open_dict(sub):
            settings = dict(OmegaConf.to_container(sub.get("settings") or OmegaConf.create({})))
            sub.settings = {**settings, "console": "off"}
            sub._convert_ = "all"  # wandb.init takes a plain dict as settings, not a DictConfig


def _has_best(trainer: L.Trainer) -> bool:
    cb = trainer.checkpoint_callback
    return bool(cb is not None and getattr(cb, "best_model_path", ""))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@cli_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    metrics, objects = train(cfg)
    if objects["trainer"].is_global_zero:  # where the results are, as the run's last lines
        from liverfusion.utils.console import run_outputs

        print("\n".join(run_outputs(objects["output_dir"])), flush=True)
    name = cfg.get("optimized_metric")
    if name:
        if name not in metrics:
            raise KeyError(f"optimized_metric {name!r} was not logged; logged: {sorted(metrics)}")
        return metrics[name]
    return None


def main() -> float | None:
    """Console script / ``python -m``: ``--help`` is the command's own page; Hydra's own failures (a run folder that
    cannot be created, an unknown key on the command line) get one line and exit status 2 too (``hydra_cli``)."""
    return hydra_cli(_hydra_main, config_name="train")()


if __name__ == "__main__":
    main()
