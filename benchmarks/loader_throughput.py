"""CPU side of the GPU pre-training presets: does the data loader keep up, and does the archive have to fit in RAM?

1. **Loader samples/s against workers** for the GPU presets (``+experiment=simsiam_pretrain_gpu`` at 16x128x128 and
   96x96x96): the pre-training loader alone (cached volume -> two views cropped, resized, smoothed, bias-field
   corrected in the workers; flips, affine, intensity and noise run batched on the device and are not part of it),
   pairs/s over timed batches after a warm-up, for each worker count. Beside it, the cost of each per-view loader
   transform (forced on) times its probability: what dominates. A server's feed is projected from the measured
   per-pair CPU time: ``(cores - 1) / seconds per pair``, to compare with the GPU's pairs/s
   (``benchmarks/gpu_throughput.py``).
2. **In-memory against memory-mapped cache** (``data.in_memory``), growing archive: pairs/s and the memory the
   loader processes hold (proportional set size, anonymous and file-backed, of the main process and its workers,
   from ``/proc/<pid>/smaps_rollup``). In memory every case costs RAM in every run; memory-mapped, the pages are
   file-backed and reclaimable, so an archive larger than RAM streams from disk (here every size fits in the page
   cache, so the disk-bound case is not measured).

Each point runs in its own process (a clean memory baseline). Resumable: finished points are kept in the results;
``--fresh`` redoes them.

    python benchmarks/loader_throughput.py                     # both parts
    python benchmarks/loader_throughput.py --part workers --presets gpu_16x128x128

Writes ``benchmarks/results/loader_throughput.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__:
    from benchmarks import common
else:
    import common

sys.path.insert(0, str(common.REPO))


def _pss(pid: int) -> dict[str, float]:
    out = {"pss_anon_mb": 0.0, "pss_file_mb": 0.0}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Pss_Anon", "Pss_File"):
            out[f"{key.lower()}_mb"] += int(value.split()[0]) / 1024
    return out


def _memory_of_tree() -> dict[str, float]:
    """PSS of this process and its children (the loader workers), in MB."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {os.getpid()}, True
    while grew:
        kids = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= kids
        grew = bool(kids)
    total = {"pss_anon_mb": 0.0, "pss_file_mb": 0.0}
    for pid in tree:
        for k, v in _pss(pid).items():
            total[k] += v
    return {k: round(v, 1) for k, v in total.items()}


def _data_module(overrides: list[str]):
    from hydra.utils import instantiate

    cfg = common.compose("train", [*overrides, *common.NO_OUTPUT])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return cfg, dm


def _epochs(loader):
    """The loader's batches, epoch after epoch (a small archive holds fewer batches than are timed)."""
    while True:
        yield from loader


def _rate(loader, warmup: int, timed: int, pairs_per_batch: int, probe=None) -> dict[str, Any]:
    it = _epochs(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(timed):
        next(it)
    seconds = time.perf_counter() - t0
    out = {"pairs_per_s": round(timed * pairs_per_batch / seconds, 2), "timed_s": round(seconds, 2)}
    if probe is not None:
        out.update(probe())
    del it
    return out


def one_workers(overrides: list[str], workers: int, proto: dict[str, Any]) -> dict[str, Any]:
    cfg, dm = _data_module(
        [*overrides, f"data.num_workers={workers}", f"data.batch_size={proto['batch_size']}"]
    )
    loader = dm.train_dataloader()
    return {
        "shape": list(cfg.data.preprocess.shape),
        **_rate(loader, int(proto["warmup_batches"]), int(proto["timed_batches"]), int(proto["batch_size"])),
    }


def one_transforms(overrides: list[str], proto: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-view cost of each loader transform (forced on), its probability, and the expected cost per view."""
    import torch

    from liverfusion.data.augment_recipe import checked_recipe, loader_part
    from liverfusion.utils.plain import to_plain

    torch.set_num_threads(1)  # a loader worker's view of the CPU
    cfg, dm = _data_module(overrides)
    recipe = checked_recipe(to_plain(cfg.data.augment.recipe))
    shape = list(cfg.data.preprocess.shape)
    from liverfusion.data.datasets import CaseDataset

    base = CaseDataset(dm.pretrain_entries()[:8], in_memory=True)
    views = [base[i]["image"][:1].clone() for i in range(len(base))]
    rows = []
    x_in = views
    for t in loader_part(recipe, shape):
        prob = float(getattr(t, "prob", 1.0))
        if hasattr(t, "prob"):
            t.prob = 1.0
        outs, t0 = [], time.perf_counter()
        for k in range(int(proto["transform_repeats"])):
            outs.append(t(x_in[k % len(x_in)]))
        per_call = (time.perf_counter() - t0) / int(proto["transform_repeats"])
        rows.append(
            {
                "transform": type(t).__name__,
                "ms_per_call": round(1e3 * per_call, 2),
                "prob": prob,
                "ms_per_view": round(1e3 * per_call * prob, 2),
            }
        )
        x_in = [torch.as_tensor(o) for o in outs[: len(views)]]
    return rows


def one_memory(overrides: list[str], size: int, in_memory: bool, mem: dict[str, Any]) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from liverfusion.data.datasets import CaseDataset
    from liverfusion.data.mda import ViewDataset, collate_views

    cfg, dm = _data_module(overrides)
    entries = dm.pretrain_entries()
    if len(entries) < size:
        raise SystemExit(f"the archive has {len(entries)} cases, fewer than {size}")
    before = _memory_of_tree()
    ds = ViewDataset(CaseDataset(entries[:size], in_memory=in_memory), dm.sampler, dm.augment)
    loader = DataLoader(
        ds,
        batch_size=int(cfg.data.batch_size),
        shuffle=True,
        drop_last=True,
        num_workers=int(mem["workers"]),
        collate_fn=collate_views,
        persistent_workers=False,
    )
    got = _rate(
        loader,
        int(mem["warmup_batches"]),
        int(mem["timed_batches"]),
        int(cfg.data.batch_size),
        _memory_of_tree,
    )
    got["baseline_pss_anon_mb"] = before["pss_anon_mb"]
    got["case_mb"] = round(entries[0].load(mmap=True).nbytes / 2**20, 2)
    return got


def _child(kind: str, payload: dict[str, Any]) -> Any:
    """Run one point in a fresh process; its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps({"kind": kind, **payload})]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {payload} failed:\n" + "\n".join(out.stderr.splitlines()[-15:]))
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(res: dict[str, Any], proto: dict[str, Any]) -> str:
    lines = [
        "# Loader throughput on CPU (`benchmarks/loader_throughput.py`)",
        "",
        f"{res.get('machine', '')} Pairs (two views of one case) per second of the pre-training loader alone, "
        f"batch {proto['batch_size']} pairs, {proto['timed_batches']} timed batches after {proto['warmup_batches']} "
        "of warm-up; the batched device augmentation is not part of it.",
        "",
        "| preset | workers | pairs/s |",
        "|---|---:|---:|",
    ]
    for preset, per in res.get("workers", {}).items():
        for w, r in sorted(per.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {preset} | {w} | {r['pairs_per_s']:.1f} |")
    for preset, rows in res.get("transforms", {}).items():
        lines += [
            "",
            f"Per-view loader transforms at `{preset}` (one thread, each forced on; expected = x prob):",
            "",
        ]
        lines += ["| transform | ms per call | prob | expected ms per view |", "|---|---:|---:|---:|"]
        lines += [
            f"| {r['transform']} | {r['ms_per_call']:.2f} | {r['prob']:.2f} | {r['ms_per_view']:.2f} |"
            for r in rows
        ]
        total = sum(r["ms_per_view"] for r in rows)
        cores = int(proto["server_cores"])
        feed = (cores - 1) * 1000 / (2 * total) if total else float("nan")
        lines.append(
            f"| **sum** | | | **{total:.2f}** (a pair: {2 * total:.2f} ms; {cores} cores, {cores - 1} workers: "
            f"about {feed:.0f} pairs/s) |"
        )
    if res.get("memory"):
        mem = proto["memory"]
        lines += [
            "",
            f"In-memory against memory-mapped cache (`data.in_memory`), {mem['workers']} workers, demo shape: pairs/s "
            "and the proportional set size of the loader processes (main + workers) while iterating.",
            "",
            "| cases | in_memory | pairs/s | anonymous MB | file-backed MB |",
            "|---:|---|---:|---:|---:|",
        ]
        for key, r in sorted(res["memory"].items(), key=lambda kv: (int(kv[0].split("/")[0]), kv[0])):
            size, mode = key.split("/")
            lines.append(
                f"| {size} | {mode} | {r['pairs_per_s']:.1f} | {r['pss_anon_mb']:.0f} | {r['pss_file_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("workers", "memory", "all"), default="all")
    parser.add_argument("--presets", nargs="*", default=None)
    parser.add_argument(
        "--work", type=Path, default=common.REPO / ".cache" / "benchmarks" / "loader_throughput"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=common.RESULTS / "loader_throughput.json")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # one point, in a child process
    args = parser.parse_args(argv)
    proto = common.load_yaml("loader_throughput", "protocol")

    if args.one:
        job = json.loads(args.one)
        common.in_process(1, Path(job["work"]))
        if job["kind"] == "workers":
            result = one_workers(job["overrides"], int(job["workers"]), proto)
        elif job["kind"] == "transforms":
            result = one_transforms(job["overrides"], proto)
        else:
            result = one_memory(job["overrides"], int(job["size"]), bool(job["in_memory"]), proto["memory"])
        print(json.dumps(result))
        return

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = [
        f"paths.data_dir={(args.data_dir or work / 'data').resolve()}",
        f"paths.cache_dir={(args.cache_dir or work / 'cache').resolve()}",
        "logger=csv",
    ]
    unknown = sorted(set(args.presets or ()) - set(proto["presets"]))
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {sorted(proto['presets'])}")
    res = {} if args.fresh else common.read_json(args.results)
    load0 = os.getloadavg()[0]

    def save() -> None:
        res["machine"] = (
            f"{os.cpu_count()} CPU cores, Python {sys.version.split()[0]}; load average at start {load0:.2f}, "
            f"at end {os.getloadavg()[0]:.2f}."
        )
        common.write_results(args.results, res, markdown(res, proto))

    if args.part in ("workers", "all"):
        for preset, overrides in proto["presets"].items():
            if args.presets is not None and preset not in args.presets:
                continue
            over = [*overrides, *paths]
            per = res.setdefault("workers", {}).setdefault(preset, {})
            for w in proto["workers"]:
                if str(w) not in per:
                    per[str(w)] = _child("workers", {"overrides": over, "workers": w, "work": str(work)})
                    print(f"[{time.strftime('%H:%M:%S')}] {preset} workers={w}: {per[str(w)]}", flush=True)
                    save()
            device_only = "augment=mda_device" in overrides  # no per-view loader transform to time
            if not device_only and preset not in res.setdefault("transforms", {}):
                res["transforms"][preset] = _child("transforms", {"overrides": over, "work": str(work)})
                save()
    if args.part in ("memory", "all"):
        mem = proto["memory"]
        over = [*mem["preset"], *paths]
        for size in mem["sizes"]:
            for in_memory in (True, False):
                key = f"{size}/{'in_memory' if in_memory else 'mmap'}"
                if key not in res.setdefault("memory", {}):
                    res["memory"][key] = _child(
                        "memory", {"overrides": over, "size": size, "in_memory": in_memory, "work": str(work)}
                    )
                    print(f"[{time.strftime('%H:%M:%S')}] memory {key}: {res['memory'][key]}", flush=True)
                    save()
    save()
    print(markdown(res, proto))


if __name__ == "__main__":
    main()
