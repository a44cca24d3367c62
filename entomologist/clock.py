"""The one clock seam, and refusing to connect with a clock that is provably behind.

``Clock`` is every reading of time and every wait the product makes on a
bounded future or queue: the run's ``Deadline`` carries one, and the lock,
the retries, fleet provisioning, the MQTT waits and the spend record all ask
it, so tests replace one object (tests/fakes.py FakeClock) instead of waiting.
A wait on something another thread completes (an awscrt future, the queue
its callbacks fill) has to be a real bounded wait: ``Clock`` does it, given
the timeout the caller worked out from ``monotonic``, and a fake clock
answers at once (what is ready, or the timeout after advancing by it) rather
than being polled.

A board without a real-time clock can boot years in the past; TLS would then
fail only after a long delay, with an opaque error.  The clock cannot be
earlier than the notBefore of a certificate the service issued.

The config file's modification time is deliberately not a floor: a clock
that once ran ahead stamps it in the future, and the device would then refuse
every boot until real time caught up.  (A certificate is stamped by the
service's clock, not ours.)
"""
from __future__ import annotations

import queue
import re
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Sequence

from .certs import not_valid_before, pem_certificates
from .errors import TransientError
from .files import FileProblem, read_bounded

BOOT_ID = "/proc/sys/kernel/random/boot_id"
BOOT_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Clock:
    """Real time: the monotonic clock for durations, the wall clock for what
    outlives the run (records, certificate validity), and real waits."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def boot_id(self) -> str | None:
        """This boot's identity (the kernel's random boot_id); None where there is none."""
        try:
            with open(BOOT_ID, "rb") as f:
                text = f.read(64).decode("ascii", "replace").strip()
        except OSError:
            return None
        return text if BOOT_ID_RE.fullmatch(text) else None

    def boottime(self) -> float | None:
        """Seconds since this boot, counting suspend, and blind to the wall clock being
        set; None where the kernel has no CLOCK_BOOTTIME."""
        try:
            return time.clock_gettime(time.CLOCK_BOOTTIME)
        except (AttributeError, OSError):
            return None

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def result(self, future: Future, timeout: float):
        """``future.result``, waiting at most ``timeout`` seconds (awscrt's futures
        never time out by themselves); concurrent.futures.TimeoutError then."""
        return future.result(max(0.0, timeout))

    def get(self, items: queue.Queue, timeout: float):
        """The next item of ``items``, waiting at most ``timeout``; queue.Empty then."""
        return items.get(timeout=max(0.0, timeout))


REAL = Clock()


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def check_clock(certificate_files: Sequence[Path],
                now: Callable[[], float] = REAL.time) -> None:
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
            f"the system clock is not set: it reads {utc(current)}, before {source} "
            f"({utc(floor)}); the run will be retried",
            hint="time synchronisation (systemd-timesyncd, network time)")
