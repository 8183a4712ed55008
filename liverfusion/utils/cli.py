"""The one error wrapper of every command-line entry point.

A problem the user can fix ends the command with one line, ``error: <file or key>: <problem>; <fix>``, on stderr and
exit status 2, never a traceback from deep inside torch. Set ``LIVERFUSION_TRACEBACK=1`` to see the traceback too
(for bug reports).

Two decorators: ``cli_errors`` around the body of an entry point (inside ``@hydra.main`` for a Hydra app), and
``hydra_cli`` around the ``@hydra.main`` function itself, for what fails in Hydra before the body runs (a run folder
that cannot be created, an unknown key on the command line). Inside a Hydra job ``cli_errors`` also masks the privacy
salt in Hydra's own copies of the config (``.hydra/*.yaml``, ``multirun.yaml``) before the body runs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from liverfusion.errors import ConfigError, LiverfusionError

log = logging.getLogger("liverfusion")
F = TypeVar("F", bound=Callable[..., Any])

USER_ERROR = 2
"""Exit status of a problem in the user's config, data, checkpoint or folders."""
INTERNAL_ERROR = 1
"""Exit status of an unexpected failure (a bug): still one line, with the way to get the traceback."""


def _unwrap(err: BaseException) -> BaseException:
    """Hydra's ``instantiate`` wraps what a constructor raised (our ConfigError, say): report the original."""
    try:
        from hydra.errors import InstantiationException
    except ImportError:  # pragma: no cover
        return err
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _compact_hydra(err: BaseException) -> ConfigError | None:
    """Hydra's own one-message errors (an override it cannot parse or apply, a config group option that does not
    exist) as a ConfigError on one line; None for anything else."""
    try:
        from hydra.errors import CompactHydraException, OverrideParseException
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(err, CompactHydraException):
        return None
    fix = (
        "check the key and the quoting (--help lists the config groups, --cfg job shows the composed config)"
    )
    if isinstance(err, OverrideParseException):
        fix = "quote the value as key='value' (a path with spaces, commas, brackets or non-ASCII letters needs it)"
    text = str(err).split("Config search path:")[0]  # the search path is Hydra's business, not the user's
    problem = " ".join(text.split())
    cause = " ".join(str(err.__cause__).splitlines()[:1]) if err.__cause__ is not None else ""
    if cause and cause not in problem:
        problem = f"{problem} ({cause})"
    return ConfigError(f"command line: {problem}", fix=fix)


def _user_error(err: BaseException) -> LiverfusionError | OSError | None:
    """``err`` (unwrapped) when it is the user's to fix, else None (a bug)."""
    err = _unwrap(err)
    hydra = _compact_hydra(err)
    if hydra is not None:
        return hydra
    return err if isinstance(err, LiverfusionError | OSError) else None


def error_line(err: BaseException) -> str:
    """The one line printed for ``err``: ``error: <where>: <problem>; <fix>``."""
    err = _user_error(err) or _unwrap(err)
    if isinstance(err, LiverfusionError):
        text = str(err)
        fix = getattr(err, "fix", None)
        if fix and fix not in text:
            text = f"{text}; {fix}"
        return f"error: {text}"
    if isinstance(err, OSError):
        where = err.filename or "a file"
        problem = err.strerror or type(err).__name__
        if err.errno == errno.ENOSPC:
            fix = "free disk space (or point paths.log_dir / the cache elsewhere) and run again"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "choose a folder you may write to"
        else:
            fix = "check the path"
        if err.filename and err.errno in (errno.EEXIST, errno.ENOTDIR, errno.EACCES, errno.EPERM):
            blocker = _blocker(Path(err.filename))  # "File exists" on a folder to make: a file is in the way
            if blocker:
                problem, fix = f"{problem}: {blocker}", "choose another folder"
        return f"error: {where}: {problem}; {fix}"
    first = str(err).splitlines()[0] if str(err) else ""
    return (
        f"error: internal error ({type(err).__name__}: {first}); set LIVERFUSION_TRACEBACK=1 for the traceback "
        "and report it"
    )


def fail(err: BaseException) -> None:
    """Print ``err`` as one line and exit: 2 for the user's problems, 1 for bugs."""
    if os.environ.get("LIVERFUSION_TRACEBACK"):
        traceback.print_exception(err)
    line = error_line(err)
    log.debug("%s", line)
    print(line, file=sys.stderr, flush=True)
    sys.exit(USER_ERROR if _user_error(err) is not None else INTERNAL_ERROR)


def cli_errors(fn: F) -> F:
    """Decorate an entry point's body: every exception becomes one line and an exit status (see ``fail``). Inside a
    Hydra job, the salt is masked in Hydra's saved copies of the config first (see ``mask_hydra_outputs``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            mask_hydra_outputs()
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001  one line for the user, whatever went wrong
            fail(err)

    return wrapper  # type: ignore[return-value]


# ---- Hydra's own failures: before the body runs, Hydra prints them (some with a traceback) and exits 1 ----------
@contextlib.contextmanager
def _hydra_raises() -> Iterator[None]:
    """Make Hydra raise its failures to us instead of printing them (``HYDRA_FULL_ERROR``), for this call only."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def _blocker(path: Path) -> str:
    """Why ``path`` cannot be made: the nearest existing ancestor is a file, or a folder we may not write to."""
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable"
            return ""
    return ""


def run_folder_error(err: OSError) -> ConfigError:
    """An OSError of Hydra creating or writing the run folder (``hydra.run.dir`` under ``paths.log_dir``) as the
    one line that names the folder, why, and the key to change."""
    target = Path(err.filename) if err.filename else None
    why = err.strerror or type(err).__name__
    blocker = _blocker(target) if target is not None else ""
    reason = f"{why}: {blocker}" if blocker else why
    return ConfigError(
        f"{target or 'the run folder'}: cannot create the run folder ({reason})",
        fix="set paths.log_dir (or hydra.run.dir / hydra.sweep.dir) to a folder you may write to",
    )


def hydra_cli(hydra_main: F | None = None, *, config_name: str | None = None) -> Any:
    """Decorate a ``@hydra.main`` function (the console script / ``python -m`` entry): what Hydra itself fails on
    before the body runs (the run folder, an override) is one line and exit status 2 too, never Hydra's traceback.

    The body (decorated with ``cli_errors`` inside ``@hydra.main``) has already turned its own errors into an exit
    status; what arrives here is Hydra's. Before Hydra parses the command line: ``-h`` / ``--help`` prints the
    command's own page (``liverfusion.utils.help_pages``) and exits 0; known third-party warnings are filtered
    (``liverfusion.utils.console``); the late groups (experiment, hparams_search, debug) are rewritten so they are
    taken with or without ``+`` and composed in their fixed order (``liverfusion.utils.search_path``).
    ``config_name`` is the primary config (read from the ``@hydra.main`` decorator when not given). Usable bare
    (``@hydra_cli``) or with arguments (``@hydra_cli(config_name="train")``).
    """
    if hydra_main is None:
        return functools.partial(hydra_cli, config_name=config_name)

    @functools.wraps(hydra_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            name = _primary_config(sys.argv[1:]) or config_name or hydra_config_name(hydra_main)
            if _wants_help(sys.argv[1:]):
                from liverfusion.utils.help_pages import print_help_for_config

                if print_help_for_config(name):
                    sys.exit(0)
            from liverfusion.utils.console import quiet_third_party

            quiet_third_party()
            with _hydra_raises(), _late_groups_in_argv(name), _secrets_out_of_argv():
                return hydra_main(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001  one line for the user, whatever went wrong
            if isinstance(err, OSError) and _compact_hydra(err) is None:
                err = run_folder_error(err)
            fail(err)

    return wrapper  # type: ignore[return-value]


def _wants_help(argv: list[str]) -> bool:
    from liverfusion.utils.help_pages import wants_help

    return wants_help(argv)


def hydra_config_name(hydra_main: Callable[..., Any]) -> str | None:
    """The ``config_name`` given to ``@hydra.main`` for this function (kept in the decorator's closure)."""
    code = getattr(hydra_main, "__code__", None)
    cells = getattr(hydra_main, "__closure__", None) or ()
    if code is None:
        return None
    values = dict(zip(code.co_freevars, cells))
    cell = values.get("config_name")
    try:
        value = cell.cell_contents if cell is not None else None
    except ValueError:  # pragma: no cover  (an empty cell)
        return None
    return value if isinstance(value, str) else None


def _primary_config(argv: list[str]) -> str | None:
    """``--config-name X`` / ``-cn X`` / ``--config-name=X`` on the command line."""
    for i, arg in enumerate(argv):
        if arg in ("--config-name", "-cn") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1]
    return None


@contextlib.contextmanager
def _late_groups_in_argv(config_name: str | None) -> Iterator[None]:
    """For this call, the overrides of ``sys.argv`` as ``normalize_overrides`` writes them (``+experiment=x`` and
    ``experiment=x`` both work; a debug preset composes after the experiment whatever the order typed)."""
    if not config_name:
        yield
        return
    from liverfusion.utils.search_path import normalize_overrides

    argv = list(sys.argv)
    positions = [i for i, a in enumerate(argv[1:], start=1) if not a.startswith("-") and "=" in a]
    # a flag's value (``--config-dir conf``, ``-cn train``) is not an override
    positions = [i for i in positions if argv[i - 1] not in ("--config-dir", "-cd", "--config-path", "-cp")]
    rewritten = normalize_overrides(config_name, [argv[i] for i in positions])
    for i, arg in zip(positions, rewritten):
        sys.argv[i] = arg
    try:
        yield
    finally:
        sys.argv[:] = argv


# ---- secrets in Hydra's saved copies of the config ------------------------------------------------------------
_warned_salt_override = False
SECRET_ENV_PREFIX = "LIVERFUSION_SECRET_"
"""A secret given on the command line moves into the environment variable ``LIVERFUSION_SECRET_<KEY>``."""


@contextlib.contextmanager
def _secrets_out_of_argv() -> Iterator[None]:
    """A salt on the command line (``privacy_salt=XYZ``, ``+callbacks.x.salt=XYZ``) would be recorded by Hydra
    (``.hydra/``), by W&B (the run's metadata keeps ``sys.argv``) and re-read by DDP children from ``sys.argv``. For
    this call, the value moves into an environment variable and the argument becomes ``key=${oc.env:VAR}``, which
    every one of them records as it is and resolves to the same value (children inherit the environment). Warns
    that ``LIVERFUSION_PRIVACY_SALT`` is the way that leaves no trace in the shell history either."""
    global _warned_salt_override
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:  # pragma: no cover
        yield
        return
    parser = None
    argv, env_before, moved = list(sys.argv), {}, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("-") or "=" not in arg or "${" in arg or not _secret_key(arg.split("=", 1)[0]):
            continue
        try:
            parser = parser or OverridesParser.create()
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001  Hydra reports a malformed override itself
            continue
        if override.is_delete() or override.is_sweep_override():
            continue  # a sweep over salts stays as given (Hydra's saved copies are still masked)
        var = SECRET_ENV_PREFIX + re.sub(r"\W", "_", override.key_or_group).upper()
        env_before.setdefault(var, os.environ.get(var))
        os.environ[var] = str(override.value())
        sys.argv[i] = f"{override.get_key_element()}=${{oc.env:{var}}}"
        moved.append(override.key_or_group)
    if moved and not _warned_salt_override:
        _warned_salt_override = True
        print(
            f"warning: {', '.join(moved)} given on the command line: kept out of the run's files, but it stays in "
            "your shell history and the process list; set LIVERFUSION_PRIVACY_SALT instead (docs/operations.md)",
            file=sys.stderr,
            flush=True,
        )
    try:
        yield
    finally:
        sys.argv[:] = argv
        for var, value in env_before.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _secret_key(key: str) -> bool:
    from liverfusion.utils.privacy import SECRET_KEYS

    name = re.split(r"[./]", key.lstrip("+~").split("@", 1)[0])[-1]
    return name in SECRET_KEYS


def _mask_override(text: Any) -> Any:
    """``privacy_salt=XYZ`` (or ``+callbacks.x.salt=XYZ``) -> ``privacy_salt=***``; any other override as is."""
    from liverfusion.utils.run_folder import MASK

    if not isinstance(text, str) or "=" not in text or "${" in text.split("=", 1)[1]:
        return text  # an interpolation (``${oc.env:...}``) names no secret
    key = text.split("=", 1)[0]
    return f"{key}={MASK}" if _secret_key(key) else text


def _mask_tree(tree: Any) -> Any:
    """Every value under a secret key masked, except interpolations (``${oc.env:...}`` names no secret)."""
    from liverfusion.utils.run_folder import MASK

    if isinstance(tree, dict):
        return {
            k: (
                MASK
                if _secret_key(str(k)) and tree[k] is not None and not str(tree[k]).startswith("${")
                else _mask_tree(v)
            )
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [_mask_tree(v) for v in tree]
    return tree


def _mask_hydra_tree(tree: Any) -> Any:
    """A saved Hydra config (``config.yaml``, ``hydra.yaml``, ``multirun.yaml``, ``overrides.yaml``) masked: secret
    keys, the recorded overrides, and ``hydra.job.override_dirname``."""
    if isinstance(tree, list):  # overrides.yaml
        return [_mask_override(v) for v in tree]
    tree = _mask_tree(tree)
    hydra = tree.get("hydra") if isinstance(tree, dict) else None
    if isinstance(hydra, dict):
        overrides = hydra.get("overrides") or {}
        for part in ("task", "hydra"):
            if isinstance(overrides.get(part), list):
                overrides[part] = [_mask_override(v) for v in overrides[part]]
        job = hydra.get("job") or {}
        if isinstance(job.get("override_dirname"), str):
            sep = (((job.get("config") or {}).get("override_dirname") or {}).get("item_sep")) or ","
            job["override_dirname"] = sep.join(_mask_override(v) for v in job["override_dirname"].split(sep))
    return tree


def _rewrite_masked(path: Path) -> bool:
    """Rewrite one saved Hydra YAML with its secrets masked; True when it held one."""
    from omegaconf import OmegaConf

    from liverfusion.utils.atomic import atomic_write_text

    if not path.is_file():
        return False
    loaded = OmegaConf.load(path)
    tree = OmegaConf.to_container(loaded, resolve=False)
    masked = _mask_hydra_tree(tree)
    if masked == tree:
        return False
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(masked)))
    return True


def mask_hydra_outputs() -> list[Path]:
    """Inside a Hydra job: mask the privacy salt in the copies of the config Hydra has just saved (the run's
    ``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``, and a sweep's ``multirun.yaml``), and warn when the
    salt was given on the command line. Returns the files rewritten; outside a Hydra job, nothing."""
    global _warned_salt_override
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover
        return []
    if not HydraConfig.initialized():
        return []
    hcfg = HydraConfig.get()
    task_overrides = list(OmegaConf.select(hcfg, "overrides.task", default=None) or [])
    given = [o.split("=", 1)[0] for o in task_overrides if _mask_override(o) != o]
    if given and not _warned_salt_override:
        _warned_salt_override = True
        log.warning(
            "%s given on the command line: masked in the run's saved configs, but it stays in your shell history "
            "and the process list; set LIVERFUSION_PRIVACY_SALT instead (docs/operations.md)",
            ", ".join(given),
        )
    files: list[Path] = []
    subdir = OmegaConf.select(hcfg, "output_subdir", default=None)
    out = OmegaConf.select(hcfg, "runtime.output_dir", default=None, throw_on_missing=False)
    if subdir is not None and out:
        files += [Path(out) / str(subdir) / f"{n}.yaml" for n in ("config", "hydra", "overrides")]
    if OmegaConf.select(hcfg, "mode", default=None) == RunMode.MULTIRUN:
        sweep = OmegaConf.select(hcfg, "sweep.dir", default=None, throw_on_missing=False)
        if sweep:
            files.append(Path(sweep) / "multirun.yaml")
    return [p for p in files if _rewrite_masked(p)]
