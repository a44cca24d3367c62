"""One run at a time: an exclusive flock on the config's real folder.

Locking the folder rather than a lock file needs no write (a provisioned
device with a read-only config folder still reports its boot), and a run
through a symlinked config and a run through its target lock the same folder.
The folder's inode, unlike the config's, survives the config's rewrites.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

from .errors import ConfigError, TransientError
from .retries import Deadline

log = logging.getLogger("entomologist")


class RunLock:
    def __init__(self, config_path: Path):
        self.path = Path(os.path.realpath(config_path)).parent
        self._fd: int | None = None

    def acquire(self, deadline: Deadline, poll: float = 0.1) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"config folder {self.path} cannot be opened: {exc.strerror}",
                              hint="--config") from None
        announced = False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if not announced:
                log.info("another run holds the lock on %s; waiting for it", self.path)
                announced = True
            if deadline.remaining() <= poll:
                raise TransientError("another run still holds the lock at the time limit",
                                     hint=f"for a hung process holding {self.path}")
            time.sleep(poll)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
