"""An HTTP CONNECT proxy for sites that let devices out only through one.

``HTTP_PROXY`` in the config: ``http://[user:password@]host:port``.  Both
connections (claim and device) open a tunnel through it with CONNECT; the
TLS handshake and MQTT then run end to end with the broker, so the proxy
sees neither the certificates nor the messages.

The password is a secret: it is kept out of every repr, registered with the
log filter, and no message here ever quotes the configured value (a bad
value is described, never echoed).

What a proxy's failure means is proxy_probe's.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote, urlsplit

from . import logs
from .config_file import HOST_LABEL_RE, bad_key

log = logging.getLogger("entomologist")

KEY = "HTTP_PROXY"
FORM = "http://[user:password@]host:port"


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
