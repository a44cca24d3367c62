"""The run's deadline, and retries with exponential backoff and full jitter."""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Callable

from .clock import REAL, Clock
from .errors import TransientError

log = logging.getLogger("entomologist")

STEP_TIMEOUT = 20.0
RUN_TIMEOUT = 120.0
# boot.py --check: long enough for one connection's worth of waits, short for a technician.
CHECK_TIMEOUT = 30.0


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero (nan and inf remove every bound)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number of seconds above 0, not {text!r}")
    return value


class Deadline:
    """The whole run's time budget; every wait asks it for a bounded slice.

    It carries the run's clock (entomologist.clock), so whatever is handed the
    deadline sleeps and waits on the same time that bounds it."""

    def __init__(self, seconds: float, clock: Clock = REAL, step_limit: float = STEP_TIMEOUT):
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"a deadline needs a finite positive number of seconds, not {seconds}")
        self.clock = clock
        self._end = clock.monotonic() + seconds
        self.step_limit = step_limit

    def remaining(self) -> float:
        return self._end - self.clock.monotonic()

    def step(self, what: str) -> float:
        """How long the next wait may last: the step limit, or what is left of the run."""
        left = self.remaining()
        if left <= 0:
            raise TransientError(f"{what}: the run's time limit was reached",
                                 hint="the network link; the run will be retried")
        return min(self.step_limit, left)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: sleep uniformly in [0, min(cap, base*2^n)]."""

    base: float = 0.5
    cap: float = 20.0
    # Not worth sleeping if less than this would be left for the next try.
    min_attempt: float = 1.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0, min(self.cap, self.base * 2 ** attempt))


# Tuned with bench/fleet.py (50 devices, 5 requests/s per API): a throttled
# request is asked again on its open connection, which costs one publish, so
# a short cap keeps the fleet's makespan near N/R; reconnecting costs TCP and
# TLS handshakes, so it backs off further.
BUSY_BACKOFF = Backoff(base=0.5, cap=2.0)
RECONNECT_BACKOFF = Backoff(base=0.5, cap=20.0)


def with_retries(action: Callable[[], object], deadline: Deadline, what: str,
                 backoff: Backoff = RECONNECT_BACKOFF, rng: random.Random | None = None,
                 retry_on: type[TransientError] = TransientError,
                 hold: "Callable[[], tuple[float, str]] | None" = None):
    """Call ``action`` until it does not raise ``retry_on`` or time runs out.

    ``hold``, asked after each failure, gives the least wait before the next
    attempt and why (a bound on what attempts spend, kept across runs): a
    wait past the deadline ends the run at once instead of sleeping.
    """
    attempt = 0
    while True:
        try:
            return action()
        except retry_on as exc:
            attempt += 1
            pause = backoff.delay(attempt, rng)
            held, why = hold() if hold is not None else (0.0, "")
            if held > pause:
                pause = held
            if deadline.remaining() - pause < backoff.min_attempt:
                reason = why if held and held >= pause else "the run's time limit was reached"
                raise TransientError(f"{exc} (gave up after {attempt} attempt(s): {reason})",
                                     hint=exc.hint) from exc
            log.warning("%s: %s; retrying in %.1f s (attempt %d)", what, exc, pause, attempt + 1)
            deadline.clock.sleep(pause)
