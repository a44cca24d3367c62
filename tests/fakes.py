"""A hand-written fake of the MQTT seam (ento.MqttSession) and helpers.

FakeCloud plays AWS IoT: it records every call the flows make and answers
fleet provisioning requests from a script, with real certificates from a
small test CA, so the files the flows write can be checked for real.
"""
from __future__ import annotations

import datetime as dt
import json
from collections import deque
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import ento

CREATE = "$aws/certificates/create/json"
CREATE_CSR = "$aws/certificates/create-from-csr/json"


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


class MiniCA:
    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test CA")])
        self.cert = self._build(self.name, self.key.public_key(), ca=True)

    def _build(self, subject, public_key, ca=False):
        now = dt.datetime.now(dt.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))

    def sign(self, public_key) -> str:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
        return self._build(subject, public_key).public_bytes(serialization.Encoding.PEM).decode()

    def pair(self) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]),
                           key.public_key())
        return cert.public_bytes(serialization.Encoding.PEM).decode(), pem_key(key)

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


class FakeSession:
    def __init__(self, cloud: "FakeCloud", client_id: str):
        self.cloud = cloud
        self.client_id = client_id
        self.inbox: deque = deque()

    def subscribe(self, topics, timeout):
        self.cloud.calls.append(("subscribe", tuple(topics)))
        self.cloud.fail_if_scripted("subscribe")

    def publish(self, topic, payload, timeout):
        self.cloud.calls.append(("publish", topic, bytes(payload)))
        if self.cloud.on_publish:
            self.cloud.on_publish(topic)
        self.cloud.fail_if_scripted("publish")
        self.cloud.respond(self, topic, bytes(payload))

    def receive(self, timeout):
        self.cloud.calls.append(("receive",))
        if not self.inbox:
            raise ento.TransientError(f"no answer from the service in {timeout:.0f} s")
        return self.inbox.popleft()

    def close(self):
        self.cloud.calls.append(("close",))


class FakeCloud:
    """Scripted AWS IoT.  ``create_answers`` / ``register_answers`` are consumed
    one per request: ("accepted"|"rejected", body) or None for silence; when a
    script runs out, requests succeed."""

    def __init__(self, ca: MiniCA | None = None, thing_prefix: str = "thing-"):
        self.ca = ca or MiniCA()
        self.calls: list[tuple] = []
        self.connections: list[tuple] = []
        self.create_answers: deque = deque()
        self.register_answers: deque = deque()
        self.failures: dict[str, deque] = {}
        self.tokens: dict[str, str] = {}
        self.issued: list[dict] = []
        self.thing_prefix = thing_prefix
        self.on_register = None
        self.on_publish = None
        self.csrs: list[str] = []

    # the connector, passed to the flows as ``connect``
    def __call__(self, endpoint, cert, key, client_id, timeout):
        self.connections.append((client_id, Path(cert).name, endpoint))
        self.calls.append(("connect", client_id, Path(cert).name))
        self.fail_if_scripted("connect")
        return FakeSession(self, client_id)

    def fail_with(self, operation: str, *errors: Exception) -> None:
        self.failures.setdefault(operation, deque()).extend(errors)

    def fail_if_scripted(self, operation: str) -> None:
        queue = self.failures.get(operation)
        if queue:
            raise queue.popleft()

    def respond(self, session: FakeSession, topic: str, payload: bytes) -> None:
        if topic == CREATE:
            answer = self.create_answers.popleft() if self.create_answers else self.good_create()
        elif topic == CREATE_CSR:
            self.csrs.append(json.loads(payload)["certificateSigningRequest"])
            answer = (self.create_answers.popleft() if self.create_answers
                      else self.good_csr(self.csrs[-1]))
        elif topic.startswith("$aws/provisioning-templates/"):
            if self.on_register:
                self.on_register(payload)
            answer = (self.register_answers.popleft() if self.register_answers
                      else self.good_register(payload))
        else:
            return
        if answer is None:
            return
        outcome, body = answer
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        session.inbox.append((f"{topic}/{outcome}", data))

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
