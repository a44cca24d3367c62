"""A hand-written fake of ``awscrt.mqtt.Connection``, and a fake AWS IoT behind it.

The flows run for real above it: ``entomologist.mqtt``'s bounded waits, AWS's
``IotIdentityClient`` (which accepts the fake: it is an ``mqtt.Connection``),
and every file the flows write.  FakeCloud records every call and answers
fleet provisioning requests from a script, with real certificates from a
small test CA.
"""
from __future__ import annotations

import datetime as dt
import json
import queue
import re
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from awscrt import mqtt
from awscrt.exceptions import AwsCrtError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from entomologist.clock import Clock

CREATE = "$aws/certificates/create/json"
CREATE_CSR = "$aws/certificates/create-from-csr/json"
REGISTER_PREFIX = "$aws/provisioning-templates/"


def public_keys_equal(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def certificate_id(cert_pem: bytes) -> str:
    """AWS IoT's certificate ID: the SHA-256 of the DER certificate, in hex."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def pem_key(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()


def crt_error(name: str) -> AwsCrtError:
    return AwsCrtError(code=1049, name=name, message=f"fake {name}")


class ClaimClientId:
    """Equal to any claim client ID of ``serial``: the serial, "-", 16 random hex digits."""

    def __init__(self, serial: str):
        self.pattern = re.compile(re.escape(serial) + "-[0-9a-f]{16}")

    def __eq__(self, other) -> bool:
        return isinstance(other, str) and self.pattern.fullmatch(other) is not None

    def __repr__(self) -> str:
        return f"<claim client ID {self.pattern.pattern}>"


CAM42_CLAIM = ClaimClientId("CAM-42")


class MiniCA:
    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test CA")])
        self.cert = self._build(self.name, self.key.public_key(), ca=True)

    def _build(self, subject, public_key, ca=False, not_before=None):
        now = dt.datetime.now(dt.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(not_before or now - dt.timedelta(minutes=5))
                .not_valid_after(max(now, not_before or now) + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))

    def sign(self, public_key, not_before=None) -> str:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
        return self._build(subject, public_key, not_before=not_before).public_bytes(
            serialization.Encoding.PEM).decode()

    def pair(self, not_before=None) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        return self.sign(key.public_key(), not_before), pem_key(key)

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


def _resolved(value=None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


class FakeConnection(mqtt.Connection):
    """Connect, disconnect, subscribe and publish return futures, as awscrt's do;
    messages reach the subscription callbacks; every call is recorded."""

    def __init__(self, cloud: "FakeCloud", client_id: str, cert_name: str, on_interrupted):
        # Nothing native stands behind this fake: the base __init__ is not called.
        self.cloud = cloud
        self.client_id = client_id
        self.cert_name = cert_name
        self.on_interrupted = on_interrupted
        self.callbacks: dict[str, object] = {}
        self.packet_id = 0

    def _next_id(self) -> int:
        self.packet_id += 1
        return self.packet_id

    def connect(self):
        self.cloud.calls.append(("connect", self.client_id, self.cert_name))
        return self.cloud.scripted("connect") or _resolved({"return_code": 0,
                                                            "session_present": False})

    def disconnect(self):
        self.cloud.calls.append(("close",))
        return _resolved({})

    def subscribe(self, topic, qos, callback=None):
        self.cloud.calls.append(("subscribe", topic))
        self.callbacks[topic] = callback
        packet_id = self._next_id()
        scripted = self.cloud.scripted("subscribe", topic)
        if scripted is not None:
            return scripted, packet_id
        suback = {"packet_id": packet_id, "topic": topic, "qos": qos}
        if not self.cloud.hold_subacks:
            return _resolved(suback), packet_id
        # SUBACKs held until that many SUBSCRIBEs are out: a flow that waits
        # on one before sending the next never gets it.
        future: Future = Future()
        self.cloud.held.append((future, suback))
        if len(self.cloud.held) >= self.cloud.hold_subacks:
            for held, value in self.cloud.held:
                held.set_result(value)
        return future, packet_id

    def publish(self, topic, payload, qos, retain=False):
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        self.cloud.calls.append(("publish", topic, data))
        if self.cloud.on_publish:
            self.cloud.on_publish(topic)
        failed = self.cloud.scripted("publish", topic)
        if failed is None:
            self.cloud.respond(self, topic, data)
        return failed or _resolved({"packet_id": self._next_id()}), self.packet_id

    def deliver(self, topic: str, data: bytes) -> None:
        callback = self.callbacks.get(topic)
        if callback is not None:
            callback(topic=topic, payload=data, dup=False, qos=mqtt.QoS.AT_LEAST_ONCE,
                     retain=False)

    def drop(self) -> None:
        """The broker goes away: awscrt reports it through on_connection_interrupted."""
        self.on_interrupted(connection=self, error=crt_error("AWS_ERROR_MQTT_UNEXPECTED_HANGUP"))


class FakeCloud:
    """Scripted AWS IoT.  ``create_answers`` / ``register_answers`` are consumed
    one per request: ("accepted"|"rejected", body) or None for silence; when a
    script runs out, requests succeed.  ``fail_with(operation, *outcomes)``
    scripts the next futures of "connect", "subscribe" or "publish": an
    exception, "never" for a future that never resolves, "refused" for a
    refused SUBACK, or None for one that behaves."""

    def __init__(self, ca: MiniCA | None = None, thing_prefix: str = "thing-"):
        self.ca = ca or MiniCA()
        self.calls: list[tuple] = []
        self.connections: list[FakeConnection] = []
        self.create_answers: deque = deque()
        self.register_answers: deque = deque()
        self.failures: dict[str, deque] = {}
        self.issued: list[dict] = []
        self.thing_prefix = thing_prefix
        self.on_register = None
        self.on_publish = None
        self.csrs: list[str] = []
        self.hold_subacks = 0
        self.held: list = []

    # The connection builder, passed to the flows as ``build``.
    def __call__(self, endpoint, tls, client_id, timeout, on_interrupted):
        connection = FakeConnection(self, client_id, tls.cert_path.name, on_interrupted)
        connection.tls = tls
        connection.endpoint = endpoint
        self.connections.append(connection)
        return connection

    def fail_with(self, operation: str, *outcomes) -> None:
        self.failures.setdefault(operation, deque()).extend(outcomes)

    def scripted(self, operation: str, topic: str | None = None) -> Future | None:
        queue = self.failures.get(operation)
        if not queue:
            return None
        outcome = queue.popleft()
        if outcome is None:  # this one behaves
            return None
        if outcome == "never":
            return Future()
        if outcome == "refused":
            return _resolved(error=mqtt.SubscribeError(topic))
        return _resolved(error=outcome)

    def respond(self, connection: FakeConnection, topic: str, payload: bytes) -> None:
        if topic == CREATE:
            answer = self.create_answers.popleft() if self.create_answers else self.good_create()
        elif topic == CREATE_CSR:
            self.csrs.append(json.loads(payload)["certificateSigningRequest"])
            answer = (self.create_answers.popleft() if self.create_answers
                      else self.good_csr(self.csrs[-1]))
        elif topic.startswith(REGISTER_PREFIX):
            if self.on_register:
                self.on_register(payload)
            answer = (self.register_answers.popleft() if self.register_answers
                      else self.good_register(payload))
        else:
            return
        if answer is None:
            return
        if answer == "drop":
            connection.drop()
            return
        outcome, body = answer
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.deliver(f"{topic}/{outcome}", data)

    def good_create(self):
        cert, key = self.ca.pair()
        token = f"token-{len(self.issued)}-secret"
        body = {"certificateId": certificate_id(cert.encode()), "certificatePem": cert,
                "privateKey": key, "certificateOwnershipToken": token}
        self.issued.append(body)
        return "accepted", body

    def good_csr(self, csr_pem: str):
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        cert = self.ca.sign(csr.public_key())
        body = {"certificateId": certificate_id(cert.encode()), "certificatePem": cert,
                "certificateOwnershipToken": f"token-{len(self.issued)}-secret"}
        self.issued.append(body)
        return "accepted", body

    def good_register(self, payload: bytes):
        doc = json.loads(payload)
        serial = doc["parameters"].get("SerialNumber", "x")
        return "accepted", {"deviceConfiguration": {}, "thingName": self.thing_prefix + serial}

    def published(self, prefix: str = "") -> list[tuple[str, bytes]]:
        return [(c[1], c[2]) for c in self.calls if c[0] == "publish" and c[1].startswith(prefix)]

    def registers(self) -> list[tuple[str, bytes]]:
        return self.published(REGISTER_PREFIX)


class FakeClock(Clock):
    """The one clock seam: wall time (``time``, also ``now``), the deadline's
    monotonic time, the boot's clock (``boottime``) and ``sleep`` move together,
    and only when a flow sleeps or waits or a test advances them; a test may
    also set the wall clock alone (``set_wall``) or reboot (a new ``boot_id``).

    A wait on a future or a queue takes no real time: what is ready now is
    returned, and otherwise the clock moves on by the whole timeout and the
    wait times out, as a real one would at that moment.  Everything the fakes
    resolve is resolved before or while the flow sends, on the same thread, so
    nothing could arrive later; and nothing polls, so nothing can spin."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.wall = start
        self.mono = 1000.0
        self.boot = "00000000-0000-4000-8000-000000000001"
        self.since_boot = 500.0
        self.sleeps: list[float] = []
        self.waits: list[float] = []

    def time(self) -> float:
        return self.wall

    now = time

    def monotonic(self) -> float:
        return self.mono

    def boot_id(self) -> str | None:
        return self.boot

    def boottime(self) -> float | None:
        return self.since_boot

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds
        self.since_boot += seconds

    def set_wall(self, wall: float) -> None:
        """The wall clock is set (NTP, an operator, a hostile time server): only it moves."""
        self.wall = wall

    def reboot(self, wall: float | None = None, boot: str | None = None) -> None:
        """A new boot: a new boot_id, the boot-time clocks restart, the wall clock reads
        ``wall`` (as a board without a real-time clock may)."""
        number = int(self.boot.rsplit("-", 1)[1], 16) + 1
        self.boot = boot or f"00000000-0000-4000-8000-{number:012x}"
        self.since_boot = 5.0
        self.mono = 5.0
        if wall is not None:
            self.wall = wall

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))

    def _timed_out(self, timeout: float) -> None:
        self.waits.append(max(0.0, timeout))
        self.advance(max(0.0, timeout))

    def result(self, future: Future, timeout: float):
        if not future.done():
            self._timed_out(timeout)
            raise FutureTimeout()
        return future.result(0)

    def get(self, items, timeout: float):
        try:
            return items.get_nowait()
        except queue.Empty:
            self._timed_out(timeout)
            raise
