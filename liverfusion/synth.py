"""``python -m liverfusion.synth``: write the embedded phantom data set (a Hydra app, config conf/synth.yaml).

    python -m liverfusion.synth out=data/phantom n_cases=700 seed=7 workers=2 shape=[16,64,64]
    python -m liverfusion.synth out=data/phantom spec=path/to/my_phantom.yaml probe=true

Errors a user can fix (foreign output folder, bad spec, a folder that cannot be written) end the run with exit status
2 and one line on stderr (``liverfusion.utils.cli``).
"""

from __future__ import annotations

import json
import time

import hydra
from omegaconf import DictConfig

from liverfusion.data.phantom import (
    fusion_probe,
    generate_phantom,
    load_phantom_spec,
    summary_text,
    validate_spec,
)
from liverfusion.errors import ConfigError
from liverfusion.utils.cli import cli_errors, hydra_cli
from liverfusion.utils.hydra_utils import CONFIG_DIR


def synthesize(cfg: DictConfig) -> dict:
    """Generate the phantom described by a composed synth config; returns the summary (phantom.json)."""
    if not cfg.get("out"):
        raise ConfigError("set the output folder: python -m liverfusion.synth out=DIR")
    spec = load_phantom_spec(cfg.spec) if cfg.get("spec") else validate_spec(cfg.phantom)
    start = time.perf_counter()
    summary = generate_phantom(
        cfg.out,
        spec,
        seed=int(cfg.seed),
        n_cases=int(cfg.n_cases),
        n_unlabelled=int(cfg.n_unlabelled),
        workers=int(cfg.workers),
        shape=list(cfg.shape) if cfg.get("shape") else None,
        overwrite=bool(cfg.overwrite),
        progress=bool(cfg.progress),
    )
    print(f"{summary_text(summary)}\nwritten to {cfg.out} in {time.perf_counter() - start:.1f} s")
    if cfg.get("probe"):
        result = fusion_probe(cfg.out, workers=int(cfg.workers))
        print("fusion probe (patient-grouped CV macro-F1):")
        print(json.dumps(result, indent=2))
    return summary


@hydra_cli
@hydra.main(config_path=CONFIG_DIR, config_name="synth", version_base="1.3")
@cli_errors
def main(cfg: DictConfig) -> None:
    synthesize(cfg)


if __name__ == "__main__":
    main()
