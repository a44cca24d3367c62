"""SIGTERM and SIGINT: stop at once, unless a registration's answer is on its way.

A run is built so that a kill at any instant leaves a state the next run
completes; so on a signal the run simply ends where it is, as a kill would
(no clean-up, no retry), after one log line.  The one exception: between
sending RegisterThing and recording its answer, ending now would waste that
registration (the next run would register again, leaving the accepted one's
certificate unused in AWS).  There the run waits up to GRACE_S for the answer
and its record, then ends.  GRACE_S stays well within the unit's
TimeoutStopSec, after which systemd kills.

The exit code is 75 (EX_TEMPFAIL): the run did not finish.  ``systemctl
stop`` and a shutdown never restart a unit whatever its code, while a stray
SIGTERM from anything else is retried like any transient failure.

SIGINT is handled even when the process was started with it ignored (``&``
in a script, nohup): Ctrl-C and a test harness's SIGINT must stop the run
the same way.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from . import logs
from .errors import STOPPED

log = logging.getLogger("entomologist")

GRACE_S = 5.0
# How long after the run's time limit a call that never returned ends the run:
# beyond the run's own bounded work once its limit is reached (a disconnect
# waits up to 2 s for the broker), so only a call that never returns meets it.
LIMIT_GRACE_S = 5.0
EXIT_CODE = STOPPED
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_BEFORE_START: dict = {}


class Stop:
    """The run's signal handlers, and the one window where a signal waits.

    ``on_exit(code)`` runs just before the process ends (the scripts count
    their outcome with it)."""

    def __init__(self, on_exit: Callable[[int], None] = lambda code: None,
                 grace: float = GRACE_S):
        self._on_exit = on_exit
        self._grace = grace
        self._waiting_for: str | None = None
        self._received: str | None = None
        self._ending = threading.Lock()
        self._limit: threading.Timer | None = None

    @contextmanager
    def installed(self) -> Iterator["Stop"]:
        """The handlers, for the time of the block (the caller's come back after it)."""
        before = {signo: signal.signal(signo, self._handle) for signo in SIGNALS}
        try:
            yield self
        finally:
            if self._limit is not None:
                self._limit.cancel()  # the run is over: it never fires in a caller's process
            for signo, handler in before.items():
                signal.signal(signo, handler)

    def time_limit(self, seconds: float) -> None:
        """A backstop for the run's time limit: every wait of the run's own is bounded,
        but a call into a PKCS#11 module (python-pkcs11's, awscrt's) has no limit, and
        a token or a device that stops answering holds it for ever.  LIMIT_GRACE_S
        after ``seconds`` the run ends as on SIGTERM, from this timer's thread (until the
        ``installed`` block ends)."""
        why = (f"the run's time limit ({seconds:g} s) passed in a call that did not return "
               f"(a PKCS#11 module whose token or device stopped answering?)")
        self._limit = backstop(seconds, lambda: self._stop_requested(why), "the run")

    def _handle(self, signo: int, frame) -> None:
        self._stop_requested(signal.Signals(signo).name)

    def _stop_requested(self, name: str) -> None:
        if self._received is not None:
            self._end(f"{name} again: stopping now; the next run takes over from here")
        self._received = name
        if self._waiting_for is None:
            self._end(f"{name}: stopping now; the next run takes over from here")
        log.warning("%s: %s is on its way: waiting up to %.0f s for its answer, to record "
                    "it, then stopping", name, self._waiting_for, self._grace)
        timer = threading.Timer(self._grace, self._end,
                                [f"{name}: no answer to {self._waiting_for} in "
                                 f"{self._grace:.0f} s: stopping; the next run takes over "
                                 f"from here"])
        timer.daemon = True
        timer.start()

    @contextmanager
    def answer_awaited(self, what: str) -> Iterator[None]:
        """A signal inside this block waits (bounded) for the block to end, then stops."""
        self._waiting_for = what
        outcome = "its answer recorded"
        try:
            yield
        except BaseException as exc:
            outcome = f"it did not complete ({type(exc).__name__})"
            raise
        finally:
            self._waiting_for = None
            if self._received is not None:
                self._end(f"{self._received}: stopping after {what}, {outcome}")

    def _end(self, message: str) -> None:
        # Whichever comes first (the grace timer's thread, the main thread) ends the run.
        self._ending.acquire()
        log.error("%s", message)
        try:
            self._on_exit(EXIT_CODE)
        finally:
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except Exception:
                    pass
            os._exit(EXIT_CODE)


def backstop(seconds: float, act: Callable[[], None], whose: str) -> threading.Timer | None:
    """``act()`` from a timer's thread LIMIT_GRACE_S after a time limit of ``seconds``
    (cancel the timer returned once the work is over); None, with one warning, on a
    host with no thread to give: the work goes on without it."""
    # A lock's wait cannot be longer than TIMEOUT_MAX (--timeout may be 1e300).
    timer = threading.Timer(min(seconds + LIMIT_GRACE_S, threading.TIMEOUT_MAX), act)
    timer.daemon = True
    try:
        timer.start()
    except RuntimeError as exc:
        log.warning("no backstop for %s's time limit: %s", whose, exc)
        return None
    return timer


def stop_while_starting() -> None:
    """Until a script's Stop is installed: a signal while Python loads the product
    (on a camera's slow CPU and card, a second or more) ends the run as Stop would,
    with one line and 75, not with a KeyboardInterrupt traceback or a death by
    SIGTERM.  Nothing has been done yet, so there is nothing to wait for."""
    for signo in SIGNALS:
        _BEFORE_START.setdefault(signo, signal.signal(signo, _stopped_while_starting))


def started() -> None:
    """The handlers from before ``stop_while_starting``, for a command that handles
    signals its own way (``--check``: Ctrl-C prints "interrupted")."""
    for signo, handler in _BEFORE_START.items():
        signal.signal(signo, handler)


def _stopped_while_starting(signo: int, frame) -> None:
    prefix = "<3>" if logs.stderr_is_journal() else "ERROR "
    message = f"{signal.Signals(signo).name}: stopping now; the next run takes over from here"
    try:
        os.write(2, f"{prefix}{message}\n".encode())
    finally:
        os._exit(EXIT_CODE)
