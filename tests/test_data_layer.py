"""Data layer: layouts, clear errors naming file and reason, splits by patient, cached preprocessing."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from liverfusion.data.cache import PreprocessedCache, clear_cache
from liverfusion.data.datamodule import ClassificationDataModule
from liverfusion.data.io import load_volume, save_volume
from liverfusion.data.layouts import (
    FolderLayout,
    GenericLayout,
    LLDMMRILayout,
    UnionLayout,
    patient_from_case,
)
from liverfusion.data.preprocess import PreprocessConfig
from liverfusion.data.splits import Splits, make_splits
from liverfusion.errors import ConfigError, DataError
from tests.helpers import PHASES, data_module, write_lld_like


@pytest.fixture
def lld(tmp_path):
    return write_lld_like(tmp_path / "lld")


def layout(root, **kw):
    return LLDMMRILayout(root, modalities=PHASES, class_names=["a", "b", "c"], **kw)


def test_io_axis_convention_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (D, H, W)
    save_volume(tmp_path / "v.nii.gz", a, spacing=(5.0, 2.0, 1.0))
    import nibabel as nib

    img = nib.load(tmp_path / "v.nii.gz")
    assert img.shape == (4, 3, 2)  # NIfTI (X, Y, Z) = (W, H, D)
    assert tuple(float(z) for z in img.header.get_zooms()) == (1.0, 2.0, 5.0)
    vol = load_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(vol.array, a)
    assert vol.spacing == (5.0, 2.0, 1.0)


def test_patient_from_case_strips_lesion_index():
    assert patient_from_case("MR207602_1") == "MR207602"
    assert patient_from_case("MR207602") == "MR207602"
    assert patient_from_case("P0007_12") == "P0007"


def test_lld_layout_scans_cases_patients_labels(lld):
    cases = layout(lld).scan()
    assert len(cases) == 12 + 3
    by_id = {c.case_id: c for c in cases}
    assert by_id["P0004_1"].patient_id == "P0004"
    assert by_id["P0001"].label == 1
    assert all(set(c.available) == set(PHASES) for c in cases)


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        ("missing", "missing modality 'DWI'"),
        ("unreadable", "unreadable image"),
        ("nan", "NaN/inf voxels"),
        ("constant", "constant image"),
        ("not3d", "not a 3D image"),
    ],
)
def test_bad_volume_errors_name_file_and_reason(lld, tmp_path, corrupt, reason):
    target = lld / "images" / "P0003" / "DWI.nii.gz"
    if corrupt == "missing":
        target.unlink()
    elif corrupt == "unreadable":
        target.write_bytes(gzip.compress(b"this is not nifti"))
    elif corrupt == "nan":
        a = np.ones((6, 16, 16), np.float32)
        a[0, 0, 0] = np.nan
        save_volume(target, a)
    elif corrupt == "constant":
        save_volume(target, np.full((6, 16, 16), 7, np.float32))
    elif corrupt == "not3d":
        import nibabel as nib

        nib.save(nib.Nifti1Image(np.ones((4, 4), np.float32), np.eye(4)), str(target))
    dm = data_module(
        ClassificationDataModule,
        layout(lld),
        preprocess={"shape": [4, 8, 8]},
        cache_dir=tmp_path / "cache",
        split={"n_folds": 2, "test_fraction": 0.0, "save_to": None},
        progress=False,
    )
    with pytest.raises(DataError) as info:
        dm.setup()
    msg = str(info.value)
    assert reason in msg
    assert "P0003" in msg
    if corrupt != "missing":
        assert str(target) in msg


def test_unknown_label_and_duplicate_case_errors(lld):
    labels = lld / "labels.txt"
    original = labels.read_text()
    labels.write_text(original + "P0002 9\n")
    with pytest.raises(DataError, match=r"case 'P0002'.*unknown label '9'"):
        layout(lld).scan()
    labels.write_text(original.replace("P0002 2", "P0002 -1"))
    cases = {c.case_id: c for c in layout(lld).scan()}
    assert cases["P0002"].label is None  # -1 = unlabelled
    labels.write_text(original + "P0002 2\n")
    with pytest.raises(DataError, match="duplicate case ids"):
        layout(lld).scan()


def test_missing_modality_can_be_masked_or_skipped(lld):
    (lld / "images" / "P0003" / "DWI.nii.gz").unlink()
    cases = {c.case_id: c for c in layout(lld, on_missing_modality="mask").scan()}
    assert cases["P0003"].missing == {"DWI"}
    skip = layout(lld, on_missing_modality="skip")
    assert "P0003" not in {c.case_id for c in skip.scan()}
    assert skip.skipped[0][0] == "P0003"


def test_exact_copy_of_another_modality_counts_as_missing(lld):
    src = lld / "images" / "P0005" / "T2WI.nii.gz"
    shutil.copyfile(src, lld / "images" / "P0005" / "C+A.nii.gz")
    cases = {c.case_id: c for c in layout(lld, on_missing_modality="mask", duplicate_source=["T2WI"]).scan()}
    assert cases["P0005"].missing == {"C+A"}
    assert any("exact copy" in n for n in cases["P0005"].notes)


def test_splits_are_by_patient_stratified_seeded_and_saved(lld, tmp_path):
    cases = layout(lld).scan()
    s1 = make_splits(cases, n_folds=3, test_fraction=0.25, seed=3)
    s2 = make_splits(cases, n_folds=3, test_fraction=0.25, seed=3)
    assert s1 == s2
    assert s1 != make_splits(cases, n_folds=3, test_fraction=0.25, seed=4)
    all_patients = [p for f in s1.folds for p in f] + s1.test
    assert len(all_patients) == len(set(all_patients)) == 12
    path = s1.save(tmp_path / "splits.json")
    assert Splits.load(path) == s1
    part = s1.partition(1)
    assert set(part["train"]).isdisjoint(part["val"]) and set(part["val"]).isdisjoint(part["test"])
    # nested CV (no test split): fold k tests, fold k+1 validates
    nested = make_splits(cases, n_folds=3, test_fraction=0.0, seed=0)
    p0 = nested.partition(0)
    assert p0["test"] == nested.folds[0] and p0["val"] == nested.folds[1]


def test_patient_in_two_splits_is_rejected(lld, tmp_path):
    cases = layout(lld).scan()
    s = make_splits(cases, n_folds=2, test_fraction=0.0, seed=0)
    s.folds[1].append(s.folds[0][0])
    path = tmp_path / "bad.json"
    import json

    from liverfusion.data.splits import SPLIT_FORMAT

    path.write_text(json.dumps({"format": SPLIT_FORMAT, **s.__dict__}))
    with pytest.raises(DataError, match=rf"patient '{s.folds[0][0]}' is in two splits"):
        Splits.load(path)


def test_cache_keyed_by_content_and_config(lld, tmp_path):
    cases = layout(lld).scan()[:3]
    cfg = PreprocessConfig(shape=(4, 8, 8))
    cache = PreprocessedCache(tmp_path / "c", "lld", PHASES, cfg)
    first = cache.build(cases, progress=False)
    assert first[0].load().shape == (3, 4, 8, 8)
    mtime = first[0].path.stat().st_mtime_ns
    again = cache.build(cases, progress=False)
    assert again[0].path == first[0].path and again[0].path.stat().st_mtime_ns == mtime  # not rebuilt
    other_cfg = PreprocessedCache(tmp_path / "c", "lld", PHASES, PreprocessConfig(shape=(4, 8, 12)))
    assert other_cfg.build(cases[:1], progress=False)[0].path != first[0].path
    # a changed file gives a new entry: the cache cannot go stale
    a = load_volume(cases[0].images["DWI"]).array
    save_volume(cases[0].images["DWI"], a + 5, spacing=(3.0, 1.0, 1.0))
    assert cache.build(cases[:1], progress=False)[0].path != first[0].path
    assert clear_cache(tmp_path / "c") > 0
    assert not (tmp_path / "c").exists()


def test_nothing_written_under_data_dir(lld, tmp_path):
    before = sorted((p, p.stat().st_mtime_ns) for p in lld.rglob("*"))
    dm = data_module(
        ClassificationDataModule,
        layout(lld),
        preprocess={"shape": [4, 8, 8]},
        cache_dir=tmp_path / "cache",
        split={"n_folds": 2, "test_fraction": 0.25, "save_to": str(tmp_path / "s.json")},
        batch_size=2,
        progress=False,
        num_workers=0,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 4, 8, 8)
    assert batch["present"].all()
    assert sorted((p, p.stat().st_mtime_ns) for p in lld.rglob("*")) == before
    assert (tmp_path / "s.json").is_file()
    seen = {}
    for name in ("train", "val", "test"):
        for e in dm.part_entries(name):
            assert seen.setdefault(e.patient_id, name) == name  # every lesion of a patient in one split


def test_spacing_mode_resamples_then_fits_shape(tmp_path):
    a = np.random.default_rng(0).normal(size=(10, 40, 40)).astype(np.float32)
    save_volume(tmp_path / "v.nii.gz", a, spacing=(4.0, 1.0, 1.0))
    from liverfusion.data.preprocess import Preprocessor

    pre = Preprocessor(
        PreprocessConfig(
            shape=(16, 16, 16), mode="spacing", target_spacing=(2.0, 2.0, 2.0), normalize="zscore"
        )
    )
    out = pre(load_volume(tmp_path / "v.nii.gz"))
    assert out.shape == (16, 16, 16)
    with pytest.raises(ConfigError, match="target_spacing"):
        PreprocessConfig(mode="spacing")


def test_median_normalisation_is_a_ratio_to_the_dominant_tissue(tmp_path):
    from liverfusion.data.preprocess import Preprocessor

    rng = np.random.default_rng(0)
    liver = rng.normal(500.0, 10.0, size=(8, 16, 16)).astype(np.float32)
    liver[3:5, 6:10, 6:10] = 1000.0  # a lesion twice as bright as the liver
    pre = Preprocessor(PreprocessConfig(shape=(8, 16, 16), normalize="median"))
    outs = []
    for gain in (1.0, 3.7):  # a scanner gain leaves the ratios unchanged
        save_volume(tmp_path / f"g{gain}.nii.gz", liver * gain)
        outs.append(pre(load_volume(tmp_path / f"g{gain}.nii.gz")))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5)
    assert abs(np.median(outs[0]) - 1.0) < 1e-6
    # the lesion keeps its ratio: not clipped, unlike a percentile window
    np.testing.assert_allclose(outs[0][3:5, 6:10, 6:10], 2.0, rtol=0.05)
    # with nonzero the background (zeros around a brain, say) does not count
    brain = np.zeros((8, 16, 16), np.float32)
    brain[:, 4:12, 4:12] = 300.0 + rng.normal(0.0, 1e-3, size=(8, 8, 8))  # an image, not a two-valued mask
    save_volume(tmp_path / "brain.nii.gz", brain)
    nz = Preprocessor(PreprocessConfig(shape=(8, 16, 16), normalize="median", nonzero=True))
    assert nz(load_volume(tmp_path / "brain.nii.gz")).max() == pytest.approx(1.0, abs=1e-4)


def test_median_normalisation_of_a_mostly_empty_volume_names_the_file(lld, tmp_path):
    target = lld / "images" / "P0003" / "DWI.nii.gz"
    a = np.zeros((6, 16, 16), np.float32)
    a[:2, :4, :4] = 5.0  # median 0: most voxels carry no signal
    a[0, 0, 0] = 6.0  # three values: an image, not a two-valued mask
    save_volume(target, a)
    dm = data_module(
        ClassificationDataModule,
        layout(lld),
        preprocess={"shape": [4, 8, 8], "normalize": "median"},
        cache_dir=tmp_path / "cache",
        split={"n_folds": 2, "test_fraction": 0.0, "save_to": None},
        progress=False,
    )
    with pytest.raises(DataError, match="positive median") as info:
        dm.setup()
    assert "P0003" in str(info.value) and str(target) in str(info.value)


def test_union_and_folder_layouts(lld, tmp_path):
    for i in range(2):
        save_volume(tmp_path / "pool" / f"image_{i}.nii.gz", np.random.rand(4, 8, 8).astype(np.float32))
    folder = FolderLayout(tmp_path / "pool", {"T2WI": "image_*.nii.gz"}, name="pool")
    union = UnionLayout([layout(lld, name="lld"), folder])
    cases = union.scan()
    pool = [c for c in cases if c.dataset == "pool"]
    assert len(pool) == 2 and pool[0].case_id.startswith("pool:") and pool[0].missing == {"DWI", "C+A"}
    assert pool[0].label is None


def test_generic_layout_columns_and_label_map(tmp_path):
    root = tmp_path / "gen"
    rows = ["id,pid,grade,has_b"]
    for i in range(4):
        for m in ("a", "b"):
            save_volume(
                root / "subjects" / f"c{i}" / f"{m}.nii.gz", np.random.rand(4, 8, 8).astype(np.float32)
            )
        rows.append(f"c{i},p{i // 2},{1 + i % 2},{i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    gl = GenericLayout(
        root,
        ["a", "b"],
        ["low", "high"],
        id_column="id",
        patient_column="pid",
        label_column="grade",
        label_map={1: "low", 2: "high"},
        missing_flags={"b": "has_b"},
        on_missing_modality="mask",
    )
    cases = {c.case_id: c for c in gl.scan()}
    assert cases["c0"].label == 0 and cases["c1"].label == 1
    assert cases["c0"].missing == {"b"} and cases["c1"].missing == set()
    assert cases["c3"].patient_id == "p1"
    bad = GenericLayout(root, ["a"], ["low"], id_column="nope")
    with pytest.raises(DataError, match=r"columns \['nope'"):
        bad.scan()


def test_a_file_is_hashed_once_per_process_and_again_when_it_changes(tmp_path):
    from liverfusion.data import io

    path = tmp_path / "x.bin"
    path.write_bytes(b"a" * 1000)
    first = io.file_digest(path)
    reads = io._digest.cache_info().misses
    assert (
        io.file_digest(path) == first and io._digest.cache_info().misses == reads
    )  # remembered, not re-read
    path.write_bytes(b"b" * 1000)  # same size, new content: the stat changes, so the digest is computed again
    assert io.file_digest(path) != first
    copy = tmp_path / "y.bin"
    copy.write_bytes(b"b" * 1000)
    assert io.file_digest(copy) == io.file_digest(path)  # content, not identity, is what the digest says


def test_prepare_data_then_setup_lists_and_checks_the_data_set_once(lld, tmp_path, monkeypatch):
    """Lightning calls prepare_data then setup in one process: the second does not scan (and hash) every file
    again, which on a large archive is most of the time to the first step; a process that only sets up scans."""
    lay = layout(lld)
    scans = []
    real = type(lay).scan
    monkeypatch.setattr(type(lay), "scan", lambda self: scans.append(1) or real(self))
    kw = dict(preprocess={"shape": [4, 8, 8]}, cache_dir=tmp_path / "cache", batch_size=2, progress=False)
    dm = data_module(ClassificationDataModule, lay, **kw)
    dm.prepare_data()
    dm.setup()
    assert len(scans) == 1 and dm.entries and dm.partition["train"]
    other = data_module(ClassificationDataModule, lay, **kw)  # a DDP rank > 0: setup alone
    other.setup()
    assert len(scans) == 2 and sorted(other.entries) == sorted(dm.entries)
    assert {k: v.path for k, v in other.entries.items()} == {k: v.path for k, v in dm.entries.items()}
