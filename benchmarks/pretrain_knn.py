"""Does MDA pre-training help? kNN macro-F1 of frozen encoder features on held-out labelled cases.

Arms, each over several seeds, all at the demo budget (``+experiment=simsiam_pretrain``, the CPU preset):
- ``cross``: SimSiam on MDA cross-modality pairs (the paper's method);
- ``same``: SimSiam on same-modality pairs (the ablation without MDA);
- ``random``: the same encoder, randomly initialised, not trained;
- ``mixed`` (optional): cross pairs with probability 0.5, else same-modality pairs;
- ``cross_paper_lr`` (optional): cross with the paper's base lr 0.05 instead of the demo's 0.5;
- ``cross_spatial`` / ``same_spatial`` (optional): cross / same pairs with spatial augmentation only
  (``augment=mda_spatial``: no intensity transforms);
- ``random_bn`` (optional, a diagnostic): the random encoder with its BatchNorm statistics re-estimated on the
  pre-training volumes (no gradient step): how much of a gain is mere BN calibration.

Data: a phantom generated with a seed that no tuning used (``--phantom-seed``, default 424242; tuning used the
phantom seeds 7 and 20231030). Features: the pooled features of every phase, each l2-normalised, concatenated.
Memory bank: the labelled training cases of fold 0; queries: the validation and test cases, which pre-training
never sees (the more queries, the less noisy a 7-class macro-F1). Goals (issue 3): cross beats random by >= 10 F1 points, cross >= same, no collapse
(final epoch z_std >= 0.5 / sqrt(d)).

Resumable: each finished (arm, seed) is stored in the results JSON and skipped on a re-run with the same settings.

    python benchmarks/pretrain_knn.py                       # 3 seeds x 3 arms, results in benchmarks/results/
    python benchmarks/pretrain_knn.py --seeds 0 --arms cross random --override model.optimizer.base_lr=1.0 \\
        --phantom-seed 20231030 --results /tmp/tune.json    # a tuning probe (never on the benchmark seed)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__:  # imported as benchmarks.pretrain_knn (the tests)
    from benchmarks import common
else:  # run as python benchmarks/pretrain_knn.py: common.py lies beside it, on sys.path
    import common

ARMS = ("cross", "same", "random", "mixed", "random_bn", "cross_paper_lr", "cross_spatial", "same_spatial")
DEFAULT_ARMS = ("cross", "same", "random")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS)
    p.add_argument("--phantom-seed", type=int, default=424242)
    p.add_argument("--n-cases", type=int, default=450)
    p.add_argument("--experiment", default="simsiam_pretrain")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every arm")
    p.add_argument("--workdir", type=Path, default=common.REPO / ".cache" / "bench" / "pretrain_knn")
    p.add_argument("--results", type=Path, default=common.RESULTS / "pretrain_knn.json")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training runs")
    p.add_argument(
        "--reeval", action="store_true", help="recompute kNN of finished runs from their encoder.pt"
    )
    return p.parse_args(argv)


def common_overrides(args: argparse.Namespace) -> list[str]:
    data_dir = args.workdir / f"data_{args.phantom_seed}"
    return [
        f"+experiment={args.experiment}",
        f"paths.data_dir={data_dir}",
        f"data.cache_dir={args.workdir / 'cache'}",
        f"data.layout.seed={args.phantom_seed}",
        f"data.layout.n_cases={args.n_cases}",
        *args.override,
    ]


def arm_overrides(arm: str, seed: int) -> list[str]:
    policy = next((p for p in ("same", "mixed") if arm == p or arm.startswith(f"{p}_")), "cross")
    extra = ["model.optimizer.base_lr=0.05"] if arm == "cross_paper_lr" else []
    if arm.endswith("_spatial"):  # spatial augmentation only: the views keep each phase's intensities
        extra.append("augment=mda_spatial")
    return [f"seed={seed}", f"data.pairs.policy={policy}", *extra]


def settings_key(args: argparse.Namespace) -> str:
    text = json.dumps([args.experiment, args.phantom_seed, args.n_cases, sorted(args.override)])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def pretrain(args: argparse.Namespace, arm: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """Run the real CLI (a fresh process per run, like a user) and read what it wrote."""
    cmd = [
        sys.executable,
        "-m",
        "liverfusion.train",
        *common_overrides(args),
        *arm_overrides(arm, seed),
        f"hydra.run.dir={run_dir}",
        "logger=csv",
        "extras.print_config=false",
        f"extras.torch_threads={args.threads}",
        "callbacks.progress_bar=null",
    ]
    code, seconds = common.run_logged(cmd, run_dir.parent / f"{run_dir.name}.log")
    if code:
        raise RuntimeError(f"pre-training {arm} seed {seed} failed (exit {code}); see {run_dir}.log")
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    z = [float(r["train/z_std"]) for r in rows if r.get("train/z_std")]
    loss = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    return {
        "encoder": str(run_dir / "checkpoints" / "encoder.pt"),
        "train_seconds": round(seconds, 1),
        "z_std_per_epoch": z,
        "loss_per_epoch": loss,
        "command": " ".join(cmd[1:]),
    }


def recalibrate_bn(encoder, dm, channels_last: bool) -> None:
    """BatchNorm running statistics = the plain average over every modality volume of the pre-training cases."""
    import torch

    from liverfusion.data.datasets import CaseDataset

    for m in encoder.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    encoder.train()
    with torch.no_grad():
        for batch in dm._loader(
            CaseDataset(dm.pretrain_entries()), shuffle=False, batch_size=dm.eval_batch_size
        ):
            image, present = batch["image"], batch["present"]
            x = image[present].unsqueeze(1)  # real modalities only, (n, 1, D, H, W)
            encoder(x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x)
    encoder.eval()


def evaluate(args: argparse.Namespace, arm: str, seed: int, encoder_path: str | None) -> dict[str, Any]:
    import torch
    from hydra.utils import instantiate

    from liverfusion.data.datasets import CaseDataset
    from liverfusion.models import build_encoder
    from liverfusion.modules.encoder_file import load_encoder_payload
    from liverfusion.modules.knn import encode_loader, knn_scores

    cfg = common.compose("train", [*common_overrides(args), *arm_overrides(arm, seed), *common.NO_OUTPUT])
    dm = instantiate(cfg.data, progress=False, num_workers=0)
    dm.setup("fit")
    bank_entries = dm.part_entries("train", labelled_only=True)
    query_entries = dm.part_entries("val", labelled_only=True) + dm.part_entries("test", labelled_only=True)
    assert not {e.patient_id for e in bank_entries} & {e.patient_id for e in query_entries}
    if encoder_path is None:
        torch.manual_seed(seed)
        encoder = instantiate(cfg.model.encoder)
    else:
        payload = load_encoder_payload(encoder_path)
        encoder = build_encoder(**payload["encoder_config"])
        encoder.load_state_dict(payload["state_dict"])
    channels_last = bool(cfg.model.get("channels_last", False))
    if arm == "random_bn":
        recalibrate_bn(encoder, dm, channels_last)
    loader = lambda entries: dm._loader(CaseDataset(entries), shuffle=False, batch_size=dm.eval_batch_size)  # noqa: E731
    bank, bank_y = encode_loader(encoder, loader(bank_entries), channels_last)
    query, query_y = encode_loader(encoder, loader(query_entries), channels_last)
    k, temperature = int(cfg.model.knn.k), float(cfg.model.knn.temperature)
    scores = knn_scores(bank, bank_y, query, query_y, dm.num_classes, k, temperature)
    invariance = phase_invariance(query, len(dm.modalities))
    d = int(cfg.model.projector.out_dim)
    return {
        "knn_f1": scores["f1"],
        "knn_acc": scores["acc"],
        "bank": len(bank_entries),
        "queries": len(query_entries),
        "k": k,
        "z_dim": d,
        "z_std_threshold": 0.5 / math.sqrt(d),
        **invariance,
    }


def phase_invariance(feats, n_modalities: int) -> dict[str, float]:
    """How alike an encoder makes the phases of one case, against the same phase of different cases.

    ``phase_cos``: mean cosine between two different phases of the same case; ``case_cos``: mean cosine between
    the same phase of two different cases (features centred first). A phase-invariant encoder (what cross-modality pairs teach) drives
    ``phase_cos`` towards 1 and above ``case_cos``; the concatenated phases then repeat one another.
    """
    import torch

    x = feats.reshape(feats.shape[0], n_modalities, -1)  # (N, M, F)
    # centred on the mean feature of all (case, phase) pairs, then unit length: ReLU features share a large
    # common component that would put every cosine near 1
    x = torch.nn.functional.normalize(x - x.mean(dim=(0, 1), keepdim=True), dim=-1)
    m = n_modalities
    within = torch.einsum("nif,njf->nij", x, x)
    phase_cos = (within.sum((1, 2)) - within.diagonal(dim1=1, dim2=2).sum(1)) / (m * (m - 1))
    n = x.shape[0]
    across = torch.einsum("imf,jmf->mij", x, x)
    case_cos = (across.sum((1, 2)) - across.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
    return {"phase_cos": float(phase_cos.mean()), "case_cos": float(case_cos.mean())}


def summarise(results: dict[str, Any], key: str, arms: list[str], seeds: list[int]) -> str:
    lines = [
        "| arm | kNN macro-F1 (mean +- std) | per seed | final z_std (threshold) | phase cos | case cos | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    means = {}

    def mean_of(runs: list[dict[str, Any]], field: str, fmt: str = ".3f") -> str:
        values = [r[field] for r in runs if r.get(field) is not None]
        return format(statistics.mean(values), fmt) if values else "-"

    for arm in arms:
        runs = [results["runs"].get(f"{key}/{arm}/seed{s}") for s in seeds]
        runs = [r for r in runs if r]
        if not runs:
            continue
        f1 = [100 * r["knn_f1"] for r in runs]
        means[arm] = statistics.mean(f1)
        sd = statistics.stdev(f1) if len(f1) > 1 else 0.0
        z = [r["z_std_per_epoch"][-1] for r in runs if r.get("z_std_per_epoch")]
        z_text = f"{min(z):.4f}..{max(z):.4f} ({runs[0]['z_std_threshold']:.4f})" if z else "-"
        lines.append(
            f"| {arm} | {means[arm]:.1f} +- {sd:.1f} | {', '.join(f'{v:.1f}' for v in f1)} | {z_text} | "
            f"{mean_of(runs, 'phase_cos')} | {mean_of(runs, 'case_cos')} | {mean_of(runs, 'train_seconds', '.0f')} |"
        )
    if "cross" in means and "random" in means:
        gain = means["cross"] - means["random"]
        lines.append(
            f"\ncross - random: {gain:+.1f} F1 points (goal >= +10: {'met' if gain >= 10 else 'NOT met'})"
        )
    if "cross" in means and "same" in means:
        diff = means["cross"] - means["same"]
        lines.append(f"cross - same: {diff:+.1f} F1 points (goal >= 0: {'met' if diff >= 0 else 'NOT met'})")
    collapsed = [
        k
        for k, r in results["runs"].items()
        if k.startswith(key) and r.get("z_std_per_epoch") and r["z_std_per_epoch"][-1] < r["z_std_threshold"]
    ]
    lines.append(f"collapsed runs (final z_std < 0.5/sqrt(d)): {collapsed or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = common.read_json(args.results, {"runs": {}})
    key = settings_key(args)
    results.setdefault("settings", {})[key] = {
        "experiment": args.experiment,
        "phantom_seed": args.phantom_seed,
        "n_cases": args.n_cases,
        "overrides": args.override,
    }
    for seed in args.seeds:
        for arm in args.arms:
            name = f"{key}/{arm}/seed{seed}"
            if name in results["runs"]:
                done = results["runs"][name]
                if args.reeval:
                    done.update(evaluate(args, arm, seed, done.get("encoder")))
                    common.write_json(args.results, results, sort_keys=True)
                print(f"skip {name} (done: F1 {100 * done['knn_f1']:.1f})", flush=True)
                continue
            print(f"run {name} ...", flush=True)
            record: dict[str, Any] = {"arm": arm, "seed": seed}
            encoder = None
            if arm not in ("random", "random_bn"):
                run_dir = args.workdir / "runs" / key / f"{arm}_seed{seed}"
                run_dir.mkdir(parents=True, exist_ok=True)
                record.update(pretrain(args, arm, seed, run_dir))
                encoder = record["encoder"]
            record.update(evaluate(args, arm, seed, encoder))
            results["runs"][name] = record
            common.write_json(args.results, results, sort_keys=True)
            z = record.get("z_std_per_epoch") or [float("nan")]
            print(f"  {name}: kNN F1 {100 * record['knn_f1']:.1f}, final z_std {z[-1]:.4f}", flush=True)
    table = summarise(results, key, args.arms, args.seeds)
    header = (
        f"# kNN macro-F1 after pre-training (phantom seed {args.phantom_seed}, {args.n_cases} cases, "
        f"+experiment={args.experiment}, overrides {args.override or 'none'}, seeds {args.seeds})\n\n"
    )
    from liverfusion.utils.atomic import atomic_write_text

    atomic_write_text(args.results.with_suffix(".md"), header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
