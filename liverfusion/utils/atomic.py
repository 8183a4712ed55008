"""Atomic file output: write to a temporary file in the same folder, then rename over the target.

A killed process, a full disk or a second writer therefore leaves either the old file or the new one, never a
half-written file that looks complete (a rename within one folder is atomic; a temporary file elsewhere, e.g. in
/tmp, would be copied, not renamed, across file systems). A failed write raises the OSError with the *target's* name
(not the temporary file's), which the CLI prints as ``error: <target>: No space left on device; ...``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 64 << 20


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``.

    ``suffix`` defaults to the target's full suffix (e.g. ``.nii.gz``) so that writers which infer the format
    from the name keep working. ``durable`` fsyncs the file and its folder, so the new file survives a power cut
    (checkpoints, exported weights); rebuildable outputs skip it.
    """
    target = Path(target)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if suffix is None:
            suffix = "".join(target.suffixes)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        if durable:
            _fsync(tmp_path)
        os.replace(tmp_path, target)
        if durable:
            _fsync(target.parent)
    except BaseException as err:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        if isinstance(err, OSError):
            named = _naming_target(err, target, tmp_path)
            if named is not err:
                raise named from err
        raise


def _naming_target(err: OSError, target: Path, tmp: Path | None) -> OSError:
    """``err`` re-made to name ``target`` when it names nothing or only the temporary file."""
    if err.errno is None or (err.filename is not None and str(err.filename) not in (str(tmp), str(target))):
        return err
    if str(err.filename) == str(target) and err.filename2 is None:
        return err
    try:
        return type(err)(err.errno, err.strerror or os.strerror(err.errno), str(target))
    except TypeError:  # an OSError subclass with another signature
        return OSError(err.errno, err.strerror or os.strerror(err.errno), str(target))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems refuse to fsync a folder; the file itself must sync
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_chunks(fh, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to the open file ``fh`` in chunks (one place for tests to simulate a full disk)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK):
        fh.write(view[start : start + CHUNK])


def atomic_write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def atomic_write_bytes(
    target: str | Path, data: bytes | bytearray | memoryview, durable: bool = False
) -> Path:
    with atomic_path(target, durable=durable) as tmp, open(tmp, "wb") as fh:
        _write_chunks(fh, data)
    return Path(target)
