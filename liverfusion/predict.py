"""``python -m liverfusion.predict ckpt_path=<ckpt | run | multirun> input=<folder> out=<folder>``: a trained
classifier (or the fold ensemble of a cross-validation) answers for new patients, with no data yaml and no labels.

``input`` is a folder of case folders ``<case>/<modality>.nii.gz``, an LLD-MMRI release (``images/`` or the
folder holding it) or a DICOM tree (``rules=<name>``: ``prepare`` maps its series to modalities and converts it in a
temporary folder; each case is named by its pseudonym and linked to its study folder). Modalities (names and
order), classes, preprocessing, crop, orientation and the temperature come from the checkpoint (and the
``calibration.json`` stored with it), never from the command line. A missing modality is masked (as in training
with ``on_missing_modality=mask``) and listed for its case.

Outputs, all under ``out`` (written atomically; a non-empty ``out`` is refused unless ``overwrite=true``):
- ``predictions.csv``: case, patient, modalities used, missing modalities, one (calibrated) probability per class,
  prediction, confidence (its probability), ``review`` (confidence below ``review_threshold``) and ``source`` (the
  case's folder in the input);
- ``predictions.json``: the same per case plus the model (checkpoints, temperature, TTA, device) and each case's
  folder and files, so every prediction can be traced to its input;
- with ``explain=true``: ``explain/<case>/<modality>_gradcam.nii.gz`` (Grad-CAM on the shared encoder, on that input
  file's own grid and affine; one map for early fusion), ``explain/<case>.png`` (modalities x slices) and, in the
  JSON, the modality-occlusion importance (the predicted class's probability lost when each modality is masked).

``tta=flip`` averages flipped copies; ``device=auto`` uses the GPU when there is one; cases go through in batches.

Nothing is ever written under ``input``: the preprocessed volumes go to a temporary cache (or ``cache_dir``).
Docs: docs/predict.md.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from liverfusion.data.cache import PreprocessedCache
from liverfusion.data.datasets import CaseDataset
from liverfusion.data.preprocess import PreprocessConfig
from liverfusion.errors import ConfigError, DataError
from liverfusion.evaluation.inference import predict, resolve_device
from liverfusion.evaluation.inputs import CaseFolderLayout, case_root
from liverfusion.evaluation.loading import load_ensemble
from liverfusion.evaluation.predictions import PredictionSet
from liverfusion.utils.atomic import atomic_write_text
from liverfusion.utils.cli import cli_errors, hydra_cli
from liverfusion.utils.config_sections import check_primary, check_value
from liverfusion.utils.evaluation_settings import INFERENCE_KEYS, inference
from liverfusion.utils.hydra_utils import CONFIG_DIR
from liverfusion.utils.plain import to_plain

log = logging.getLogger(__name__)

PREDICTIONS_FORMAT = "liverfusion-predictions/1"
# the primary config's own keys (conf/predict.yaml); device, tta, tta_axes and calibration come from the inference
# group (conf/inference, liverfusion.utils.evaluation_settings.INFERENCE_KEYS)
OWN_KEYS = (
    "task_name",
    "ckpt_path",
    "input",
    "out",
    "overwrite",
    "aliases",
    "ignore",
    "duplicate_source",
    "detect_duplicates",
    "batch_size",
    "num_workers",
    "prep_workers",
    "review_threshold",
    "cache_dir",
    "progress",
    "print_table",
    "explain",
    "explain_method",
    "explain_layer",
    "input_kind",
    "rules",
    "key_file",
    "prepare_overrides",
)
KEYS = (*OWN_KEYS, *INFERENCE_KEYS)
INPUT_KINDS = ("auto", "cases", "dicom")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_folders(input_dir: Path, out: Path, overwrite: bool, cache_dir: Path | None = None) -> None:
    """``out`` (and a given cache) must lie outside ``input``; ``out`` must be empty unless ``overwrite``."""
    if not input_dir.is_dir():
        raise DataError(
            "input folder does not exist", path=input_dir, fix="pass input=<a folder of case folders>"
        )
    if _inside(out, input_dir):
        raise ConfigError(
            f"out={out} lies inside input={input_dir}: predict never writes under its input",
            fix="choose an out folder outside the input folder",
        )
    if cache_dir is not None and _inside(cache_dir, input_dir):
        raise ConfigError(
            f"cache_dir={cache_dir} lies inside input={input_dir}: predict never writes under its input",
            fix="choose a cache folder outside the input folder (or cache_dir=null for a temporary one)",
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file", fix="choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"out={out} is not empty",
            fix="choose an empty or new folder, or pass overwrite=true to replace its predictions",
        )


def _settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain values, unknown keys refused, each value checked."""
    values = to_plain(cfg)
    values.pop("hydra", None)
    check_primary("predict", values, KEYS)
    for key in ("input", "out"):
        if values.get(key) in (None, "", "???"):
            raise ConfigError(f"{key} is required", fix=f"pass {key}=<folder>")
    values["batch_size"] = check_value("batch_size", values["batch_size"], "int", low=1)
    values["num_workers"] = check_value("num_workers", values["num_workers"], "int", low=0)
    values["prep_workers"] = check_value("prep_workers", values["prep_workers"], "int", low=0)
    values["review_threshold"] = check_value("review_threshold", values["review_threshold"], "float", 0, 1)
    for key in ("overwrite", "detect_duplicates", "progress", "print_table", "explain"):
        values[key] = check_value(key, values[key], "bool")
    if values["input_kind"] not in INPUT_KINDS:
        raise ConfigError(f"input_kind={values['input_kind']!r}: choose one of {INPUT_KINDS}")
    overrides = values.get("prepare_overrides") or []
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(
            "prepare_overrides must be a list of prepare settings",
            fix="e.g. prepare_overrides=[geometry.resample=none]",
        )
    values.update(inference({k: values[k] for k in INFERENCE_KEYS}, where="predict"))
    if not isinstance(values.get("aliases") or {}, Mapping):
        raise ConfigError("aliases must be a mapping {file name: modality}", fix="e.g. aliases={t2: T2WI}")
    return values


def prediction_rows(
    preds: PredictionSet,
    cases: Mapping[str, Any],
    review_threshold: float,
    sources: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per case: what the CSV and the printed table show (``sources``: case -> its input folder)."""
    rows = []
    for i, case_id in enumerate(preds.case_ids):
        case = cases[case_id]
        p = preds.probs[i]
        k = int(np.argmax(p))
        used = [m for m in preds.modalities if m not in case.missing]
        missing = [m for m in preds.modalities if m in case.missing]
        rows.append(
            {
                "case_id": case_id,
                "patient_id": preds.patient_ids[i],
                "modalities_used": used,
                "missing": missing,
                "probabilities": {c: float(v) for c, v in zip(preds.class_names, p)},
                "prediction": preds.class_names[k],
                "prediction_index": k,
                "confidence": float(p[k]),
                "review": bool(p[k] < review_threshold),
                "source": (sources or {}).get(case_id, case_id),
                "notes": list(case.notes),
            }
        )
    return rows


def rows_csv(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> str:
    """``predictions.csv``: lists joined with ``;`` so every case is one line."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "case_id",
            "patient_id",
            "modalities_used",
            "missing",
            *[f"prob_{c}" for c in class_names],
            "prediction",
            "prediction_index",
            "confidence",
            "review",
            "source",
        ]
    )
    for r in rows:
        w.writerow(
            [
                r["case_id"],
                r["patient_id"],
                ";".join(r["modalities_used"]),
                ";".join(r["missing"]),
                *[f"{r['probabilities'][c]:.6f}" for c in class_names],
                r["prediction"],
                r["prediction_index"],
                f"{r['confidence']:.6f}",
                "yes" if r["review"] else "no",
                r.get("source", r["case_id"]),
            ]
        )
    return buf.getvalue()


def table_text(rows: Sequence[Mapping[str, Any]], review_threshold: float) -> str:
    """The printed table: one line per case (with its input folder when the case id is a pseudonym)."""
    linked = any(r.get("source", r["case_id"]) != r["case_id"] for r in rows)
    header = ("case", "prediction", "confidence", "review", "missing") + (("source",) if linked else ())
    lines = [
        (
            str(r["case_id"]),
            str(r["prediction"]),
            f"{r['confidence']:.3f}",
            "REVIEW" if r["review"] else "",
            ",".join(r["missing"]) or "-",
        )
        + ((str(r.get("source", "")),) if linked else ())
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line).rstrip() for line in lines]
    n_review = sum(bool(r["review"]) for r in rows)
    out.append(f"{len(rows)} case(s); {n_review} below the review threshold {review_threshold:g}")
    return "\n".join(out)


def input_kind(input_dir: Path, s: Mapping[str, Any]) -> str:
    """``cases`` (case folders, LLD-MMRI ``images/``) or ``dicom``: as given, else ``dicom`` when ``rules`` is set or
    the tree holds DICOM files and no case folder holds NIfTI."""
    from liverfusion.evaluation.dicom_input import looks_like_dicom_tree

    kind = str(s["input_kind"])
    if kind != "auto":
        return kind
    if s.get("rules"):
        return "dicom"
    return "dicom" if looks_like_dicom_tree(case_root(input_dir)) else "cases"


def run_predict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The body of the CLI (also callable with a composed config); returns the ``predictions.json`` payload."""
    start = time.perf_counter()
    s = _settings(cfg)
    input_dir = Path(s["input"]).expanduser().resolve()
    out = Path(s["out"]).expanduser().resolve()
    cache_dir = Path(s["cache_dir"]).expanduser().resolve() if s.get("cache_dir") else None
    check_folders(input_dir, out, s["overwrite"], cache_dir)
    device = resolve_device(s["device"])
    models, meta = load_ensemble(s["ckpt_path"])
    modalities, class_names = list(meta["modalities"]), list(meta["class_names"])
    temperature, calibration = _temperature(s, models)
    preprocess = PreprocessConfig.from_dict(meta["preprocess"], key=f"{models[0].path}: preprocess")
    kind = input_kind(input_dir, s)
    with tempfile.TemporaryDirectory(prefix="liverfusion-predict-") as tmp:
        dicom = None
        if kind == "dicom":
            from liverfusion.evaluation.dicom_input import prepare_dicom

            dicom = prepare_dicom(
                input_dir,
                Path(tmp) / "dicom",
                s.get("rules"),
                modalities,
                aliases=s.get("aliases") or {},
                key_file=s.get("key_file"),
                overrides=list(s.get("prepare_overrides") or []),
                progress=s["progress"],
            )
            root = dicom.root
        else:
            root = case_root(input_dir)
        ignore = list(s.get("ignore") or ())
        if dicom is not None:  # series the rule set maps that this model does not take
            ignore += [f"{m}{ext}" for m in dicom.unused for ext in (".nii.gz", ".nii")]
        layout = CaseFolderLayout(
            root,
            modalities,
            aliases=s.get("aliases") or {},
            ignore=ignore,
            detect_duplicates=s["detect_duplicates"],
            duplicate_source=s.get("duplicate_source") or (),
        )
        cases = layout.scan()
        by_id = {c.case_id: c for c in cases}
        for c in cases:
            if c.missing:
                log.info("case %s: missing %s (masked)", c.case_id, sorted(c.missing))
        startup = time.perf_counter() - start
        cache = PreprocessedCache(cache_dir or Path(tmp) / "cache", "predict", modalities, preprocess)
        entries = cache.build(cases, workers=s["prep_workers"], progress=s["progress"])
        transform = None
        if meta.get("eval_crop"):
            from monai.transforms import CenterSpatialCrop

            transform = CenterSpatialCrop(roi_size=[int(c) for c in meta["eval_crop"]])
        from torch.utils.data import DataLoader

        loader = DataLoader(
            CaseDataset(entries, transform=transform, in_memory=False),
            batch_size=s["batch_size"],
            shuffle=False,
            num_workers=s["num_workers"],
        )
        preds = predict(
            models, loader, robustness=s["explain"], device=device, tta=str(s["tta"]), tta_axes=s["tta_axes"]
        )
        if temperature is not None:
            preds = preds.with_temperature(temperature)
        explained = {}
        if s["explain"]:
            explained = _explain(models, loader.dataset, preds, by_id, preprocess, meta, out, device, s)
        if dicom is not None:
            sources = {c: dicom.sources.get(c, {}).get("folder", "") for c in by_id}
            files = {c: dict(dicom.sources.get(c, {}).get("series", {})) for c in by_id}
            folders = sources
        else:
            sources = {c: str((root / c).relative_to(input_dir)) for c in by_id}
            folders = sources
            files = {
                c: {m: str(p.relative_to(input_dir)) for m, p in case.images.items() if m not in case.missing}
                for c, case in by_id.items()
            }
        prepare_log = dicom.log_path.read_text() if dicom is not None and dicom.log_path else None
    rows = prediction_rows(preds, by_id, s["review_threshold"], sources)
    for r in rows:
        if r["case_id"] in explained:
            r["explain"] = explained[r["case_id"]]
    payload = {
        "format": PREDICTIONS_FORMAT,
        "input": str(input_dir),
        "input_kind": kind,
        "model": {
            "checkpoints": [str(m.path) for m in models],
            "n_models": len(models),
            "modalities": modalities,
            "class_names": class_names,
            "preprocess": preprocess.as_dict(),
            "eval_crop": meta.get("eval_crop"),
            "temperature": temperature,
            "calibration": calibration,
            "tta": str(s["tta"]),
            "tta_axes": list(s["tta_axes"]) if s["tta"] != "none" else [],
            "device": str(device),
            "explain": s["explain"],
        },
        "review_threshold": s["review_threshold"],
        "seconds": {"startup": round(startup, 3), "total": round(time.perf_counter() - start, 3)},
        "cases": [{**r, "folder": folders[r["case_id"]], "files": files[r["case_id"]]} for r in rows],
    }
    if dicom is not None:
        payload["dicom"] = {
            "rules": dicom.rules,
            "key_file": str(s.get("key_file")) if s.get("key_file") else None,
            "note": "case ids are prepare's pseudonyms; 'folder' (the study) and 'files' (one series folder per "
            "modality) link each one to the input tree",
            "not_predicted": dicom.failures,
            "unused_modalities": dicom.unused,
            "modalities_no_rule_names": dicom.never,
            "warnings": dicom.warnings,
        }
    out.mkdir(parents=True, exist_ok=True)
    if prepare_log is not None:
        atomic_write_text(out / "prepare_log.json", prepare_log)
    atomic_write_text(out / "predictions.csv", rows_csv(rows, class_names))
    atomic_write_text(out / "predictions.json", json.dumps(payload, indent=1))
    if s["print_table"]:
        print(table_text(rows, s["review_threshold"]))
        if dicom is not None and dicom.failures:
            print(
                f"{len(dicom.failures)} stud(y/ies) of the DICOM tree not predicted (see predictions.json: dicom)"
            )
        print(f"predictions: {out / 'predictions.csv'}\ndetails:     {out / 'predictions.json'}")
    return payload


def _explain(
    models: Sequence[Any],
    dataset: CaseDataset,
    preds: PredictionSet,
    cases: Mapping[str, Any],
    preprocess: PreprocessConfig,
    meta: Mapping[str, Any],
    out: Path,
    device: Any,
    s: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """Grad-CAM maps, sheets and occlusion importance of every case (``explain=true``)."""
    from liverfusion.evaluation.explain import CamExplainer, explain_case

    explainer = CamExplainer(
        [m.net for m in models], method=str(s["explain_method"]), layer=str(s.get("explain_layer", "fusion"))
    )
    index = {c: i for i, c in enumerate(preds.case_ids)}
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for j in range(len(dataset)):
        item = dataset[j]
        i = index[item["case_id"]]
        item = {**item, "image": item["image"].to(device), "present": item["present"].to(device)}
        result[item["case_id"]] = explain_case(
            explainer,
            item,
            cases[item["case_id"]],
            preds.modalities,
            preds.class_names,
            int(preds.predictions[i]),
            preds.probs[i],
            {m: p[i] for m, p in preds.dropped.items()},
            preprocess,
            meta.get("eval_crop"),
            out,
        )
    return result


def _temperature(s: Mapping[str, Any], models: Sequence[Any]) -> tuple[float | None, dict[str, Any] | None]:
    """The temperature stored with the model (None: uncalibrated, or ``calibration=none``)."""
    if s["calibration"] == "none":
        return None, None
    from liverfusion.evaluation.calibration import stored_calibration

    found = stored_calibration(s["ckpt_path"], [m.path for m in models])
    if found is None:
        log.warning(
            "%s: no calibration.json for these checkpoints: probabilities are uncalibrated "
            "(python -m liverfusion.evaluate ckpt_path=... calibrate=true fits one)",
            s["ckpt_path"],
        )
        return None, None
    if found.get("tta", "none") != str(s["tta"]):
        log.warning(
            "the temperature was fitted with tta=%s, this run uses tta=%s", found.get("tta"), s["tta"]
        )
    return float(found["temperature"]), found


@hydra_cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@cli_errors
def main(cfg: DictConfig) -> None:
    run_predict(cfg)


if __name__ == "__main__":
    main()
