"""Own data as a user brings it: a folder outside the repository, ``./conf/data/<name>.yaml`` (written by
``data.init`` or from the template), modality file names as people spell them, the per-user cache."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from liverfusion.data import init as data_init
from liverfusion.data.cache import default_cache_dir
from liverfusion.data.io import save_volume
from liverfusion.data.layouts import GenericLayout, LLDMMRILayout
from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.hydra_utils import CONFIG_DIR, normalize_overrides

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": ""}
SHAPE = (16, 32, 32)


def write_generic(root: Path, n: int = 56, spell: dict[str, str] | None = None, seed: int = 0) -> Path:
    """``<root>/subjects/<case>/<file>`` for t2, adc, t1_post (spelled as ``spell`` says) + mask, and a CSV with
    the columns ``case_id, patient_id, age, diagnosis, has_adc``; class = which modality carries a bright blob."""
    rng = np.random.default_rng(seed)
    spell = spell or {}
    rows = []
    for i in range(n):
        case, label = f"S{i:03d}", i % 2
        for j, m in enumerate(("t2", "adc", "t1_post")):
            a = rng.normal(100, 10, size=SHAPE).astype(np.float32)
            if j == label:
                a[4:10, 8:20, 8:20] += 80
            save_volume(
                root / "subjects" / case / spell.get(m, f"{m}.nii.gz"), a, (3.0, 1.0, 1.0), dtype=np.int16
            )
        mask = np.zeros(SHAPE, np.uint8)
        mask[4:10, 8:20, 8:20] = 1
        save_volume(root / "subjects" / case / "mask.nii.gz", mask, (3.0, 1.0, 1.0))
        rows.append(
            {
                "case_id": case,
                "patient_id": f"P{i:03d}",
                "age": 40 + i,
                "diagnosis": ["benign", "malignant"][label],
                "has_adc": 1,
            }
        )
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def compose_data(config: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides=normalize_overrides(config, overrides))


# ---- modality file names ---------------------------------------------------------------------------------------
def test_phase_files_match_ignoring_case_and_spaces_vs_underscores(tmp_path):
    """A re-post's ``In phase.nii.gz`` / ``out_Phase.nii.gz`` are the ``In Phase`` / ``Out Phase`` phases."""
    a = np.full(SHAPE, 100, np.float32) + np.arange(SHAPE[2], dtype=np.float32)
    for case in ("A1", "A2"):
        save_volume(tmp_path / "images" / case / "In phase.nii.gz", a)
        save_volume(tmp_path / "images" / case / "out_Phase.nii.gz", a * 2)
    (tmp_path / "labels.txt").write_text("A1 0\nA2 1\n")
    cases = LLDMMRILayout(tmp_path, modalities=["In Phase", "Out Phase"], class_names=["x", "y"]).scan()
    assert [c.missing for c in cases] == [set(), set()]
    assert cases[0].images["In Phase"].name == "In phase.nii.gz"
    assert cases[0].images["Out Phase"].name == "out_Phase.nii.gz"


def test_generic_modality_files_match_loosely(tmp_path):
    root = write_generic(tmp_path, n=4, spell={"t1_post": "T1 Post.nii.gz", "adc": "ADC.nii.gz"})
    layout = GenericLayout(
        root,
        ["t2", "adc", "t1_post"],
        ["benign", "malignant"],
        id_column="case_id",
        label_column="diagnosis",
        patient_column="patient_id",
        mask_file="Mask.nii.gz",
    )
    cases = layout.scan()
    assert all(not c.missing for c in cases)
    assert cases[0].images["t1_post"].name == "T1 Post.nii.gz" and cases[0].mask.name == "mask.nii.gz"


def test_two_files_matching_one_modality_is_an_error_naming_both(tmp_path):
    a = np.full(SHAPE, 100, np.float32) + np.arange(SHAPE[2], dtype=np.float32)
    save_volume(tmp_path / "images" / "A1" / "In Phase.nii.gz", a)
    save_volume(tmp_path / "images" / "A1" / "in_phase.nii.gz", a)
    (tmp_path / "labels.txt").write_text("A1 0\n")
    with pytest.raises(DataError) as err:
        LLDMMRILayout(tmp_path, modalities=["In Phase"], class_names=["x"]).scan()
    text = str(err.value)
    assert "'In Phase.nii.gz'" in text and "'in_phase.nii.gz'" in text and "case 'A1'" in text
    assert "In Phase" in text and err.value.fix


# ---- data.init, the template, prepare's output -----------------------------------------------------------------
def test_data_init_guesses_a_working_data_yaml(tmp_path, monkeypatch, capsys):
    root = write_generic(tmp_path / "study", n=6, spell={"t1_post": "T1 post.nii.gz"})
    (root / "subjects" / "S000" / "extra_scout.nii.gz").write_bytes(b"")  # in one case only: left out
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert data_init.main([str(root), "out=conf/data/mine.yaml"]) == 0
    printed = capsys.readouterr().out
    assert "wrote conf/data/mine.yaml (use it as data=mine)" in printed and "extra_scout" in printed
    cfg = OmegaConf.load(work / "conf" / "data" / "mine.yaml")
    layout = cfg.layout
    assert sorted(layout.modalities) == ["T1 post", "adc", "t2"]  # as the files spell it
    assert (layout.id_column, layout.label_column, layout.patient_column) == (
        "case_id",
        "diagnosis",
        "patient_id",
    )
    assert list(layout.class_names) == ["benign", "malignant"] and layout.missing_flags == {"adc": "has_adc"}
    assert layout.mask_file == "mask.nii.gz" and list(cfg.preprocess.shape) == list(SHAPE)
    data = compose_data(
        "check", ["data=mine", f"paths.cache_dir={tmp_path / 'cache'}"]
    ).data  # found in ./conf
    cases = instantiate(data.layout).scan()
    assert len(cases) == 6 and all(not c.missing for c in cases)
    # a second run does not replace it; unknown options are refused by name
    with pytest.raises(SystemExit) as exit_info:
        data_init.main([str(root), "out=conf/data/mine.yaml"])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'outt=x.yaml' is not one of"):
        data_init.parse_options(["outt=x.yaml"])


def test_data_init_reads_an_lldmmri_layout(tiny_phantom, tmp_path):
    guess = data_init.scan(tiny_phantom)
    assert guess.kind == "lldmmri" and len(guess.modalities) == 8 and "In Phase" in guess.modalities
    text = data_init.render(guess)
    assert "LLDMMRILayout" in text and OmegaConf.create(text).layout.root == str(tiny_phantom)


def test_data_init_without_labels_says_what_to_add(tmp_path):
    root = write_generic(tmp_path / "s", n=2)
    (root / "labels.csv").unlink()
    with pytest.raises(DataError, match="no labels CSV") as err:
        data_init.scan(root)
    assert "labels=" in err.value.fix


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        head, sep, tail = text.partition(f"  {key}: ???")
        assert sep, key
        text = f"{head}  {key}: {value}{tail}"
    return text


def test_the_template_filled_in_loads_from_the_working_directory(tmp_path, monkeypatch):
    root = write_generic(tmp_path / "study", n=4)
    template = (Path(CONFIG_DIR) / "data" / "template.yaml").read_text()
    for line in template.splitlines():  # every key is explained
        if line.startswith("  ") and ":" in line and not line.strip().startswith("-"):
            assert "#" in line or line.strip().startswith("_target_"), line
    text = _fill(
        template,
        {"root": f"'{root}'", "modalities": "[t2, adc, t1_post]", "class_names": "[benign, malignant]"},
    )
    text = text.replace("id_column: case ", "id_column: case_id ").replace(
        "label_column: label ", "label_column: diagnosis "
    )
    text = text.replace("patient_column: patient ", "patient_column: patient_id ")
    (tmp_path / "work" / "conf" / "data").mkdir(parents=True)
    (tmp_path / "work" / "conf" / "data" / "mine.yaml").write_text(text)
    monkeypatch.chdir(tmp_path / "work")
    cfg = compose_data(
        "train", ["+experiment=cgc_finetune", "data=mine", f"paths.cache_dir={tmp_path / 'c'}"]
    )
    assert cfg.data._target_.endswith("ClassificationDataModule")
    cases = instantiate(cfg.data.layout).scan()
    assert [c.label for c in cases] == [0, 1, 0, 1]


def test_prepared_reads_what_prepare_writes(tmp_path):
    """``data=prepared``: subjects/<case>/<modality>.nii.gz + labels.csv with case, patient, label."""
    rows = [("P01", "P01", "1"), ("P01_1", "P01", "0"), ("P02", "P02", "")]
    a = np.full(SHAPE, 100, np.float32) + np.arange(SHAPE[2], dtype=np.float32)
    for case, _, _ in rows:
        for m in ("t2w", "adc"):
            save_volume(tmp_path / "out" / "subjects" / case / f"{m}.nii.gz", a)
    (tmp_path / "out" / "labels.csv").write_text(
        "case,patient,label\n" + "".join(f"{c},{p},{v}\n" for c, p, v in rows)
    )
    cfg = compose_data(
        "check",
        [
            "data=prepared",
            f"data.layout.root={tmp_path / 'out'}",
            "data.layout.modalities=[t2w,adc]",
            "data.layout.class_names=[benign,malignant]",
        ],
    )
    cases = instantiate(cfg.data.layout).scan()
    assert [(c.case_id, c.patient_id, c.label) for c in cases] == [
        ("P01", "P01", 1),
        ("P01_1", "P01", 0),
        ("P02", "P02", None),
    ]
    assert cfg.data.layout.clinical is True


# ---- the cache ---------------------------------------------------------------------------------------------------
def test_cache_is_per_user_not_per_launch_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("LIVERFUSION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    seen = set()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        cfg = compose_data("check", ["data=phantom"])
        seen.add(cfg.paths.cache_dir)
    assert seen == {str(tmp_path / "xdg" / "liverfusion")} == {str(default_cache_dir())}
    monkeypatch.setenv("LIVERFUSION_CACHE_DIR", str(tmp_path / "mine"))
    assert (
        compose_data("check", ["data=phantom"]).paths.cache_dir
        == str(tmp_path / "mine")
        == str(default_cache_dir())
    )


# ---- the whole path: an empty folder outside the repository -----------------------------------------------------
def _run_main(module, argv: list[str], monkeypatch) -> None:
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", argv)
    try:
        module.main()
    finally:
        GlobalHydra.instance().clear()


def test_own_data_from_an_empty_folder(tmp_path, monkeypatch):
    """Only ./conf/data/mine.yaml (written by data.init) beside a copy of the data: data.check (the console script,
    a real process), a debug=fast pre-training and a debug=fast scratch fine-tune, without --config-dir."""
    from liverfusion import train

    data = write_generic(tmp_path / "data_copy", n=56)
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LIVERFUSION_CACHE_DIR", str(tmp_path / "cache"))
    assert data_init.main([str(data), "out=conf/data/mine.yaml"]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["conf"]
    script = Path(sys.executable).with_name("liverfusion-check")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "liverfusion.data.check"]
    env = {**ENV, "LIVERFUSION_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([*cmd, "data=mine"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "56" in out.stdout and "error" not in out.stderr
    _run_main(
        train, ["liverfusion-train", "+experiment=simsiam_pretrain", "data=mine", "debug=fast"], monkeypatch
    )
    _run_main(
        train,
        ["liverfusion-train", "+experiment=cgc_finetune", "data=mine", "model.init=scratch", "debug=fast"],
        monkeypatch,
    )
    encoders = list((work / "logs" / "debug" / "simsiam_pretrain").rglob("encoder.pt"))
    tested = list((work / "logs" / "debug" / "cgc_finetune").rglob("test/metrics.json"))
    assert len(encoders) == 1 and len(tested) == 1


@pytest.mark.shared_data
def test_own_copy_of_lgg_from_an_empty_folder(shared_data, tmp_path):
    """The issue's "done when", exactly: a copy of ../shared/data/lgg_tcga_3seq_dev, conf/data/mine.yaml written by
    data.init, and the three commands as a user types them, each a real process in a folder outside the repo."""
    from tests.helpers import shared_subdir

    copy = tmp_path / "lgg_copy"
    shutil.copytree(shared_subdir(shared_data, "lgg_tcga_3seq_dev"), copy)
    work = tmp_path / "empty"
    work.mkdir()
    env = {**ENV, "LIVERFUSION_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [sys.executable, "-m", *args], cwd=work, env=env, capture_output=True, text=True, timeout=900
        )
        assert out.returncode == 0, f"{args}: {out.stderr[-3000:]}"
        return out

    run("liverfusion.data.init", str(copy), "out=conf/data/mine.yaml")
    text = (work / "conf" / "data" / "mine.yaml").read_text()
    assert '"neoplasm_histologic_grade"' in text and '"case_folder"' in text and "has_t1_pre" in text
    assert "70" in run("liverfusion.data.check", "data=mine").stdout
    run("liverfusion.train", "+experiment=simsiam_pretrain", "data=mine", "debug=fast")
    run("liverfusion.train", "+experiment=cgc_finetune", "data=mine", "model.init=scratch", "debug=fast")
    assert list((work / "logs" / "debug" / "simsiam_pretrain").rglob("encoder.pt"))
    assert list((work / "logs" / "debug" / "cgc_finetune").rglob("test/metrics.json"))
