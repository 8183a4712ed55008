"""Inter-process file locks for folders that several processes fill at once (multirun jobs, DDP ranks, nodes).

A lock is ``flock`` on a small file next to what it guards. The kernel drops it when its holder exits or is killed,
so a crashed writer never leaves a stale lock: a waiter simply gets it. The holder deletes the file before it lets
go, so no lock files pile up; a waiter that then wins the deleted file notices (its inode is no longer the path's)
and locks the path afresh, so two processes never hold "the same" lock on two inodes. The file holds the holder's
pid and host, for the "waiting for ..." message. Where ``fcntl`` is missing (Windows) ``filelock`` (a dependency of
torch) does the locking.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

NOTICE_AFTER_S = 2.0
"""A waiter logs who holds the lock after this long, then every ``REPEAT_NOTICE_S``."""
REPEAT_NOTICE_S = 60.0


class FileLock:
    """An exclusive lock on ``path`` shared by all processes that use the same file (not re-entrant)."""

    def __init__(self, path: str | Path, what: str = ""):
        self.path = Path(path)
        self.what = what or str(self.path)
        self._fd: int | None = None
        self._fallback = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._fallback is not None

    def acquire(self, blocking: bool = True, poll_s: float = 0.05) -> bool:
        """Take the lock; wait for another holder when ``blocking`` (as long as it takes), else return False.

        OSError (e.g. a read-only folder) propagates: the caller decides whether it can go on without the lock.
        """
        if self.held:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        if fcntl is None:  # pragma: no cover - Windows
            return self._acquire_fallback(blocking)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = last_notice = time.monotonic()
        noticed = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if not blocking:
                            os.close(fd)
                            return False
                    now = time.monotonic()
                    if now - start > NOTICE_AFTER_S and (not noticed or now - last_notice > REPEAT_NOTICE_S):
                        log.info(
                            "waiting for %s (held by %s for %.0f s so far)",
                            self.what,
                            self._holder(fd),
                            now - start,
                        )
                        noticed, last_notice = True, now
                    time.sleep(poll_s)
                    poll_s = min(poll_s * 1.5, 1.0)
                if self._is_path(fd):
                    break
                os.close(fd)  # the previous holder deleted this file on release: lock the path anew
            except BaseException:
                os.close(fd)
                raise
        with contextlib.suppress(OSError):  # informative only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return True

    def _is_path(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def release(self) -> None:
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release()
            self._fallback = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            # deleted while still held, so no one else can have locked the file at this path
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def _holder(fd: int) -> str:
        with contextlib.suppress(OSError):
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if text:
                return text
        return "another process"

    def _acquire_fallback(self, blocking: bool) -> bool:  # pragma: no cover - Windows
        import filelock

        lock = filelock.FileLock(str(self.path))
        try:
            lock.acquire(timeout=-1 if blocking else 0)
        except filelock.Timeout:
            return False
        self._fallback = lock
        return True


@contextlib.contextmanager
def locked(path: str | Path, what: str = "") -> Iterator[FileLock]:
    """``with locked(p):`` -- hold the lock on ``p`` for the block, waiting for any other holder first."""
    lock = FileLock(path, what)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
