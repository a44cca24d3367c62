"""The exception hierarchy, and the one place where outcomes become exit codes.

Expected failures are EntoError and end the run with one log line; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import os
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


class Rejected(ServiceError):
    """The service answered a request with a rejection: what it was asked for did not happen."""


class InventoryRefused(Rejected):
    """RegisterThing denied by the template's pre-provisioning hook: the fleet inventory."""


class SubscriptionRefused(TransientError):
    """The broker answered a SUBSCRIBE with a failure (SUBACK 0x80): a policy, not the network."""


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
# A host short of threads or memory: nothing the config names is wrong, and a
# later run may have them.
SHORTAGE_HINT = "the processes and memory of this host: another program may hold them"


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
