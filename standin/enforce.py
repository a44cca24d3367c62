"""What mosquitto's rules cannot enforce, enforced from its log, before the device hears.

standin/policy.py renders each certificate's policies as rules for mosquitto's
dynamic-security plugin (publish, receive, subscribe); this module covers the
rest: the stand-in reads mosquitto's log (log_type notice,
subscribe and debug), decides with policy.decide() / connect_allowed(),
records a ``denied`` event (action, resource, reason) and disconnects the
client (a denied connect or publish).

Why a relay as well: mosquitto 2.0.11 logs a denied PUBLISH and then at once
sends its PUBACK (an MQTT 3.1.1 PUBACK has no reason code), and it logs a
SUBSCRIBE and at once sends its SUBACK.  A client-ID takeover (StandIn._kick)
comes milliseconds later, after the device has its PUBACK: the device would
believe a denied boot message was delivered.  So each device connection
passes through a TCP relay (TLS stays end to end, mosquitto still sees the
certificate); before the relay forwards anything mosquitto sends, it reads
the log up to its end.  mosquitto writes its log line (unbuffered stderr)
before it sends the PUBACK, SUBACK or CONNACK, so the decision is always made
before the device can read the acknowledgement, and a denied client's
connection is closed instead: AWS's disconnect, with no acknowledgement.
A device that hangs up its side is not cut off: mosquitto still reads all the
device sent before, and the relay ends the pair when mosquitto closes its own.

A SUBSCRIBE is refused by mosquitto itself: the rules are given to its
dynamic-security plugin (standin/policy.py renders them), which answers a
denied one with SUBACK 0x80 and keeps the connection, as AWS does; the
enforcer records it as a ``denied`` event.

Known differences from AWS, here:
  * A denied CONNECT closes the connection after the TLS handshake and before
    the CONNACK, as AWS does; AWS may also answer CONNACK 5 (not authorized).
  * A denied iot:Receive is mosquitto's silent non-delivery (as AWS); the
    stand-in records no event for it.
  * Client IDs with spaces are not parsed from the log (AWS allows none in
    its examples; the device's are thing names and serials).
"""
from __future__ import annotations

import logging
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import policy

log = logging.getLogger("iot_standin")

# Closed connections whose late log lines are still judged; the rest are forgotten.
GONE_KEPT = 256

_LINE = re.compile(r"^\d+: (.*)$")
_CONNECTED = re.compile(r"New client connected from (\S+):(\d+) as (\S+) \(p\d+, c\d+, k\d+"
                        r"(?:, u'(.*)')?\)\.$")
_DENIED_PUBLISH = re.compile(r"Denied PUBLISH from (\S+) \(d\d, q(\d), r\d, m\d+, '(.*)', "
                             r"\.\.\. \(\d+ bytes\)\)$")
_SUBSCRIBED = re.compile(r"^(\S+) (\d) (\S.*)$")
_SUBSCRIBE_FROM = re.compile(r"^Received SUBSCRIBE from (\S+)$")
_SUBSCRIBE_FILTER = re.compile(r"^\t(\S.*) \(QoS \d\)$")


@dataclass
class Identity:
    """One certificate's standing with the service (its acl_file user is its CN)."""

    username: str
    kind: str                 # "claim", "device" or "service"
    documents: list = field(default_factory=list)
    policy_label: str = ""    # how a log line names the policy: "claim policy X"
    context: policy.Context = field(default_factory=policy.Context)
    active: bool = True
    acl: str = ""             # its rules, in acl_file's words (what a reader checks)
    notes: list[str] = field(default_factory=list)
    dynsec: list[dict] = field(default_factory=list)  # the same, as dynsec role ACLs


class Enforcer:
    """Reads mosquitto's log; decides each connect, subscribe and denied publish."""

    def __init__(self, log_path: Path, record: Callable[..., None]):
        self.log_path = log_path
        self.record = record
        self.identities: dict[str, Identity] = {}
        self._offset = 0
        self._partial = b""
        self._lock = threading.RLock()
        self._port_of: dict[str, int] = {}        # client ID -> its latest relay-side port
        self._who: dict[int, tuple[str, str]] = {}  # port -> (client ID, username)
        self._condemned: dict[int, str] = {}
        self._relay_ports: set[int] = set()
        # Relayed connections that have closed, oldest first: mosquitto may log what
        # such a client sent just before it hung up after the stand-in has seen it go.
        self._gone: dict[int, None] = {}
        self.reloads = 0
        self._subscriber: str | None = None
        self._close: Callable[[int], None] = lambda port: None

    def add(self, identity: Identity) -> None:
        with self._lock:
            self.identities[identity.username] = identity

    # -- the log

    def catch_up(self) -> None:
        """Read the log to its end and act on every complete line."""
        with self._lock:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            self._offset += len(data)
            data = self._partial + data
            *lines, self._partial = data.split(b"\n")
            for raw in lines:
                m = _LINE.match(raw.decode("utf-8", "replace"))
                if m:
                    self._line(m.group(1))

    def _line(self, text: str) -> None:
        if text == "Reloading config.":
            self.reloads += 1
            return
        m = _CONNECTED.match(text)
        if m:
            port, client_id, username = int(m.group(2)), m.group(3), m.group(4) or ""
            self._port_of[client_id] = port
            self._who[port] = (client_id, username)
            self._gone.pop(port, None)
            if port in self._relay_ports:
                self._connect(port, client_id, username)
            return
        m = _DENIED_PUBLISH.match(text)
        if m:
            self._publish_denied(m.group(1), m.group(3))
            return
        m = _SUBSCRIBE_FROM.match(text)
        if m:
            self._subscriber = m.group(1)
            return
        m = _SUBSCRIBE_FILTER.match(text)
        if m and self._subscriber in self._port_of:
            self._subscribe_asked(self._subscriber, m.group(1))
            return
        m = _SUBSCRIBED.match(text)
        if m and m.group(1) in self._port_of:
            self._subscribe(m.group(1), m.group(3))

    def _identity_of(self, client_id: str):
        port = self._port_of.get(client_id)
        if (port is None or (port not in self._relay_ports and port not in self._gone)
                or self._who.get(port, ("",))[0] != client_id):
            return None, None  # the stand-in's own connections, or a direct one
        return port, self.identities.get(self._who[port][1])

    def _deny(self, port: int, identity: Identity | None, client_id: str, action: str,
              resource: str, reason: str) -> None:
        if port in self._relay_ports:  # a gone client has no connection left to close
            self._condemned[port] = reason
        self.record("denied", action=action, resource=resource, reason=reason,
                    client_id=client_id, username=identity.username if identity else None,
                    policy=identity.policy_label if identity else None)
        log.info("denied %s on %s to %s: %s", action, resource, client_id, reason)
        self._close(port)

    def _connect(self, port: int, client_id: str, username: str) -> None:
        identity = self.identities.get(username)
        resource = policy.Context().arn("client", client_id)
        if identity is None:
            self._deny(port, None, client_id, "iot:Connect", resource,
                       f"certificate {username!r} is not registered with the stand-in")
            return
        if identity.kind == "service":
            return
        resource = identity.context.arn("client", client_id)
        if not identity.active:
            self._deny(port, identity, client_id, "iot:Connect", resource,
                       "the certificate is not ACTIVE")
            return
        decision = policy.connect_allowed(identity.documents, client_id, identity.context)
        if not decision:
            self._deny(port, identity, client_id, "iot:Connect", resource,
                       f"{decision.reason} ({identity.policy_label})")

    def _context(self, identity: Identity, client_id: str) -> policy.Context:
        return policy.Context(**{**identity.context.__dict__, "client_id": client_id})

    def _publish_denied(self, client_id: str, topic: str) -> None:
        port, identity = self._identity_of(client_id)
        if port is None or identity is None or identity.kind == "service":
            return
        decision = policy.decide(identity.documents, "iot:Publish", topic,
                                 self._context(identity, client_id))
        reason = (f"{decision.reason} ({identity.policy_label})" if not decision else
                  f"allowed by {identity.policy_label} but not expressible in mosquitto's "
                  f"acl_file: {'; '.join(identity.notes) or 'see standin/policy.py'}")
        self._deny(port, identity, client_id, "iot:Publish",
                   identity.context.arn("topic", topic), reason)

    def _subscribe_decision(self, client_id: str, topic_filter: str):
        """(port, identity, the policies' decision) for a device's SUBSCRIBE; None for
        the stand-in's own connections and unknown clients."""
        port, identity = self._identity_of(client_id)
        if port is None or identity is None or identity.kind == "service":
            return None
        return port, identity, policy.decide(identity.documents, "iot:Subscribe",
                                             topic_filter, self._context(identity, client_id))

    def _subscribe_asked(self, client_id: str, topic_filter: str) -> None:
        """A SUBSCRIBE as it arrives: the dynamic-security plugin answers a denied
        one with SUBACK 0x80 and keeps the connection, as AWS does; recorded here."""
        found = self._subscribe_decision(client_id, topic_filter)
        if found is None:
            return
        _, identity, decision = found
        if not decision:
            self.record("denied", action="iot:Subscribe",
                        resource=identity.context.arn("topicfilter", topic_filter),
                        reason=f"{decision.reason} ({identity.policy_label})",
                        client_id=client_id, username=identity.username,
                        policy=identity.policy_label, answer="SUBACK 0x80")
            log.info("refused iot:Subscribe on %s to %s (SUBACK 0x80): %s", topic_filter,
                     client_id, decision.reason)

    def _subscribe(self, client_id: str, topic_filter: str) -> None:
        """A SUBSCRIBE mosquitto granted; one the policies deny closes the connection
        (the plugin's rules are exact or stricter, so this only guards them)."""
        found = self._subscribe_decision(client_id, topic_filter)
        if found is None:
            return
        port, identity, decision = found
        if not decision:
            self._deny(port, identity, client_id, "iot:Subscribe",
                       identity.context.arn("topicfilter", topic_filter),
                       f"{decision.reason} ({identity.policy_label})")

    def connected(self, kind: str) -> list[str]:
        """Client IDs of the connections through the relay whose certificate is of ``kind``."""
        with self._lock:
            return [client_id for port, (client_id, username) in self._who.items()
                    if port in self._relay_ports
                    and getattr(self.identities.get(username), "kind", None) == kind]

    # -- the relay's questions

    def relayed(self, port: int) -> None:
        with self._lock:
            self._relay_ports.add(port)
            if port in self._gone:  # the gone client's late lines must not judge this one
                self._forget(port)

    def finished(self, port: int) -> None:
        with self._lock:
            self._relay_ports.discard(port)
            # The port may serve a later connection: its verdict goes with this one.
            self._condemned.pop(port, None)
            self._gone[port] = None
            while len(self._gone) > GONE_KEPT:
                self._forget(next(iter(self._gone)))

    def _forget(self, port: int) -> None:
        self._gone.pop(port, None)
        who = self._who.pop(port, None)
        if who and self._port_of.get(who[0]) == port:
            del self._port_of[who[0]]

    def verdict(self, port: int) -> str | None:
        """Why the connection through ``port`` must close, or None; reads the log first."""
        self.catch_up()
        with self._lock:
            return self._condemned.get(port)


class Relay:
    """Device connections to mosquitto, each held back until the log is decided."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int], enforcer: Enforcer,
                 tcp_nodelay: bool = True, bound: socket.socket | None = None):
        self.host, self.port, self.upstream = host, port, upstream
        self._bound = bound  # the port's socket, bound when the port was chosen
        self.enforcer = enforcer
        self.tcp_nodelay = tcp_nodelay
        self._listener: socket.socket | None = None
        self._conns: dict[int, tuple[socket.socket, socket.socket]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        enforcer._close = self.close

    def start(self) -> None:
        s, self._bound = self._bound, None
        if s is None:
            s = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.host, self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, daemon=True, name="standin-relay").start()
        threading.Thread(target=self._watch, daemon=True, name="standin-enforcer").start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                device, _ = self._listener.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(self.upstream, timeout=5)
                broker.settimeout(None)
            except OSError:
                device.close()
                continue
            if self.tcp_nodelay:
                for s in (device, broker):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            port = broker.getsockname()[1]
            self.enforcer.relayed(port)
            with self._lock:
                self._conns[port] = (device, broker)
            threading.Thread(target=self._pump, args=(port, device, broker, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(port, broker, device, True),
                             daemon=True).start()

    def _pump(self, port: int, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data and not gated:
                    # The device hung up its side: mosquitto still reads all it sent
                    # first, as AWS does, and ends the pair by closing its own.
                    dst.shutdown(socket.SHUT_WR)
                    return
                if not data:
                    break
                if gated and self.enforcer.verdict(port):
                    break
                dst.sendall(data)
        except OSError:
            pass
        self.close(port)

    def _watch(self) -> None:
        # A denied QoS 0 publish has no acknowledgement to hold back: look anyway.
        while not self._stopped.wait(0.05):
            try:
                self.enforcer.catch_up()
            except Exception:
                log.exception("reading mosquitto's log")

    def close(self, port: int) -> None:
        with self._lock:
            pair = self._conns.pop(port, None)
        if pair is None:
            return
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.enforcer.finished(port)

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            # close() alone leaves the port listening while accept() blocks in
            # another thread; shutdown() wakes it and stops the listening at once.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for port in list(self._conns):
            self.close(port)
