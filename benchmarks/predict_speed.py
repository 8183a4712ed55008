"""Predict speed: seconds per case of ``liverfusion.predict`` with a 3-fold ensemble at the demo size (the demo's CGC
classifier on the CPU ResNet-10, 8 phases of 16x64x64) on 2 CPU cores, and on the GPU when there is one.

Members: three classifier checkpoints built from the demo's own configs (``+experiment=cgc_demo``, random weights:
the speed of a network does not depend on what its weights learnt), saved as the runs of one multirun folder, so
``ckpt_path=<multirun>`` predicts with their ensemble exactly as after ``train --multirun ... data.fold=0,1,2``.
Input: ``--cases`` phantom case folders (LLD-MMRI layout ``images/<case>/<Phase>.nii.gz``, an unused seed).

Per configuration (device x TTA), ``--repeats`` runs of ``run_predict`` in this process; each reports its start-up
(loading the members and their calibration, scanning the input) apart from the rest, and seconds per case =
(total - start-up) / cases: reading and preprocessing each NIfTI file (a user's real cost), inference, writing. The
median over repeats is quoted. Goal: <= 2 s per case after start-up on 2 CPU cores (tta=none).

Resumable: finished configurations are skipped on a re-run (delete their entry in the JSON to redo one).

    python benchmarks/predict_speed.py                              # CPU (2 threads) and GPU when available
    python benchmarks/predict_speed.py --cases 4 --shape 8,32,32 --repeats 1 --workdir /tmp/ps  # a quick look
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__:  # imported as benchmarks.predict_speed (the tests)
    from benchmarks import common
else:  # run as python benchmarks/predict_speed.py: common.py lies beside it, on sys.path
    import common

GOAL_S_PER_CASE = 2.0
SEED = 31337  # a phantom seed no benchmark or tuning run uses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=40, help="case folders to predict")
    p.add_argument("--members", type=int, default=3, help="fold models in the ensemble")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the demo machine has 2 cores)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shape", default=None, help="phantom crop shape D,H,W (default: the demo's)")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    p.add_argument("--tta", nargs="+", default=["none", "flip"], choices=["none", "flip"])
    p.add_argument("--workdir", type=Path, default=common.REPO / ".cache" / "bench" / "predict_speed")
    p.add_argument("--results", type=Path, default=common.RESULTS / "predict_speed.json")
    return p.parse_args(argv)


def train_overrides(args: argparse.Namespace) -> list[str]:
    out = [
        "+experiment=cgc_demo",
        "model.init=scratch",
        f"paths.data_dir={args.workdir / 'data'}",
        f"paths.cache_dir={args.workdir / 'cache'}",
        f"paths.output_dir={args.workdir / 'unused'}",
        f"data.layout.n_cases={args.cases}",
        f"data.layout.seed={SEED}",
        "data.split.save_to=null",
        "extras.print_config=false",
    ]
    if args.shape:
        shape = [int(v) for v in args.shape.split(",")]
        out += [f"data.layout.shape=[{args.shape}]", f"data.preprocess.shape=[{args.shape}]"]
        if len(shape) != 3:
            raise SystemExit("--shape needs D,H,W")
    return out


def build_members(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Any]]:
    """The phantom case folders and a multirun folder of ``--members`` demo-sized classifier checkpoints."""
    import torch
    import yaml
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = common.compose("train", train_overrides(args))
    dm = instantiate(cfg.data, progress=False)
    images = Path(dm.layout.root)
    dm.layout.scan()  # generates the phantom on first use (a fixed seed: the same cases on every machine)
    spec = dm.data_spec()
    multirun = args.workdir / "multirun"
    for k in range(args.members):
        run = multirun / str(k)
        ckpt = run / "checkpoints" / "best.ckpt"
        if ckpt.is_file():
            continue
        torch.manual_seed(k)
        model = instantiate(cfg.model, data_spec=spec)
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        state = {f"net.{n}": v for n, v in model.net.state_dict().items()}
        torch.save({"liverfusion": model.inference_meta(), "state_dict": state}, ckpt)
        (run / "config_resolved.yaml").write_text(yaml.safe_dump(OmegaConf.to_container(cfg, resolve=False)))
    info = {
        "shape": list(spec["input_shape"]),
        "eval_crop": spec.get("eval_crop"),
        "modalities": spec["modalities"],
        "encoder": OmegaConf.to_container(cfg.model.encoder, resolve=True).get("arch"),
        "fusion": str(cfg.model.fusion.get("_target_", "")).rsplit(".", 1)[-1],
    }
    return images / "images", multirun, info


def predict_once(multirun: Path, images: Path, out: Path, device: str, tta: str, batch_size: int) -> dict:
    from liverfusion.predict import run_predict

    cfg = common.compose(
        "predict",
        [
            f"ckpt_path={multirun}",
            f"input={images}",
            f"out={out}",
            "overwrite=true",
            f"device={device}",
            f"tta={tta}",
            f"batch_size={batch_size}",
            "progress=false",
            "print_table=false",
        ],
    )
    start = time.perf_counter()
    payload = run_predict(cfg)
    wall = time.perf_counter() - start
    n = len(payload["cases"])
    startup = float(payload["seconds"]["startup"])
    return {
        "cases": n,
        "startup_s": startup,
        "total_s": wall,
        "s_per_case": (wall - startup) / n,
        "n_models": payload["model"]["n_models"],
        "device": payload["model"]["device"],
    }


def markdown(results: dict[str, Any]) -> str:
    info = results["setup"]
    lines = [
        "# Predict speed",
        "",
        f"`python benchmarks/predict_speed.py`: `liverfusion.predict` with a {info['members']}-model fold ensemble "
        f"(demo classifier: {info['fusion']} on {info['encoder']}, {len(info['modalities'])} modalities of "
        f"{'x'.join(map(str, info['shape']))}) on {info['cases']} phantom case folders; {info['threads']} CPU "
        f"thread(s), batch {info['batch_size']}; median of {info['repeats']} run(s). Seconds per case exclude the "
        "start-up (members loaded, input scanned), which is given apart; they include reading and preprocessing "
        f"the NIfTI files. Goal: <= {GOAL_S_PER_CASE:g} s per case on 2 CPU cores (tta=none).",
        "",
        "| device | tta | s / case | start-up s | total s | goal |",
        "|---|---|---:|---:|---:|---|",
    ]
    for key, r in results["configurations"].items():
        device, tta = key.split("/")
        goal = ""
        if device == "cpu" and tta == "none":
            goal = "met" if r["s_per_case"] <= GOAL_S_PER_CASE else "missed"
        lines.append(
            f"| {r['device']} | {tta} | {r['s_per_case']:.3f} | {r['startup_s']:.2f} | {r['total_s']:.2f} | {goal} |"
        )
    for key, why in results.get("skipped", {}).items():
        lines.append(f"| {key.split('/')[0]} | {key.split('/')[1]} | skipped: {why} | | | |")
    lines += ["", f"Machine: {results['machine']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.in_process(args.threads, args.workdir)
    import torch

    results: dict[str, Any] = common.read_json(args.results)
    images, multirun, info = build_members(args)
    setup = {
        **info,
        "members": args.members,
        "cases": args.cases,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
    }
    if results.get("setup") != setup:  # other settings: the old numbers do not compare
        results = {}
    results["setup"] = setup
    results["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    )
    configs = results.setdefault("configurations", {})
    skipped = results.setdefault("skipped", {})
    for device in args.devices:
        for tta in args.tta:
            key = f"{device}/{tta}"
            if key in configs:
                print(f"{key}: done earlier, skipped", flush=True)
                continue
            if device == "cuda" and not torch.cuda.is_available():
                skipped[key] = "no GPU on this machine"
                continue
            runs = [
                predict_once(multirun, images, args.workdir / "out", device, tta, args.batch_size)
                for _ in range(args.repeats)
            ]
            configs[key] = {
                "s_per_case": statistics.median(r["s_per_case"] for r in runs),
                "startup_s": statistics.median(r["startup_s"] for r in runs),
                "total_s": statistics.median(r["total_s"] for r in runs),
                "device": runs[0]["device"],
                "runs": runs,
            }
            skipped.pop(key, None)
            print(f"{key}: {configs[key]['s_per_case']:.3f} s/case", flush=True)
            common.write_json(args.results, results)
    common.write_results(args.results, results, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
