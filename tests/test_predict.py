"""``liverfusion.predict``: new patients' case folders in, one calibrated row per case out, the same probabilities
as ``evaluate`` on the same cases, missing phases masked and named, every bad input one clear error, nothing ever
written under the input."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from liverfusion.errors import CheckpointError, ConfigError, DataError
from liverfusion.evaluation import LoadedClassifier, predict, read_predictions_csv
from liverfusion.evaluation.inputs import CaseFolderLayout, name_key
from liverfusion.models import FUSIONS, build_encoder, build_fusion_classifier
from liverfusion.predict import run_predict
from liverfusion.utils.hydra_utils import CONFIG_DIR
from tests.test_evaluate import _evaluate, _train_tiny

N_CASES = 20  # the "folder of 20 unlabelled case folders (some with a phase removed)"
REMOVED = {1: ["DWI"], 4: ["C+A", "In Phase"], 7: ["T2WI"]}  # case index -> phases deleted from its folder


@pytest.fixture(scope="module")
def trained(tiny_phantom, tmp_path_factory):
    """One tiny classifier run (as tests/test_evaluate.py trains it)."""
    base = tmp_path_factory.mktemp("predict_model")
    _train_tiny(tiny_phantom, base, "run")
    return base, base / "run"


@pytest.fixture()
def cohort(tiny_phantom, tmp_path):
    """An unlabelled LLD-MMRI-style cohort copied from the phantom, with some phases removed."""
    root = tmp_path / "cohort"
    cases = sorted(p.name for p in (tiny_phantom / "images").iterdir())[:N_CASES]
    for i, case in enumerate(cases):
        shutil.copytree(tiny_phantom / "images" / case, root / "images" / case)
        for phase in REMOVED.get(i, []):
            (root / "images" / case / f"{phase}.nii.gz").unlink()
    (root / "labels.txt").write_text("".join(f"{c} -1\n" for c in cases))
    return root, cases


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _predict(ckpt, input_dir, out, *extra):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="predict",
            overrides=[f"ckpt_path={ckpt}", f"input={input_dir}", f"out={out}", "progress=false", *extra],
        )
    return run_predict(cfg)


def test_predict_matches_evaluate_and_names_missing_phases(trained, cohort, tiny_phantom, tmp_path):
    base, run = trained
    root, cases = cohort
    before = _snapshot(root)
    payload = _predict(run, root, tmp_path / "out")
    assert _snapshot(root) == before  # nothing under input is written
    rows = read_predictions_csv(tmp_path / "out" / "predictions.csv")
    assert rows.case_ids == cases  # one row per case, in order
    by_case = {c["case_id"]: c for c in payload["cases"]}
    for i, case in enumerate(cases):
        assert by_case[case]["missing"] == [
            m for m in payload["model"]["modalities"] if m in REMOVED.get(i, [])
        ]
        assert set(by_case[case]["modalities_used"]) | set(by_case[case]["missing"]) == set(
            payload["model"]["modalities"]
        )
    text = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert text[0].startswith("case_id,patient_id,modalities_used,missing,prob_hemangioma")
    assert text[0].endswith("prediction,prediction_index,confidence,review,source")
    assert text[1].endswith(f",images/{cases[0]}")  # each row's input folder
    assert ",In Phase;C+A," in text[5]  # the missing list of case 4, in the model's modality order

    # evaluate on the same cases (a data config pointing at the cohort, missing phases masked) agrees
    summary = _evaluate(
        tiny_phantom,
        base,
        run,
        "eval_cohort",
        [
            f"data.layout.root={root}",
            "data.layout.generate=false",
            "data.layout.on_missing_modality=mask",
            "split=all",
            "robustness=false",
        ],
    )
    assert summary["metrics"] is None  # no labels
    theirs = read_predictions_csv(base / "eval_cohort" / "predictions.csv")
    assert theirs.case_ids == rows.case_ids
    assert np.allclose(rows.probs, theirs.probs, atol=2e-6)
    conf = np.asarray([by_case[c]["confidence"] for c in cases])
    assert np.allclose(conf, theirs.probs.max(1), atol=2e-6)
    assert [by_case[c]["review"] for c in cases] == list(conf < 0.7)

    # the images/ folder itself is the same input; a non-empty out is refused, overwrite=true replaces
    with pytest.raises(ConfigError, match="is not empty"):
        _predict(run, root / "images", tmp_path / "out")
    again = _predict(run, root / "images", tmp_path / "out", "overwrite=true", "review_threshold=0.99")
    assert [c["probabilities"] for c in again["cases"]] == [c["probabilities"] for c in payload["cases"]]
    assert all(c["review"] == (c["confidence"] < 0.99) for c in again["cases"])


def test_file_names_match_ignoring_case_spaces_and_aliases(tmp_path):
    mods = ["T2WI", "In Phase", "C+A"]
    for name in ("t2wi.nii.gz", "in_phase.nii.gz", "arterial.nii", "mask.nii.gz", "notes.txt"):
        (tmp_path / "c1" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c1" / name).write_bytes(name.encode())
    layout = CaseFolderLayout(tmp_path, mods, aliases={"Arterial": "C+A"}, ignore=["mask.nii.gz"])
    (case,) = layout.scan()
    assert {m: p.name for m, p in case.images.items()} == {
        "T2WI": "t2wi.nii.gz",
        "In Phase": "in_phase.nii.gz",
        "C+A": "arterial.nii",
    }
    assert name_key("In  Phase") == name_key("in_phase") != name_key("inphase")
    with pytest.raises(ConfigError, match="aliases.x: 'DWI' is not one of the model's modalities"):
        CaseFolderLayout(tmp_path, mods, aliases={"x": "DWI"})


def test_bad_inputs_are_one_clear_error_each(trained, cohort, tmp_path):
    _, run = trained
    root, cases = cohort
    before = _snapshot(root)
    # an unknown modality file name: named, with the fix
    (root / "images" / cases[0] / "T2WI.nii.gz").rename(root / "images" / cases[0] / "t2_fse.nii.gz")
    with pytest.raises(
        DataError, match=r"file name 't2_fse.nii.gz' is none of the model's modalities"
    ) as err:
        _predict(run, root, tmp_path / "o1")
    assert cases[0] in str(err.value) and "aliases=" in err.value.fix
    # ... which an alias fixes
    out = _predict(run, root, tmp_path / "o2", "aliases={t2_fse: T2WI}")
    assert out["cases"][0]["missing"] == []
    # a case folder with no usable modality
    empty = root / "images" / "Z_empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="case 'Z_empty'.*no usable modality file"):
        _predict(run, root, tmp_path / "o3", "aliases={t2_fse: T2WI}")
    shutil.rmtree(empty)
    # a DICOM export: pointed at prepare
    series = root / "images" / "Z_dicom" / "study" / "series"
    series.mkdir(parents=True)
    (series / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(DataError, match="holds DICOM") as err:
        _predict(run, root, tmp_path / "o5", "aliases={t2_fse: T2WI}")
    assert "liverfusion.prepare kind=dicom" in err.value.fix
    shutil.rmtree(root / "images" / "Z_dicom")
    # out inside input
    with pytest.raises(ConfigError, match="lies inside input"):
        _predict(run, root, root / "images" / "preds")
    # a missing input folder
    with pytest.raises(DataError, match="input folder does not exist"):
        _predict(run, tmp_path / "nope", tmp_path / "o4")
    assert not (root / "images" / "preds").exists()
    after = _snapshot(root)
    assert set(after) - set(before) == {f"images/{cases[0]}/t2_fse.nii.gz"}  # what the test itself did


def test_not_a_classifier_is_one_line_and_exit_2(tmp_path, cohort):
    root, _ = cohort
    enc = build_encoder(name="resnet3d", arch="resnet10", widths=[4, 8, 8, 8])
    torch.save({"format": "liverfusion-encoder/1", "state_dict": enc.state_dict()}, tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match="not a liverfusion classifier checkpoint"):
        _predict(tmp_path / "encoder.pt", root, tmp_path / "o")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "liverfusion.predict",
            f"ckpt_path={tmp_path / 'encoder.pt'}",
            f"input={root}",
            f"out={tmp_path / 'cli'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "not a liverfusion classifier checkpoint" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "cli").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "cohort",
        "encoder.pt",
    ]
    # an unknown key on the command line: one line too (nothing is written, not even by Hydra)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "liverfusion.predict",
            "reviw_threshold=0.5",
            f"input={root}",
            "out=x",
            "ckpt_path=y",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "reviw_threshold" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "encoder.pt"]


def _tiny_net(fusion: str = "cgc"):
    torch.manual_seed(0)
    enc = functools.partial(
        build_encoder,
        name="resnet3d",
        arch="resnet10",
        widths=[4, 8, 8, 8],
        pool_stride=[1, 2, 2],
        stage_strides=[1, 2, 2, 1],
    )
    fus = functools.partial(FUSIONS[fusion], **({"width": 4} if fusion == "cgc" else {}))
    return build_fusion_classifier(enc, fus, ["a", "b"], 3).eval()


def test_flip_tta_and_ensembles_average_probabilities():
    nets = [_tiny_net(), _tiny_net("late_mean")]
    meta = {"modalities": ["a", "b"], "class_names": ["x", "y", "z"], "preprocess": {}, "eval_crop": None}
    models = [LoadedClassifier(n, dict(meta), Path(f"m{i}")) for i, n in enumerate(nets)]
    x = torch.randn(3, 2, 8, 32, 32)
    present = torch.tensor([[True, True], [True, False], [False, True]])
    batch = {
        "image": x,
        "present": present,
        "label": torch.full((3,), -1),
        "case_id": list("pqr"),
        "patient_id": list("pqr"),
    }
    with torch.no_grad():
        one = [n(x, present).logits.softmax(1) for n in nets]
        flipped = [
            (n(x.flip(3), present).logits.softmax(1), n(x.flip(4), present).logits.softmax(1)) for n in nets
        ]
    ens = predict(models, [batch], robustness=False, device="cpu")
    assert np.allclose(ens.probs, ((one[0] + one[1]) / 2).numpy(), atol=1e-6)
    assert np.allclose(np.exp(ens.log_probs), ens.probs, atol=1e-6)  # log of the mean, not the mean of logs
    tta = predict(models[:1], [batch], robustness=False, device="cpu", tta="flip", tta_axes=["H", "W"])
    assert np.allclose(tta.probs, ((one[0] + flipped[0][0] + flipped[0][1]) / 3).numpy(), atol=1e-6)
    assert not np.allclose(tta.probs, one[0].numpy(), atol=1e-4)
    with pytest.raises(ConfigError, match="tta_axes: unknown axis"):
        predict(models[:1], [batch], tta="flip", tta_axes=["X"])
    with pytest.raises(ConfigError, match="device='cuda:7'"):
        predict(models[:1], [batch], device="cuda:7")


def test_console_script_is_declared():
    import importlib
    import re

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    target = re.search(r'^liverfusion-predict = "([\w.]+):(\w+)"', text, re.M)
    assert target is not None, "no liverfusion-predict console script"
    assert callable(getattr(importlib.import_module(target.group(1)), target.group(2)))


# ---------------------------------------------------------------------------------------------------------------
# export: one file, torch alone, the checkpoint's logits
# ---------------------------------------------------------------------------------------------------------------
def _export(ckpt, out, *extra):
    from liverfusion.export import run_export

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"ckpt_path={ckpt}", f"out={out}", *extra])
    return run_export(cfg)


LOADER = """
import json, sys
for name in ("hydra", "omegaconf", "lightning", "liverfusion", "monai"):
    sys.modules[name] = None  # torch alone
import torch
extra = {"liverfusion.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
meta = json.loads(extra["liverfusion.json"])
batch = torch.load(sys.argv[2], weights_only=True)
log_probs = program.module()(batch["image"], batch["present"])
torch.save({"log_probs": log_probs, "classes": meta["class_names"]}, sys.argv[3])
"""


def test_export_runs_with_torch_alone_and_matches_the_checkpoint(trained, cohort, tmp_path):
    from liverfusion.data.cache import PreprocessedCache
    from liverfusion.data.datasets import CaseDataset
    from liverfusion.data.preprocess import PreprocessConfig
    from liverfusion.evaluation import load_ensemble
    from liverfusion.export import load_exported

    _, run = trained
    root, _ = cohort
    meta = _export(run, tmp_path / "model.pt2")
    assert (tmp_path / "model.pt2").is_file() and meta["n_models"] == 1
    models, ckpt_meta = load_ensemble(run)
    assert meta["modalities"] == ckpt_meta["modalities"] and meta["preprocess"] == ckpt_meta["preprocess"]
    # the same preprocessed input as predict builds (some phases missing)
    layout = CaseFolderLayout(root / "images", ckpt_meta["modalities"])
    cases = layout.scan()
    pre = PreprocessConfig.from_dict(ckpt_meta["preprocess"])
    entries = PreprocessedCache(tmp_path / "cache", "x", ckpt_meta["modalities"], pre).build(
        cases, progress=False
    )
    items = [CaseDataset(entries)[i] for i in range(len(entries))]
    batch = {
        "image": torch.stack([b["image"] for b in items]),
        "present": torch.stack([b["present"] for b in items]),
    }
    assert not batch["present"].all()
    torch.save(batch, tmp_path / "batch.pt")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            LOADER,
            str(tmp_path / "model.pt2"),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "o.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    with torch.no_grad():
        want = models[0].net(batch["image"], batch["present"]).logits.log_softmax(1)
    assert (got["log_probs"] - want).abs().max().item() < 1e-4
    assert got["classes"] == ckpt_meta["class_names"]
    # the in-package loader adds the temperature; an existing out is refused
    loaded = load_exported(tmp_path / "model.pt2")
    out = loaded(batch["image"], batch["present"])
    assert torch.allclose(out["probs"], out["log_probs"].softmax(1), atol=1e-6)  # uncalibrated: T = 1
    with pytest.raises(ConfigError, match="exists"):
        _export(run, tmp_path / "model.pt2")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        with pytest.raises(
            ConfigError, match="format=onnx needs the onnx, onnxruntime and onnxscript packages"
        ):
            _export(run, tmp_path / "model.onnx", "format=onnx")
    else:
        assert _export(run, tmp_path / "model.onnx", "format=onnx")["n_models"] == 1


def test_exported_ensemble_is_the_mean_probability_of_its_members():
    from liverfusion.evaluation.dense import EnsembleLogProbs

    nets = [_tiny_net(), _tiny_net("early"), _tiny_net("late_mean")]
    module = EnsembleLogProbs(nets).eval()
    x = torch.randn(3, 2, 8, 32, 32)
    present = torch.tensor([[True, True], [True, False], [False, True]])
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        module, (x, present), dynamic_shapes={"image": {0: batch}, "present": {0: batch}}
    )
    x5, p5 = torch.randn(5, 2, 8, 32, 32), torch.ones(5, 2, dtype=torch.bool)
    p5[2, 0] = False
    with torch.no_grad():
        for image, mask in ((x, present), (x5, p5)):  # another batch size than the example's
            want = torch.stack([n(image, mask).logits.softmax(1) for n in nets]).mean(0)
            got = program.module()(image, mask).exp()
            assert (got - want).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# explain: Grad-CAM on each input's grid, occlusion importance, a sanity check
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,shape,crop",
    [("resize", (9, 18, 20), None), ("spacing", (12, 22, 25), (10, 20, 21)), ("spacing", (7, 16, 17), None)],
)
def test_maps_go_back_onto_the_input_files_grid(tmp_path, mode, shape, crop):
    """A "map" equal to the network input (no normalisation) maps back onto the stored file exactly: the
    reorientation (file stored LAS, model RAS), resampling, padding and crops are undone voxel for voxel."""
    import nibabel as nib
    from monai.transforms import CenterSpatialCrop

    from liverfusion.data.io import load_volume
    from liverfusion.data.preprocess import PreprocessConfig, Preprocessor
    from liverfusion.evaluation.explain import to_input_grid

    data = np.random.default_rng(0).random((20, 18, 9)).astype(np.float32) * 100 + 1  # NIfTI (i, j, k)
    affine = np.diag([-1.5, 1.2, 3.0, 1.0])
    affine[:3, 3] = [10, -5, 2]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii.gz")
    spacing = (3.0, 1.2, 1.5) if mode == "spacing" else None
    cfg = PreprocessConfig(
        shape=shape, mode=mode, target_spacing=spacing, normalize="none", orientation="RAS"
    )
    net_input = Preprocessor(cfg)(load_volume(tmp_path / "a.nii.gz"))
    if crop:
        net_input = np.asarray(CenterSpatialCrop(roi_size=crop)(torch.as_tensor(net_input)[None]))[0]
    ijk, back_affine = to_input_grid(net_input, tmp_path / "a.nii.gz", cfg, crop)
    assert ijk.shape == data.shape and np.allclose(back_affine, affine)
    covered = ijk != 0
    assert covered.mean() > 0.5
    assert np.abs(ijk - data)[covered].max() < 1e-3
    if shape[0] < 9:  # the field of view cut by the crop to 7 slices: zero there, never wrapped around
        assert not covered.all()


def test_explain_writes_maps_aligned_with_the_inputs(trained, cohort, tmp_path):
    import nibabel as nib
    from PIL import Image

    _, run = trained
    root, cases = cohort
    for case in cases[5:]:  # five cases (two with phases removed) are enough here
        shutil.rmtree(root / "images" / case)
    cases = cases[:5]
    before = _snapshot(root)
    payload = _predict(run, root, tmp_path / "out", "explain=true")
    assert len(payload["cases"]) == 5
    assert _snapshot(root) == before
    modalities = payload["model"]["modalities"]
    for i, c in enumerate(payload["cases"]):
        ex = c["explain"]
        present = [m for m in modalities if m not in REMOVED.get(i, [])]
        assert sorted(ex["maps"]) == sorted(present) and not ex["one_map_for_all_modalities"]
        assert sorted(ex["occlusion"]) == sorted(present)
        for m, rel in ex["maps"].items():
            img, src = nib.load(tmp_path / "out" / rel), nib.load(root / "images" / cases[i] / f"{m}.nii.gz")
            assert img.shape == src.shape and np.allclose(img.affine, src.affine)
            values = np.asarray(img.dataobj)
            assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1 + 1e-6
        assert Image.open(tmp_path / "out" / ex["sheet"]).size[0] > 100
        # occlusion importance: the probability lost when the modality is masked, as the dropped predictions say
        assert all(abs(v) <= 1 for v in ex["occlusion"].values())


def test_randomised_model_gives_other_maps_and_early_fusion_one_map(trained, cohort):
    """Model-randomisation sanity check (Adebayo et al., 2018): re-initialised weights must not give the same maps."""
    from liverfusion.evaluation import load_ensemble
    from liverfusion.evaluation.explain import CamExplainer, rank_correlation

    _, run = trained
    root, _ = cohort
    (model,), meta = load_ensemble(run)
    shape = meta.get("eval_crop") or meta["preprocess"]["shape"]
    x = torch.rand(1, len(meta["modalities"]), *shape, generator=torch.Generator().manual_seed(0))
    present = torch.ones(1, len(meta["modalities"]), dtype=torch.bool)
    ours = CamExplainer([model.net])(x, present, 0)
    (other,), _ = load_ensemble(run)
    torch.manual_seed(123)
    for module in other.net.modules():
        if module is not other.net and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    theirs = CamExplainer([other.net])(x, present, 0)
    assert ours.shape == theirs.shape == (len(meta["modalities"]), *shape)
    assert ours.max() == pytest.approx(1.0)
    assert rank_correlation(ours, theirs) < 0.5
    assert rank_correlation(ours, ours) == pytest.approx(1.0)
    net = _tiny_net("early")
    x, present = torch.randn(1, 2, 8, 32, 32), torch.tensor([[True, False]])
    with torch.no_grad():
        predicted = int(net(x, present).logits.argmax())
    maps = CamExplainer([net])(x, present, predicted)
    assert maps.shape == (1, 8, 32, 32) and maps.max() == pytest.approx(1.0)


def test_a_checkpoint_of_the_earlier_main_still_predicts(tiny_phantom, tmp_path):
    """The classifier run of main 82851a9 (tests/fixtures/legacy_main, trained on this same tiny phantom, no
    orientation key): predict on its test cases gives the probabilities its own test step wrote."""
    legacy = Path(__file__).parent / "fixtures" / "legacy_main" / "cgc"
    run = tmp_path / "cgc"
    shutil.copytree(legacy, run)
    theirs = read_predictions_csv(run / "test" / "predictions.csv")
    cases = tmp_path / "cases"
    for case in theirs.case_ids:
        shutil.copytree(tiny_phantom / "images" / case, cases / case)
    payload = _predict(run, cases, tmp_path / "out")
    ours = read_predictions_csv(tmp_path / "out" / "predictions.csv")
    assert ours.case_ids == theirs.case_ids and payload["model"]["preprocess"]["orientation"] == "none"
    assert np.allclose(ours.probs, theirs.probs, atol=2e-6)


def test_lesion_mass_against_a_centred_blob_of_the_same_size(tmp_path):
    """The Grad-CAM check of benchmarks/calibration_phantom.py: mass inside the lesion mask vs a centred blob."""
    import nibabel as nib

    from liverfusion.data.preprocess import PreprocessConfig
    from liverfusion.evaluation.explain import centred_blob, lesion_mass, mask_on_network_grid, mass_inside

    blob = centred_blob((8, 16, 16), 100)
    assert blob.sum() == 100 and blob[4, 8, 8] and not blob[0, 0, 0]
    assert np.allclose(np.argwhere(blob).mean(0), [3.5, 7.5, 7.5], atol=0.5)  # centred
    mask = np.zeros((8, 16, 16), dtype=bool)
    mask[2:5, 2:7, 9:14] = True  # an off-centre lesion
    z, y, x = np.meshgrid(np.arange(8), np.arange(16), np.arange(16), indexing="ij")
    on_lesion = np.exp(-((z - 3) ** 2 + (y - 4) ** 2 + (x - 11) ** 2) / 8.0)
    centre = np.exp(-((z - 3.5) ** 2 + (y - 7.5) ** 2 + (x - 7.5) ** 2) / 8.0)
    found, biased = lesion_mass(on_lesion, mask), lesion_mass(centre, mask)
    assert found["lesion"] > 2 * found["blob"]  # a map on the lesion beats the centre prior
    assert biased["blob"] > biased["lesion"]  # a map of the centre does not
    flat = lesion_mass(np.ones_like(on_lesion), mask)
    assert flat["lesion"] == pytest.approx(flat["uniform"]) == pytest.approx(flat["blob"])
    assert np.isnan(mass_inside(np.zeros((2, 2, 2)), np.ones((2, 2, 2))))
    with pytest.raises(ValueError, match="differ in shape"):
        mass_inside(np.ones((2, 2, 2)), np.ones((2, 2)))
    # a mask file comes onto the network grid like its image (resize, then the centre crop)
    data = np.zeros((16, 16, 8), dtype=np.uint8)  # NIfTI (i, j, k) = (W, H, D)
    data[9:14, 2:7, 2:5] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "m.nii.gz")
    cfg = PreprocessConfig(shape=(8, 32, 32), mode="resize", normalize="none")
    grid = mask_on_network_grid(tmp_path / "m.nii.gz", cfg)
    assert grid.shape == (8, 32, 32) and grid.sum() == pytest.approx(mask.sum() * 4, rel=0.25)
    assert mask_on_network_grid(tmp_path / "m.nii.gz", cfg, (8, 16, 16)).shape == (8, 16, 16)


@pytest.mark.shared_data
def test_real_lgg_cases_predict_with_maps_on_their_grids(shared_data, tmp_path):
    """Five real LGG case folders (../shared/data) predicted by a model trained (briefly) on the other patients:
    one row each, the FLAIR-copy fillers masked, and every Grad-CAM map on its input file's grid and affine."""
    import csv

    import nibabel as nib
    from omegaconf import open_dict

    from liverfusion.train import train
    from tests.helpers import shared_subdir

    lgg = shared_subdir(shared_data, "lgg_tcga_3seq_dev")
    with (lgg / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    held = sorted(r["case_folder"] for r in rows)[:5]
    held_patients = {r["patient"] for r in rows if r["case_folder"] in held}
    train_root, new = tmp_path / "lgg_train", tmp_path / "new_cases"
    (train_root / "subjects").mkdir(parents=True)
    new.mkdir()
    kept = [r for r in rows if r["patient"] not in held_patients]
    for r in kept:
        (train_root / "subjects" / r["case_folder"]).symlink_to(lgg / "subjects" / r["case_folder"])
    for case in held:
        (new / case).symlink_to(lgg / "subjects" / case)
    with (train_root / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    GlobalHydra.instance().clear()
    overrides = [
        "+experiment=cgc_finetune",
        "data=lgg",
        f"data.layout.root={train_root}",
        "data.preprocess.shape=[16,48,48]",
        "data.num_workers=0",
        "data.prep_workers=0",
        "data.fold=0",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "model.init=scratch",
        "logger=none",
        "callbacks=none",
        "trainer.max_epochs=1",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "model.evaluation.n_boot=50",
        "extras.print_config=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    listing = {c: sorted(p.name for p in (new / c).iterdir()) for c in held}
    payload = _predict(tmp_path / "run", new, tmp_path / "out", "explain=true", "duplicate_source=[flair]")
    assert {c: sorted(p.name for p in (new / c).iterdir()) for c in held} == listing  # nothing written there
    assert [c["case_id"] for c in payload["cases"]] == held
    assert payload["model"]["modalities"] == ["t1_pre", "flair", "t1_post"]
    for c in payload["cases"]:
        assert "flair" in c["modalities_used"]  # only the FLAIR-copy fillers may be masked
        assert c["missing"] == [m for m in ("t1_pre", "t1_post") if m in c["missing"]]
        assert sorted(c["explain"]["maps"]) == sorted(c["modalities_used"])
        for m, rel in c["explain"]["maps"].items():
            img, src = nib.load(tmp_path / "out" / rel), nib.load(new / c["case_id"] / f"{m}.nii.gz")
            assert img.shape == src.shape and np.allclose(img.affine, src.affine)
            values = np.asarray(img.dataobj)
            assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1 + 1e-6


def test_predict_speed_benchmark_on_a_tiny_setting(tmp_path):
    """benchmarks/predict_speed.py end to end at a tiny size (the real run: 3 members, the demo size, 2 cores)."""
    import json

    from benchmarks import predict_speed

    args = ["--cases", "3", "--members", "2", "--shape", "8,32,32", "--repeats", "1", "--threads", "1"]
    args += ["--tta", "none", "--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r" / "s.json")]
    assert predict_speed.main(args) == 0
    res = json.loads((tmp_path / "r" / "s.json").read_text())
    cpu = res["configurations"]["cpu/none"]
    assert cpu["s_per_case"] > 0 and cpu["startup_s"] > 0 and cpu["runs"][0]["n_models"] == 2
    assert cpu["runs"][0]["cases"] == 3 and res["setup"]["shape"] == [8, 32, 32]
    assert ("cuda/none" in res["configurations"]) or ("cuda/none" in res["skipped"])
    text = (tmp_path / "r" / "s.md").read_text()
    assert "| cpu | none |" in text and "start-up" in text
    # resumable: a second run keeps the finished configuration
    assert predict_speed.main(args) == 0
    assert json.loads((tmp_path / "r" / "s.json").read_text())["configurations"]["cpu/none"] == cpu


def test_explain_layer_choice_names_the_stage_and_refuses_unknown_ones():
    from types import SimpleNamespace

    from liverfusion.errors import ConfigError
    from liverfusion.evaluation.explain import target_layer

    net = SimpleNamespace(
        encoder=SimpleNamespace(stages=[0, 1, 2, 3], spatial_dims=3), fusion=SimpleNamespace(consumes="map")
    )
    assert target_layer(net) == "dense.encoder.layer4"  # the stage the fusion block reads
    assert target_layer(net, "layer2") == "dense.encoder.layer2"
    with pytest.raises(ConfigError, match=r"explain_layer='layer9'.*layer1"):
        target_layer(net, "layer9")
