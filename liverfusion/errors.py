"""Errors a user can act on: each names the file (or case) and the problem, never a deep torch trace."""

from __future__ import annotations

from pathlib import Path


class LiverfusionError(Exception):
    """Base class for errors raised on purpose by liverfusion. ``fix`` (optional) says what would work; the CLI
    wrapper (``liverfusion.utils.cli``) prints ``error: <message>; <fix>``."""

    fix: str | None = None


class DataError(LiverfusionError):
    """A problem with the user's data: names the offending file or case and the reason."""

    def __init__(
        self, reason: str, path: str | Path | None = None, case: str | None = None, fix: str | None = None
    ):
        self.reason = reason
        self.fix = fix
        self.path = str(path) if path is not None else None
        self.case = case
        where = []
        if case is not None:
            where.append(f"case {case!r}")
        if self.path is not None:
            where.append(f"file {self.path}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + reason)

    def __reduce__(self):  # keep path/case when raised inside a worker process
        return (type(self), (self.reason, self.path, self.case, self.fix))


class ConfigError(LiverfusionError):
    """A configuration value that cannot work, with the key and what would."""

    def __init__(self, message: str, fix: str | None = None):
        self.fix = fix
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.fix))


class CheckpointError(LiverfusionError):
    """A checkpoint or exported weight file that is missing, corrupt or does not match the model."""

    def __init__(self, message: str, fix: str | None = None):
        self.fix = fix
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.fix))
