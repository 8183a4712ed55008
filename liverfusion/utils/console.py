"""What the command-line entry points print: a short config summary, where a run's results are, a model summary
without an empty FLOPs column, and no known third-party noise.

The known third-party warnings are filtered in every CLI exactly as the test suite filters them
(``[tool.pytest.ini_options] filterwarnings`` in ``pyproject.toml``; a test keeps both lists the same): each is a
deprecation inside a dependency that a user cannot act on. Warnings raised by liverfusion, and every other
warning, still show.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

KNOWN_WARNINGS: tuple[str, ...] = (
    "ignore::FutureWarning:torch.*",
    "ignore:.*LeafSpec.*:FutureWarning",
    "ignore::DeprecationWarning:pkg_resources.*",
    "ignore:.*declarative_base.*",
    "ignore:.*litlogger.*",
    "ignore:.*set_vital.*:UserWarning",
)
"""Third-party warnings nobody running liverfusion can act on, written as pytest's ``filterwarnings``
(``action:message:category:module``)."""

QUIET_LOG_MESSAGES = (
    "💡 Tip:",  # Lightning advertising its cloud products
    "Trainer already configured with model summary callbacks",
    "TPU available:",
    "HPU available:",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
"""Lightning INFO lines that tell a liverfusion user nothing (the GPU line stays: it says what runs where)."""
QUIET_LOGGERS = {"alembic": logging.WARNING}
"""Loggers of dependencies held to warnings (alembic announces its plugins at INFO when optuna's RDB is imported)."""


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not any(text.startswith(m) or m in text[:80] for m in QUIET_LOG_MESSAGES)


def quiet_third_party() -> None:
    """Filter ``KNOWN_WARNINGS`` and the Lightning/alembic noise in this process; every CLI calls it first."""
    import builtins

    for spec in KNOWN_WARNINGS:
        action, message, category, module = (spec.split(":", 3) + ["", "", ""])[:4]
        cls = getattr(builtins, category, Warning) if category else Warning
        warnings.filterwarnings(action, message=message, category=cls, module=module)  # type: ignore[arg-type]
    drop = _DropMessages()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(drop)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


# ---- the config summary --------------------------------------------------------------------------------------
def _short(target: Any) -> str:
    return str(target or "?").rsplit(".", 1)[-1]


def _sel(cfg: Any, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    except Exception:  # noqa: BLE001  an interpolation that only resolves inside a Hydra job
        return default


def _choices() -> dict[str, str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return {str(k): str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except Exception:  # noqa: BLE001  outside a Hydra job there are no choices
        pass
    return {}


def config_summary(cfg: Any) -> list[str]:
    """A few lines saying what this run is: the experiment and presets, the data set, the model, the trainer and
    the output folder (``extras.print_config=full`` prints the whole tree instead)."""
    choices = _choices()
    picked = [f"{g}={choices[g]}" for g in ("experiment", "hparams_search", "debug") if g in choices]
    data = _sel(cfg, "data") or {}
    layout = _sel(cfg, "data.layout") or {}
    mods = _sel(cfg, "data.layout.modalities") or []
    classes = _sel(cfg, "data.layout.class_names") or []
    shape = _sel(cfg, "data.preprocess.shape")
    data_line = (
        f"data:    {choices.get('data') or _sel(layout, 'name', '?')} ({_short(_sel(layout, '_target_'))}, "
        f"{_sel(layout, 'root', '?')}): {len(mods)} modalities, {len(classes)} classes, fold "
        f"{_sel(data, 'fold', '-')}, batch {_sel(data, 'batch_size', '?')}"
        + (f", volumes {'x'.join(str(s) for s in shape)}" if shape else "")
    )
    enc_cfg = _sel(cfg, "model.encoder") or _sel(cfg, "model.backbone.encoder") or {}
    enc = _sel(enc_cfg, "arch") or _sel(enc_cfg, "name") or _sel(enc_cfg, "_target_")
    fusion = _sel(cfg, "model.fusion._target_") or _sel(cfg, "model.backbone.fusion._target_")
    model_line = f"model:   {_short(_sel(cfg, 'model._target_'))}" + (
        f" ({', '.join(x for x in (_short(enc) if enc else '', _short(fusion) if fusion else '') if x)})"
        if enc or fusion
        else ""
    )
    t = _sel(cfg, "trainer") or {}
    limits = []
    for k in ("fast_dev_run", "overfit_batches", "limit_train_batches", "max_steps"):
        v = _sel(t, k)
        if v is None or v is False or (v is not True and v in (-1, 0, 1.0)):
            continue
        limits.append(k if v is True else f"{k}={v}")
    trainer_line = (
        f"trainer: {_sel(t, 'accelerator', '?')} x{_sel(t, 'devices', '?')}, max_epochs {_sel(t, 'max_epochs', '?')}, "
        f"precision {_sel(t, 'precision', '?')}" + (f", {', '.join(limits)}" if limits else "")
    )
    task = f"task:    {_sel(cfg, 'task_name', '?')}" + (f" ({', '.join(picked)})" if picked else "")
    task += f", seed {_sel(cfg, 'seed')}" + (", then test" if _sel(cfg, "test") else "")
    out = _sel(cfg, "paths.output_dir")
    return [
        task,
        data_line,
        model_line,
        trainer_line,
        f"output:  {out}" + ("" if out is None else "  (config_resolved.yaml: the full config)"),
    ]


def print_config(cfg: Any, mode: Any) -> None:
    """``extras.print_config``: ``summary`` (or true) prints ``config_summary``, ``full`` the whole tree."""
    mode = str(mode).lower()
    if mode in ("false", "none", "0", "off"):
        return
    if mode == "full":
        print_config_tree(cfg)
        return
    print("\n".join(config_summary(cfg)), flush=True)


# ---- where the results are -----------------------------------------------------------------------------------
def run_outputs(output_dir: str | Path) -> list[str]:
    """Lines naming what a finished training run left and where: test metrics with CIs, checkpoints, encoder."""
    out = Path(output_dir)
    lines = [f"run folder:   {out}"]
    for label, rel in (
        ("test metrics", "test/metrics.md"),
        ("test metrics", "test/metrics.json"),
        ("predictions", "test/predictions.csv"),
    ):
        path = out / rel
        if path.is_file():
            lines.append(
                f"{label + ':':<13} {path}" + ("  (95 % bootstrap CIs)" if rel.endswith("metrics.md") else "")
            )
            if label == "test metrics":
                break
    ckpts = sorted((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    if ckpts:
        chosen = [p.name for p in ckpts if p.name != "last.ckpt" and not p.name.startswith("step_")]
        lines.append(
            f"checkpoints:  {out / 'checkpoints'}" + (f" (selected: {', '.join(chosen)})" if chosen else "")
        )
    encoders = sorted(out.rglob("encoder.pt"))
    if encoders:
        lines.append(f"encoder:      {encoders[0]}")
    if not ckpts and not encoders:
        lines.append("checkpoints:  none written (fast_dev_run and callbacks=none save none)")
    return lines


# ---- Lightning's model summary without an empty FLOPs column ---------------------------------------------------
def _summary_table(
    summary_data: list[tuple[str, list[str]]], total_flops: int
) -> list[tuple[str, list[str]]]:
    """The summary's columns, FLOPs left out when nothing was counted (Lightning counts FLOPs only for a model
    with an ``example_input_array``, which none of liverfusion's dict-batch models has)."""
    if total_flops:
        return summary_data
    return [(name, col) for name, col in summary_data if name != "FLOPs"]


def _format(columns: Iterable[tuple[str, list[str]]]) -> str:
    columns = list(columns)
    widths = [max(len(name), *(len(v) for v in col)) if col else len(name) for name, col in columns]
    rows = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths))]
    rows.append("-" * len(rows[0]))
    n = len(columns[0][1]) if columns else 0
    for i in range(n):
        rows.append(" | ".join(col[i].ljust(w) for (_, col), w in zip(columns, widths)))
    return "\n".join(rows)


def _model_summary_class() -> type:
    from lightning.pytorch.callbacks import ModelSummary as _LightningSummary
    from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

    class ModelSummary(_LightningSummary):
        """Lightning's model summary as one plain table, without the FLOPs column when no FLOPs were counted."""

        @staticmethod
        def summarize(
            summary_data: list[tuple[str, list[str]]],
            total_parameters: int,
            trainable_parameters: int,
            model_size: float,
            total_training_modes: dict[str, int],
            total_flops: int,
            **summarize_kwargs: Any,
        ) -> None:
            table = _format(_summary_table(summary_data, total_flops))
            totals = (
                f"params: {get_human_readable_count(int(trainable_parameters))} trainable, "
                f"{get_human_readable_count(int(total_parameters - trainable_parameters))} frozen, "
                f"{get_formatted_model_size(model_size)} MB"
                + (f", {get_human_readable_count(int(total_flops))} FLOPs" if total_flops else "")
            )
            logging.getLogger("liverfusion").info("model summary\n%s\n%s", table, totals)

    ModelSummary.__qualname__ = (
        "ModelSummary"  # pickled by reference as liverfusion.utils.console.ModelSummary
    )
    ModelSummary.__module__ = __name__
    return ModelSummary


def __getattr__(name: str) -> Any:
    """``liverfusion.utils.console.ModelSummary`` (a Lightning callback: Lightning is imported on first use only,
    so the CLIs' ``--help`` stays light)."""
    if name == "ModelSummary":
        cls = _model_summary_class()
        globals()["ModelSummary"] = cls
        return cls
    raise AttributeError(name)


def print_config_tree(cfg: Any) -> None:
    """The whole config as a rich tree, secrets masked (``extras.print_config=full``)."""
    from omegaconf import DictConfig, OmegaConf
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    from liverfusion.utils.run_folder import mask_secrets

    tree = Tree("config", guide_style="dim")
    plain_cfg = (
        mask_secrets(OmegaConf.to_container(cfg, resolve=False)) if isinstance(cfg, DictConfig) else cfg
    )
    for key, value in plain_cfg.items():
        text = OmegaConf.to_yaml(value) if isinstance(value, dict | list) else str(value)
        tree.add(str(key)).add(Syntax(text, "yaml"))
    rprint(tree)
