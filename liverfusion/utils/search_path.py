"""Where the entry points look for configs, and which config groups are chosen last; importable without Hydra.

Every Hydra entry point searches, in this order (the first file found wins):

1. ``conf/`` in the working directory (where the command is typed), so ``conf/data/mine.yaml`` beside your data
   works as ``data=mine`` with no ``--config-dir``;
2. each folder of ``LIVERFUSION_CONFIG_DIR`` (``os.pathsep``-separated: a lab's shared configs, say);
3. the package's own configs (``liverfusion/conf``, shipped in the wheel).

The search is done by the Hydra search-path plugin ``hydra_plugins.liverfusion_plugins`` (so the compose API finds
the same files); ``--help`` lists config group options from the same folders without importing Hydra.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

PACKAGE_CONF = Path(__file__).resolve().parents[1] / "conf"
"""The configs shipped in the package (``liverfusion/conf``)."""
CONFIG_DIR_ENV = "LIVERFUSION_CONFIG_DIR"

LATE_GROUPS = ("experiment", "hparams_search", "debug")
"""Config groups selected after everything else, in this order: an experiment overrides the defaults, a sweep
overrides the experiment (``test: false`` per trial), and a debug preset overrides both, whichever order they are
typed in. Each is taken with or without the ``+`` (``+experiment=x`` and ``experiment=x`` are the same)."""


def user_config_dirs(cwd: str | Path | None = None, env: str | None = None) -> list[Path]:
    """``<cwd>/conf`` (when it exists) and the folders of ``LIVERFUSION_CONFIG_DIR``, in search order; the package's
    own folder is left out (the repository's ``conf`` is a link to it). A folder named in the variable that does not
    exist is an error, not a silent miss."""
    from liverfusion.errors import ConfigError

    cwd = Path(cwd) if cwd is not None else Path.cwd()
    env = os.environ.get(CONFIG_DIR_ENV, "") if env is None else env
    found: list[Path] = []
    local = cwd / "conf"
    if local.is_dir():
        found.append(local.resolve())
    for part in (p for p in env.split(os.pathsep) if p.strip()):
        path = Path(part).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"{CONFIG_DIR_ENV}={env}: {path} is not a folder",
                fix=f"point {CONFIG_DIR_ENV} at a folder holding config groups (data/, experiment/, ...) or unset it",
            )
        found.append(path.resolve())
    out: list[Path] = []
    for path in found:
        if path != PACKAGE_CONF and path not in out:
            out.append(path)
    return out


def config_dirs(cwd: str | Path | None = None) -> list[Path]:
    """Every folder searched for configs, first match first: the user's, then the package's."""
    return [*user_config_dirs(cwd), PACKAGE_CONF]


def group_options(group: str, dirs: Sequence[Path] | None = None) -> list[str]:
    """The options of a config group (``data`` -> ``chaos``, ``lgg``, ..., ``mine``), over every searched folder;
    names starting with ``_`` are building blocks, not options."""
    names: set[str] = set()
    for base in dirs if dirs is not None else config_dirs():
        folder = base / group
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
    return sorted(names)


def _primary_file(config_name: str, dirs: Sequence[Path]) -> Path | None:
    for base in dirs:
        path = base / f"{config_name}.yaml"
        if path.is_file():
            return path
    return None


def _defaults_entries(path: Path) -> list[object]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    entries = loaded.get("defaults") if isinstance(loaded, dict) else None
    return list(entries) if isinstance(entries, list) else []


def default_groups(config_name: str, dirs: Sequence[Path] | None = None) -> set[str]:
    """The config groups a primary config selects in its defaults list (following primary configs it builds on,
    as ``viz_pairs`` builds on ``train``): a group there is chosen with ``group=x``, any other with ``+group=x``."""
    dirs = list(dirs) if dirs is not None else config_dirs()
    groups: set[str] = set()
    seen: set[str] = set()
    pending = [config_name]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _primary_file(name, dirs)
        if path is None:
            continue
        for entry in _defaults_entries(path):
            if isinstance(entry, str):
                if entry != "_self_":
                    pending.append(entry.lstrip("/"))
                continue
            if not isinstance(entry, dict) or len(entry) != 1:
                continue
            key = str(next(iter(entry)))
            if key.startswith("override "):
                continue
            key = key.removeprefix("optional ").strip().lstrip("/").split("@", 1)[0]
            groups.add(key)
    return groups


_GROUP_ARG = re.compile(r"^(?P<plus>\+?)(?P<group>[A-Za-z_][\w/]*)=(?P<value>.*)$", re.S)


def normalize_overrides(
    config_name: str, overrides: Iterable[str], dirs: Sequence[Path] | None = None
) -> list[str]:
    """The overrides as Hydra must see them so that the late groups (``LATE_GROUPS``) are taken with or without
    ``+`` and composed in their fixed order, whatever the order typed:

    - a late group the primary config already selects (``viz_pairs`` selects ``experiment``): ``+g=x`` -> ``g=x``;
    - a late group it does not select (``train`` selects none of them): ``g=x`` -> ``+g=x``, and the appended late
      groups are put in ``LATE_GROUPS`` order (Hydra composes appended groups in the order given), so
      ``debug=fast +experiment=x`` composes the experiment first and the debug preset over it.

    Everything else is returned unchanged, in place.
    """
    args = list(overrides)
    in_defaults = default_groups(config_name, dirs)
    appended: list[int] = []
    for i, arg in enumerate(args):
        m = _GROUP_ARG.match(arg)
        if m is None or m["group"] not in LATE_GROUPS:
            continue
        group, value = m["group"], m["value"]
        if group in in_defaults:
            args[i] = f"{group}={value}"
        else:
            args[i] = f"+{group}={value}"
            appended.append(i)
    ordered = sorted(
        (args[i] for i in appended), key=lambda a: LATE_GROUPS.index(_GROUP_ARG.match(a)["group"])
    )
    for i, arg in zip(appended, ordered):
        args[i] = arg
    return args
