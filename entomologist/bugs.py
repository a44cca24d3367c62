"""The count of runs in a row that ended in a bug, read by the unit's ExecCondition.

Optional machinery: the boot's flow does not depend on it; boot.py calls
``note_outcome`` once a run has its exit code.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import EntoError
from .files import write_file_atomic

log = logging.getLogger("entomologist")


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
