"""An HTTP CONNECT proxy for sites that let devices out only through one.

``HTTP_PROXY`` in the config: ``http://[user:password@]host:port``.  Both
connections (claim and device) open a tunnel through it with CONNECT; the
TLS handshake and MQTT then run end to end with the broker, so the proxy
sees neither the certificates nor the messages.

The password is a secret: it is kept out of every repr, registered with the
log filter, and no message here ever quotes the configured value (a bad
value is described, never echoed).

awscrt 0.36.1 reports every answer to CONNECT but 200 as one error,
AWS_ERROR_HTTP_PROXY_CONNECT_FAILED: a 403 (the proxy's rules forbid that
port), a 401 or 407 (credentials) and a 500 or 502 (the proxy could not
reach the endpoint) look alike.  The first two are the site's configuration
and retrying cannot help; the last is an outage that retrying should ride
out.  So after that error ``failure`` asks the proxy itself, with one CONNECT
of its own, which status it answers, and decides from that.
"""
from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote, urlsplit

from . import logs
from .config_file import HOST_LABEL_RE, bad_key
from .errors import ConfigError, EntoError, TransientError

log = logging.getLogger("entomologist")

KEY = "HTTP_PROXY"
FORM = "http://[user:password@]host:port"
CONNECT_FAILED = "AWS_ERROR_HTTP_PROXY_CONNECT_FAILED"
PROBE_LIMIT_S = 10.0


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        """How messages name the proxy: its address, never its credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _host_problem(host: str) -> str | None:
    """Why ``host`` is no proxy host (None if it is one)."""
    if "%" in host:
        return "names an IPv6 zone (%25...), which the connection cannot use"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    # As URL parsers read it: a name ending in a number is an IPv4 address, and
    # 999.1.1.1 or 1.2.3 is no valid one (a resolver would take it as a name).
    if re.fullmatch(r"[0-9]+|0[xX][0-9A-Fa-f]*", labels[-1]):
        return "is no valid IPv4 address (four numbers from 0 to 255)"
    if 0 < len(host) <= 253 and all(HOST_LABEL_RE.fullmatch(label) for label in labels):
        return None
    return "does not name a valid proxy host"


def parse(value: object) -> Proxy | None:
    """HTTP_PROXY's value as a Proxy; None when absent, null or "".  Raises ConfigError.

    No message quotes the value: it may hold the password.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_key(KEY, f"must be a string like {FORM}, not {type(value).__name__}")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise bad_key(KEY, f"must be a URL like {FORM}, without spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise bad_key(KEY, f"has an invalid host or port; the form is {FORM}") from None
    if "://" not in value or parts.scheme.lower() != "http":
        raise bad_key(KEY, f"must start with http:// (a proxy reached over plain HTTP; the tunnel "
                           f"it opens carries TLS end to end); the form is {FORM}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad_key(KEY, f"must not have a path, query or fragment; the form is {FORM}")
    host = parts.hostname or ""
    problem = _host_problem(host)
    if problem:
        raise bad_key(KEY, f"{problem}; the form is {FORM}")
    if not port:
        raise bad_key(KEY, f"must give the proxy's port (1 to 65535); the form is {FORM}")
    username = password = None
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        raw_user, colon, raw_password = userinfo.partition(":")
        # A URL carries ':', '@' and '%' in credentials percent-encoded.
        username, password = unquote(raw_user), unquote(raw_password)
        logs.redact(password)
        logs.redact(raw_password)
        if not username or not colon:
            raise bad_key(KEY, "has credentials without a user name or a password; "
                               f"the form is {FORM}")
        if not password:
            raise bad_key(KEY, f"has an empty password; the form is {FORM}")
        if not (username + password).isprintable():
            raise bad_key(KEY, "has control characters (percent-encoded) in its user name or "
                               f"password; the form is {FORM}")
    if ":" not in host:  # a name, not an IPv6 address
        host = host.rstrip(".").lower()
    return Proxy(host, port, username, password)


ENVIRONMENT = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_noted: list[str] = []


def note_environment(env: Mapping[str, str] | None = None) -> str | None:
    """Say, once per run, that a proxy variable of the environment is not used.

    The unit's environment has none; honouring one only in a by-hand run
    would make that run test a path the boot never takes.  Its value is
    never shown (it may hold a password).  Returns the variable's name.
    """
    env = os.environ if env is None else env
    name = next((n for n in ENVIRONMENT if env.get(n)), None)
    if name and name not in _noted:
        _noted.append(name)
        log.warning("%s is set in the environment but not used: the connection goes "
                    "direct; set %s in the config to use a proxy", name, KEY)
    return name


def crt_options(proxy: Proxy):
    """awscrt's HttpProxyOptions for a tunnel (CONNECT) through ``proxy``."""
    from awscrt import http
    basic = proxy.username is not None
    return http.HttpProxyOptions(
        proxy.host, proxy.port,
        auth_type=(http.HttpProxyAuthenticationType.Basic if basic
                   else http.HttpProxyAuthenticationType.Nothing),
        auth_username=proxy.username, auth_password=proxy.password,
        connection_type=http.HttpProxyConnectionType.Tunneling)


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
    sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
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
