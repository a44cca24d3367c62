"""One MQTT connection over mutual TLS, with every wait bounded.

``build_connection`` is the only place that makes a real awscrt connection;
the unit tests replace it with a hand-written fake ``awscrt.mqtt.Connection``
so that everything above it (this module's waits, AWS's IotIdentityClient,
the flows) runs for real.  awscrt's futures never time out by themselves:
every ``result`` here is given what is left of the step.
"""
from __future__ import annotations

import logging
import queue
import re
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from . import proxy as http_proxy
from . import proxy_probe
from .clock import REAL, Clock, utc
from .errors import SHORTAGE_HINT, ConfigError, SubscriptionRefused, TransientError
from .files import read_bounded
from .proxy import Proxy

log = logging.getLogger("entomologist")

KEEP_ALIVE_SECS = 44
CLOSE_WAIT = 2.0
NETWORK_HINT = "the network link, ENDPOINT_URL, PORT and ROOT_CA"
# AWS IoT closes the connection of a client whose publish its policy denies
# (no PUBACK), and may do the same to a denied subscribe: a connection lost
# this soon after one may be the policy, not the network.
POLICY_SUSPECT_SECS = 3.0


def policy_hint(network_hint: str, action: str, topic: str) -> str:
    return f"{network_hint} (or the certificate's policy may not allow {action} on {topic})"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    ca: Path
    proxy: Proxy | None = None  # an HTTP CONNECT proxy on the way (HTTP_PROXY)


@dataclass(frozen=True)
class Tls:
    """What a connection presents and trusts, read by us (bounded, never a FIFO)
    so that the TLS library reads no file itself.  ``key`` is a key file's PEM,
    or a key held in a token (entomologist.pkcs11_key.TokenKey)."""

    cert_path: Path
    cert_pem: bytes
    key: object = field(repr=False)
    ca_pem: bytes = field(repr=False)


# awscrt's binding raises a bare RuntimeError whose text names the error:
# "12 (AWS_ERROR_THREAD_INSUFFICIENT_RESOURCE): Insufficent resources for thread."
_CRT_ERROR_NAME = re.compile(r"\((AWS_[A-Z0-9_]+)\)")
# A host short of threads or memory (another program holds them): nothing the
# config names is wrong, and a later run may have them.
SHORTAGES = frozenset({"AWS_ERROR_THREAD_INSUFFICIENT_RESOURCE", "AWS_ERROR_OOM"})


def crt_error_name(exc: BaseException) -> str:
    name = getattr(exc, "name", None)
    if name:
        return name
    found = _CRT_ERROR_NAME.search(str(exc)) if isinstance(exc, RuntimeError) else None
    return found.group(1) if found else type(exc).__name__


def host_shortage(exc: BaseException) -> bool:
    """Whether ``exc`` says that this host had no thread or memory to give."""
    return (isinstance(exc, MemoryError) or crt_error_name(exc) in SHORTAGES
            or (isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)))



def crt_failure(what: str, exc: BaseException, hint: str = NETWORK_HINT) -> TransientError:
    if host_shortage(exc):
        return TransientError(f"{what} failed: no thread or memory to be had "
                              f"({crt_error_name(exc)}: {str(exc)[:80]})", hint=SHORTAGE_HINT)
    return TransientError(f"{what} failed: {crt_error_name(exc)}", hint=hint)


def connection_options(endpoint: Endpoint, tls: Tls, client_id: str, timeout: float,
                       on_interrupted: Callable[..., None]) -> dict:
    """What every connection shares, whatever holds its key."""
    options = dict(endpoint=endpoint.host, port=endpoint.port, ca_bytes=tls.ca_pem,
                   client_id=client_id, clean_session=True, keep_alive_secs=KEEP_ALIVE_SECS,
                   tcp_connect_timeout_ms=int(max(timeout, 0.1) * 1000),
                   on_connection_interrupted=on_interrupted, enable_metrics_collection=False)
    if endpoint.proxy is not None:
        # The builder still chooses ALPN by endpoint.port (x-amzn-mqtt-ca on
        # 443): the TLS session runs with the broker, inside the tunnel.
        options["http_proxy_options"] = http_proxy.crt_options(endpoint.proxy)
    return options


def build_connection(endpoint: Endpoint, tls: Tls, client_id: str, timeout: float,
                     on_interrupted: Callable[..., None]):
    """A real awscrt ``mqtt.Connection`` with a key file's key, not yet connected.
    (On port 443 the builder offers the ALPN protocol x-amzn-mqtt-ca, as AWS IoT
    requires.)"""
    from awsiot import mqtt_connection_builder
    return mqtt_connection_builder.mtls_from_bytes(
        tls.cert_pem, tls.key, **connection_options(endpoint, tls, client_id, timeout,
                                                    on_interrupted))


Builder = Callable[..., object]


class Link:
    """An open connection, and a queue of what arrives on it.

    Subscription callbacks put their messages on ``events``; a lost
    connection puts a TransientError there, so a flow awaiting an answer
    learns at once that none will come (it starts again from scratch rather
    than trusting an automatic reconnect to have kept its subscriptions).
    Every wait on the connection goes through ``clock`` (entomologist.clock).
    """

    def __init__(self, connection, events: "queue.Queue", clock: Clock = REAL):
        self.connection = connection
        self.events = events
        self.clock = clock
        # (action, topic, when) of the last publish or subscribe sent
        self.last_sent: tuple[str, str, float] | None = None

    def note_sent(self, action: str, topic: str) -> None:
        """Call before sending: a loss may be reported before the send returns."""
        self.last_sent = (action, topic, self.clock.monotonic())

    def loss_hint(self) -> str:
        """The hint for a lost connection: the policy too, if it closed right after a send."""
        sent = self.last_sent
        if sent and self.clock.monotonic() - sent[2] < POLICY_SUSPECT_SECS:
            return policy_hint(NETWORK_HINT, sent[0], sent[1])
        return NETWORK_HINT

    def next_event(self, timeout: float, silence_hint: str | None = None):
        """The next message or loss; ``silence_hint`` is what to check when nothing came."""
        try:
            item = self.clock.get(self.events, timeout)
        except queue.Empty:
            raise TransientError(f"no answer from the service in {timeout:.0f} s",
                                 hint=silence_hint or "the network link and that the "
                                                      "provisioning service is reachable"
                                 ) from None
        if isinstance(item, BaseException):
            raise item
        return item

    def wait_subscribed(self, pending: Iterable[tuple[str, Future]], timeout: float,
                        refused_hint: str) -> None:
        """Wait for the SUBACK of every subscription already sent (one round trip)."""
        end = self.clock.monotonic() + timeout
        for topic, future in pending:
            # The first one unacknowledged is the one a lost connection points at.
            self.note_sent("iot:Subscribe", topic)
            try:
                granted = self.clock.result(future, end - self.clock.monotonic())
            except FutureTimeout:
                raise TransientError(f"subscribe to {topic}: no SUBACK in {timeout:.0f} s",
                                     hint=policy_hint("the network link", "iot:Subscribe",
                                                      topic)) from None
            except Exception as exc:
                if type(exc).__name__ == "SubscribeError":  # awscrt 0.36.1: a refused SUBACK
                    granted = None
                else:
                    raise crt_failure(f"subscribe to {topic}", exc,
                                      policy_hint(NETWORK_HINT, "iot:Subscribe", topic)) from None
            if isinstance(granted, dict):
                granted = granted.get("qos")
            if granted is None:
                raise SubscriptionRefused(f"the broker refused the subscription to {topic}",
                                          hint=refused_hint)

    def wait_published(self, topic: str, future: Future, timeout: float) -> None:
        try:
            self.clock.result(future, timeout)
        except FutureTimeout:
            raise TransientError(f"publish to {topic}: no PUBACK in {timeout:.0f} s",
                                 hint=policy_hint("the network link", "iot:Publish",
                                                  topic)) from None
        except Exception as exc:
            raise crt_failure(f"publish to {topic}", exc,
                              policy_hint(NETWORK_HINT, "iot:Publish", topic)) from None

    def publish(self, topic: str, payload: bytes, timeout: float) -> None:
        """Publish with QoS 1 and wait for the PUBACK."""
        from awscrt import mqtt
        self.note_sent("iot:Publish", topic)
        future, _ = self.connection.publish(topic, payload, mqtt.QoS.AT_LEAST_ONCE)
        self.wait_published(topic, future, timeout)

    def close(self) -> None:
        try:
            self.clock.result(self.connection.disconnect(), CLOSE_WAIT)
        except Exception:
            log.debug("disconnect did not complete cleanly")


def connect(endpoint: Endpoint, cert: Path, key, client_id: str, timeout: float,
            build: Builder | None = None, proxy: Proxy | None = None,
            clock: Clock = REAL) -> Link:
    """Open a mutual-TLS MQTT connection and wait, bounded, for its CONNACK.

    ``key`` is a key file's path, or a token key for ``build``; ``proxy``, an
    HTTP proxy to tunnel through (every builder sees it on the endpoint);
    ``clock``, what the link's waits run on (the run deadline's).
    """
    build = build or build_connection
    if proxy is not None:
        endpoint = replace(endpoint, proxy=proxy)
        log.info("tunnelling through the HTTP proxy %s", proxy)
    else:
        http_proxy.note_environment()
    hint = "the config's file paths"
    tls = Tls(cert, read_bounded(cert, "certificate", hint=hint),
              read_bounded(key, "private key", hint=hint) if isinstance(key, Path) else key,
              read_bounded(endpoint.ca, "CA file", hint="ROOT_CA in the config"))
    events: queue.Queue = queue.Queue()
    links: list[Link] = []

    def interrupted(connection=None, error=None, **_):
        hint = links[0].loss_hint() if links else NETWORK_HINT
        events.put(crt_failure("the connection", error or RuntimeError("interrupted"), hint))

    try:
        connection = build(endpoint, tls, client_id, timeout, interrupted)
    except Exception as exc:
        if host_shortage(exc):
            raise TransientError(f"no thread or memory to be had for the connection "
                                 f"({crt_error_name(exc)})",
                                 hint=SHORTAGE_HINT) from None
        raise ConfigError(f"cannot load the TLS files ({crt_error_name(exc)})",
                          hint=f"{endpoint.ca}, {cert} and {key}") from None
    link = Link(connection, events, clock)
    links.append(link)
    from . import nodelay
    # Through a proxy, awscrt's one socket goes to the proxy.
    peer = endpoint.proxy or endpoint
    via = f" through the HTTP proxy {endpoint.proxy}" if endpoint.proxy else ""
    started = clock.monotonic()
    try:
        # awscrt opens its socket inside connect(); the option must land on it
        # before the TLS handshake's second flight (see nodelay).
        with nodelay.after_connect(peer.host, peer.port, timeout) as watch:
            connecting = connection.connect()
        try:
            clock.result(connecting, timeout)
        finally:
            watch.stop()
    except FutureTimeout:
        link.close()
        if endpoint.proxy is None and watch.applied is not None and \
                watch.applied.state == "ESTABLISHED":
            # The broker took the TCP connection: awscrt answers a server certificate
            # that does not verify (a wrong ROOT_CA; a clock far ahead, which makes it
            # look expired) only after 10-30 s, often after this limit.
            raise TransientError(
                f"connect to {endpoint.host}:{endpoint.port}: the TCP connection opened, but "
                f"TLS and MQTT did not finish in {timeout:.0f} s",
                hint=f"ROOT_CA and the system clock (it reads {utc(clock.time())}): a server "
                     f"certificate that does not verify is reported only after 10-30 s; then "
                     f"the network link") from None
        raise TransientError(f"connect to {endpoint.host}:{endpoint.port}{via}: no answer in "
                             f"{timeout:.0f} s", hint="the network link") from None
    except Exception as exc:
        if endpoint.proxy is not None:
            raise proxy_probe.failure(endpoint.proxy, endpoint.host, endpoint.port, exc,
                                      timeout - (clock.monotonic() - started)) from None
        hint = NETWORK_HINT
        if "TLS" in (getattr(exc, "name", None) or ""):
            # awscrt names no cause: a clock far ahead (a broken or hostile time
            # server) makes the broker's certificate look expired, and the clock
            # check before the connect only catches one behind.
            hint += f", and the system clock (it reads {utc(clock.time())})"
        raise crt_failure(f"connect to {endpoint.host}:{endpoint.port}", exc, hint=hint) from None
    return link
