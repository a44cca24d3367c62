"""Name lookups bounded in time, and TCP connections that use them.

getaddrinfo has no time limit of its own: a DNS server that stops answering
holds it for resolv.conf's timeout times attempts (a minute or more), and while
it runs in the main thread a signal handler cannot run either.  So the lookup
runs in a daemon thread, abandoned when the time is up, and the main thread
waits on a lock, which a signal interrupts.
"""
from __future__ import annotations

import errno
import socket
import threading
import time

from .errors import SHORTAGE_HINT, TransientError


def _timed_out(host: str, timeout: float) -> TimeoutError:
    return TimeoutError(errno.ETIMEDOUT, f"no DNS answer for {host} in {timeout:.0f} s")


def getaddrinfo(host: str, port: int, timeout: float) -> list:
    """``socket.getaddrinfo(host, port, type=SOCK_STREAM)``, TimeoutError after ``timeout`` s."""
    box: list = []
    done = threading.Event()

    def target() -> None:
        try:
            box.append((True, socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box.append((False, exc))
        finally:
            done.set()
    try:
        threading.Thread(target=target, name="getaddrinfo", daemon=True).start()
    except RuntimeError as exc:  # a host out of threads: a later run may have one
        raise TransientError(f"no thread to be had for the name lookup of {host} ({exc})",
                             hint=SHORTAGE_HINT) from None
    if not done.wait(max(timeout, 0.0)):
        raise _timed_out(host, timeout)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def create_connection(host: str, port: int, timeout: float) -> socket.socket:
    """As ``socket.create_connection((host, port), timeout)``, but ``timeout`` bounds the
    lookup and every address tried, all together."""
    end = time.monotonic() + timeout
    last: OSError | None = None
    for family, kind, proto, _, address in getaddrinfo(host, port, timeout):
        remaining = end - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(remaining)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or TimeoutError(errno.ETIMEDOUT, f"connect to {host}:{port} timed out")
