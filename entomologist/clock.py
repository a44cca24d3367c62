"""Refuse to connect with a clock that is provably behind.

A board without a real-time clock can boot years in the past; TLS would then
fail only after a long delay, with an opaque error.  The clock cannot be
earlier than the notBefore of a certificate the service issued.

The config file's modification time is deliberately not a floor: a clock
that once ran ahead stamps it in the future, and the device would then refuse
every boot until real time caught up.  (A certificate is stamped by the
service's clock, not ours.)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from .certs import not_valid_before, pem_certificates
from .errors import TransientError
from .files import FileProblem, read_bounded


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def check_clock(certificate_files: Sequence[Path],
                now: Callable[[], float] = time.time) -> None:
    floor, source = 0.0, ""
    for path in certificate_files:
        try:
            starts = [not_valid_before(der)
                      for der in pem_certificates(read_bounded(path, "certificate"))]
        except (FileProblem, ValueError):
            continue  # unreadable files are reported where they are used
        for start in starts:
            if start > floor:
                floor, source = start, f"the start of validity of {path}"
    current = now()
    if current < floor:
        raise TransientError(
            f"the system clock is not set: it reads {_utc(current)}, before {source} "
            f"({_utc(floor)}); the run will be retried",
            hint="time synchronisation (systemd-timesyncd, network time)")
