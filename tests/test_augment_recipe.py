"""One MDA augmentation recipe (conf/augment/_mda_recipe.yaml), two pipelines: per view (mda_cpu) and split
between the loader and the device (mda_batched). Both must draw from the same ranges, and the per-view pipeline is
exactly the list the YAML spelled out before the recipe existed."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)

from liverfusion.data.augment_recipe import device_part, loader_part, per_view
from liverfusion.data.batched_monai import (
    BatchRandBiasField,
    BatchRandGaussianSmooth,
    BatchRandScaleCropResize,
)
from liverfusion.data.transforms import BatchCompose, BatchRandAffine, BatchRandFlip, BatchRandIntensity
from liverfusion.errors import ConfigError
from liverfusion.utils.config_sections import model_config
from liverfusion.utils.hydra_utils import CONFIG_DIR

SHAPE = [8, 24, 24]
RECIPE = model_config("_mda_recipe", group="augment")["augment"]["recipe"]


def only(section: str, **values) -> dict:
    """The recipe with every transform off except ``section`` (probability 1 unless given)."""
    r = {k: ({**v, "prob": 0.0} if "prob" in v else dict(v)) for k, v in RECIPE.items()}
    r[section] = {**r[section], "prob": 1.0, **values}
    return r


def test_per_view_is_the_recipe_as_the_yaml_spelled_it():
    """Seeded outputs equal the explicit MONAI list of the former conf/augment/mda_cpu.yaml."""
    sigma = [0.5, 1.0]
    explicit = [
        RandScaleCrop(
            roi_scale=[0.75, 0.6, 0.6], max_roi_scale=[1.0] * 3, random_size=True, random_center=True
        ),
        Resize(spatial_size=SHAPE, mode="trilinear"),
        RandFlip(prob=0.5, spatial_axis=1),
        RandFlip(prob=0.5, spatial_axis=2),
        RandAffine(
            prob=0.5, rotate_range=[0.26, 0.0, 0.0], scale_range=[0.0, 0.1, 0.1], padding_mode="zeros"
        ),
        RandAdjustContrast(prob=0.5, gamma=[0.7, 1.5]),
        RandScaleIntensity(prob=0.5, factors=0.2),
        RandShiftIntensity(prob=0.5, offsets=0.1),
        RandGaussianNoise(prob=0.3, std=0.05),
        RandGaussianSmooth(prob=0.2, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma),
        RandBiasField(prob=0.3, coeff_range=[0.0, 0.2]),
    ]
    x = torch.rand(1, 12, 30, 30)
    for seed in range(4):
        a, b = Compose(per_view(RECIPE, SHAPE)), Compose(explicit)
        a.set_random_state(seed)
        b.set_random_state(seed)
        assert torch.equal(torch.as_tensor(a(x.clone())), torch.as_tensor(b(x.clone())))


def test_loader_and_device_parts_split_the_recipe():
    loader = [type(t) for t in loader_part(RECIPE, SHAPE)]
    assert loader == [RandScaleCrop, Resize, RandGaussianSmooth, RandBiasField]
    device = device_part(RECIPE)
    assert [type(t).__name__ for t in device] == [
        "BatchRandFlip",
        "BatchRandAffine",
        "BatchRandIntensity",
        "BatchRandGaussianNoise",
    ]
    flip, affine, intensity, noise = device
    views = [t for t in per_view(RECIPE, SHAPE) if isinstance(t, RandFlip)]
    assert len(views) == len(flip.spatial_axes) and all(t.prob == flip.prob for t in views)
    grid = next(t for t in per_view(RECIPE, SHAPE) if isinstance(t, RandAffine)).rand_affine_grid
    assert grid.rotate_range == (affine.rotate, 0.0, 0.0)  # MONAI draws in [-r, r]; the batched one too
    assert list(grid.scale_range) == affine.scale
    contrast = next(t for t in per_view(RECIPE, SHAPE) if isinstance(t, RandAdjustContrast))
    assert tuple(contrast.gamma) == tuple(intensity.gamma)
    assert noise.std == next(t for t in per_view(RECIPE, SHAPE) if isinstance(t, RandGaussianNoise)).std


@pytest.mark.parametrize(
    ("section", "bound"),
    [("scale_intensity", RECIPE["scale_intensity"]["factor"]), ("shift_intensity", None)],
)
def test_both_pipelines_draw_intensity_from_the_same_range(section, bound):
    """On a constant volume the drawn factor / offset is readable: both pipelines span the recipe's range."""
    r = only(section)
    bound = bound if bound is not None else r["shift_intensity"]["offset"]
    ones = torch.ones(1, *SHAPE)
    t = Compose([x for x in per_view(r, SHAPE) if not isinstance(x, RandScaleCrop | Resize)])
    t.set_random_state(0)
    per = torch.tensor([float(torch.as_tensor(t(ones.clone())).mean()) - 1.0 for _ in range(300)])
    batched = BatchCompose(device_part(r))(
        torch.ones(300, 1, *SHAPE), generator=torch.Generator().manual_seed(0)
    )
    dev = batched.flatten(1).mean(1) - 1.0
    for drawn in (per, dev):
        assert drawn.abs().max() <= bound + 1e-5
        assert drawn.min() < -0.8 * bound and drawn.max() > 0.8 * bound  # the whole range is used, both sides


def test_zero_probability_leaves_a_transform_out_and_unknown_keys_are_refused():
    assert not any(isinstance(t, RandGaussianNoise) for t in per_view(only("flip"), SHAPE))
    assert [type(t) for t in device_part(only("affine"))] == [BatchRandAffine]
    with pytest.raises(ConfigError, match="unknown key"):
        per_view({**RECIPE, "noise": {**RECIPE["noise"], "sd": 0.1}}, SHAPE)
    with pytest.raises(ConfigError, match="missing key"):
        device_part({k: v for k, v in RECIPE.items() if k != "flip"})


@pytest.mark.parametrize("option", ["mda_cpu", "mda_batched", "mda_spatial", "mda_device"])
def test_augment_options_compose_from_the_one_recipe(option):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "+experiment=simsiam_pretrain",
                f"augment={option}",
                "paths.output_dir=/tmp/x",
                "data.augment.recipe.noise.std=0.07",  # one number, seen by whichever pipeline runs noise
            ],
        )
    loader = instantiate(cfg.data.augment)
    device = instantiate(cfg.data.batch_augment) if cfg.data.batch_augment is not None else []
    assert all(callable(t) for t in [*loader, *device])
    if option == "mda_cpu":
        assert next(t for t in loader if isinstance(t, RandGaussianNoise)).std == 0.07 and not device
    elif option == "mda_batched":
        assert device[-1].std == 0.07 and isinstance(device[0], BatchRandFlip)
    elif option == "mda_device":  # the loader does nothing; the device runs mda_batched's two parts in order
        assert loader == [] and device[-1].std == 0.07
        assert [type(t) for t in device] == [
            BatchRandScaleCropResize,
            BatchRandGaussianSmooth,
            BatchRandBiasField,
            *(type(t) for t in device_part(cfg.data.augment.recipe)),
        ]
    else:  # spatial only: no intensity anywhere
        assert [type(t) for t in device] == [BatchRandFlip, BatchRandAffine]
        assert not any(isinstance(t, BatchRandIntensity) for t in device)


def test_mda_device_moves_the_loader_part_to_the_batch_with_the_same_draw_ranges():
    """What mda_batched's workers do per view (crop + resize, smoothing, bias field) is, with mda_device, the first
    batched transforms, with the recipe's numbers: the crop box range, the smoothing sigma range and probability,
    the bias field coefficient range and probability."""
    from liverfusion.data.augment_recipe import device_all

    crop, smooth, bias = device_all(RECIPE)[:3]
    assert crop.roi_scale == list(RECIPE["crop"]["roi_scale"])
    assert crop.max_roi_scale == list(RECIPE["crop"]["max_roi_scale"])
    assert (smooth.prob, smooth.sigma) == (RECIPE["smooth"]["prob"], list(RECIPE["smooth"]["sigma"]))
    assert (bias.prob, bias.coeff_range) == (
        RECIPE["bias_field"]["prob"],
        list(RECIPE["bias_field"]["coeff_range"]),
    )
    x = torch.rand(4, 1, *SHAPE)
    out = BatchCompose(device_all(RECIPE))(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, x)
