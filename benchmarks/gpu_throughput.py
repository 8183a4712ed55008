"""GPU throughput of pre-training and fine-tuning: samples/s, step time, data wait, peak memory, achieved FLOP/s as a
share of a dense bf16 matmul measured in the same run, and Lightning against a plain PyTorch loop.

Settings (``gpu_throughput/settings.yaml``; ``--quick`` runs the ones marked quick, about 5 minutes on an H200 including data):

- SimSiam at the GPU preset (``+experiment=simsiam_pretrain_gpu``: ResNet-18, 16x128x128, batch 64 pairs, batched
  augmentation on the device) in fp32, bf16 autocast, bf16 + channels_last_3d, bf16 + ``torch.compile``, and with
  0 / 4 / 8 / 16 loader workers, with the whole augmentation batched on the device (``augment=mda_device``: the
  workers only gather cached volumes); the same at 96x96x96;
- the phase-aware hybrid recipe (``hybrid_pretrain``'s objective on the GPU preset, 3 views per case);
- CGC fine-tuning (``+experiment=cgc_finetune`` with ResNet-18 at 16x128x128, bf16, 8 workers).

Per setting, in one process: the Lightning loop (``Trainer.fit``, logging / checkpointing / progress bar off) and a
plain loop over the same module, data loader, batch and precision, alternated; steady-state medians after warm-up.
Data wait = time from the end of one step to the start of the next (Lightning: between the batch hooks; plain: the
``next(loader)`` + transfer) over the step period. FLOPs per step from ``torch.utils.flop_counter`` (forward +
backward), so ``mfu`` = achieved FLOP/s / measured bf16 matmul FLOP/s (not a data sheet).

    python benchmarks/gpu_throughput.py --quick          # one short GPU slot: the settings of the issue's goals
    python benchmarks/gpu_throughput.py                  # every setting (resumable: finished ones are skipped)
    python benchmarks/gpu_throughput.py --device cpu --tiny --settings pretrain_bf16   # check the script on CPU

Writes ``benchmarks/results/gpu_throughput.{md,json}`` (``--results`` to change; ``--tiny`` runs never overwrite the
committed GPU results unless ``--results`` says so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

if __package__:
    from benchmarks import common
else:
    import common

SETTINGS: dict[str, dict[str, Any]] = common.load_yaml("gpu_throughput", "settings")
TINY: list[str] = common.load_yaml("gpu_throughput", "tiny")["overrides"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS))
    p.add_argument(
        "--quick", action="store_true", help="only the quick settings, fewer steps (one short GPU slot)"
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--tiny", action="store_true", help="tiny sizes (check the script on CPU; figures mean nothing)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per arm (default 30, quick 15, tiny 4)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, tiny 1)")
    p.add_argument(
        "--repeats", type=int, default=None, help="Lightning/plain alternations (default 2, quick 1)"
    )
    p.add_argument("--n-cases", type=int, default=None, help="phantom cases (default 320, tiny 24)")
    p.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench" / "gpu_throughput")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 15 if args.quick else 30)
    args.warmup = args.warmup or (1 if args.tiny else 5)
    args.repeats = args.repeats or (1 if args.quick or args.tiny else 2)
    args.n_cases = args.n_cases or (24 if args.tiny else 320)
    if args.results is None:
        args.results = (args.workdir / "tiny.json") if args.tiny else RESULTS / "gpu_throughput.json"
    if args.settings is None:
        args.settings = [n for n, s in SETTINGS.items() if s.get("quick") or not args.quick]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error(
                "--device cuda: no CUDA device here; run on a GPU machine, or --device cpu --tiny to check"
            )
    return args


def compose(args: argparse.Namespace, spec: dict[str, Any]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from liverfusion.utils.hydra_utils import CONFIG_DIR

    overrides = [
        *spec["overrides"],
        "paths.output_dir=/tmp/unused",
        f"paths.data_dir={args.workdir / 'data'}",
        f"data.cache_dir={args.workdir / 'cache'}",
        f"data.layout.n_cases={args.n_cases}",
        "data.split.save_to=null",
        f"trainer.precision={spec['precision']}",
        *(TINY if args.tiny else []),
    ]
    if args.tiny and spec["kind"] == "finetune":
        overrides = [o for o in overrides if not o.startswith(("model.projector", "model.predictor"))]
    if args.device == "cpu":
        overrides += ["trainer.accelerator=cpu", "trainer.benchmark=false"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


# ---- measuring ---------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def matmul_flops(device: str, dtype_name: str = "bfloat16", n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of a large dense matmul in ``dtype`` on this device (best of ``reps``): the practical peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = n if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def autocast(device: str, precision: str):
    import contextlib

    import torch

    if precision.startswith("bf16"):
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_loss(model, batch, kind: str):
    if kind == "pretrain":
        return model.ssl_step(batch)[0]
    return model.training_step(batch, 0)


def step_flops(model, batch, kind: str, device: str, precision: str) -> int:
    """FLOPs of one training step (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            loss = step_loss(model, batch, kind)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class Stamps:
    """Step starts and ends: period = start to next start, wait = end of one step to start of the next."""

    def __init__(self, device: str):
        self.device, self.starts, self.ends = device, [], []

    def start(self) -> None:
        self.starts.append(time.perf_counter())

    def end(self) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())

    def summary(self, warmup: int, batch: int) -> dict[str, float]:
        s, e = self.starts[warmup:], self.ends[warmup:]
        n = min(len(s), len(e))
        periods = [s[i + 1] - s[i] for i in range(n - 1)]
        waits = [s[i + 1] - e[i] for i in range(n - 1)]
        steps = [e[i] - s[i] for i in range(n)]
        period = statistics.median(periods)
        return {
            "samples_per_s": batch / period,
            "median_step_s": period,
            "median_compute_s": statistics.median(steps),
            "data_wait_fraction": statistics.median(waits) / period,
        }


def build(cfg, args: argparse.Namespace, spec: dict[str, Any]):
    import torch
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, progress=False)
    dm.setup("fit")
    model = instantiate(cfg.model, data_spec=dm.data_spec()).to(args.device)
    if spec.get("compile"):
        model = torch.compile(model)
    return dm, model


def lightning_arm(cfg, args, spec, dm, model, steps: int) -> dict[str, float]:
    import lightning as L

    stamps = Stamps(args.device)

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stamps.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.end()

    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=spec["precision"],
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        benchmark=args.device == "cuda",
        callbacks=[Stamp()],
    )
    if hasattr(model, "export_encoder"):
        model.export_encoder = lambda: None  # the export is not part of the loop being timed
    trainer.fit(model, datamodule=dm)
    dm.trainer = None
    return stamps.summary(args.warmup, dm.batch_size)


def plain_arm(cfg, args, spec, dm, model, steps: int) -> dict[str, float]:
    """The same module, loader and precision in a hand-written loop (no Trainer)."""
    from types import SimpleNamespace

    model._trainer = SimpleNamespace(
        estimated_stepping_batches=steps,
        datamodule=dm,
        world_size=1,
        accumulate_grad_batches=1,
        training=True,
    )
    conf = model.configure_optimizers()
    model._trainer = None
    opt = conf["optimizer"] if isinstance(conf, dict) else conf[0][0] if isinstance(conf, tuple) else conf
    model.train()
    loader = dm.train_dataloader()
    stamps = Stamps(args.device)
    it = iter(loader)
    for _ in range(steps):
        try:
            raw = next(it)
        except StopIteration:  # a new epoch: new workers, as in Lightning's loop
            it = iter(loader)
            raw = next(it)
        # Lightning's on_train_batch_start comes after the fetch, the transfer and on_after_batch_transfer (the
        # batched augmentation): the plain loop stamps at the same point, so both count those as data wait
        batch = dm.on_after_batch_transfer(model.transfer_batch_to_device(raw, model.device, 0), 0)
        stamps.start()
        with autocast(args.device, spec["precision"]):
            loss = step_loss(model, batch, spec["kind"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.end()
    del it
    return stamps.summary(args.warmup, dm.batch_size)


def run_setting(args: argparse.Namespace, name: str, peak: float) -> dict[str, Any]:
    import torch

    spec = SETTINGS[name]
    cfg = compose(args, spec)
    dm, model = build(cfg, args, spec)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = args.warmup + args.steps
    arms: dict[str, list[dict[str, float]]] = {"lightning": [], "plain": []}
    for r in range(args.repeats):
        for arm in ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning"):
            torch.manual_seed(r)
            fn = lightning_arm if arm == "lightning" else plain_arm
            arms[arm].append(fn(cfg, args, spec, dm, model, steps))
            print(f"  {name} {arm} repeat {r}: {arms[arm][-1]['samples_per_s']:.1f} samples/s", flush=True)
    med = {a: {k: statistics.median(x[k] for x in v) for k in v[0]} for a, v in arms.items()}
    # FLOPs of one step on a real batch (the loader's own, batched augmentation included)
    batch = next(iter(dm.train_dataloader()))
    batch = dm.on_after_batch_transfer(model.transfer_batch_to_device(batch, model.device, 0), 0)
    flops = step_flops(model, batch, spec["kind"], args.device, spec["precision"])
    light = med["lightning"]
    achieved = flops / light["median_compute_s"]
    return {
        "name": name,
        "kind": spec["kind"],
        "overrides": spec["overrides"],
        "precision": spec["precision"],
        "compile": bool(spec.get("compile")),
        "channels_last": bool(cfg.model.get("channels_last", False)),
        "batch": dm.batch_size,
        "input_shape": list(dm.input_shape),
        "num_workers": dm.num_workers,
        "samples_per_s": light["samples_per_s"],
        "median_step_s": light["median_step_s"],
        "data_wait_fraction": light["data_wait_fraction"],
        "plain_samples_per_s": med["plain"]["samples_per_s"],
        "plain_data_wait_fraction": med["plain"]["data_wait_fraction"],
        "lightning_over_plain": light["samples_per_s"] / med["plain"]["samples_per_s"],
        "flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "mfu": achieved / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }


def limit(row: dict[str, Any]) -> str:
    """Which resource bounds the setting (read from its own figures)."""
    if row["data_wait_fraction"] >= 0.05:
        return "loader (data wait >= 5 %: more workers, or move per-view work to the device)"
    if row["mfu"] < 0.3:
        return "kernels (small 3D convs / memory bandwidth: MFU < 30 % with the loader keeping up)"
    return "compute"


def table(payload: dict[str, Any]) -> str:
    rows = payload["settings"]
    lines = [
        "# GPU throughput",
        "",
        f"Device: {payload['device']}; torch {payload['torch']}, CUDA {payload['cuda']}; dense bf16 matmul measured "
        f"in this run: {payload['matmul_bf16_tflops']:.0f} TFLOP/s. Command: `{payload['command']}`.",
        "",
        "| setting | batch x shape | workers | samples/s | step (ms) | data wait | Lightning / plain | MFU | "
        "peak GiB | limit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['batch']} x {'x'.join(map(str, r['input_shape']))} | {r['num_workers']} | "
            f"{r['samples_per_s']:.1f} | {1000 * r['median_step_s']:.1f} | {100 * r['data_wait_fraction']:.1f} % | "
            f"{r['lightning_over_plain']:.3f} | {100 * r['mfu']:.1f} % | {mem} | {limit(r)} |"
        )
    lines += [
        "",
        "Goals (ResNet-18 16x128x128 pre-training, bf16): data wait < 5 %, Lightning / plain >= 0.97, MFU >= 30 %.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    import torch

    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")
    args.workdir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"settings": []}
    if args.results.is_file():
        payload = json.loads(args.results.read_text())
    done = {r["name"] for r in payload.get("settings", [])}
    peak = matmul_flops(args.device)
    payload.update(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        matmul_bf16_tflops=peak / 1e12,
        command="python benchmarks/gpu_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    start = time.perf_counter()
    for name in args.settings:
        if name in done:
            print(f"{name}: done (delete its entry in {args.results} to redo it)", flush=True)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        try:
            row = run_setting(args, name, peak)
        except Exception as exc:  # noqa: BLE001  one failing setting must not lose the others' figures
            print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        payload["settings"] = [r for r in payload["settings"] if r["name"] != name] + [row]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(args.results)  # atomic: a killed run keeps every finished setting
        if args.device == "cuda":
            torch.cuda.empty_cache()
    text = table(payload)
    args.results.with_suffix(".md").write_text(text)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
