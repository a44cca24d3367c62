"""``boot.py --check``'s network checks, in the order a connection goes: DNS, the HTTP
proxy (CONNECT answered), TCP, the TLS handshake, then MQTT.

The TLS handshake is Python's ssl against ROOT_CA rather than awscrt's: awscrt
(s2n) answers a server certificate that does not verify only after a 10 to 30 s
delay (its blinding), Python's ssl at once.  It is capped at TLS 1.2 when it
presents a certificate: the server's verdict on that certificate is then part of
the handshake (under TLS 1.3 it comes after the client has finished, so a server
that speaks only TLS 1.3 gets a second handshake and VERDICT_WAIT after it).
"""
from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Callable

from . import config as configuration, files, fleet, lookup, mqtt, proxy_probe
from . import proxy as http_proxy
from .check_local import Plan, device_ca
from .clock import utc
from .client_id import claim_client_id
from .errors import ConfigError, TransientError
from .retries import Deadline

# How long a TLS 1.3-only server is given to refuse our certificate after the handshake.
VERDICT_WAIT = 1.0


def check_dns(config: configuration.Config, deadline: Deadline):
    host, port = ((config.proxy.host, config.proxy.port) if config.proxy
                  else (config.host, config.port))
    what = f"the HTTP proxy's host {host}" if config.proxy else f"ENDPOINT_URL {host}"
    try:
        step = deadline.step("DNS")
        infos = lookup.getaddrinfo(host, port, step)
    except TimeoutError:
        raise TransientError(f"resolve {what}: no answer in {step:.0f} s",
                             hint="the network link") from None
    except socket.gaierror as exc:
        raise TransientError(f"cannot resolve {what}: {exc.strerror}",
                             hint="DNS, ENDPOINT_URL" + (" and HTTP_PROXY" if config.proxy
                                                         else "")) from None
    addresses = sorted({info[4][0] for info in infos})
    note = "; the proxy resolves ENDPOINT_URL" if config.proxy else ""
    return f"{what} is {', '.join(addresses[:4])}{note}"


def check_proxy(config: configuration.Config, deadline: Deadline):
    proxy = config.proxy
    try:
        status, sock = proxy_probe.open_tunnel(proxy, config.host, config.port,
                                               min(deadline.step("HTTP proxy"),
                                                   proxy_probe.PROBE_LIMIT_S))
    except proxy_probe.ProbeError as exc:
        raise TransientError(f"the HTTP proxy {proxy} did not answer CONNECT as an HTTP "
                             f"proxy ({exc})", hint=f"that {http_proxy.KEY} names the "
                                                    f"site's HTTP proxy") from None
    except OSError as exc:
        raise TransientError(f"cannot reach the HTTP proxy {proxy}: {type(exc).__name__}",
                             hint=f"that the proxy is running and reachable, and "
                                  f"{http_proxy.KEY}") from None
    if status != 200:
        sock.close()
        raise proxy_probe.refusal(proxy, config.host, config.port, status)
    return f"the HTTP proxy {proxy} opened a tunnel to {config.host}:{config.port}", sock


def check_tcp(config: configuration.Config, deadline: Deadline):
    try:
        sock = lookup.create_connection(config.host, config.port, deadline.step("TCP"))
    except OSError as exc:
        raise TransientError(f"connect to {config.host}:{config.port} failed: "
                             f"{exc.strerror or type(exc).__name__}",
                             hint="the network link, ENDPOINT_URL and PORT") from None
    peer = sock.getpeername()[0]
    return f"{config.host}:{config.port} ({peer}) accepts connections", sock


def tls_context(ca_pem: bytes, port: int, pair: tuple[Path, Path] | None,
                tls13: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    if port == 443:
        context.set_alpn_protocols(["x-amzn-mqtt-ca"])  # as the boot's builder offers on 443
    if pair is not None:
        # ssl reads them only by path: the claim files were found trusted, and
        # CERT_DIR, where nobody else can add or replace an entry, holds the device's.
        context.load_cert_chain(*pair)
        if not tls13:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


class ClosedAfterHandshake(Exception):
    """The server closed the connection once it had our certificate, without a word."""


def _handshake(context: ssl.SSLContext, sock: socket.socket, host: str, timeout: float,
               verdict_wait: float | None = None) -> str:
    """The TLS version, after a handshake on ``sock`` (closed after).  ``verdict_wait``:
    under TLS 1.3 the server judges our certificate after the handshake; wait that
    long for an alert or a close (a server that accepts it waits for MQTT)."""
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            if verdict_wait is not None and tls.version() == "TLSv1.3":
                tls.settimeout(verdict_wait)
                try:
                    if not tls.recv(1):
                        raise ClosedAfterHandshake()
                except TimeoutError:
                    pass
            return tls.version()
    finally:
        sock.close()


def token_handshake(config: configuration.Config, deadline: Deadline, cert: Path,
                    ca_pem: bytes) -> None:
    """A TLS handshake through awscrt, presenting ``cert`` with the token's key (Python's
    ssl cannot use a key it cannot read): an HTTP client connection, which sends nothing
    once its TLS session is up.  Called after the server's certificate has verified, so
    awscrt's delay on a server it does not trust never comes into play."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from awscrt import http, io

    from . import pkcs11_key
    key = pkcs11_key.token_key(config.token)
    cert_pem = files.read_bounded(cert, "certificate", hint="the certificate in CERT_DIR")
    options = io.TlsContextOptions.create_client_with_mtls_pkcs11(
        **key.mtls_kwargs(), cert_file_contents=cert_pem)
    options.override_default_trust_store(ca_pem)
    tls = io.ClientTlsContext(options).new_connection_options()
    tls.set_server_name(config.host)
    if config.port == 443:
        tls.set_alpn_list(["x-amzn-mqtt-ca"])
    step = deadline.step("TLS handshake with the token's key")
    socket_options = io.SocketOptions()
    socket_options.connect_timeout_ms = int(max(step, 0.1) * 1000)
    connecting = http.HttpClientConnection.new(
        config.host, config.port, socket_options=socket_options, tls_connection_options=tls,
        proxy_options=http_proxy.crt_options(config.proxy) if config.proxy else None)
    try:
        connection = connecting.result(step)
    except FutureTimeout:
        raise TransientError(f"TLS with {config.host}:{config.port} with the device "
                             f"certificate: no answer in {step:.0f} s",
                             hint=mqtt.NETWORK_HINT) from None
    except Exception as exc:
        raise mqtt.crt_failure(f"TLS with {config.host}:{config.port} with the device "
                               f"certificate and the token's key", exc,
                               hint=f"that {cert} is registered with AWS IoT and active, "
                                    f"the token, and the network link") from None
    connection.close()


# Expired or not yet valid: what every certificate looks like to a clock set wrong (a
# broken or hostile time server), while the CA and the endpoint are right.
CLOCK_VERIFY_CODES = {9, 10}  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED


def check_tls(config: configuration.Config, deadline: Deadline,
              connect: Callable[[], socket.socket], sock: socket.socket, ca: Path,
              pair: tuple[Path, Path] | None, whose: str, token_cert: Path | None = None):
    """``sock``: the connection the TCP or proxy check opened; ``connect`` opens another."""
    hint = "ROOT_CA in the config"
    ca_pem = files.read_bounded(ca, "CA file", hint=hint)
    where = f"TLS with {config.host}:{config.port}"
    try:
        context = tls_context(ca_pem, config.port, pair)
    except (ssl.SSLError, ValueError) as exc:
        sock.close()
        raise ConfigError(f"cannot load the TLS files ({type(exc).__name__})",
                          hint=f"{ca}" + (f", {pair[0]} and {pair[1]}" if pair else "")) from None
    verified = f"the server's certificate for {config.host} verifies against {ca}"
    try:
        try:
            version = _handshake(context, sock, config.host, deadline.step("TLS handshake"))
        except ssl.SSLError as exc:
            if pair is None or "PROTOCOL_VERSION" not in str(exc.reason).upper():
                raise
            # A server that speaks only TLS 1.3 (AWS IoT's TLS13 security policies).
            version = _handshake(tls_context(ca_pem, config.port, pair, tls13=True),
                                 connect(), config.host, deadline.step("TLS handshake"),
                                 verdict_wait=min(VERDICT_WAIT, deadline.step("TLS")))
    except ssl.SSLCertVerificationError as exc:
        about = f"{hint}, and that ENDPOINT_URL is this account's endpoint"
        if exc.verify_code in CLOCK_VERIFY_CODES:
            about = (f"the system clock (it reads {utc(deadline.clock.time())}) and time "
                     f"synchronisation, then {about}")
        raise TransientError(f"{where}: the server's certificate does not verify against "
                             f"{ca} ({exc.verify_message})", hint=about) from None
    except (ssl.SSLError, ClosedAfterHandshake) as exc:
        closed = isinstance(exc, ClosedAfterHandshake)
        reason = "it closed the connection" if closed else str(exc.reason or exc)
        if not closed and "ALERT" not in reason.upper():
            raise TransientError(f"{where} failed: {reason}", hint=mqtt.NETWORK_HINT) from None
        if pair is not None:
            raise TransientError(f"{where}: the server refused the {whose} certificate "
                                 f"({reason})",
                                 hint=f"that {pair[0]} is registered with AWS IoT and active, "
                                      f"and ENDPOINT_URL") from None
        if not any(word in reason.upper() for word in ("HANDSHAKE_FAILURE",
                                                       "CERTIFICATE_REQUIRED")):
            raise TransientError(f"{where} failed: {reason}", hint=mqtt.NETWORK_HINT) from None
        # Under TLS 1.2 a server asks for a certificate once ours has verified its
        # own, and refuses to go on without one.
        version = None
    except (OSError, TimeoutError) as exc:
        raise TransientError(f"{where} failed: {type(exc).__name__}",
                             hint=mqtt.NETWORK_HINT) from None
    if token_cert is not None:
        token_handshake(config, deadline, token_cert, ca_pem)
        return f"{verified}, and it accepts the device certificate with the token's key"
    if pair is None:
        return f"{verified}; no client certificate presented (none is installed yet)"
    return f"{version} with the {whose} certificate: {verified}"


def check_claim_mqtt(config: configuration.Config, settings: configuration.ProvisioningSettings,
                     deadline: Deadline, build: mqtt.Builder | None):
    client = claim_client_id(config.serial_id)
    link = fleet.connect_with_claim(config, settings, client, deadline, build)
    try:
        service = fleet.FleetProvisioning(link, settings.template_name, settings.csr_mode,
                                          deadline)
        service.subscribe()
    finally:
        link.close()
    return (f"CONNECT as {client} with the claim certificate accepted; subscribed "
            f"to {' and '.join(service.resources.values())}; nothing published")


def check_device_mqtt(config: configuration.Config, plan: Plan, deadline: Deadline,
                      build: mqtt.Builder | None):
    cert_dir = plan.cert_dir
    key, builder = cert_dir.key, build
    if config.token is not None:
        from . import pkcs11_key
        key = pkcs11_key.token_key(config.token)
        builder = build or pkcs11_key.build_connection
    client_id = config.thing_name or config.serial_id
    link = mqtt.connect(mqtt.Endpoint(config.host, config.port, device_ca(config, plan)),
                        cert_dir.cert, key, client_id,
                        deadline.step("connect with the device certificate"), builder,
                        proxy=config.proxy, clock=deadline.clock)
    link.close()
    return f"CONNECT as {client_id} with the device certificate accepted; nothing published"
