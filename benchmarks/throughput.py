"""Pre-training throughput: Lightning vs a plain PyTorch loop, FLOP/s, data vs model time, demo wall time and memory.

For each preset (``demo``: the CPU demo preset as shipped, ResNet-10 widths 16..128, batch 32 pairs at 16x64x64;
``demo_per_view_aug`` / ``demo_batched_aug``: the same with every augmentation per view in the loader workers, or
with flips/affine/intensity/noise batched after transfer; ``resnet18``: MONAI widths, batch 8 pairs), the SAME SimSiam module, data loader (MDA pairs, YAML augmentation, default worker
count), batch, torch threads and precision (fp32) run through

- ``lightning``: ``Trainer.fit`` with logging, checkpointing and progress bar off (only the framework's own loop);
- ``plain``: ``for batch in loader: loss = ssl_step(batch); loss.backward(); opt.step(); sched.step()``;

alternating the two arms for several repeats in one process and quoting medians of steady-state samples/s
(warm-up steps excluded). Also: model FLOPs per step (``torch.utils.flop_counter``), achieved FLOP/s as a share
of a large fp32 matmul's FLOP/s measured in the same run, and the plain loop's time blocked on the loader vs time
in the model per step. ``demo_run`` runs the demo command (``+experiment=simsiam_pretrain``) as a user would and
records its wall time and peak resident memory (largest process: trainer or a loader worker).

Resumable: finished presets are skipped on a re-run (delete their entry in the JSON to redo one).

    python benchmarks/throughput.py                      # all presets
    python benchmarks/throughput.py --presets demo --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__:  # imported as benchmarks.throughput (the tests)
    from benchmarks import common
else:  # run as python benchmarks/throughput.py: common.py lies beside it, on sys.path
    import common

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"overrides": [], "steps": 14, "warmup": 2},
    "demo_per_view_aug": {"overrides": ["augment=mda_cpu"], "steps": 14, "warmup": 2},
    "demo_batched_aug": {"overrides": ["augment=mda_batched"], "steps": 14, "warmup": 2},
    "resnet18": {
        "overrides": ["encoder@model.encoder=resnet18", "data.batch_size=8"],
        "steps": 8,
        "warmup": 2,
    },
}
ALL = [*PRESETS, "demo_run", "demo_run_cold"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=common.REPO / ".cache" / "bench" / "throughput")
    p.add_argument("--results", type=Path, default=common.RESULTS / "throughput.json")
    return p.parse_args(argv)


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [f"paths.data_dir={args.workdir / 'data'}", f"data.cache_dir={args.workdir / 'cache'}"]


def compose(overrides: list[str]):
    """The pre-training preset composed in this process, with ``overrides``."""
    return common.compose("train", ["+experiment=simsiam_pretrain", *common.NO_OUTPUT, *overrides])


def matmul_flops(n: int = 4096, reps: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on this machine (best of ``reps``): the practical peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(model, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model.ssl_step(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class StepTimes:
    """Wall-clock and main-process CPU stamps at the start of every training batch (and after the last one).

    The CPU rate (samples per CPU-second of the training process, all its threads, loader workers excluded) is
    what a busy shared machine disturbs least: another job's load stretches the wall clock, not our CPU time.
    """

    def __init__(self):
        self.stamps: list[float] = []
        self.cpu: list[float] = []

    def stamp(self) -> float:
        now = time.perf_counter()
        self.stamps.append(now)
        self.cpu.append(time.process_time())
        return now

    def rate(self, warmup: int, batch: int) -> float:
        s = self.stamps[warmup:]
        return (len(s) - 1) * batch / (s[-1] - s[0])

    def cpu_rate(self, warmup: int, batch: int) -> float:
        c = self.cpu[warmup:]
        return (len(c) - 1) * batch / (c[-1] - c[0])


def lightning_arm(cfg, dm, steps: int, warmup: int) -> tuple[float, float]:
    import lightning as L
    from hydra.utils import instantiate

    times = StepTimes()

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            times.stamp()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == steps:  # the last optimiser step (batch_idx restarts every epoch)
                times.stamp()

    model = instantiate(cfg.model, data_spec=dm.data_spec())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Stamp()],
    )
    model.export_encoder = lambda: None  # the export is not part of the loop being timed
    trainer.fit(model, datamodule=dm)
    return times.rate(warmup, dm.batch_size), times.cpu_rate(warmup, dm.batch_size)


def plain_arm(cfg, dm, steps: int, warmup: int) -> tuple[float, float, list[float], list[float]]:
    from types import SimpleNamespace

    from hydra.utils import instantiate

    # a Lightning arm run before leaves its finished trainer on the datamodule (trainer.training is then False),
    # and MDADataModule.on_after_batch_transfer would skip the batched augmentation: the plain loop runs without one
    dm.trainer = None
    model = instantiate(cfg.model, data_spec=dm.data_spec())
    model._trainer = SimpleNamespace(
        estimated_stepping_batches=steps, datamodule=dm, world_size=1, accumulate_grad_batches=1
    )
    conf = model.configure_optimizers()
    model._trainer = None
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    model.train()
    loader = dm.train_dataloader()
    times = StepTimes()
    data_wait, compute = [], []
    it = iter(loader)
    for _ in range(steps):
        t0 = times.stamp()
        try:
            raw = next(it)
        except StopIteration:  # a new epoch: new workers, as in Lightning's loop
            it = iter(loader)
            raw = next(it)
        batch = dm.on_after_batch_transfer(raw, 0)
        t1 = time.perf_counter()
        loss, _, _ = model.ssl_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        t2 = time.perf_counter()
        data_wait.append(t1 - t0)
        compute.append(t2 - t1)
    times.stamp()
    del it
    rates = times.rate(warmup, dm.batch_size), times.cpu_rate(warmup, dm.batch_size)
    return *rates, data_wait[warmup:], compute[warmup:]


def batch_cpu_cost(dm, n: int = 3) -> float:
    """Seconds of one core to build one batch in-process (what the workers spend per step)."""
    import torch

    ds = dm.pair_dataset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        t = time.perf_counter()
        for i in range(n * dm.batch_size):
            ds[i % len(ds)]
        return (time.perf_counter() - t) / n
    finally:
        torch.set_num_threads(threads)


def run_preset(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import warnings

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch.utils.data import default_collate

    warnings.filterwarnings("ignore")
    spec = PRESETS[name]
    torch.set_num_threads(args.threads)
    cfg = compose(data_overrides(args) + spec["overrides"])
    dm = instantiate(cfg.data, progress=False)
    dm.setup("fit")
    model = instantiate(cfg.model, data_spec=dm.data_spec())
    ds = dm.pair_dataset()
    batch = dm.on_after_batch_transfer(default_collate([ds[i] for i in range(dm.batch_size)]), 0)
    flops = step_flops(model, batch)
    peak = [matmul_flops()]
    rates: dict[str, list[float]] = {"lightning": [], "plain": []}
    cpu_rates: dict[str, list[float]] = {"lightning": [], "plain": []}
    waits, computes = [], []
    for r in range(args.repeats):
        order = ["lightning", "plain"] if r % 2 == 0 else ["plain", "lightning"]
        for arm in order:
            torch.manual_seed(r)
            if arm == "lightning":
                rate, cpu_rate = lightning_arm(cfg, dm, spec["steps"], spec["warmup"])
            else:
                rate, cpu_rate, wait, compute = plain_arm(cfg, dm, spec["steps"], spec["warmup"])
                waits += wait
                computes += compute
            rates[arm].append(rate)
            cpu_rates[arm].append(cpu_rate)
            print(
                f"  {name} repeat {r} {arm}: {rate:.2f} samples/s, {cpu_rate:.2f} samples/CPU-s", flush=True
            )
        peak.append(matmul_flops())
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_rates.items()}
    model_s = statistics.median(computes)
    return {
        "preset": name,
        "batch": dm.batch_size,
        "input_shape": list(dm.input_shape),
        "encoder": {k: OmegaConf.to_container(cfg.model.encoder)[k] for k in ("arch", "widths")},
        "threads": args.threads,
        "num_workers": dm.num_workers,
        "precision": str(cfg.trainer.precision),
        "channels_last": bool(cfg.model.get("channels_last", False)),
        "repeats": args.repeats,
        "steps_per_repeat": spec["steps"],
        "warmup_steps": spec["warmup"],
        "samples_per_s": rates,
        "median_samples_per_s": med,
        "ratio_lightning_over_plain": med["lightning"] / med["plain"],
        "samples_per_cpu_s": cpu_rates,
        "median_samples_per_cpu_s": cpu_med,
        "cpu_ratio_lightning_over_plain": cpu_med["lightning"] / cpu_med["plain"],
        "flops_per_step": flops,
        "model_s_per_step": model_s,
        "data_wait_s_per_step": statistics.median(waits),
        "batch_build_cpu_s": batch_cpu_cost(dm),
        "achieved_flops": flops / model_s,
        "matmul_flops": max(peak),
        "share_of_matmul": flops / model_s / max(peak),
        "load_average": os.getloadavg(),
    }


def run_demo(args: argparse.Namespace, cold: bool) -> dict[str, Any]:
    """The demo's pre-training command as a user runs it. ``cold``: into an empty data dir and cache, so the
    wall time includes generating and preprocessing the phantom (what a first ``make demo`` does)."""
    name = "demo_run_cold" if cold else "demo_run"
    out = args.workdir / name
    if cold:
        import shutil

        shutil.rmtree(args.workdir / "cold", ignore_errors=True)
        data = [
            f"paths.data_dir={args.workdir / 'cold' / 'data'}",
            f"data.cache_dir={args.workdir / 'cold' / 'cache'}",
        ]
    else:
        data = data_overrides(args)
    cmd = [
        sys.executable,
        "-m",
        "liverfusion.train",
        "+experiment=simsiam_pretrain",
        *data,
        f"hydra.run.dir={out}",
        "logger=csv",
        "extras.print_config=false",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    code, wall = common.run_logged(cmd, args.workdir / f"{name}.log")
    if code:
        raise RuntimeError(f"demo run failed (exit {code}); see {args.workdir / f'{name}.log'}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "command": " ".join(cmd[1:]),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "peak_is_this_run": peak_kib > before,
        "load_average": os.getloadavg(),
        "note": "phantom generated and preprocessed inside wall_s"
        if cold
        else "phantom generated and cached beforehand (not in wall_s)",
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| preset | batch | Lightning samples/s | plain samples/s | ratio | ratio (CPU time) | GFLOP/step | "
        "model s/step | data wait s/step | batch build (1 core) s | achieved GFLOP/s | share of matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PRESETS:
        r = results.get(name)
        if not r:
            continue
        med = r["median_samples_per_s"]
        lines.append(
            f"| {name} | {r['batch']} | {med['lightning']:.2f} | {med['plain']:.2f} | "
            f"{r['ratio_lightning_over_plain']:.3f} | {r['cpu_ratio_lightning_over_plain']:.3f} | "
            f"{r['flops_per_step'] / 1e9:.1f} | {r['model_s_per_step']:.3f} | "
            f"{r['data_wait_s_per_step']:.3f} | {r['batch_build_cpu_s']:.3f} | {r['achieved_flops'] / 1e9:.1f} | "
            f"{100 * r['share_of_matmul']:.0f} % of {r['matmul_flops'] / 1e9:.0f} GFLOP/s |"
        )
    for name in ("demo_run", "demo_run_cold"):
        demo = results.get(name)
        if demo:
            lines.append(
                f"\n{name}: {demo['wall_s']} s wall, peak RSS {demo['peak_rss_mib']} MiB (load average "
                f"{', '.join(f'{x:.1f}' for x in demo['load_average'])}; {demo['note']})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from liverfusion.utils.atomic import atomic_write_text

    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = common.read_json(args.results)
    # make sure the phantom and the cache exist before anything is timed
    from hydra.utils import instantiate

    instantiate(compose(data_overrides(args)).data, progress=False).setup("fit")
    for name in args.presets:
        if name in results:
            print(f"skip {name} (done)")
            continue
        print(f"run {name} ...", flush=True)
        results[name] = (
            run_demo(args, cold=name == "demo_run_cold")
            if name.startswith("demo_run")
            else run_preset(args, name)
        )
        common.write_json(args.results, results)
    text = table(results)
    atomic_write_text(
        args.results.with_suffix(".md"), "# Pre-training throughput (CPU, fp32)\n\n" + text + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
