"""Which request gets which answer: the fleet provisioning API as AWS IoT answers it,
and the faults the stand-in can be told to commit.

``Responder.handle(topic, payload)`` returns what to do (answer on a topic,
after a delay; or drop the device's connection); the stand-in carries it out
on the broker.  Nothing here needs a broker, so it is tested on its own.

RegisterThing evaluates the provisioning template (by default the one in
cloud/stack.yaml, through standin.template): its parameters, thing name,
attributes, certificate status, policies and deviceConfiguration.  Each device
certificate gets a common name of its own (``ento-device-<16 hex>``: the
certificate ID cannot be its CN, being the hash of the certificate), so that
mosquitto's use_identity_as_username tells one certificate from another.

When the stack's template has a pre-provisioning hook, every RegisterThing
with a valid token is first put to it (standin.inventory.HookCaller); a
refusal is 403 ACCESS_DENIED and nothing is registered.
"""
from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from . import template as templates
from .ca import StandInCA, certificate_id, pem_key, public_key_id

CREATE = "$aws/certificates/create/json"
CREATE_CSR = "$aws/certificates/create-from-csr/json"
REGISTER_PREFIX = "$aws/provisioning-templates/"
REGISTER_SUFFIX = "/provision/json"
BOOT_PREFIX = "cameraDevice/"
MALFORMED_CREATE = ("not-json", "missing-cert", "bad-pem", "wrong-key")
MALFORMED_REGISTER = ("not-json", "empty-thing")
# What RegisterThing answers when the pre-provisioning hook refuses or fails:
# AWS documents only that the request "fails with ACCESS_DENIED"; 403 is AWS
# IoT's Forbidden.
HOOK_REFUSAL = ("ACCESS_DENIED", 403,
                "ACCESS_DENIED: the pre-provisioning hook did not allow this registration")
# Template parameters that are the device's secrets: never in the record.
SECRET_PARAMETERS = ("ProvisioningSecret",)


@dataclass
class Rejection:
    status: int
    code: str
    message: str = "rejected by the stand-in"

    @classmethod
    def parse(cls, text: str) -> "Rejection":
        """STATUS:CODE[:MESSAGE]; ValueError for anything else (a usage error)."""
        status, _, rest = text.partition(":")
        code, _, message = rest.partition(":")
        if not status.isdigit() or not 400 <= int(status) <= 599 or not code:
            raise ValueError(f"expected STATUS:CODE[:MESSAGE] with a 4xx or 5xx status, "
                             f"not {text!r}")
        return cls(int(status), code, message or "rejected by the stand-in")

    def body(self) -> dict:
        return {"statusCode": self.status, "errorCode": self.code, "errorMessage": self.message}


@dataclass
class Faults:
    """How the stand-in misbehaves; change fields while it runs."""

    reject_create: Rejection | None = None
    reject_register: Rejection | None = None
    # Reject only the first K requests of each kind (None: every one).
    reject_times: int | None = None
    no_answer: bool = False
    # Carry out every RegisterThing (the thing and its active certificate exist)
    # and never answer it: AWS IoT with a claim policy that lacks iot:Receive on
    # the provisioning topics.
    drop_register_answers: bool = False
    delay: float = 0.0
    malformed_create: str | None = None
    malformed_register: str | None = None
    # Drop the requesting device's connection right after a "create" or
    # "register" request (instead of answering it), drop_times times.
    drop_after: str | None = None
    drop_times: int = 1
    # Shared rate limit: called with "create" or "register", False means
    # throttle (429 ThrottlingException), as AWS IoT does over its TPS limit.
    limiter: "Callable[[str], bool] | None" = None
    # Called when a RegisterThing is accepted, before the answer is sent: a test
    # changes the device's world at the most expensive moment.
    after_register: "Callable[[], None] | None" = None
    # Answer this deviceConfiguration instead of the template's: values that are
    # not the strings AWS documents (a number, an object), as a template may hold.
    device_configuration: "object | None" = None
    counts: dict = field(default_factory=dict)

    def throttled(self, kind: str) -> Rejection | None:
        if self.limiter is None or self.limiter(kind):
            return None
        return Rejection(429, "ThrottlingException", "Rate exceeded")

    def should_drop(self, kind: str) -> bool:
        if self.drop_after != kind or self.drop_times <= 0:
            return False
        self.drop_times -= 1
        return True

    def take(self, kind: str, rejection: Rejection | None) -> Rejection | None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if rejection and (self.reject_times is None or self.counts[kind] <= self.reject_times):
            return rejection
        return None


@dataclass(frozen=True)
class Answer:
    topic: str
    payload: bytes
    delay: float = 0.0


@dataclass(frozen=True)
class Drop:
    client_id: str


class RsaKeys:
    """RSA-2048 keys for one stand-in, each handed out once.

    A key costs about 60 ms of CPU to make and a test run starts hundreds of
    stand-ins, so the keys made in a process serve every stand-in in it, in the
    same order: no stand-in ever gives two certificates one key, and nothing a
    device sees tells two stand-ins' keys apart.
    """

    _made: list[rsa.RSAPrivateKey] = []
    _making = threading.Lock()

    def __init__(self) -> None:
        self._taken = 0

    def next(self) -> rsa.RSAPrivateKey:
        with RsaKeys._making:
            if self._taken == len(RsaKeys._made):
                RsaKeys._made.append(rsa.generate_private_key(public_exponent=65537,
                                                              key_size=2048))
            key = RsaKeys._made[self._taken]
            self._taken += 1
        return key


class Responder:
    """The fleet provisioning API of one template, answering one device at a time."""

    def __init__(self, ca: StandInCA, template: str, serial: str, faults: Faults,
                 record: Callable[..., None],
                 key_factory: "Callable[[], rsa.RSAPrivateKey] | None" = None,
                 provisioning: "templates.ProvisioningTemplate | None" = None,
                 on_registered: "Callable[[templates.Registration, str], None] | None" = None,
                 hook: "Callable[[dict], bool] | None" = None,
                 hook_context: "Callable[[str], dict] | None" = None):
        self.ca = ca
        # The pre-provisioning hook (standin.inventory.HookCaller): called with
        # AWS's event, True to allow.  hook_context(template) gives the event's
        # claimCertificateId, templateArn and clientId.
        self.hook = hook
        self.hook_context = hook_context or (lambda template: {})
        self.pems: dict[str, str] = {}
        self.template = template
        self.provisioning = provisioning or templates.load_stack().template
        # Called with the registration and the certificate's CN before the
        # answer goes out: the device's policies apply from its first connection.
        self.on_registered = on_registered
        self.common_names: dict[str, str] = {}
        self.serial = serial
        self.faults = faults
        self.record = record
        # CreateKeysAndCertificate answers with an RSA-2048 key, as AWS does; a
        # benchmark may hand in keys made beforehand.
        self.key_factory = key_factory or RsaKeys().next
        self.tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def handle(self, topic: str, payload: bytes) -> list:
        with self._lock:
            return self._handle(topic, payload)

    def _handle(self, topic: str, payload: bytes) -> list:
        if topic.startswith(BOOT_PREFIX):
            self.record("boot", topic=topic, payload=payload.decode("utf-8", "replace"))
            return []
        if topic == CREATE:
            self.record("create-request")
            if self.faults.should_drop("create"):
                return [Drop(self.serial)]
            return self._answer(CREATE, *self._create(None))
        if topic == CREATE_CSR:
            self.record("csr-request")
            if self.faults.should_drop("create"):
                return [Drop(self.serial)]
            return self._answer(CREATE_CSR, *self._create(payload))
        if topic.startswith(REGISTER_PREFIX) and topic.endswith(REGISTER_SUFFIX):
            template = topic[len(REGISTER_PREFIX):-len(REGISTER_SUFFIX)]
            if self.faults.should_drop("register"):
                self.record("register-request", template=template, dropped=True)
                return [Drop(self.serial)]
            answer = self._answer(topic, *self._register(template, payload))
            if self.faults.drop_register_answers:
                self.record("register-answer-dropped", template=template)
                return []
            return answer
        return []

    def _answer(self, request_topic: str, accepted: bool, body) -> list:
        if self.faults.no_answer:
            self.record("no-answer", topic=request_topic)
            return []
        topic = f"{request_topic}/{'accepted' if accepted else 'rejected'}"
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return [Answer(topic, data, self.faults.delay)]

    def _create(self, csr_payload: bytes | None):
        kind = "create" if csr_payload is None else "csr"
        rejection = (self.faults.take(kind, self.faults.reject_create)
                     or self.faults.throttled("create"))
        if rejection:
            return False, rejection.body()
        key_pem = None
        if csr_payload is None:
            key = self.key_factory()
            public_key, key_pem = key.public_key(), pem_key(key).decode()
        else:
            try:
                doc = json.loads(csr_payload)
                csr = x509.load_pem_x509_csr(doc["certificateSigningRequest"].encode())
                if not csr.is_signature_valid:
                    raise ValueError("bad signature")
                self.record("csr-parsed", public_key=public_key_id(csr.public_key()),
                            subject=csr.subject.rfc4514_string())
            except (ValueError, KeyError, TypeError, AttributeError):
                return False, Rejection(400, "InvalidCsr",
                                        "the certificate signing request is invalid").body()
            public_key = csr.public_key()
        common_name = f"ento-device-{secrets.token_hex(8)}"
        cert = self.ca.issue(public_key, common_name)
        cert_id = certificate_id(cert)
        self.common_names[cert_id] = common_name
        token = secrets.token_urlsafe(32)
        self.tokens[token] = cert_id
        self.pems[cert_id] = cert.public_bytes(serialization.Encoding.PEM).decode()
        body = {"certificateId": cert_id,
                "certificatePem": self.pems[cert_id],
                "certificateOwnershipToken": token}
        if key_pem is not None:
            body["privateKey"] = key_pem
        self.record(f"{kind}-accepted", certificateId=cert_id)
        return True, self._malform_create(body)

    def _malform_create(self, body: dict):
        how = self.faults.malformed_create
        if how == "not-json":
            return b"<html>Bad gateway</html>"
        if how == "missing-cert":
            del body["certificatePem"]
        elif how == "bad-pem":
            body["certificatePem"] = ("-----BEGIN CERTIFICATE-----\nnot a certificate\n"
                                      "-----END CERTIFICATE-----\n")
        elif how == "wrong-key":
            other = self.ca.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "other")
            body["certificatePem"] = other.public_bytes(serialization.Encoding.PEM).decode()
        return body

    def _register(self, template: str, payload: bytes):
        try:
            doc = json.loads(payload)
            token = doc["certificateOwnershipToken"]
            params = doc.get("parameters", {})
            if not isinstance(token, str) or not isinstance(params, dict):
                raise TypeError("wrong types")
        except (ValueError, KeyError, TypeError, AttributeError):
            self.record("register-request", template=template, valid=False)
            return False, Rejection(400, "InvalidPayload", "malformed request").body()
        cert_id = self.tokens.get(token)
        self.record("register-request", template=template,
                    parameters={k: "<redacted>" if k in SECRET_PARAMETERS else v
                                for k, v in params.items()},
                    token_valid=cert_id is not None)
        rejection = (self.faults.take("register", self.faults.reject_register)
                     or self.faults.throttled("register"))
        if rejection:
            return False, rejection.body()
        if template != self.template:
            return False, Rejection(404, "ResourceNotFoundException",
                                    f"template {template} does not exist").body()
        if cert_id is None:
            return False, Rejection(400, "InvalidCertificateOwnershipToken",
                                    "the ownership token is not valid").body()
        if self.hook is not None:
            event = {"claimCertificateId": "", "certificateId": cert_id,
                     "certificatePem": self.pems[cert_id],
                     "templateArn": "", "clientId": "",
                     **self.hook_context(template),
                     "parameters": dict(params)}
            if not self.hook(event):
                code, status, message = HOOK_REFUSAL
                self.record("register-rejected", statusCode=status, errorCode=code,
                            errorMessage=message, hook=True)
                return False, Rejection(status, code, message).body()
        try:
            registration = self.provisioning.register(params, cert_id)
        except templates.Rejection as exc:
            self.record("register-rejected", statusCode=exc.status, errorCode=exc.code,
                        errorMessage=exc.message)
            return False, exc.payload()
        thing = registration.thing_name or ""
        self.record("register-accepted", thingName=thing, certificateId=cert_id,
                    attributes=registration.attributes,
                    deviceConfiguration=registration.device_configuration)
        if self.on_registered is not None:
            self.on_registered(registration, self.common_names[cert_id])
        if self.faults.after_register is not None:
            self.faults.after_register()
        how = self.faults.malformed_register
        if how == "not-json":
            return True, b"not json"
        if how == "empty-thing":
            thing = ""
        answer = {**registration.accepted(), "thingName": thing}
        if self.faults.device_configuration is not None:
            answer["deviceConfiguration"] = self.faults.device_configuration
        return True, answer
