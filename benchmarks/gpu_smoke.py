"""GPU check: pre-train and fine-tune for a few steps with `trainer=gpu`; print throughput and peak memory.

Run on a machine with a GPU (about 2-3 minutes): `bash benchmarks/gpu_smoke.sh` (or `python benchmarks/gpu_smoke.py`).
Results are printed and saved to benchmarks/results/gpu_smoke.json (or $OUT when set). Never part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import open_dict

from liverfusion.train import train
from liverfusion.utils.hydra_utils import CONFIG_DIR

if __package__:  # imported as benchmarks.gpu_smoke (the tests)
    from benchmarks import common
else:  # run as python benchmarks/gpu_smoke.py: common.py lies beside it, on sys.path
    import common


class StepTimer(L.Callback):
    """Wall time of training steps after a warm-up (CUDA-synchronised), and the samples they saw."""

    def __init__(self, warmup: int = 3):
        self.warmup, self.times, self.samples, self._t, self._seen = warmup, [], 0, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self._seen += 1
        if self._seen > self.warmup:  # counted over epochs: short epochs still give timed steps
            self.times.append(time.perf_counter() - self._t)
            x = batch["views"][0] if "views" in batch else batch["image"]
            self.samples += int(x.shape[0])


def run(experiment: str, overrides: list[str], workdir: Path) -> dict:
    cfg = common.compose("train", [f"+experiment={experiment}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir / experiment)
    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats()
    orig = L.Trainer.__init__

    def patched(self, *args, callbacks=None, **kwargs):  # add the timer without touching the configs
        orig(self, *args, callbacks=[*(callbacks or []), timer], **kwargs)

    L.Trainer.__init__ = patched
    try:
        start = time.perf_counter()
        metrics, objects = train(cfg)
        wall = time.perf_counter() - start
    finally:
        L.Trainer.__init__ = orig
    step = sorted(timer.times)[len(timer.times) // 2] if timer.times else float("nan")
    return {
        "experiment": experiment,
        "steps_timed": len(timer.times),
        "median_step_s": step,
        "samples_per_s": timer.samples / sum(timer.times) if timer.times else float("nan"),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "wall_s": wall,
        "precision": str(cfg.trainer.precision),
        "encoder_path": str(getattr(objects["model"], "encoder_path", "") or ""),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
    }


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        description=__doc__
        + "\nEnvironment: GPU_SMOKE_DIR (work folder), GPU_SMOKE_CASES (phantom cases, 600), "
        "GPU_SMOKE_FINETUNE (fine-tune experiment, cgc_finetune), OUT (results folder).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: nothing to check", file=sys.stderr)
        return 1
    work = Path(os.environ.get("GPU_SMOKE_DIR") or tempfile.mkdtemp(prefix="gpu_smoke_"))
    n_cases = int(os.environ.get("GPU_SMOKE_CASES", "600"))
    common = [
        f"paths.data_dir={work / 'data'}",
        f"paths.cache_dir={work / 'cache'}",
        f"paths.log_dir={work}",
        f"data.layout.n_cases={n_cases}",
        "data.layout.workers=8",
        "data.prep_workers=8",
        "data.num_workers=6",
        "logger=csv",
        "extras.print_config=false",
        "trainer.max_epochs=3",
        "+trainer.limit_train_batches=25",
        "trainer.check_val_every_n_epoch=1",
        "+trainer.limit_val_batches=4",
    ]
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    pre = run("simsiam_pretrain_gpu", [*common, "data.batch_size=32", "data.layout.shape=[16,128,128]"], work)
    report["runs"].append(pre)
    print(json.dumps(pre, indent=1))
    finetune = os.environ.get("GPU_SMOKE_FINETUNE", "cgc_finetune")
    if (Path(CONFIG_DIR) / "experiment" / f"{finetune}.yaml").is_file() and pre["encoder_path"]:
        ft = run(
            finetune,
            [
                *common,
                "trainer=gpu",
                "data.batch_size=16",
                "data.layout.shape=[16,128,128]",
                "data.preprocess.shape=[16,128,128]",
                "encoder@model.encoder=resnet18",
                f"model.pretrained.path={pre['encoder_path']}",
            ],
            work,
        )
        report["runs"].append(ft)
        print(json.dumps(ft, indent=1))
    out = Path(os.environ.get("OUT") or common.RESULTS) / "gpu_smoke.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
