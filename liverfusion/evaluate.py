"""``python -m liverfusion.evaluate ckpt_path=... data=...``: run a trained classifier (or the ensemble of a CV's fold
models) on a data set in any supported layout and write what a clinician, a challenge and a paper need.

Outputs (in the run dir, ``logs/evaluate/runs/<time>/`` by default):
- ``predictions.csv``: case, patient, one probability column per class, prediction, label (when known);
- ``submission.json``: the LLD-MMRI format ``[{"image_id", "prediction", "score": [all class probabilities]}]``;
- with labels: ``metrics.json`` / ``metrics.md`` (every metric with a patient-level bootstrap 95 % CI; DeLong CI for
  binary AUROC), ``robustness.csv`` / ``.md`` (each modality dropped in turn: metric loss), optional per-patient
  aggregation (``aggregate=mean|max``), optional paired comparison with another ``predictions.csv``
  (``compare_to=...``: paired bootstrap, DeLong for binary AUROC).
- with labels, calibration: ``calibration.json`` / ``.md`` (ECE over 15 bins, MCE, Brier, NLL before and after the
  temperature stored with the model), ``reliability.png`` and selective prediction (``risk_coverage.csv`` / ``.png``,
  AURC, macro-F1 of the 80 % most confident cases). ``calibrate=true`` first fits that temperature on each member's
  validation split (out-of-fold for a fold ensemble) and stores it as ``calibration.json`` in the run / multirun
  folder; every probability written is then the calibrated one (predictions never change).

``device=auto`` runs on the GPU when there is one; ``tta=flip`` averages flipped copies.

Modalities (names and order), class names, preprocessing and the evaluation crop come from the checkpoint, never
from the command line, so a model is always fed what it was trained on.
The work is done by the :mod:`liverfusion.evaluation` library (the same writer serves the classifier's own test
step); this module is the command line and re-exports the library's names for code that imports them from here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from liverfusion.errors import ConfigError
from liverfusion.evaluation import (
    HEADLINE_METRICS,
    ROBUSTNESS_METRICS,
    LoadedClassifier,
    PredictionSet,
    aggregate_by_patient,
    batch_predictions,
    best_in_run,
    check_ensemble,
    compare_predictions,
    find_checkpoints,
    load_classifier,
    load_ensemble,
    metrics_markdown,
    metrics_with_ci,
    predict,
    predictions_csv,
    read_predictions_csv,
    resolve_device,
    robustness_table,
    rows_csv,
    submission_json,
    table_markdown,
    write_evaluation,
    write_json,
)
from liverfusion.evaluation.loading import _best_in_run
from liverfusion.utils.cli import cli_errors, hydra_cli
from liverfusion.utils.hydra_utils import CONFIG_DIR

log = logging.getLogger(__name__)

__all__ = [  # re-exported: older code and the benchmarks import these from liverfusion.evaluate
    "HEADLINE_METRICS",
    "ROBUSTNESS_METRICS",
    "LoadedClassifier",
    "PredictionSet",
    "_best_in_run",
    "aggregate_by_patient",
    "batch_predictions",
    "best_in_run",
    "check_ensemble",
    "compare_predictions",
    "evaluate",
    "find_checkpoints",
    "load_classifier",
    "load_ensemble",
    "main",
    "metrics_markdown",
    "metrics_with_ci",
    "predict",
    "predictions_csv",
    "read_predictions_csv",
    "resolve_device",
    "robustness_table",
    "rows_csv",
    "submission_json",
    "table_markdown",
    "write_evaluation",
    "write_json",
]


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
# the primary config's own keys (conf/evaluate.yaml); the groups' keys come from liverfusion.utils.evaluation_settings
OWN_KEYS = (
    "task_name",
    "ckpt_path",
    "split",
    "use_checkpoint_data",
    "override_class_names",
    "batch_size",
    "save_features",
    "compare_to",
    "compare_metric",
    "calibrate",
)
SECTIONS = ("data", "paths", "extras", "hydra")
SPLITS = ("test", "val", "train", "all")


def _settings(cfg: Any) -> dict[str, Any]:
    """The run's settings as plain values: every key stated by ``conf/evaluate.yaml`` and its groups (no default
    here), unknown keys refused, each value checked."""
    from liverfusion.utils import evaluation_settings as settings
    from liverfusion.utils.config_sections import check_primary, check_value
    from liverfusion.utils.plain import to_plain

    known = (*OWN_KEYS, *settings.SCORING_KEYS, *settings.INFERENCE_KEYS)
    given = {k: v for k, v in cfg.items() if k not in SECTIONS}
    check_primary("evaluate", given, known)
    values = to_plain({k: given[k] for k in OWN_KEYS})
    if values["ckpt_path"] in (None, "", "???"):
        raise ConfigError("ckpt_path=... is required: a classifier .ckpt, a run folder or a multirun folder")
    if str(values["split"]) not in SPLITS:
        raise ConfigError(f"split={values['split']!r}: choose one of {list(SPLITS)}")
    values["batch_size"] = check_value("batch_size", values["batch_size"], "int", low=1)
    for key in ("use_checkpoint_data", "override_class_names", "save_features", "calibrate"):
        values[key] = check_value(key, values[key], "bool")
    values.update(settings.scoring({k: to_plain(given[k]) for k in settings.SCORING_KEYS}, where="evaluate"))
    values.update(
        settings.inference({k: to_plain(given[k]) for k in settings.INFERENCE_KEYS}, where="evaluate")
    )
    return values


def _apply_checkpoint_data(cfg: Any, meta: Mapping[str, Any], single: bool) -> None:
    """Modalities, classes, preprocessing and crop from the checkpoint into the data config (in place); on the
    data set the model was trained on, also its split settings and (for one model) its fold, so ``split=test``
    is that model's own test split."""
    from omegaconf import OmegaConf

    with open_dict(cfg):
        layout = cfg.data.layout
        if "modalities" in layout or "patterns" not in layout:
            layout.modalities = list(meta["modalities"])
        if "class_names" in layout and layout.class_names:
            ours, theirs = list(layout.class_names), list(meta["class_names"])
            if ours != theirs:
                if not cfg.override_class_names:
                    raise ConfigError(
                        f"data.layout.class_names: the data set's classes {ours} differ from the model's {theirs}: "
                        "its labels would be scored as the model's classes",
                        fix="evaluate on data with the model's classes, or pass override_class_names=true to "
                        "score with the model's names anyway",
                    )
                log.warning("override_class_names: the data set's classes %s are scored as %s", ours, theirs)
            layout.class_names = theirs
        cfg.data.preprocess = OmegaConf.create(meta["preprocess"])
        cfg.data.eval_crop = meta.get("eval_crop")
        if meta.get("split") and meta.get("dataset") == layout.get("name"):
            for key, value in meta["split"].items():
                cfg.data.split[key] = value
            if single and meta.get("fold") is not None:
                cfg.data.fold = int(meta["fold"])
            log.info("split settings of the training run: %s, fold %s", meta["split"], cfg.data.fold)


def _datamodule(cfg: Any, meta: Mapping[str, Any], single: bool, split: str) -> Any:
    """The data module serving ``split`` of ``cfg.data`` with the checkpoint's modalities, preprocessing and crop."""
    from hydra.utils import instantiate

    if cfg.use_checkpoint_data:
        _apply_checkpoint_data(cfg, meta, single=single)
    with open_dict(cfg):
        cfg.data.predict_part = split
        cfg.data.eval_batch_size = int(cfg.batch_size)
        cfg.data.train_transform = None
    dm = instantiate(cfg.data)
    dm.setup("predict")
    if dm.modalities != list(meta["modalities"]):
        raise ConfigError(
            f"the data set's modalities {dm.modalities} differ from the model's {meta['modalities']} (names and "
            "order must match; set the layout's modality names)"
        )
    return dm


def fit_calibration(cfg: Any, models: list[LoadedClassifier], paths: list[Path]) -> tuple[float, Path]:
    """Fit one temperature on the validation split of every member (out-of-fold for a fold ensemble) and store it
    with the model (``calibration.json``); return it and where it went."""
    import copy

    from liverfusion.evaluation.calibration import fit_temperature, pooled_validation, write_calibration

    s = _settings(cfg)
    if not s["use_checkpoint_data"]:
        raise ConfigError(
            "calibrate=true needs use_checkpoint_data=true (each member's own validation split)"
        )
    sets = []
    for m in models:
        dataset, name = m.meta.get("dataset"), cfg.data.layout.get("name")
        if not m.meta.get("split") or dataset != name:
            raise ConfigError(
                f"calibrate=true: {m.path} was trained on data set {dataset!r}, the data config is {name!r}; the "
                "temperature is fitted on the model's own validation split",
                fix="pass the data config the model was trained on (data=...)",
            )
        member_cfg = copy.deepcopy(cfg)
        with open_dict(member_cfg):
            member_cfg.data.split.save_to = None
        dm = _datamodule(member_cfg, m.meta, single=True, split="val")
        sets.append(
            predict(
                [m],
                dm.predict_dataloader(),
                robustness=False,
                device=s["device"],
                tta=s["tta"],
                tta_axes=s["tta_axes"],
            )
        )
    validation = pooled_validation(sets)
    temperature = fit_temperature(validation.logits(), validation.labels)
    where = write_calibration(s["ckpt_path"], paths, temperature, validation, tta=s["tta"])
    log.info(
        "temperature %.4f fitted on %d validation cases: %s", temperature, len(validation.case_ids), where
    )
    return temperature, where


def evaluate(cfg: Any) -> dict[str, Any]:
    """The body of the CLI (also callable with a composed config)."""
    from liverfusion.evaluation.calibration import stored_calibration, write_calibration_report
    from liverfusion.utils.hydra_utils import apply_extras, save_resolved_config

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    apply_extras(cfg)
    s = _settings(cfg)
    device = resolve_device(s["device"])
    paths = find_checkpoints(s["ckpt_path"])
    models = [load_classifier(p) for p in paths]
    meta = check_ensemble(models)
    log.info("evaluating %d model(s) on %s: %s", len(models), device, [str(p) for p in paths])
    split = str(s["split"])
    if s["calibrate"]:
        fit_calibration(cfg, models, paths)
        if split == "val":
            log.warning(
                "split=val is what the temperature was fitted on: its calibrated scores are optimistic"
            )
    stored = None
    if s["calibration"] == "auto":
        stored = stored_calibration(s["ckpt_path"], paths)
    dm = _datamodule(cfg, meta, single=len(models) == 1, split=split)
    save_resolved_config(cfg, out_dir)
    if len(models) > 1 and split != "all" and getattr(dm.splits, "nested", False):
        raise ConfigError(
            "the fold models of a nested CV each trained on the other folds' test patients: evaluate their "
            "ensemble only on a separate cohort (split=all), or one fold model on its own test fold"
        )
    raw = predict(
        models,
        dm.predict_dataloader(),
        robustness=s["robustness"],
        device=device,
        tta=s["tta"],
        tta_axes=s["tta_axes"],
    )
    temperature = float(stored["temperature"]) if stored else None
    preds = raw.with_temperature(temperature) if temperature else raw
    compare = read_predictions_csv(s["compare_to"]) if s["compare_to"] else None
    extra: dict[str, Any] = {
        "checkpoints": [str(p) for p in paths],
        "split": split,
        "dataset": dm.layout.name,
        "device": str(device),
        "tta": s["tta"],
        "temperature": temperature,
        "calibration_file": stored["path"] if stored else None,
    }
    summary = write_evaluation(
        preds,
        out_dir,
        n_boot=s["n_boot"],
        alpha=s["alpha"],
        seed=s["seed"],
        threshold=s["threshold"],
        aggregate=s["aggregate"],
        save_features=s["save_features"],
        compare_to=compare,
        compare_metric=str(s["compare_metric"]),
        extra=extra,
    )
    if raw.has_labels:
        summary["calibration"] = write_calibration_report(raw, temperature, out_dir)
        write_json(out_dir / "summary.json", summary)
    if (out_dir / "metrics.md").is_file():
        print((out_dir / "metrics.md").read_text())
    print(f"predictions: {out_dir / 'predictions.csv'}\nsubmission:  {out_dir / 'submission.json'}")
    return summary


@hydra_cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@cli_errors
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    evaluate(cfg)


if __name__ == "__main__":
    main()
