"""Parameters and FLOPs of the encoder and the fusion block (the method claims CGC is lightweight).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products, 2 per
multiply-add; normalisation, activations and pooling are not counted. Counted for one forward pass in eval mode.

``python -m liverfusion.models.complexity --encoder resnet10_cpu --shape 16 64 64 --modalities 3 --classes 2``
prints a markdown table for every preset in ``conf/fusion``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from liverfusion.models.classifier_net import FusionClassifierNet, build_fusion_classifier

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)`` (no gradient)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def complexity_report(
    net: FusionClassifierNet, input_shape_dhw: Sequence[int], batch_size: int = 1
) -> dict[str, Any]:
    """Params and FLOPs of encoder, fusion block and total for all modalities present at D x H x W."""
    m = len(net.modalities)
    x = torch.zeros(batch_size, m, *input_shape_dhw)
    mask = torch.ones(batch_size, m, dtype=torch.bool)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            enc = net.encode(x, mask)
        encoder_flops = count_flops(net.encode, x, mask)
        maps = enc.maps if net.fusion.consumes == "map" else None
        fusion_flops = count_flops(net.fusion, maps, enc.pooled, enc.mask)
    finally:
        net.train(was_training)
    encoder_params, fusion_params = count_parameters(net.encoder), count_parameters(net.fusion)
    total_flops = encoder_flops + fusion_flops
    return {
        "fusion": net.fusion.name,
        "num_modalities": m,
        "input_shape": list(input_shape_dhw),
        "batch_size": batch_size,
        "map_shape": list(enc.maps.shape[3:]),
        "encoder_params": encoder_params,
        "fusion_params": fusion_params,
        "total_params": encoder_params + fusion_params,
        "encoder_flops": encoder_flops,
        "fusion_flops": fusion_flops,
        "total_flops": total_flops,
        "fusion_flops_share": fusion_flops / total_flops if total_flops else 0.0,
    }


def preset_table(
    encoder_preset: str,
    input_shape_dhw: Sequence[int],
    num_modalities: int,
    num_classes: int,
    fusion_presets: Sequence[str] | None = None,
    conf_dir: Path = CONF_DIR,
) -> list[dict[str, Any]]:
    """``complexity_report`` for each fusion preset (default: all in conf/fusion) with one encoder preset."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    encoder_cfg = OmegaConf.load(conf_dir / "encoder" / f"{encoder_preset}.yaml")
    names = fusion_presets or sorted(p.stem for p in (conf_dir / "fusion").glob("*.yaml"))
    modalities = [f"m{i}" for i in range(num_modalities)]
    rows = []
    for name in names:
        torch.manual_seed(0)
        fusion = instantiate(OmegaConf.load(conf_dir / "fusion" / f"{name}.yaml"))
        net = build_fusion_classifier(
            functools.partial(instantiate, encoder_cfg), fusion, modalities, num_classes
        )
        rows.append({"preset": name, **complexity_report(net, input_shape_dhw)})
    return rows


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of ``preset_table`` rows."""
    lines = [
        "| fusion | fusion params | fusion FLOP | encoder params | encoder FLOP | total FLOP | fusion FLOP share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {_si(r['fusion_params'])} | {_si(r['fusion_flops'])} | {_si(r['encoder_params'])} | "
            f"{_si(r['encoder_flops'])} | {_si(r['total_flops'])} | {100 * r['fusion_flops_share']:.2f} % |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet10_cpu", help="preset name in conf/encoder")
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument(
        "--fusion", nargs="*", default=None, help="preset names in conf/fusion (default: all)"
    )
    args = parser.parse_args(argv)
    rows = preset_table(args.encoder, args.shape, args.modalities, args.classes, args.fusion)
    print(
        f"encoder {args.encoder}, input {args.modalities} x {' x '.join(map(str, args.shape))}, "
        f"{args.classes} classes, batch 1, map {' x '.join(map(str, rows[0]['map_shape']))}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
