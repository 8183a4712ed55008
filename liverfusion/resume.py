"""``python -m liverfusion.resume RUN_DIR [key=value ...]``: continue a killed or pre-empted run in its own directory.

Hydra makes a new directory per launch, so resuming goes through the old run's ``config_resolved.yaml`` instead:
same outputs, same seed, same W&B run id (online; an offline run cannot be resumed by W&B: the continuation is a new
offline run in the same folder, and ``wandb sync`` uploads both), from ``checkpoints/last.ckpt``. A truncated or
corrupt checkpoint is reported and the newest readable one is used instead; nothing is deleted.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from liverfusion.errors import CheckpointError, LiverfusionError
from liverfusion.utils import hydra_utils  # noqa: F401  (registers resolvers)
from liverfusion.utils.cli import cli_errors
from liverfusion.utils.run_folder import file_in_run, load_run_config

log = logging.getLogger(__name__)


def checkpoint_is_readable(path: Path) -> str | None:
    """None when ``path`` loads safely as a Lightning checkpoint; otherwise the reason it does not (a truncated
    file, a pickle payload, interpolating metadata, no state_dict)."""
    from liverfusion.utils.checkpoint_io import safe_load

    try:
        obj = safe_load(path)
    except LiverfusionError as exc:
        return str(exc).removeprefix(f"{path}: ")[:300]
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
    """The run's saved config, rebased onto ``run_dir`` (a copied or moved run resumes inside itself), with the
    newest readable checkpoint of ``run_dir/checkpoints`` as ``ckpt_path``."""
    run_dir = Path(run_dir).expanduser().resolve()
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    ckpt_dir = run_dir / "checkpoints"
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.ckpt_path = str(find_resume_checkpoint(ckpt_dir))
        run_id = file_in_run(run_dir, "wandb_run_id.txt", subdir=".")
        if run_id is not None and cfg.get("logger") and cfg.logger.get("wandb"):
            cfg.logger.wandb.id = run_id.read_text().strip()
            cfg.logger.wandb.resume = "allow"
    return cfg


@cli_errors
def main(argv: list[str] | None = None) -> None:
    from liverfusion.utils.console import quiet_third_party
    from liverfusion.utils.help_pages import (
        build_parser,  # the parser and its --help page live there (no torch import)
    )

    args = build_parser("resume").parse_args(argv)
    quiet_third_party()
    from liverfusion.train import train

    cfg = resume_config(args.run_dir, args.overrides)
    print(f"resuming {args.run_dir} from {cfg.ckpt_path}")
    train(cfg)


if __name__ == "__main__":
    main()
