"""The bad-input battery (issue 14): every command-line entry point, one case per kind of bad input, in one place.

Each case runs the real entry point (``main`` with its argv, in-process; three subprocesses for what only a fresh
interpreter shows) and asserts: the exit status, no traceback on stdout or stderr, the offending file or key named in
the message, and every input file byte-identical afterwards (sha256 before and after). Also here: the salt given on
the command line never lands in clear in a run's files, and valid paths with spaces and non-ASCII letters work.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from liverfusion.data.io import save_volume
from liverfusion.data.layouts import LLDMMRILayout
from liverfusion.data.splits import SPLIT_FORMAT, make_splits
from liverfusion.errors import ConfigError
from liverfusion.utils.run_folder import salt_matches
from tests.helpers import PHASES, data_module, write_lld_like
from tests.test_prepare_bad_inputs import (
    all_nan,
    binary_mask,
    complex_data,
    constant,
    text_file,
    truncated_gzip,
    write_case,
)

REPO = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "fixtures" / "legacy_main"
SSL_CKPT = LEGACY / "ssl" / "checkpoints" / "last.ckpt"
CLASSIFIER = LEGACY / "cgc" / "checkpoints" / "best_epoch000.ckpt"
SHAPE = (4, 8, 8)
CLASSES = ["a", "b", "c"]


# ---- helpers ---------------------------------------------------------------------------------------------------
def q(path: Path | str) -> str:
    """A path as a Hydra override value (quoted: spaces, commas and non-ASCII letters need it)."""
    return f"'{path}'"


def digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under every input path (what 'the input tree is unchanged' means)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def logging_kept() -> Iterator[None]:
    """Hydra's job logging reconfigures (or disables) the process's loggers; put them back for the next test. A
    handler a library bound at import to an earlier test's (closed) capture stream would print a logging error with a
    traceback: not the entry point's, so those are muted (``logging.raiseExceptions``) for the call."""
    root = logging.getLogger()
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    saved_root = (root.level, list(root.handlers))
    loggers = {n: lg for n, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    saved = {n: (lg.disabled, lg.level, list(lg.handlers), lg.propagate) for n, lg in loggers.items()}
    try:
        yield
    finally:
        logging.raiseExceptions = raise_exceptions
        for h in root.handlers:
            if h not in saved_root[1]:
                h.close()
        root.handlers[:] = saved_root[1]
        root.setLevel(saved_root[0])
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if not isinstance(lg, logging.Logger):
                continue
            disabled, level, handlers, propagate = saved.get(name, (False, logging.NOTSET, [], True))
            lg.disabled, lg.propagate = disabled, propagate
            lg.setLevel(level)
            lg.handlers[:] = handlers


# entry point -> (module, how it takes its arguments): "hydra" reads sys.argv, "argv" takes a list
ENTRY = {
    "train": ("liverfusion.train", "hydra"),
    "data.check": ("liverfusion.data.check", "hydra"),
    "prepare": ("liverfusion.prepare.__main__", "hydra"),
    "synth": ("liverfusion.synth", "hydra"),
    "viz.pairs": ("liverfusion.viz.pairs", "hydra"),
    "resume": ("liverfusion.resume", "argv"),
    "report": ("liverfusion.report", "argv"),
}
for _module, _ in ENTRY.values():  # imported at collection: libraries bind their log handlers to pytest's own
    importlib.import_module(_module)  # streams, not to a test's capsys stream closed after it


def run_in_process(cli: str, args: list[str], capsys) -> tuple[int, str]:
    """Call the entry point as its console script would; its exit status and everything it printed."""
    module, style = ENTRY[cli]
    main = importlib.import_module(module).main
    GlobalHydra.instance().clear()
    argv = sys.argv
    code: int | str | None = 0
    capsys.readouterr()
    try:
        with logging_kept():
            if style == "hydra":
                sys.argv = [cli, *args]
                main()
            else:
                code = main(args)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    out = capsys.readouterr()
    return (code if isinstance(code, int) else 1), out.out + out.err


def lld_args(root: Path, tmp: Path) -> list[str]:
    """Overrides pointing data=lldmmri at a tiny LLD-MMRI-layout set (3 phases, 3 classes, 4x8x8)."""
    return [
        "data=lldmmri",
        f"data.layout.root={q(root)}",
        f"data.layout.modalities=[{','.join(PHASES)}]",
        f"data.layout.class_names=[{','.join(CLASSES)}]",
        "data.layout.clinical=false",
        f"data.preprocess.shape=[{','.join(map(str, SHAPE))}]",
        f"data.cache_dir={q(tmp / 'cache')}",
        "data.num_workers=0",
        "data.prep_workers=0",
        "data.split.n_folds=2",
        "data.split.test_fraction=0.25",
    ]


def train_args(root: Path, tmp: Path) -> list[str]:
    """A tiny classifier run from random weights on the LLD-like set, its run folder under ``tmp``."""
    return [
        "+experiment=cgc_finetune",
        "model.init=scratch",
        *lld_args(root, tmp),
        "data.batch_size=2",
        "model.encoder.widths=[4,8,8,8]",
        "model.fusion.width=4",
        "logger=none",
        "extras.print_config=false",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "test=false",
        f"paths.log_dir={q(tmp / 'logs')}",
        f"hydra.run.dir={q(tmp / 'run')}",
    ]


@pytest.fixture(scope="module")
def lld_base(tmp_path_factory) -> Path:
    return write_lld_like(tmp_path_factory.mktemp("battery") / "lld", n_patients=6, shape=SHAPE)


def split_payload(root: Path) -> dict:
    cases = LLDMMRILayout(root, modalities=PHASES, class_names=CLASSES).scan()
    s = make_splits(cases, n_folds=2, test_fraction=0.25, seed=0)
    return {"format": SPLIT_FORMAT, **s.__dict__}


class _Payload:  # a pickle that would write a file when unpickled by an unsafe load
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


# ---- the cases ---------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    args: list[str]
    inputs: list[Path]
    named: list[str]  # each must appear in the output
    code: int = 2


def _data(tmp: Path, base: Path) -> Path:
    root = tmp / "data"
    shutil.copytree(base, root)
    return root


def _broken_phase(tmp: Path, base: Path, breaker: Callable[[Path], Path], problem: str) -> Setup:
    root = _data(tmp, base)
    bad = breaker(root / "images" / "P0001" / "DWI.nii.gz")
    return Setup(lld_args(root, tmp), [root], [str(bad), problem])


def truncated_nifti(tmp, base):
    return _broken_phase(tmp, base, truncated_gzip, "truncated or corrupt")


def text_named_nii_gz(tmp, base):  # prepare: the only case fails naming the file; no case prepared -> exit 1
    export = tmp / "export"
    write_case(export, "case_a", 0)
    bad = text_file(export / "case_a" / "t2w_tra.nii.gz")
    args = [f"input={q(export)}", f"out={q(tmp / 'out')}", "kind=nifti", "rules=prostatex"]
    args += ["rules.required=[t2w_tra]", "privacy.ids=keep", "progress=false"]
    return Setup(args, [export], [str(bad), "not a readable NIfTI file"], code=1)


def mask_as_phase(tmp, base):
    return _broken_phase(tmp, base, binary_mask, "only two values")


def complex_volume(tmp, base):  # through training: the data module reads it when the run starts
    root = _data(tmp, base)
    bad = complex_data(root / "images" / "P0002" / "T2WI.nii.gz")
    return Setup(train_args(root, tmp), [root], [str(bad), "complex-valued"])


def all_nan_volume(tmp, base):
    return _broken_phase(tmp, base, all_nan, "every voxel is NaN/inf")


def constant_volume(tmp, base):
    return _broken_phase(tmp, base, constant, "constant image")


def missing_phase(tmp, base):
    root = _data(tmp, base)
    (root / "images" / "P0003" / "C+A.nii.gz").unlink()
    args = [*lld_args(root, tmp), "data.layout.on_missing_modality=error"]
    return Setup(args, [root], ["P0003", "C+A"])


def unknown_label(tmp, base):
    root = _data(tmp, base)
    labels = root / "labels.txt"
    labels.write_text(labels.read_text().replace("P0002 2\n", "P0002 7\n"))
    return Setup(lld_args(root, tmp), [root], [str(labels), "P0002"])


def patient_in_two_splits(tmp, base):
    root = _data(tmp, base)
    payload = split_payload(root)
    payload["folds"][1].append(payload["folds"][0][0])
    split = tmp / "splits.json"
    split.write_text(json.dumps(payload))
    return Setup(
        [*train_args(root, tmp), f"data.split.file={q(split)}"],
        [root, split],
        [str(split), "in two splits"],
    )


def split_leaving_patients_out(tmp, base):
    root = _data(tmp, base)
    payload = split_payload(root)
    payload["folds"] = [f[:1] for f in payload["folds"]]
    split = tmp / "partial.json"
    split.write_text(json.dumps(payload))
    return Setup(
        [*lld_args(root, tmp), f"data.split.file={q(split)}"],
        [root, split],
        [str(split), "data.split.allow_missing"],
    )


def unknown_split_key(tmp, base):
    root = _data(tmp, base)
    payload = {**split_payload(root), "foldz": []}
    split = tmp / "splits.json"
    split.write_text(json.dumps(payload))
    return Setup(
        [*train_args(root, tmp), f"data.split.file={q(split)}"], [root, split], [str(split), "'foldz'"]
    )


def negative_batch_size(tmp, base):
    root = _data(tmp, base)
    return Setup([*train_args(root, tmp), "data.batch_size=-1"], [root], ["data.batch_size=-1"])


def fraction_out_of_range(tmp, base):  # viz.pairs composes the pre-training config
    root = _data(tmp, base)
    args = [*lld_args(root, tmp), "data.split.test_fraction=1.5", f"hydra.run.dir={q(tmp / 'run')}"]
    return Setup(args, [root], ["data.split.test_fraction=1.5"])


def ssl_checkpoint_as_ckpt_path(tmp, base):
    root = _data(tmp, base)
    return Setup([*train_args(root, tmp), f"ckpt_path={q(SSL_CKPT)}"], [root, SSL_CKPT], [str(SSL_CKPT)])


def pickle_checkpoint(tmp, base):  # resume: the run's only checkpoint is a pickle payload
    run = tmp / "run"
    shutil.copytree(LEGACY / "ssl", run)
    bad = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(tmp / "ran")}, bad)
    return Setup([str(run)], [run], [str(bad.parent), "last.ckpt", "pickled Python objects"])


def wrong_kind_encoder_file(tmp, base):
    root = _data(tmp, base)
    weights = tmp / "weights.pt"
    torch.save({"weights": {"conv.weight": torch.zeros(2)}}, weights)
    args = [*train_args(root, tmp), "model.init=pretrained", f"model.pretrained.path={q(weights)}"]
    return Setup(args, [root, weights], [str(weights), "neither an encoder export"])


def uncreatable_output_folder(tmp, base):  # synth: a file is in the way
    blocker = tmp / "a_file"
    blocker.write_text("x")
    return Setup(
        [f"out={q(blocker / 'phantom')}", "n_cases=2", "progress=false"],
        [blocker],
        [str(blocker), "not a folder"],
    )


def empty_prepare_input(tmp, base):
    export = tmp / "export"
    export.mkdir()
    (export / "notes.txt").write_text("not a case")
    args = [f"input={q(export)}", f"out={q(tmp / 'out')}", "kind=nifti", "progress=false"]
    return Setup(args, [export], [str(export), "no case to prepare"])


def unknown_config_key(tmp, base):  # Hydra refuses it before liverfusion runs
    root = _data(tmp, base)
    return Setup([*train_args(root, tmp), "data.batch_sise=4"], [root], ["data.batch_sise"])


def unknown_preprocess_key(tmp, base):  # Hydra adds it (+), the data module refuses it
    root = _data(tmp, base)
    return Setup(
        [*lld_args(root, tmp), "+data.preprocess.spacingg=1"], [root], ["data.preprocess", "spacingg"]
    )


def report_without_runs(tmp, base):
    folder = tmp / "sweep"
    folder.mkdir()
    (folder / "notes.txt").write_text("no runs here")
    return Setup([str(folder), "--no-plots"], [folder], [str(folder), "test/summary.json"])


CASES: dict[str, tuple[str, Callable[[Path, Path], Setup]]] = {
    "truncated NIfTI": ("data.check", truncated_nifti),
    "text file named .nii.gz": ("prepare", text_named_nii_gz),
    "mask given as a phase": ("data.check", mask_as_phase),
    "complex data": ("train", complex_volume),
    "all-NaN volume": ("data.check", all_nan_volume),
    "constant volume": ("data.check", constant_volume),
    "missing phase": ("data.check", missing_phase),
    "unknown label": ("data.check", unknown_label),
    "patient in two splits": ("train", patient_in_two_splits),
    "split file leaving patients out": ("data.check", split_leaving_patients_out),
    "unknown split key": ("train", unknown_split_key),
    "negative batch size": ("train", negative_batch_size),
    "fraction out of range": ("viz.pairs", fraction_out_of_range),
    "SSL checkpoint as classifier ckpt_path": ("train", ssl_checkpoint_as_ckpt_path),
    "pickle checkpoint": ("resume", pickle_checkpoint),
    "wrong-kind encoder file": ("train", wrong_kind_encoder_file),
    "uncreatable output folder": ("synth", uncreatable_output_folder),
    "empty prepare input": ("prepare", empty_prepare_input),
    "unknown config key": ("train", unknown_config_key),
    "unknown preprocess key": ("data.check", unknown_preprocess_key),
    "report folder without runs": ("report", report_without_runs),
}
# in a subprocess below: "checkpoint with ${...} metadata" (evaluate), "uncreatable run folder" (train)


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input(kind, lld_base, tmp_path, capsys, monkeypatch):
    cli, make = CASES[kind]
    monkeypatch.chdir(tmp_path)  # whatever an entry point writes by default lands here, not in the repository
    monkeypatch.delenv("LIVERFUSION_PRIVACY_SALT", raising=False)
    setup = make(tmp_path, lld_base)
    before = digest(setup.inputs)
    code, output = run_in_process(cli, setup.args, capsys)
    assert code == setup.code, f"{cli} exited {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = re.findall(r"error: [^\r\n]*", output)  # after a progress bar, on its line
    assert len(errors) == 1 or setup.code != 2, output[-3000:]
    for name in setup.named:
        assert name in output, f"{name!r} not named in:\n{output[-3000:]}"
    assert digest(setup.inputs) == before
    assert not (tmp_path / "ran").exists()  # no payload ran


# ---- subprocesses: the fresh interpreter of `python -m` ------------------------------------------------------
def _python_m(module: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    environ.pop(
        "HYDRA_FULL_ERROR", None
    )  # as a user runs it: Hydra's own error printing is what must not show
    environ.pop("LIVERFUSION_PRIVACY_SALT", None)
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def test_uncreatable_run_folder_is_one_line_from_python_m_and_the_console_entry(
    tmp_path, capsys, monkeypatch
):
    """Hydra creates the run folder before liverfusion runs: under a regular file it is still one line, exit 2."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = [f"paths.log_dir={q(blocker / 'logs')}", "extras.print_config=false"]
    res = _python_m("liverfusion.train", args, tmp_path)
    output = res.stdout + res.stderr
    assert res.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output[-3000:]
    (line,) = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert (
        str(blocker / "logs") in line and "cannot create the run folder" in line and "paths.log_dir" in line
    )
    assert f"{blocker} is a file, not a folder" in line
    assert blocker.read_text() == "x"
    # the console script liverfusion-train calls the same function; in-process, as it does
    monkeypatch.chdir(tmp_path)
    code, output = run_in_process("train", args, capsys)
    assert code == 2 and "cannot create the run folder" in output and "Traceback" not in output


def test_interpolating_checkpoint_metadata_through_evaluate(tmp_path):
    ckpt = torch.load(CLASSIFIER, weights_only=True)
    ckpt["liverfusion"]["class_names"][0] = "${oc.env:HOME}"
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    before = digest([bad])
    res = _python_m(
        "liverfusion.evaluate", [f"ckpt_path={q(bad)}", f"hydra.run.dir={q(tmp_path / 'run')}"], tmp_path
    )
    output = res.stdout + res.stderr
    assert res.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    (line,) = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert str(bad) in line and "class_names" in line and "interpolation" in line
    assert digest([bad]) == before


def test_salt_given_on_the_command_line_never_lands_in_a_run(tmp_path, lld_base):
    """``privacy_salt=...`` on the command line: used (the run's fingerprint matches it), warned about, and in clear
    in none of the run's files: Hydra's .hydra/ copies, W&B's offline run (which records the command line), logs."""
    salt = "Zq-cmdline-salt-4417"
    root = _data(tmp_path, lld_base)
    args = [a for a in train_args(root, tmp_path) if a != "logger=none"]
    args += ["privacy=true", f"privacy_salt={salt}", "logger=wandb"]
    res = _python_m("liverfusion.train", args, tmp_path, WANDB_MODE="offline", WANDB_SILENT="true")
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-3000:]
    assert "LIVERFUSION_PRIVACY_SALT" in output and "privacy_salt given on the command line" in output
    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert (run / ".hydra" / "overrides.yaml").is_file() and list(run.glob("wandb/offline-run-*/*.wandb"))
    assert len(files) > 8
    leaked = [str(p) for p in files if salt.encode() in p.read_bytes()]
    assert not leaked and salt not in output
    fingerprint = json.loads((run / "run.json").read_text())["salt_fingerprint"]
    assert salt_matches(salt, fingerprint)  # the run was salted with it, not with a mask


# ---- valid inputs: spaces and non-ASCII letters in paths ---------------------------------------------------------
def _generic_set(root: Path) -> Path:
    """A tiny generic-layout data set (subjects/<case>/<modality>.nii.gz + labels.csv), 8 patients, 2 classes."""
    rng = np.random.default_rng(0)
    rows = ["case,label,patient"]
    for p in range(8):
        case = f"S{p:02d}"
        for mod in ("t1", "t2"):
            a = rng.normal(100, 10, size=SHAPE).astype(np.float32)
            save_volume(
                root / "subjects" / case / f"{mod}.nii.gz", a, spacing=(3.0, 1.0, 1.0), dtype=np.int16
            )
        rows.append(f"{case},{'ab'[p % 2]},{case}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_paths_with_spaces_and_non_ascii_letters_work_quoted(tmp_path, capsys, monkeypatch):
    root = _generic_set(tmp_path / "Åsa data" / "my set ü")
    cache = tmp_path / "cache dir é"
    args = [
        "data=lgg",
        f"data.layout.root={q(root)}",
        "data.layout.name=own",
        "data.layout.modalities=[t1,t2]",
        "data.layout.class_names=[a,b]",
        "data.layout.label_map=null",
        "data.layout.id_column=case",
        "data.layout.label_column=label",
        "data.layout.patient_column=patient",
        "data.layout.missing_flags=null",
        "data.layout.duplicate_source=[]",
        "data.layout.mask_file=null",
        "data.layout.clinical=false",
        f"data.preprocess.shape=[{','.join(map(str, SHAPE))}]",
        f"data.cache_dir={q(cache)}",
        "data.num_workers=0",
        "data.prep_workers=0",
        "data.split.n_folds=2",
        "strict=true",
    ]
    monkeypatch.chdir(tmp_path)
    before = digest([root])
    code, output = run_in_process("data.check", args, capsys)
    assert code == 0, output[-3000:]
    # the table's title names the folder; rich may wrap a long path anywhere, so compare without whitespace
    assert "no problems found" in output and "Åsadata/mysetü" in "".join(output.split()), output[-3000:]
    assert digest([root]) == before
    assert any(cache.rglob("*")), "the cache under the non-ASCII folder was written"
    # unquoted, Hydra's parser refuses the letter: one line that says to quote it
    code, output = run_in_process("data.check", [a.replace(q(root), str(root)) for a in args], capsys)
    assert code == 2 and "Traceback" not in output and "key='value'" in output


def test_unknown_preprocess_key_is_a_config_error_naming_it(tmp_path):
    from liverfusion.data.datamodule import ClassificationDataModule

    layout = LLDMMRILayout(tmp_path / "absent", modalities=PHASES, class_names=CLASSES)
    with pytest.raises(ConfigError, match="data.preprocess: unknown key") as info:
        data_module(
            ClassificationDataModule,
            layout,
            preprocess={"shape": [4, 8, 8], "spacingg": 1.0},
            cache_dir=tmp_path,
        )
    assert "spacingg" in str(info.value) and "target_spacing" in (info.value.fix or "")


def test_hydra_secret_masking_of_saved_files(tmp_path):
    """What ``cli_errors`` does to Hydra's saved copies inside a job, on files as Hydra writes them."""
    from liverfusion.utils.cli import _mask_hydra_tree

    tree = {
        "privacy_salt": "s3cret-xyz",
        "callbacks": {"w": {"salt": "${privacy_salt}"}},
        "hydra": {
            "overrides": {"task": ["privacy_salt=s3cret-xyz", "+callbacks.w.salt='s3cret-xyz'", "a=1"]},
            "job": {"override_dirname": "a=1,privacy_salt=s3cret-xyz", "config": {}},
        },
    }
    masked = _mask_hydra_tree(json.loads(json.dumps(tree)))
    assert "s3cret-xyz" not in json.dumps(masked)
    assert masked["callbacks"]["w"]["salt"] == "${privacy_salt}"  # an interpolation names no secret
    assert masked["hydra"]["overrides"]["task"][2] == "a=1"
    assert _mask_hydra_tree(["privacy_salt=s3cret-xyz", "x=2"]) == ["privacy_salt=***", "x=2"]
