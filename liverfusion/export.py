"""``python -m liverfusion.export ckpt_path=<ckpt | run | multirun> out=<file> [format=export|onnx]``: the network
(or the fold ensemble) and what it needs to be used correctly, in one file that runs without this repository.

``format=export`` writes a ``torch.export`` program (``.pt2``) with ``liverfusion.json`` inside it: modalities (names
and order), classes, preprocessing, crop, the network input shape and the temperature. Its one output is the
ensemble's log-probabilities (the log of the members' mean probability; for one model its log-softmax); calibrated
probabilities are ``softmax(log_probs / temperature)``. Loading needs torch alone (no Hydra, no Lightning, not this
package)::

    import json, torch
    extra = {"liverfusion.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    meta = json.loads(extra["liverfusion.json"])
    log_probs = program.module()(image, present)   # (N, M, D, H, W) float32, (N, M) bool
    probs = torch.softmax(log_probs / (meta["temperature"] or 1.0), dim=1)

:func:`load_exported` does exactly that. The input is the *preprocessed* stack (what ``meta["preprocess"]`` and
``meta["eval_crop"]`` describe; ``liverfusion.data.preprocess`` implements it). ``format=onnx`` (optional extra:
``pip install 'liverfusion[onnx]'``: onnx, onnxruntime, onnxscript) writes the same graph as ONNX with the metadata in its ``metadata_props``.

The exported graph encodes every modality volume and zeroes the absent ones, where the training network skips them:
with the encoder in eval mode each volume is encoded on its own, so the logits are the same (checked at export).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EXPORT_FORMAT = "liverfusion-export/1"
META_FILE = "liverfusion.json"
FORMATS = ("export", "onnx")
PARITY_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# loader (torch only)
# ---------------------------------------------------------------------------------------------------------------
class ExportedClassifier:
    """A loaded export: ``meta`` and a call returning ``log_probs`` and calibrated ``probs``."""

    def __init__(self, module: Any, meta: Mapping[str, Any]):
        self.module, self.meta = module, dict(meta)

    def __call__(self, image: torch.Tensor, present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if present is None:
            present = torch.ones(image.shape[:2], dtype=torch.bool)
        with torch.no_grad():
            log_probs = self.module(image.float(), present.bool())
        t = float(self.meta.get("temperature") or 1.0)
        return {"log_probs": log_probs, "probs": torch.softmax(log_probs / t, dim=1)}


def load_exported(path: str | Path) -> ExportedClassifier:
    """Load a ``format=export`` file with torch alone."""
    extra = {META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {}
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a liverfusion export (no {META_FILE} of format {EXPORT_FORMAT})")
    return ExportedClassifier(program.module(), meta)


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------
def export_metadata(
    models: Sequence[Any], meta: Mapping[str, Any], temperature: float | None
) -> dict[str, Any]:
    import liverfusion
    from liverfusion.data.io import file_digest

    shape = meta.get("eval_crop") or (meta.get("preprocess") or {}).get("shape")
    return {
        "format": EXPORT_FORMAT,
        "modalities": list(meta["modalities"]),
        "class_names": list(meta["class_names"]),
        "preprocess": meta.get("preprocess"),
        "eval_crop": meta.get("eval_crop"),
        "input": {
            "image": ["N", len(meta["modalities"]), *[int(s) for s in shape]],
            "present": ["N", len(meta["modalities"])],
            "dtype": {"image": "float32", "present": "bool"},
        },
        "output": "log_probs (N, K): log of the members' mean probability; probs = softmax(log_probs / temperature)",
        "temperature": temperature,
        "n_models": len(models),
        "checkpoints": [{"name": Path(m.path).name, "digest": file_digest(m.path)} for m in models],
        "fusion": [m.meta.get("fusion_config", {}).get("name") for m in models],
        "liverfusion_version": liverfusion.__version__,
        "torch_version": torch.__version__,
    }


def _example(meta: Mapping[str, Any], n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    shape = meta.get("eval_crop") or meta["preprocess"]["shape"]
    m = len(meta["modalities"])
    g = torch.Generator().manual_seed(0)
    image = torch.rand(n, m, *[int(s) for s in shape], generator=g)
    present = torch.ones(n, m, dtype=torch.bool)
    if m > 1:
        present[0, 1:] = False  # the example exercises a missing modality too
    return image, present


def run_export(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The body of the CLI: build, check against the checkpoints, write; returns the metadata."""
    from liverfusion.errors import CheckpointError, ConfigError
    from liverfusion.evaluation.calibration import stored_calibration
    from liverfusion.evaluation.dense import EnsembleLogProbs
    from liverfusion.evaluation.inference import mean_log_probs
    from liverfusion.evaluation.loading import load_ensemble
    from liverfusion.utils.atomic import atomic_path
    from liverfusion.utils.plain import to_plain

    s = to_plain(cfg)
    s.pop("hydra", None)
    known = {"task_name", "ckpt_path", "out", "format", "calibration", "overwrite"}
    unknown = sorted(set(s) - known)
    if unknown:
        raise ConfigError(f"export: unknown key(s) {unknown}", fix=f"known keys: {', '.join(sorted(known))}")
    if s.get("out") in (None, "", "???"):
        raise ConfigError("out is required", fix="pass out=<file>, e.g. out=model.pt2")
    fmt = str(s.get("format", "export"))
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {FORMATS}")
    if s.get("calibration", "auto") not in ("auto", "none"):
        raise ConfigError(f"calibration={s.get('calibration')!r}: choose auto or none")
    out = Path(s["out"]).expanduser()
    if out.exists() and not s.get("overwrite", False):
        raise ConfigError(f"out={out} exists", fix="choose another file or pass overwrite=true")
    models, meta = load_ensemble(s["ckpt_path"])
    temperature = None
    if s.get("calibration", "auto") == "auto":
        found = stored_calibration(s["ckpt_path"], [m.path for m in models])
        temperature = float(found["temperature"]) if found else None
    module = EnsembleLogProbs([m.net.cpu().eval() for m in models]).eval()
    image, present = _example(meta)
    # parity before anything is written: the dense graph must give the checkpoints' own log-probabilities
    with torch.no_grad():
        parts = [m.net(image, present).logits.float().log_softmax(dim=1).numpy() for m in models]
    reference = parts[0] if len(parts) == 1 else mean_log_probs(parts)
    metadata = export_metadata(models, meta, temperature)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        module, (image, present), dynamic_shapes={"image": {0: batch}, "present": {0: batch}}
    )
    with torch.no_grad():
        got = program.module()(image, present).numpy()
    gap = float(abs(got - reference).max())
    if gap > PARITY_ATOL:
        raise CheckpointError(
            f"{models[0].path}: the exported graph differs from the checkpoint by {gap:.2e} (> {PARITY_ATOL})",
            fix="nothing was written; report this network's configuration",
        )
    metadata["parity_max_abs_diff"] = gap
    if fmt == "export":
        with atomic_path(out, suffix=".pt2") as tmp:
            torch.export.save(program, str(tmp), extra_files={META_FILE: json.dumps(metadata)})
    else:
        _write_onnx(module, image, present, metadata, out)
    log.info("exported %d model(s) to %s (parity %.1e)", len(models), out, gap)
    print(f"exported: {out} ({fmt}, {len(models)} model(s), temperature {temperature})")
    return metadata


def _write_onnx(
    module: torch.nn.Module, image: torch.Tensor, present: torch.Tensor, meta: Mapping, out: Path
) -> None:
    from liverfusion.errors import CheckpointError, ConfigError
    from liverfusion.utils.atomic import atomic_path

    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; without it torch fails deep inside)
    except ImportError:
        raise ConfigError(
            "format=onnx needs the onnx, onnxruntime and onnxscript packages",
            fix="pip install 'liverfusion[onnx]' (onnx, onnxruntime, onnxscript), or use format=export",
        ) from None
    with atomic_path(out, suffix=".onnx") as tmp:
        torch.onnx.export(
            module,
            (image, present),
            str(tmp),
            input_names=["image", "present"],
            output_names=["log_probs"],
            dynamic_axes={"image": {0: "N"}, "present": {0: "N"}, "log_probs": {0: "N"}},
        )
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = META_FILE, json.dumps(meta)
        onnx.save(model, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": image.numpy(), "present": present.numpy()})[0]
        with torch.no_grad():
            want = module(image, present).numpy()
        gap = float(abs(got - want).max())
        if gap > PARITY_ATOL:
            raise CheckpointError(
                f"{out}: onnxruntime differs from torch by {gap:.2e} (> {PARITY_ATOL})",
                fix="use format=export",
            )


def main() -> None:
    """Console entry point (Hydra is imported here, so loading an export never needs it)."""
    import hydra

    import liverfusion.evaluation  # noqa: F401  imported before Hydra sets up logging (quiet third-party imports)
    from liverfusion.utils.cli import cli_errors, hydra_cli
    from liverfusion.utils.hydra_utils import CONFIG_DIR

    @hydra_cli
    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
    @cli_errors
    def _main(cfg: Any) -> None:
        run_export(cfg)

    _main()


if __name__ == "__main__":
    main()
