"""``python -m liverfusion.prepare input=EXPORT out=DATASET kind=dicom|nifti|lldmmri rules=NAME [preset=NAME] ...``

A thin Hydra wrapper around :func:`liverfusion.prepare.app.run_prepare`; the config is ``conf/prepare.yaml`` with
the groups ``rules`` and ``preset`` under ``conf/prepare/``. Exit status: 0 done, 1 some case failed and
``strict=true``, 2 a configuration or input problem of the whole run, 3 the privacy audit found identifying values.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from liverfusion.errors import LiverfusionError
from liverfusion.prepare.app import run_prepare

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("liverfusion.prepare")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        result = run_prepare(cfg)
    except LiverfusionError as exc:
        log.error("%s", exc)
        sys.exit(2)
    if result.exit_code:
        sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
