"""One run at a time: an exclusive flock on ``CERT_DIR/run.lock``.

The lock lives in CERT_DIR because nobody but root and us can write there
(checked before use), and the file is 0600: another local user can neither
open it nor hold the lock to block every boot (a flock on a folder anyone can
read, such as /etc/entomologist, could be held by anyone).  A provisioned
device whose folders are read-only still locks: the file, made at the first
boot, is opened read-only then, and a missing one falls back to the unit's
RuntimeDirectory (/run/entomologist), by hand too when that folder is there, else
for a run by hand to the folder itself.  A run through a symlinked config and
a run through its target find the same real CERT_DIR, so they exclude each
other.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from .errors import ConfigError, StorageError, TransientError
from .retries import Deadline

log = logging.getLogger("entomologist")

LOCK_NAME = "run.lock"
UNIT_RUNTIME_DIRECTORY = "/run/entomologist"  # the unit's RuntimeDirectory=entomologist


def runtime_directory() -> str | None:
    """Where a lock goes when CERT_DIR cannot hold its file: under the unit, its
    RuntimeDirectory; by hand, that same folder when it is there and nobody but root
    (or us) can use it, so that a run by hand and the unit's exclude each other."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return runtime
    try:
        st = os.stat(UNIT_RUNTIME_DIRECTORY)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o077:
        return UNIT_RUNTIME_DIRECTORY
    return None


class RunLock:
    def __init__(self, cert_dir: Path):
        self.path = cert_dir / LOCK_NAME
        self._fd: int | None = None

    def _open(self) -> int:
        # O_NONBLOCK: a FIFO planted as the lock file must not hang the open.
        flags = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            return os.open(self.path, flags | os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
                raise
        try:
            return os.open(self.path, flags | os.O_RDONLY)
        except FileNotFoundError:
            pass
        # A read-only CERT_DIR without the file (an image made before it existed):
        # the unit's private RuntimeDirectory, which nobody else can open (the
        # folder itself may be one that others can open, and so hold).
        runtime = runtime_directory()
        if runtime:
            self.path = Path(runtime) / LOCK_NAME
            return os.open(self.path, flags | os.O_RDWR | os.O_CREAT, 0o600)
        return os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def acquire(self, deadline: Deadline, poll: float = 0.1) -> None:
        try:
            self._fd = self._open()
        except OSError as exc:
            raise StorageError(f"cannot open the lock {self.path}: {exc.strerror}",
                               hint=f"the owner and mode of {self.path.parent}") from None
        st = os.fstat(self._fd)
        if st.st_uid not in (0, os.geteuid()) or (
                stat.S_ISREG(st.st_mode) and st.st_mode & 0o077):
            self.release()
            raise ConfigError(f"refusing the lock {self.path}: it is not a 0600 file of root "
                              f"or this user", hint=f"remove {self.path}")
        announced = False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if not announced:
                log.info("another run holds the lock %s; waiting for it", self.path)
                announced = True
            if deadline.remaining() <= poll:
                raise TransientError("another run still holds the lock at the time limit",
                                     hint=f"for a hung process holding {self.path}")
            deadline.clock.sleep(poll)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(cert_dir: Path, runtime_dir: str | None = None) -> Path | None:
    """The lock a running boot holds now, if any: found as ``RunLock`` would find it,
    but without creating, writing or waiting for anything (a lock file that does
    not exist is held by nobody).  A shared lock taken for an instant is the probe:
    a run starting in that instant waits that instant.  Once ``run.lock`` exists
    every run locks it, so nothing else is probed then; before, a run locks the
    folder only where it cannot create the file (a read-only CERT_DIR): elsewhere a
    lock on the folder (a CERT_DIR others can read, which any of them can flock) is
    nobody's boot."""
    candidates = [cert_dir / LOCK_NAME]
    if not os.path.lexists(candidates[0]):
        if runtime_dir:
            candidates.append(Path(runtime_dir) / LOCK_NAME)
        if not os.access(cert_dir, os.W_OK):
            candidates.append(cert_dir)
    for path in candidates:
        try:
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(path, flags | (os.O_DIRECTORY if path == cert_dir else 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return path
        finally:
            os.close(fd)  # closing releases the probe's lock
    return None
