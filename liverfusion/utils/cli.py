"""The one error wrapper of every command-line entry point.

A problem the user can fix ends the command with one line, ``error: <file or key>: <problem>; <fix>``, on stderr and
exit status 2, never a traceback from deep inside torch. Set ``LIVERFUSION_TRACEBACK=1`` to see the traceback too
(for bug reports).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from liverfusion.errors import LiverfusionError

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


def error_line(err: BaseException) -> str:
    """The one line printed for ``err``: ``error: <where>: <problem>; <fix>``."""
    err = _unwrap(err)
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
    user = isinstance(_unwrap(err), LiverfusionError | OSError)
    sys.exit(USER_ERROR if user else INTERNAL_ERROR)


def cli_errors(fn: F) -> F:
    """Decorate an entry point's body: every exception becomes one line and an exit status (see ``fail``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001  one line for the user, whatever went wrong
            fail(err)

    return wrapper  # type: ignore[return-value]
