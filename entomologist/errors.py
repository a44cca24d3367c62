"""The exception hierarchy, and the one place where outcomes become exit codes.

Expected failures are EntoError and end the run with one log line; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable

log = logging.getLogger("entomologist")


class EntoError(Exception):
    """An expected failure: logged as one line, no traceback.

    ``hint`` says what a technician should check.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(EntoError):
    """The config file, or a file it names, is missing, wrong or untrusted."""


class TransientError(EntoError):
    """Network, broker or service trouble that a later run may not meet."""


class ServiceBusy(TransientError):
    """The service answered but is busy (throttling, 5xx): ask again, same connection."""


class ServiceError(EntoError):
    """The service refused for good, or answered with something malformed."""


class StorageError(EntoError):
    """Credentials or the config cannot be written."""


class ReadOnlyStorage(StorageError):
    """The write failed because the file system, or this process's view of it, is read-only."""


# sysexits.h; the most specific class wins, EntoError itself is a transient
# failure of unknown kind rather than a bug.
EXIT_CODES: tuple[tuple[type[EntoError], int], ...] = (
    (ConfigError, os.EX_CONFIG),        # 78
    (TransientError, os.EX_TEMPFAIL),   # 75
    (ServiceError, os.EX_DATAERR),      # 65
    (StorageError, os.EX_CANTCREAT),    # 73
    (EntoError, os.EX_TEMPFAIL),
)


# A run stopped by a signal or Ctrl-C did not finish: transient.  systemd never
# restarts a unit it stopped itself, whatever the code (see entomologist.stop).
STOPPED = os.EX_TEMPFAIL


def exit_code(exc: EntoError) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(exc, kind))


def run_main(body: Callable[[], None]) -> int:
    """Run ``body`` and turn its outcome into an exit code."""
    try:
        body()
    except EntoError as exc:
        hint = f"; check {exc.hint}" if exc.hint else ""
        log.error("%s%s", exc, hint)
        return exit_code(exc)
    except KeyboardInterrupt:
        log.error("interrupted")
        return STOPPED
    except Exception:
        log.exception("unexpected error (a bug): please report it with this log")
        return os.EX_SOFTWARE
    return os.EX_OK


BUG_COUNT_FILE = "consecutive-bugs"
BUG_LIMIT = 3


def read_bug_count(path: str) -> int:
    """The count in ``path``; a missing, empty or garbled file counts as 0, as the
    unit's ExecCondition reads it (one or two digits, else 0)."""
    try:
        with open(path, "rb") as f:
            text = f.read(16)
    except OSError:
        return 0
    return int(text) if re.fullmatch(rb"[0-9]{1,2}\n*", text) else 0


def note_outcome(code: int, runtime_dir: str | None) -> None:
    """Count consecutive runs that ended in a bug, in the unit's RuntimeDirectory.

    systemd retries every failure but 78 and 65; a bug (70) may be a passing
    fault worth a few tries, but retried every minute for ever it only burns
    power and fills the journal.  The unit's ExecCondition skips the run once
    the count reaches BUG_LIMIT; /run is emptied at the next boot.  The count
    is replaced whole (a full /run keeps the old one, never an empty file).
    """
    if not runtime_dir:
        return  # run by hand: nothing to count
    from .files import write_file_atomic
    path = os.path.join(runtime_dir, BUG_COUNT_FILE)
    try:
        if code != os.EX_SOFTWARE:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        count = read_bug_count(path) + 1
        write_file_atomic(Path(path), f"{count}\n".encode(), 0o600)
        if count >= BUG_LIMIT:
            log.error("%d runs in a row ended in a bug: no more retries until the next boot "
                      "(or remove %s and restart the unit)", count, path)
    except OSError as exc:
        log.warning("cannot count failed runs in %s: %s", runtime_dir, exc.strerror)
    except EntoError as exc:
        log.warning("cannot count failed runs: %s", exc)
