"""The ``--help`` pages of every entry point and the argument parsers of the non-Hydra commands: text about the
commands, no behaviour, so it sits at the bottom of the house (the console scripts in ``liverfusion.help``, the Hydra
wrapper in ``liverfusion.utils.cli`` and the argparse commands all read it).

This module imports nothing heavy (no torch, Lightning, MONAI, not even Hydra), so ``liverfusion-<command> --help``
answers at once. A Hydra command's page lists its own config groups (with the options found in ``./conf``,
``LIVERFUSION_CONFIG_DIR`` and the package) and the top-level keys of its primary config with their defaults and
comments, so the page follows the YAML.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from liverfusion.utils.search_path import config_dirs, group_options

WIDTH = 110
STEP_NAMES = ("check", "pretrain", "finetune", "evaluate", "report")
"""The steps of ``make demo`` / ``liverfusion-demo``, in order."""


@dataclass(frozen=True)
class Command:
    """One entry point: its console script, module, what it does, and three examples."""

    name: str
    module: str
    summary: str
    examples: tuple[str, str, str]
    config: str | None = None  # the primary config of a Hydra command; None: argparse
    groups: tuple[str, ...] = ()  # config groups shown (folder under conf/ -> shown as its last part)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def script(self) -> str:
        return f"liverfusion-{self.name}"


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "train",
            "liverfusion.train",
            "Pre-train an encoder (SimSiam, BYOL, VICReg, ...) or train a fusion classifier: an experiment preset "
            "plus your overrides. Runs go to logs/<task>/runs/<time>/ (debug presets: logs/debug/...).",
            (
                "liverfusion-train +experiment=simsiam_pretrain",
                "liverfusion-train +experiment=cgc_finetune data=mine model.pretrained.path=<run>/checkpoints/encoder.pt",
                "liverfusion-train +experiment=simsiam_pretrain data=mine debug=fast",
            ),
            config="train",
            groups=(
                "experiment",
                "data",
                "model",
                "trainer",
                "logger",
                "callbacks",
                "debug",
                "hparams_search",
            ),
            notes=(
                "experiment, hparams_search and debug are taken with or without '+' and composed last, in that "
                "order: a debug preset always wins over the experiment",
                "sweeps: --multirun key=a,b,c (Hydra) or hparams_search=<name> (Optuna; several workers may share "
                "one study)",
            ),
        ),
        Command(
            "evaluate",
            "liverfusion.evaluate",
            "Score a trained classifier (or a cross-validation's fold ensemble) on a data set: predictions.csv, "
            "metrics with bootstrap 95 % CIs, robustness and calibration. Modalities, classes and preprocessing "
            "come from the checkpoint.",
            (
                "liverfusion-evaluate ckpt_path=logs/cgc_finetune/runs/<time>",
                "liverfusion-evaluate ckpt_path=logs/cgc_finetune/multiruns/<time> data=mine split=all",
                "liverfusion-evaluate ckpt_path=<run> calibrate=true tta=flip",
            ),
            config="evaluate",
            groups=("data",),
        ),
        Command(
            "predict",
            "liverfusion.predict",
            "Predict new patients with a trained classifier: no data yaml, no labels. Writes predictions.csv/json "
            "(calibrated probabilities, review flag) under out.",
            (
                "liverfusion-predict ckpt_path=<run> input=new_cases/ out=predictions/",
                "liverfusion-predict ckpt_path=<multirun> input=new_cases/ out=predictions/ tta=flip",
                "liverfusion-predict ckpt_path=<run> input=new_cases/ out=maps/ explain=true",
            ),
            config="predict",
        ),
        Command(
            "export",
            "liverfusion.export",
            "Export a trained classifier (or fold ensemble) with its modalities, classes, preprocessing and "
            "temperature as one torch.export (.pt2) or ONNX file that runs without this package.",
            (
                "liverfusion-export ckpt_path=<run> out=model.pt2",
                "liverfusion-export ckpt_path=<multirun> out=ensemble.pt2",
                "liverfusion-export ckpt_path=<run> out=model.onnx format=onnx",
            ),
            config="export",
        ),
        Command(
            "check",
            "liverfusion.data.check",
            "Scan a data set: what it holds (cases, patients, classes, modalities, shapes) and every problem, "
            "before any training. Decodes and caches every volume once.",
            (
                "liverfusion-check data=mine",
                "liverfusion-check data=lgg strict=true",
                "liverfusion-check data=mine clear_cache=true",
            ),
            config="check",
            groups=("data",),
        ),
        Command(
            "init",
            "liverfusion.data.init",
            "Write a data yaml for a folder of cases: scans case folders, modality file names and a labels CSV, "
            "and lists what it guessed.",
            (
                "liverfusion-init /data/my_study out=conf/data/mine.yaml",
                "liverfusion-init /data/my_study out=conf/data/mine.yaml labels=/data/my_study/grades.csv",
                "liverfusion-init /data/my_study out=conf/data/mine.yaml overwrite=true",
            ),
        ),
        Command(
            "prepare",
            "liverfusion.prepare",
            "Turn a hospital export (DICOM tree, NIfTI folders, the LLD-MMRI release) into a training-ready data "
            "set: subjects/<case>/<modality>.nii.gz + labels.csv, pseudonymised, with QA sheets. data=prepared "
            "reads the result.",
            (
                "liverfusion-prepare input=export/ out=data/mine kind=dicom rules=prostatex",
                "liverfusion-prepare input=niftis/ out=data/mine kind=nifti labels.csv=grades.csv "
                "labels.key_column=id labels.label_column=grade",
                "liverfusion-prepare preset=lgg_crops input=lgg_tcga_3seq_dev/subjects out=data/lgg_crops",
            ),
            config="prepare",
            groups=("prepare/rules", "prepare/preset"),
        ),
        Command(
            "synth",
            "liverfusion.synth",
            "Write the embedded multi-phase liver lesion phantom (LLD-MMRI layout) for demos and tests.",
            (
                "liverfusion-synth out=data/phantom",
                "liverfusion-synth out=data/phantom n_cases=700 seed=7 workers=2 shape=[16,64,64]",
                "liverfusion-synth out=data/phantom probe=true",
            ),
            config="synth",
            groups=("phantom",),
        ),
        Command(
            "resume",
            "liverfusion.resume",
            "Continue a killed or pre-empted training run in its own folder, from its newest readable checkpoint.",
            (
                "liverfusion-resume logs/simsiam_pretrain/runs/<time>",
                "liverfusion-resume logs/cgc_finetune/runs/<time> trainer.max_epochs=50",
                "liverfusion-resume logs/cgc_finetune/multiruns/<time>/3",
            ),
        ),
        Command(
            "report",
            "liverfusion.report",
            "Aggregate cross-validation runs into results.md, CSV tables, figures and a model card.",
            (
                "liverfusion-report logs/cgc_finetune/multiruns/<time>",
                "liverfusion-report <multirun pretrained> <multirun scratch> --names pretrained scratch",
                "liverfusion-report <multirun> --out report/ --no-plots",
            ),
        ),
        Command(
            "demo",
            "liverfusion.demo",
            "The main job on the embedded phantom, step by step with the real commands: check, pre-train, "
            "fine-tune, evaluate, report (about 10 minutes on 2 CPU cores).",
            (
                "liverfusion-demo",
                "liverfusion-demo --steps check,pretrain",
                "liverfusion-demo --root logs/demo/mine trainer.max_epochs=2",
            ),
        ),
        Command(
            "pairs",
            "liverfusion.viz.pairs",
            "Draw example MDA positive pairs (centre slices of both views) as a PNG, composed exactly like "
            "pre-training.",
            (
                "liverfusion-pairs data=mine n=8",
                "liverfusion-pairs +experiment=simsiam_same_modality out=/tmp/same.png",
                "liverfusion-pairs data.pairs.policy=mixed seed_pairs=3",
            ),
            config="viz_pairs",
            groups=("experiment", "data", "debug"),
        ),
    )
}
CONFIG_COMMANDS = {c.config: c for c in COMMANDS.values() if c.config}

HYDRA_FLAGS = (
    ("--cfg job", "print the composed config and exit (add --resolve to resolve interpolations)"),
    ("--multirun", "one job per combination of comma-separated values (key=a,b)"),
    ("--hydra-help", "Hydra's own options"),
)


# ---- the pages ---------------------------------------------------------------------------------------------------
_KEY_LINE = re.compile(r"^(?P<key>[A-Za-z_]\w*):\s*(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")


_GLOBAL_GROUP = re.compile(r"^\s+-\s+(?P<group>[\w/]+)@_global_:\s*(?P<option>[\w.-]+)")


def _find(relative: str) -> Path | None:
    return next((d / relative for d in config_dirs() if (d / relative).is_file()), None)


def primary_keys(config: str) -> list[tuple[str, str, str]]:
    """``(key, default, comment)`` of the top-level keys of a primary config, read from its YAML text (comments
    beside a key or on the lines above it), followed by those of the settings groups its defaults list places at
    the top level (``- inference@_global_: default``); ``defaults`` and ``hydra`` are left out."""
    path = _find(f"{config}.yaml")
    return _keys_of(path) if path else []


def _keys_of(path: Path) -> list[tuple[str, str, str]]:
    keys: list[tuple[str, str, str]] = []
    groups: list[Path] = []
    above: list[str] = []
    for line in path.read_text().splitlines():
        g = _GLOBAL_GROUP.match(line)
        if g:
            found = _find(f"{g['group']}/{g['option']}.yaml")
            groups += [found] if found else []
            continue
        if line.startswith("#"):
            above.append(line.lstrip("# ").strip())
            continue
        m = _KEY_LINE.match(line)
        if m is None:
            if not line.strip():
                above = []
            continue
        key, value, comment = m["key"], m["value"], (m["comment"] or "").strip()
        if key not in ("defaults", "hydra"):
            keys.append((key, value or "{...}", comment or (above[-1] if above else "")))
        above = []
    for group in groups:
        keys += [k for k in _keys_of(group) if k[0] not in {key for key, _, _ in keys}]
    return keys


def _groups_block(cmd: Command) -> list[str]:
    if not cmd.groups:
        return []
    lines = ["config groups (group=option; add your own as ./conf/<group>/<option>.yaml):"]
    for group in cmd.groups:
        shown = group.rsplit("/", 1)[-1]
        opts = ", ".join(group_options(group)) or "(none)"
        lines += textwrap.wrap(
            opts, WIDTH, initial_indent=f"  {shown}: ", subsequent_indent=" " * (len(shown) + 4)
        )
    return lines


def help_text(name: str) -> str:
    """The ``--help`` page of a Hydra command (argparse commands print their parser's help)."""
    cmd = COMMANDS[name]
    if cmd.config is None:
        return build_parser(name).format_help()
    lines = [
        f"usage: {cmd.script} [key=value ...] [group=option ...] [--cfg job] [--multirun]",
        f"       (also: python -m {cmd.module})",
        "",
        *textwrap.wrap(cmd.summary, WIDTH),
        "",
    ]
    lines += _groups_block(cmd)
    keys = primary_keys(cmd.config)
    if keys:
        lines += ["", f"options (key=value; defaults from conf/{cmd.config}.yaml):"]
        width = max(len(k) for k, _, _ in keys)
        for key, value, comment in keys:
            value = value if len(value) <= 24 else value[:21] + "..."
            text = f"  {key:<{width}}  {value:<24}  {comment}".rstrip()
            lines.append(text if len(text) <= WIDTH else text[: WIDTH - 3] + "...")
    lines += ["", "Hydra flags:"] + [f"  {flag:<14} {what}" for flag, what in HYDRA_FLAGS]
    if cmd.notes:
        lines += ["", "notes:"]
        for note in cmd.notes:
            lines += textwrap.wrap(note, WIDTH, initial_indent="  - ", subsequent_indent="    ")
    lines += ["", "examples:"] + [f"  {e}" for e in cmd.examples]
    lines += ["", "a value with spaces, commas, brackets or non-ASCII letters is quoted: key='/data/Åsa/x'"]
    return "\n".join(lines) + "\n"


def wants_help(argv: Sequence[str]) -> bool:
    """``-h`` / ``--help`` among the arguments (not as a value, not after ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in ("-h", "--help"):
            return True
    return False


def print_help_for_config(config: str | None) -> bool:
    """Print the page of the Hydra command whose primary config is ``config``; False when there is none."""
    cmd = CONFIG_COMMANDS.get(config or "")
    if cmd is None:
        return False
    sys.stdout.write(help_text(cmd.name))
    sys.stdout.flush()
    return True


# ---- the argparse commands' parsers ----------------------------------------------------------------------------
def _parser(name: str) -> argparse.ArgumentParser:
    cmd = COMMANDS[name]
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in cmd.examples)
    return argparse.ArgumentParser(
        prog=cmd.script,
        description=cmd.summary + f"\n(also: python -m {cmd.module})",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of an argparse command (``resume``, ``report``, ``demo``, ``init``)."""
    p = _parser(name)
    if name == "resume":
        p.add_argument(
            "run_dir", help="the run directory of the interrupted run (holds config_resolved.yaml)"
        )
        p.add_argument("overrides", nargs="*", help="dotted key=value changes, e.g. trainer.max_epochs=50")
    elif name == "report":
        p.add_argument("dirs", nargs="+", help="multirun / run folders (several: one arm family each)")
        p.add_argument("--out", default=None, help="output folder (default: <first DIR>/report)")
        p.add_argument("--names", nargs="*", default=None, help="a label per DIR")
        p.add_argument("--metric", default="lld_score", help="metric of the paired comparisons")
        from liverfusion.utils.evaluation_settings import defaults

        scores = defaults("evaluation")  # conf/evaluation/default.yaml, as evaluate and the test step read it
        p.add_argument(
            "--n-boot",
            type=int,
            default=None,
            help=f"bootstrap resamples, whole patients (default {scores['n_boot']}: conf/evaluation/default.yaml)",
        )
        p.add_argument(
            "--seed",
            type=int,
            default=None,
            help=f"bootstrap seed (default {scores['seed']}: conf/evaluation/default.yaml)",
        )
        p.add_argument("--embedding", choices=["tsne", "pca", "none"], default="tsne")
        p.add_argument("--no-plots", action="store_true")
        p.add_argument("--card-template", default=None, help="model card template (default: the shipped one)")
        p.add_argument("--wandb", choices=["off", "offline", "online"], default="off")
    elif name == "demo":
        p.add_argument(
            "--steps", default=",".join(STEP_NAMES), help=f"comma-separated subset of {STEP_NAMES}"
        )
        p.add_argument(
            "--root",
            default=None,
            help="output folder of this demo (default logs/demo/<time>; reuse one to resume)",
        )
        p.add_argument("overrides", nargs="*", help="Hydra overrides passed to the training steps")
    elif name == "init":
        p.add_argument(
            "folder", help="the data set folder: case folders (directly or under subjects/ or images/)"
        )
        p.add_argument(
            "options",
            nargs="*",
            metavar="key=value",
            help="out=<yaml to write> (default conf/data/<folder name>.yaml), name=<data set name>, "
            "labels=<CSV>, overwrite=true",
        )
    else:  # pragma: no cover
        raise KeyError(name)
    return p
