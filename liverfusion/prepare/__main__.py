"""``python -m liverfusion.prepare input=EXPORT out=DATASET kind=dicom|nifti|lldmmri rules=NAME [preset=NAME] ...``

A thin Hydra wrapper around :func:`liverfusion.prepare.app.run_prepare`; the config is ``conf/prepare.yaml`` with
the groups ``rules`` and ``preset`` under ``conf/prepare/``. Exit status: 0 done; 1 no case could be prepared, or
``strict=true`` and some case failed or something was warned about; 2 a configuration, input or output-folder problem
of the whole run (one line ``error: <file or key>: <problem>; <fix>`` on stderr); 3 the privacy audit found
identifying values.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from liverfusion.prepare.app import run_prepare
from liverfusion.utils.cli import cli_errors, hydra_cli
from liverfusion.utils.hydra_utils import CONFIG_DIR


@cli_errors
def _prepare(cfg: DictConfig) -> int:
    return run_prepare(cfg).exit_code


@hydra_cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    code = _prepare(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
