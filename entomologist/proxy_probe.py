"""What an HTTP proxy's failure means, asked of the proxy itself.

awscrt 0.36.1 reports every answer to CONNECT but 200 as one error,
AWS_ERROR_HTTP_PROXY_CONNECT_FAILED: a 403 (the proxy's rules forbid that
port), a 401 or 407 (credentials) and a 500 or 502 (the proxy could not
reach the endpoint) look alike.  The first two are the site's configuration
and retrying cannot help; the last is an outage that retrying should ride
out.  So after that error ``failure`` asks the proxy itself, with one CONNECT
of its own, which status it answers, and decides from that.  ``boot.py
--check`` opens its tunnel with the same ``open_tunnel``.
"""
from __future__ import annotations

import base64
import re
import socket
import time

from . import lookup
from .errors import ConfigError, EntoError, TransientError
from .proxy import FORM, KEY, Proxy

CONNECT_FAILED = "AWS_ERROR_HTTP_PROXY_CONNECT_FAILED"
PROBE_LIMIT_S = 10.0
# What the probe reads at most: interim (1xx) answers and the final status line.
PROBE_MAX_BYTES = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")


class ProbeError(OSError):
    """The proxy's answer to the probe is not an HTTP answer, or is unbounded."""


class ClosedWithoutAnswer(ProbeError):
    """The proxy closed the probe's connection without a status line."""


def connect_status(proxy: Proxy, host: str, port: int, timeout: float) -> int:
    """The status ``proxy`` answers to CONNECT host:port, as awscrt asks it, read
    within ``timeout`` seconds in all and at most PROBE_MAX_BYTES: interim 1xx
    answers (but 101) are skipped, and a proxy that sends them for ever, or a
    byte at a time, only runs the time out.

    Raises OSError (socket.timeout when the time runs out; ProbeError when the
    answer is not HTTP or too long).
    """
    status, sock = open_tunnel(proxy, host, port, timeout, read_head=False)
    sock.close()
    return status


def open_tunnel(proxy: Proxy, host: str, port: int, timeout: float,
                read_head: bool = True) -> tuple[int, socket.socket]:
    """CONNECT host:port through ``proxy``, as ``connect_status`` asks it: the final
    status and the socket (the caller closes it).  With ``read_head`` a 200 is
    read to the end of its head, so that what follows on the socket is the
    tunnel.  Raises as ``connect_status``."""
    end = time.monotonic() + timeout
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    sock = lookup.create_connection(proxy.host, proxy.port, timeout)
    try:
        sock.settimeout(max(end - time.monotonic(), 0.001))
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        received, start = b"", 0  # start: where the answer being read begins
        while True:
            line_end = received.find(b"\r\n", start)
            if line_end >= 0:
                match = _STATUS_LINE.fullmatch(received[start:line_end])
                if not match:
                    raise ProbeError("not an HTTP status line")
                status = int(match.group(1))
                final = not (100 <= status < 200) or status == 101
                if final and (not read_head or status != 200):
                    return status, sock
                head_end = received.find(b"\r\n\r\n", start)
                if head_end >= 0:
                    if not final:
                        start = head_end + 4
                        continue
                    # A tunnel carries nothing until the client speaks.
                    if len(received) > head_end + 4:
                        raise ProbeError("bytes after the answer, before the tunnel was used")
                    return status, sock
            if len(received) >= PROBE_MAX_BYTES:
                raise ProbeError(f"no final status in {PROBE_MAX_BYTES} bytes")
            left = end - time.monotonic()
            if left <= 0:
                raise socket.timeout("no final status in time")
            sock.settimeout(left)
            chunk = sock.recv(PROBE_MAX_BYTES - len(received))
            if not chunk:
                raise ClosedWithoutAnswer("closed without a status line")
            received += chunk
    except BaseException:
        sock.close()
        raise


def refusal(proxy: Proxy, host: str, port: int, status: int) -> EntoError:
    """What a status other than 200 to our CONNECT means, and what to check.

    Only 401, 403 and 407 are the site's configuration: anything else (a
    captive portal's redirect or login page, a 400, a 404) may be gone at the
    next try, and stopping the unit until the next boot would cost more than
    retrying every minute."""
    where = f"the HTTP proxy {proxy}"
    if status in (401, 407):
        if proxy.username is None:
            return ConfigError(f"{where} asks for credentials (HTTP {status}) to CONNECT to "
                               f"{host}:{port}",
                               hint=f"that {KEY} carries the proxy's user name and "
                                    f"password ({FORM})")
        return ConfigError(f"{where} refused the credentials in {KEY} (HTTP {status}) to "
                           f"CONNECT to {host}:{port}",
                           hint=f"the user name and password in {KEY} (percent-encode "
                                f"':', '@' and '%' in them) and the proxy's user list")
    if status == 403:
        return ConfigError(f"{where} refused to CONNECT to {host}:{port} (HTTP {status})",
                           hint=f"that the proxy's rules allow CONNECT to port {port} "
                                f"(tinyproxy: ConnectPort; squid: SSL_ports), or use PORT "
                                f"443, which proxies allow for HTTPS")
    if status in (408, 429) or status >= 500:
        return TransientError(f"{where} could not open a tunnel to {host}:{port} "
                              f"(HTTP {status})",
                              hint="that the proxy can resolve and reach ENDPOINT_URL; "
                                   "the endpoint may be down")
    return TransientError(f"{where} answered CONNECT to {host}:{port} with something other "
                          f"than a tunnel (HTTP {status})",
                          hint="whether the site's network wants a login first (a captive "
                               "portal) and that HTTP_PROXY names the site's proxy; retrying")


# Before the proxy accepted the connection: nothing was said to it.
_UNREACHABLE = ("AWS_IO_DNS_", "AWS_IO_SOCKET_CONNECTION_REFUSED", "AWS_IO_SOCKET_TIMEOUT",
                "AWS_IO_SOCKET_NO_ROUTE_TO_HOST", "AWS_IO_SOCKET_NETWORK_DOWN",
                "AWS_IO_SOCKET_INVALID_ADDRESS", "AWS_IO_SOCKET_ADDRESS_IN_USE")
# The proxy's socket closed under awscrt: before it answered CONNECT, or after a 200.
_CLOSED = ("AWS_IO_SOCKET_CLOSED", "AWS_IO_SOCKET_CONNECTION_RESET", "AWS_IO_BROKEN_PIPE",
           "AWS_IO_SOCKET_BROKEN_PIPE")


def failure(proxy: Proxy, host: str, port: int, exc: BaseException,
            timeout: float) -> EntoError:
    """The error to raise when connecting to host:port through ``proxy`` failed with ``exc``.

    ``timeout`` bounds the one probe of the proxy this may send, in all."""
    name = getattr(exc, "name", None) or type(exc).__name__
    where = f"the HTTP proxy {proxy}"
    if name.startswith(_UNREACHABLE):
        return TransientError(f"cannot reach {where}: {name}",
                              hint=f"that the proxy is running and reachable, and {KEY}")
    if name == "AWS_ERROR_HTTP_PROTOCOL_ERROR":
        return TransientError(f"{where} did not answer CONNECT as an HTTP proxy: {name}",
                              hint=f"that {KEY} names an HTTP proxy's host and port")
    if name not in (CONNECT_FAILED, *_CLOSED):
        return TransientError(f"connect to {host}:{port} through {where} failed: {name}",
                              hint="the network link, the proxy, ENDPOINT_URL, PORT and ROOT_CA")
    try:
        status = connect_status(proxy, host, port, min(max(timeout, 0.1), PROBE_LIMIT_S))
    except ClosedWithoutAnswer:
        return TransientError(f"{where} accepts connections but closes them without "
                              f"answering CONNECT to {host}:{port} ({name})",
                              hint=f"the proxy's logs, and that {KEY} names the site's proxy")
    except OSError as exc2:
        return TransientError(f"{where} refused or dropped the tunnel to {host}:{port}, and "
                              f"asking it again failed ({type(exc2).__name__})",
                              hint=f"that the proxy is running and reachable, and {KEY}")
    if status == 200 and name in _CLOSED:
        return TransientError(f"{where} opened the tunnel to {host}:{port}, then the "
                              f"connection closed before TLS completed ({name})",
                              hint="the proxy's logs (it may cut tunnels it does not like), "
                                   "and that ENDPOINT_URL and PORT reach the broker")
    if status == 200:
        return TransientError(f"{where} refused the tunnel to {host}:{port} once, then "
                              f"allowed it when asked again",
                              hint="the proxy's logs")
    return refusal(proxy, host, port, status)
