"""The console scripts (``liverfusion-<command>``): ``--help`` is answered from ``liverfusion.utils.help_pages``
without importing anything heavy; otherwise the command's module is imported and its ``main`` runs."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from liverfusion.utils.help_pages import COMMANDS, build_parser, help_text, wants_help


# ---- the console scripts -----------------------------------------------------------------------------------------
def run(name: str, argv: Sequence[str] | None = None) -> Any:
    """A console script: ``--help`` answered here (nothing heavy imported); otherwise the command's ``main``. Returns
    an exit status for ``sys.exit`` (0 for a Hydra command, whatever its task returned)."""
    cmd = COMMANDS[name]
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        if cmd.config is None:
            build_parser(name).print_help()
        else:
            sys.stdout.write(help_text(name))
        return 0
    module = importlib.import_module(cmd.module if cmd.name != "prepare" else "liverfusion.prepare.__main__")
    result = module.main()
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def train() -> Any:
    return run("train")


def evaluate() -> Any:
    return run("evaluate")


def predict() -> Any:
    return run("predict")


def export() -> Any:
    return run("export")


def check() -> Any:
    return run("check")


def init() -> Any:
    return run("init")


def prepare() -> Any:
    return run("prepare")


def synth() -> Any:
    return run("synth")


def resume() -> Any:
    return run("resume")


def report() -> Any:
    return run("report")


def demo() -> Any:
    return run("demo")


def pairs() -> Any:
    return run("pairs")
