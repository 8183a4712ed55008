"""``python -m liverfusion.resume RUN_DIR [key=value ...]``: continue a killed or pre-empted run in its own directory.

Hydra makes a new directory per launch, so resuming goes through the old run's ``config_resolved.yaml`` instead:
same outputs, same seed, same W&B run id (online; an offline run cannot be resumed by W&B: the continuation is a new
offline run in the same folder, and ``wandb sync`` uploads both), from ``checkpoints/last.ckpt``. A truncated or
corrupt checkpoint is reported and the newest readable one is used instead; nothing is deleted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from liverfusion.errors import CheckpointError, LiverfusionError
from liverfusion.utils import hydra_utils  # noqa: F401  (registers resolvers)

log = logging.getLogger(__name__)


def checkpoint_is_readable(path: Path) -> str | None:
    """None when ``path`` loads as a Lightning checkpoint; otherwise the reason it does not."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors of truncated or corrupt files come in many types
        if "Unsupported global" in str(exc):  # intact file holding a class the safe loader will not build
            return None
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:300]
    if not isinstance(obj, dict) or "state_dict" not in obj:
        return "not a Lightning checkpoint (no state_dict)"
    return None


def find_resume_checkpoint(ckpt_dir: Path) -> Path:
    """The newest readable ``*.ckpt`` (``last.ckpt`` first on a tie); CheckpointError naming each bad file."""
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"no checkpoints folder at {ckpt_dir}: nothing to resume from")
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (-p.stat().st_mtime_ns, p.name != "last.ckpt"))
    problems = []
    for path in candidates:
        why = checkpoint_is_readable(path)
        if why is None:
            for bad, reason in problems:
                log.warning("checkpoint %s is unreadable (%s): using %s instead", bad, reason, path)
                print(
                    f"warning: checkpoint {bad} is unreadable ({reason}); resuming from {path}",
                    file=sys.stderr,
                )
            return path
        problems.append((path, why))
    details = "; ".join(f"{p.name}: {why}" for p, why in problems) or "no *.ckpt files"
    raise CheckpointError(f"no readable checkpoint in {ckpt_dir} ({details})")


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> DictConfig:
    run_dir = Path(run_dir).expanduser().resolve()
    saved = run_dir / "config_resolved.yaml"
    if not saved.is_file():
        raise CheckpointError(f"{saved} is missing: is {run_dir} a liverfusion run directory?")
    cfg = OmegaConf.load(saved)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    ckpt_dir = (
        Path(cfg.callbacks.model_checkpoint.dirpath)
        if cfg.get("callbacks") and cfg.callbacks.get("model_checkpoint")
        else run_dir / "checkpoints"
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.ckpt_path = str(find_resume_checkpoint(ckpt_dir))
        run_id = run_dir / "wandb_run_id.txt"
        if run_id.is_file() and cfg.get("logger") and cfg.logger.get("wandb"):
            cfg.logger.wandb.id = run_id.read_text().strip()
            cfg.logger.wandb.resume = "allow"
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run_dir", help="the run directory of the interrupted run (holds config_resolved.yaml)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value changes, e.g. trainer.max_epochs=50")
    args = parser.parse_args(argv)
    from liverfusion.train import train

    try:
        cfg = resume_config(args.run_dir, args.overrides)
        print(f"resuming {args.run_dir} from {cfg.ckpt_path}")
        train(cfg)
    except LiverfusionError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
