"""MDA positive pairs: policies, available modalities only, patient integrity, split hygiene, unions, augmentation
(per view, YAML, batched) and reproducibility."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function, seed_everything

from liverfusion.data.augment_recipe import device_part
from liverfusion.data.datasets import CaseDataset
from liverfusion.data.io import save_volume
from liverfusion.data.layouts import FolderLayout, LLDMMRILayout, UnionLayout
from liverfusion.data.mda import STACK, MDADataModule, PairSampler, ViewDataset, collate_views
from liverfusion.data.transforms import (
    BatchCompose,
    BatchRandAffine,
    BatchRandFlip,
    BatchRandGaussianNoise,
    BatchRandIntensity,
    build_batch_transform,
)
from liverfusion.errors import ConfigError
from liverfusion.utils.config_sections import model_config
from tests.helpers import PHASES, data_module, write_lld_like

SHAPE = (6, 16, 16)
# damaged cases are unlabelled, so they always belong to the pre-training pool ("unlabelled" part)
MISSING_DWI, FILLER_COPY, SINGLE = "P0001", "P0002", "P0003"


def _relabel_unlabelled(root: Path, cases: set[str]) -> None:
    lines = []
    for line in (root / "labels.txt").read_text().splitlines():
        case, label = line.split()
        lines.append(f"{case} {-1 if case in cases else label}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """24 patients (3 classes, some with two lesions) in the LLD-MMRI layout; three damaged, unlabelled cases."""
    root = write_lld_like(tmp_path_factory.mktemp("mda") / "lld", n_patients=24, shape=SHAPE)
    images = root / "images"
    (images / MISSING_DWI / "DWI.nii.gz").unlink()
    shutil.copy(images / FILLER_COPY / "T2WI.nii.gz", images / FILLER_COPY / "C+A.nii.gz")
    (images / SINGLE / "DWI.nii.gz").unlink()
    (images / SINGLE / "C+A.nii.gz").unlink()
    _relabel_unlabelled(root, {MISSING_DWI, FILLER_COPY, SINGLE})
    return root


def tiny_layout(root: Path, name: str = "tiny") -> LLDMMRILayout:
    return LLDMMRILayout(
        root, modalities=PHASES, class_names=["a", "b", "c"], on_missing_modality="mask", name=name
    )


def make_dm(layout, cache: Path, **kw) -> MDADataModule:
    args = {
        "preprocess": {"shape": list(SHAPE), "cache_dtype": "float32"},
        "cache_dir": cache,
        "batch_size": 4,
        "num_workers": 0,
        "progress": False,
        "split": {"n_folds": 3, "test_fraction": 0.25, "seed": 0},
    }
    args.update(kw)
    dm = data_module(MDADataModule, layout, **args)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ---- the sampler ----


def test_cross_draws_two_different_present_modalities():
    s = PairSampler(["a", "b", "c", "d"], policy="cross")
    g = torch.Generator().manual_seed(0)
    pairs = [s.draw([True, False, True, True], g) for _ in range(600)]
    assert all(a != b for a, b in pairs)
    assert {i for p in pairs for i in p} == {0, 2, 3}  # never the missing modality 1
    ordered = Counter(pairs)
    assert len(ordered) == 6  # every ordered pair of the three present modalities occurs


def test_weights_bias_the_draw_and_zero_excludes():
    s = PairSampler(["a", "b", "c"], policy="same", weights={"a": 3.0, "c": 0.0})
    g = torch.Generator().manual_seed(1)
    counts = Counter(s.draw([True, True, True], g)[0] for _ in range(4000))
    assert counts[2] == 0
    assert 2.6 < counts[0] / counts[1] < 3.4  # 3:1
    with pytest.raises(ConfigError, match="unknown modalities"):
        PairSampler(["a"], weights={"zz": 1.0})
    with pytest.raises(ConfigError, match="policy"):
        PairSampler(["a", "b"], policy="crosss")


def test_same_and_mixed_policies():
    g = torch.Generator().manual_seed(2)
    same = PairSampler(["a", "b", "c"], policy="same")
    assert all(a == b for a, b in (same.draw([True] * 3, g) for _ in range(200)))
    mixed = PairSampler(["a", "b", "c"], policy="mixed", p_cross=0.3)
    share = np.mean([a != b for a, b in (mixed.draw([True] * 3, g) for _ in range(4000))])
    assert 0.26 < share < 0.34
    with pytest.raises(ConfigError, match="p_cross"):
        PairSampler(["a", "b"], policy="mixed", p_cross=1.5)


def test_single_modality_cases_fall_back_or_are_left_out():
    cross = PairSampler(["a", "b"], policy="cross")
    assert not cross.usable([True, False])
    fallback = PairSampler(["a", "b"], policy="cross", fallback_same=True)
    assert fallback.usable([True, False])
    assert fallback.draw([True, False]) == (0, 0)
    assert PairSampler(["a", "b"], policy="same").usable([False, True])


# ---- the data module on a real (tiny) layout ----


def test_pairs_come_from_one_case_of_one_patient_over_many_draws(tiny, cache):
    dm = make_dm(tiny_layout(tiny), cache)
    ds = dm.pair_dataset()
    arrays = {e.case_id: e.load().astype(np.float32) for e in ds.base.entries}
    patient_of = {e.case_id: e.patient_id for e in ds.base.entries}
    seen_patients = set()
    torch.manual_seed(0)
    for _ in range(15):  # 15 epochs of batches: every case drawn many times with random modality pairs
        for batch in dm._loader(ds, shuffle=True, collate_fn=collate_views):
            for i, case in enumerate(batch["case_id"]):
                assert batch["patient_id"][i] == patient_of[case]
                m1, m2 = int(batch["view_modalities"][0][i]), int(batch["view_modalities"][1][i])
                assert m1 != m2
                # both views are exactly this case's volumes (no augmentation configured): nothing from elsewhere
                np.testing.assert_array_equal(batch["views"][0][i, 0].numpy(), arrays[case][m1])
                np.testing.assert_array_equal(batch["views"][1][i, 0].numpy(), arrays[case][m2])
                seen_patients.add(batch["patient_id"][i])
    assert seen_patients == {e.patient_id for e in ds.base.entries}


def test_only_real_modalities_are_drawn(tiny, cache):
    dm = make_dm(tiny_layout(tiny), cache, pairs={"policy": "cross"})
    ds = dm.pair_dataset()
    index = {e.case_id: i for i, e in enumerate(ds.base.entries)}
    dwi, ca = PHASES.index("DWI"), PHASES.index("C+A")
    torch.manual_seed(0)
    drawn_missing = {m for _ in range(200) for m in ds[index[MISSING_DWI]]["view_modalities"].tolist()}
    drawn_copy = {m for _ in range(200) for m in ds[index[FILLER_COPY]]["view_modalities"].tolist()}
    assert dwi not in drawn_missing and drawn_missing == {0, 2}
    assert ca not in drawn_copy and drawn_copy == {0, 1}  # the filler copy of T2WI counts as missing


def test_single_modality_case_left_out_and_counted_or_kept_with_fallback(tiny, cache, caplog):
    dm = make_dm(tiny_layout(tiny), cache, pairs={"policy": "cross"})
    ids = {e.case_id for e in dm.pretrain_entries()}
    assert SINGLE not in ids and dm.left_out == [SINGLE]
    assert dm.pretrain_summary()["left_out"] == 1
    assert "left out" in caplog.text
    kept = make_dm(tiny_layout(tiny), cache, pairs={"policy": "cross", "fallback_same": True})
    ds = kept.pair_dataset()
    i = [e.case_id for e in ds.base.entries].index(SINGLE)
    assert ds[i]["view_modalities"].tolist() == [0, 0] and kept.left_out == []


def test_validation_and_test_patients_never_enter_pretraining(tiny, cache):
    dm = make_dm(tiny_layout(tiny), cache)
    pretrain = {e.patient_id for e in dm.pair_dataset().base.entries}
    held_out = set(dm.partition["val"]) | set(dm.partition["test"])
    assert held_out and pretrain and not pretrain & held_out
    assert pretrain <= set(dm.partition["train"]) | set(dm.partition["unlabelled"])
    bank, query = dm.monitor_datasets()
    assert not {e.patient_id for e in bank.entries} & {e.patient_id for e in query.entries}
    assert {e.patient_id for e in query.entries} <= set(dm.partition["val"])
    for part in (["train", "val"], ["test"]):
        with pytest.raises(ConfigError, match="pretrain_parts"):
            data_module(MDADataModule, tiny_layout(tiny), cache_dir=cache, pretrain_parts=part)


def _one_modality_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        save_volume(
            root / f"image_{i}.nii.gz",
            rng.normal(100, 10, size=SHAPE).astype(np.float32),
            spacing=(3.0, 1.0, 1.0),
        )
    return root


def test_cross_on_a_one_modality_data_set_is_a_clear_error(tmp_path, cache):
    folder = FolderLayout(
        _one_modality_folder(tmp_path / "pool"), patterns={"t2": "image_*.nii.gz"}, name="pool"
    )
    with pytest.raises(ConfigError, match=r"pairs.policy='cross' needs two modalities.*policy=same"):
        make_dm(folder, cache, split={"n_folds": 2, "test_fraction": 0.0})
    dm = make_dm(folder, cache, split={"n_folds": 2, "test_fraction": 0.0}, pairs={"policy": "same"})
    assert len(dm.pair_dataset()) == 6 and dm.val_dataloader() == []  # unlabelled pool: no kNN monitor


def test_union_of_data_sets(tiny, tmp_path, cache):
    folder = FolderLayout(
        _one_modality_folder(tmp_path / "pool", n=4), patterns={"T2WI": "image_*.nii.gz"}, name="pool"
    )
    union = UnionLayout([tiny_layout(tiny, name="lld"), folder], name="union")
    dm = make_dm(union, cache, pairs={"policy": "cross", "fallback_same": True})
    ds = dm.pair_dataset()
    members = Counter(e.case_id.split(":")[0] for e in ds.base.entries)
    assert members["pool"] == 4 and members["lld"] > 10
    torch.manual_seed(0)
    for i, e in enumerate(ds.base.entries):
        item = ds[i]
        assert (
            item["patient_id"] == e.patient_id and item["case_id"].split(":")[0] == e.patient_id.split(":")[0]
        )
        if e.case_id.startswith("pool:"):
            assert item["view_modalities"].tolist() == [0, 0]  # T2WI is the pool's only modality
    strict = make_dm(union, cache, pairs={"policy": "cross"})
    assert len(strict.left_out) == 4 + 1  # the pool's cases and the single-modality lesion


# ---- augmentation ----


def _augment_cfg(extra: list[str] | None = None):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from liverfusion.utils.hydra_utils import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "+experiment=simsiam_pretrain",
                "paths.output_dir=/tmp/x",
                f"data.preprocess.shape={list(SHAPE)}",
                *(extra or []),
            ],
        )
    return instantiate(cfg.data.augment), cfg


def test_yaml_augmentation_keeps_shape_and_views_are_independent(tiny, cache):
    augment, _ = _augment_cfg()
    dm = make_dm(tiny_layout(tiny), cache, augment=augment, pairs={"policy": "same"})
    ds = dm.pair_dataset()
    torch.manual_seed(0)
    item = ds[0]
    v1, v2 = item["views"]
    assert v1.shape == v2.shape == (1, *SHAPE)
    assert item["view_modalities"][0] == item["view_modalities"][1]
    assert not torch.equal(v1, v2)  # same modality, two independent augmentations
    assert type(v1) is torch.Tensor  # plain tensors (no MetaTensor) reach the collate


def _batches(dm: MDADataModule, seed: int, workers: int, n: int = 3) -> list[dict]:
    seed_everything(seed, workers=True)
    loader = dm._loader(dm.pair_dataset(), shuffle=True, drop_last=True, collate_fn=collate_views)
    loader.worker_init_fn = pl_worker_init_function if workers else None
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if i + 1 == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_views_reproduce_under_seed_everything(tiny, cache, workers):
    augment, _ = _augment_cfg()
    dm = make_dm(tiny_layout(tiny), cache, augment=augment, num_workers=workers)
    a, b, c = _batches(dm, 5, workers), _batches(dm, 5, workers), _batches(dm, 6, workers)
    for x, y in zip(a, b):
        assert x["case_id"] == y["case_id"]
        assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"]))
    assert not all(torch.equal(x["views"][0], z["views"][0]) for x, z in zip(a, c))


RECIPE = model_config("_mda_recipe", group="augment")["augment"]["recipe"]
INTENSITY = {"gamma": [0.7, 1.5], "scale": 0.2, "shift": 0.1}


def test_batched_transforms_draw_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, *SHAPE)
    flipped = BatchRandFlip(prob=0.5, spatial_axes=[2])(x, generator=g)
    is_flipped = [torch.equal(flipped[i], x[i].flip(3)) for i in range(64)]
    is_same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    assert all(f or s for f, s in zip(is_flipped, is_same)) and 10 < sum(is_flipped) < 54
    assert torch.allclose(
        BatchRandAffine(prob=0.0, rotate=0.26, scale=[0.0, 0.1, 0.1], padding_mode="zeros")(x, generator=g),
        x,
        atol=1e-5,
    )
    rotated = BatchRandAffine(prob=1.0, rotate=0.3, scale=[0.0, 0.1, 0.1], padding_mode="zeros")(
        x, generator=g
    )
    assert rotated.shape == x.shape and not torch.allclose(rotated, x)
    same = BatchRandIntensity(**INTENSITY, gamma_prob=0.0, scale_prob=0.0, shift_prob=0.0)(x, generator=g)
    assert torch.equal(same, x)
    gamma = BatchRandIntensity(
        **{**INTENSITY, "gamma": [0.5, 2.0]}, gamma_prob=1.0, scale_prob=0.0, shift_prob=0.0
    )(x, generator=g)
    flat_in, flat_out = x.flatten(1), gamma.flatten(1)
    assert torch.allclose(flat_out.amin(1), flat_in.amin(1), atol=1e-5)  # gamma keeps each sample's range
    assert torch.allclose(flat_out.amax(1), flat_in.amax(1), atol=1e-5)
    noisy = BatchRandGaussianNoise(prob=1.0, std=0.1)(x, generator=g)
    assert (noisy - x).std() > 0.01
    pipeline = BatchCompose(device_part(RECIPE))
    r1 = pipeline(x, generator=torch.Generator().manual_seed(3))
    r2 = pipeline(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2)
    with pytest.raises(ConfigError):
        BatchRandFlip(prob=0.5, spatial_axes=[3])
    with pytest.raises(ConfigError):
        build_batch_transform(["not a transform"])


def test_batch_augment_applies_to_training_views_only(tiny, cache):
    dm = make_dm(tiny_layout(tiny), cache, batch_augment=[BatchRandGaussianNoise(prob=1.0, std=0.5)])
    batch = next(iter(dm.train_dataloader()))
    v1, v2 = (v.clone() for v in batch["views"])
    out = dm.on_after_batch_transfer(batch, 0)
    d1, d2 = out["views"][0] - v1, out["views"][1] - v2
    assert d1.abs().sum() > 0 and d2.abs().sum() > 0 and not torch.allclose(d1, d2)
    case_batch = next(iter(dm.val_dataloader()[0]))
    image = case_batch["image"].clone()
    assert torch.equal(dm.on_after_batch_transfer(case_batch, 0)["image"], image)  # monitors see clean cases


def test_case_dataset_items_carry_ids(tiny, cache):
    dm = make_dm(tiny_layout(tiny), cache)
    ds = CaseDataset(dm.part_entries("train"))
    item = ds[0]
    assert {"case_id", "patient_id", "index", "present"} <= set(item)
    assert isinstance(ViewDataset(ds, dm.sampler)[0]["index"], int)


# ---- the example-pair grid ----


def test_pair_grid_png_and_wandb_callback(tiny, cache, tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    from liverfusion.callbacks import PairGridLogger
    from liverfusion.utils.privacy import images_allowed
    from liverfusion.viz.pairs import draw_pairs, save_pairs_png

    dm = make_dm(tiny_layout(tiny), cache)
    ds = dm.pair_dataset()
    state = torch.get_rng_state()
    items = draw_pairs(ds, n=5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # drawing examples leaves the training stream alone
    assert [i["case_id"] for i in items] == [i["case_id"] for i in draw_pairs(ds, n=5, seed=1)]
    path = save_pairs_png(items, dm.modalities, tmp_path / "pairs.png", per_row=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300

    class RecordingWandb(WandbLogger):
        def __init__(self):
            super().__init__(offline=True, save_dir=str(tmp_path))
            self.images = []

        def log_image(self, key, images, **kwargs):
            self.images.append((key, images))

    assert images_allowed("auto", clinical=False) and not images_allowed("auto", clinical=True)
    assert images_allowed(True, clinical=True)
    for clinical, expected in ((False, 1), (True, 0)):
        dm.layout.clinical = clinical
        wandb = RecordingWandb()
        trainer = SimpleNamespace(
            loggers=[wandb], is_global_zero=True, datamodule=dm, train_dataloader=SimpleNamespace(dataset=ds)
        )
        PairGridLogger(n=4).on_train_start(trainer, None)
        assert len(wandb.images) == expected
        if expected:
            key, images = wandb.images[0]
            assert key == "pairs/examples" and images[0].ndim == 3 and images[0].shape[2] == 3
    dm.layout.clinical = False
    quiet = SimpleNamespace(loggers=[], is_global_zero=True, datamodule=dm, train_dataloader=None)
    PairGridLogger().on_train_start(quiet, None)  # no W&B logger: nothing to do, no error


def test_viz_pairs_command_line(tiny, cache, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "grid.png"
    cmd = [
        sys.executable,
        "-m",
        "liverfusion.viz.pairs",
        "data=lldmmri",
        f"data.layout.root={tiny}",
        f"data.layout.modalities=[{','.join(PHASES)}]",
        "data.layout.class_names=[a,b,c]",
        "data.layout.on_missing_modality=mask",
        "data.layout.clinical=false",
        f"data.preprocess.shape=[{','.join(map(str, SHAPE))}]",
        f"data.cache_dir={cache}",
        "data.num_workers=0",
        "data.prep_workers=0",
        "n=4",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and f"pairs written to {out}" in result.stdout
    from hydra import compose, initialize_config_dir

    from liverfusion.utils.hydra_utils import CONFIG_DIR
    from liverfusion.viz.pairs import make_grid

    overrides = [c for c in cmd[3:] if not c.startswith(("hydra.", "data.layout.clinical"))]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("viz_pairs", overrides=[*overrides, "data.layout.clinical=true", "paths.output_dir=/x"])
    with pytest.raises(ConfigError, match="marked clinical"):
        make_grid(cfg)


@pytest.mark.shared_data
def test_chaos_one_modality_cross_fails_clearly_same_works(shared_data):
    """The real CHAOS pool (20 T2-SPIR volumes, one modality, no labels) under the pre-training experiment."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from liverfusion.utils.hydra_utils import CONFIG_DIR

    def data_module(*extra):
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    "+experiment=simsiam_pretrain",
                    "data=chaos",
                    "paths.output_dir=/x",
                    f"paths.shared_data_dir={shared_data}",
                    "data.split.save_to=null",
                    "data.num_workers=0",
                    *extra,
                ],
            )
        return instantiate(cfg.data, progress=False)

    with pytest.raises(ConfigError, match=r"pairs.policy='cross' needs two modalities.*'chaos'.*policy=same"):
        data_module().setup("fit")
    for extra in (["data.pairs.policy=same"], ["data.pairs.fallback_same=true"]):
        dm = data_module(*extra)
        dm.setup("fit")
        ds = dm.pair_dataset()
        assert len(ds) == 20 and dm.left_out == [] and dm.val_dataloader() == []
        item = ds[0]
        assert item["view_modalities"].tolist() == [0, 0] and item["views"][0].shape == (1, 16, 96, 96)


# ---- phase-aware policies: hybrid (anchor, other phase, same phase) and stack (whole multi-phase case) ----


def test_hybrid_views_are_anchor_cross_and_same(tiny, cache):
    dm = make_dm(tiny_layout(tiny), cache, pairs={"policy": "hybrid"})
    assert dm.view_plan == {"policy": "hybrid", "views": 3, "kind": "modality"}
    ds = dm.pair_dataset()
    arrays = {e.case_id: e.load().astype(np.float32) for e in ds.base.entries}
    torch.manual_seed(0)
    batch = next(iter(dm._loader(ds, shuffle=True, collate_fn=collate_views)))
    assert len(batch["views"]) == 3 and len(batch["view_modalities"]) == 3
    a, b, c = (m.tolist() for m in batch["view_modalities"])
    assert a == c and all(x != y for x, y in zip(a, b))
    for i, case in enumerate(batch["case_id"]):  # no augmentation configured: views are the case's volumes
        for v, m in zip(batch["views"], (a, b, c)):
            np.testing.assert_array_equal(v[i, 0].numpy(), arrays[case][m[i]])
    assert SINGLE in dm.left_out  # one real modality: no cross-phase pair


def test_stack_views_share_spatial_draw_and_draw_intensity_per_phase(tiny, cache):
    augment, _ = _augment_cfg()
    dm = make_dm(tiny_layout(tiny), cache, augment=augment, pairs={"policy": "stack"})
    assert dm.view_plan == {"policy": "stack", "views": 2, "kind": "stack"}
    ds = dm.pair_dataset()
    i = [e.case_id for e in ds.base.entries].index(MISSING_DWI)
    torch.manual_seed(1)
    item = ds[i]
    v1, v2 = item["views"]
    assert v1.shape == v2.shape == (len(PHASES), *SHAPE) and item["view_modalities"].tolist() == [
        STACK,
        STACK,
    ]
    assert not torch.equal(v1, v2)  # two independent draws
    assert torch.count_nonzero(v1[PHASES.index("DWI")]) == 0  # an absent phase stays zero
    assert SINGLE in {e.case_id for e in ds.base.entries}  # a stack needs one real phase, not two


def test_stack_spatial_part_is_one_draw_for_all_phases(tiny, cache):
    from monai.transforms import RandFlip, RandScaleIntensity

    flip = [RandFlip(prob=0.5, spatial_axis=2)]
    dm = make_dm(tiny_layout(tiny), cache, augment=flip, pairs={"policy": "stack"})
    ds = dm.pair_dataset()
    e = ds.base.entries[0]
    x = torch.from_numpy(e.load().astype(np.float32)) * torch.tensor(e.present).view(-1, 1, 1, 1)
    torch.manual_seed(0)
    for _ in range(12):
        v = ds[0]["views"][0]
        assert torch.equal(v, x) or torch.equal(v, x.flip(3))  # all phases flipped together, or none
    bad = make_dm(
        tiny_layout(tiny), cache, augment=[RandScaleIntensity(factors=0.1), *flip], pairs={"policy": "stack"}
    )
    with pytest.raises(ConfigError, match="spatial transform must come before"):
        bad.pair_dataset()


def test_batched_stack_augment_keeps_absent_phases_zero(tiny, cache):
    dm = make_dm(
        tiny_layout(tiny),
        cache,
        pairs={"policy": "stack"},
        batch_augment=[BatchRandIntensity(**INTENSITY, gamma_prob=0.5, scale_prob=0.5, shift_prob=1.0)],
    )
    seen_absent = 0
    for batch in dm.train_dataloader():
        out = dm.on_after_batch_transfer(batch, 0)
        absent = ~out["present"]
        seen_absent += int(absent.sum())
        for v in out["views"]:
            assert torch.count_nonzero(v[absent]) == 0  # the shift is drawn per phase, never on absent ones
    assert seen_absent > 0


def test_phase_aware_policies_refuse_one_modality_data_and_unknown_policies():
    with pytest.raises(ConfigError, match=r"policy='stack' needs a data set with two or more modalities"):
        PairSampler(["T2WI"], policy="stack")
    with pytest.raises(ConfigError, match=r"policy='hybrid' needs"):
        PairSampler(["T2WI"], policy="hybrid")
    with pytest.raises(
        ConfigError, match=r"unknown policy 'stak'.*'cross', 'same', 'mixed', 'hybrid', 'stack'"
    ):
        PairSampler(["a", "b"], policy="stak")


def test_mda_device_views_leave_the_loader_as_cached_and_are_augmented_after_transfer(tiny, cache):
    """augment=mda_device: the workers hand over the cached phases untouched, the whole recipe runs on the batch
    (stack views: one crop box shared by a view's phases, absent phases still zero)."""
    from liverfusion.data.augment_recipe import device_all, no_loader_part
    from liverfusion.utils.config_sections import model_config

    recipe = model_config("_mda_recipe", group="augment")["augment"]["recipe"]
    for policy in ("cross", "stack"):
        dm = make_dm(
            tiny_layout(tiny),
            cache,
            augment=no_loader_part(recipe),
            batch_augment=device_all(recipe),
            pairs={"policy": policy},
        )
        batch = next(iter(dm.train_dataloader()))
        raw = CaseDataset(dm.pretrain_entries())
        first = raw.entries.index(next(e for e in raw.entries if e.case_id == batch["case_id"][0]))
        m = batch["view_modalities"][0][0] if policy == "cross" else None
        cached = raw[first]["image"] if m is None else raw[first]["image"][int(m)][None]
        assert torch.equal(batch["views"][0][0], cached)  # nothing ran per view in the loader
        before = [v.clone() for v in batch["views"]]
        out = dm.on_after_batch_transfer(batch, 0)
        assert all(a.shape == b.shape and not torch.equal(a, b) for a, b in zip(out["views"], before))
        if policy == "stack":
            absent = ~out["present"]
            assert all(torch.count_nonzero(v[absent]) == 0 for v in out["views"])
