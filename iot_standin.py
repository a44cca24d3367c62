"""A local stand-in for AWS IoT, to test device images without an AWS account.

It starts Debian's mosquitto with mutual TLS on a free loopback port, with a
test CA it generates, and a responder that answers the fleet provisioning MQTT
API ($aws/certificates/create/json, $aws/certificates/create-from-csr/json,
$aws/provisioning-templates/<name>/provision/json) with real certificates
signed by that CA.  Every request, answer and boot message is recorded as a
JSON line in <dir>/standin/events.jsonl.  It writes a ready ento.conf and claim
files for one simulated device into <dir>.

    python iot_standin.py run --dir DIR [--serial ID] [--template NAME]
                              [--reject-create STATUS:CODE[:MESSAGE]]
                              [--reject-register STATUS:CODE[:MESSAGE]]
                              [--reject-times K] [--no-answer] [--delay SECONDS]
                              [--malformed-create not-json|missing-cert|bad-pem|wrong-key]
                              [--malformed-register not-json|empty-thing]
                              [--drop-after create|register] [--refuse-connections]
    python iot_standin.py demo

`run` serves until interrupted; `demo` provisions a simulated device in a
temporary folder with boot.py and shows what it wrote.  A broker delivers
$aws/.../accepted to every subscriber (AWS answers only the requester), so
provision one device at a time per stand-in.

Exit codes: 0 done; 69 mosquitto is missing or would not start; 1 the demo's
boot.py run failed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("iot_standin")

HERE = Path(__file__).resolve().parent
CREATE = "$aws/certificates/create/json"
CREATE_CSR = "$aws/certificates/create-from-csr/json"
REGISTER_PREFIX = "$aws/provisioning-templates/"
REGISTER_SUFFIX = "/provision/json"
BOOTED_FILTER = "cameraDevice/+/booted"
DEFAULT_SERIAL = "CAM-0001"
DEFAULT_TEMPLATE = "EntoFleetTemplate"


@dataclass
class Rejection:
    status: int
    code: str
    message: str = "rejected by the stand-in"

    @classmethod
    def parse(cls, text: str) -> "Rejection":
        status, _, rest = text.partition(":")
        code, _, message = rest.partition(":")
        return cls(int(status), code or "Rejected", message or "rejected by the stand-in")


@dataclass
class Faults:
    """How the stand-in misbehaves; change fields while it runs."""

    reject_create: Rejection | None = None
    reject_register: Rejection | None = None
    # Reject only the first K requests of each kind (None: every one).
    reject_times: int | None = None
    no_answer: bool = False
    delay: float = 0.0
    # Malformed answers: "not-json", "missing-cert", "bad-pem", "wrong-key" for
    # CreateKeysAndCertificate; "not-json", "empty-thing" for RegisterThing.
    malformed_create: str | None = None
    malformed_register: str | None = None
    # Drop the requesting device's connection right after a "create" or
    # "register" request (instead of answering it), drop_times times.
    drop_after: str | None = None
    drop_times: int = 1
    # Shared rate limit: called with "create" or "register", False means
    # throttle (429 ThrottlingException), as AWS IoT does over its TPS limit.
    limiter: "Callable[[str], bool] | None" = None
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


# ------------------------------------------------------------ the test CA

def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


class StandInCA:
    def __init__(self, common_name: str = "Entomologist stand-in CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, public_key, common_name: str, *, server: bool = False,
              subject: x509.Name | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                   common_name)]))
            .issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False))
        if server:
            import ipaddress
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def write_pair(self, directory: Path, stem: str, common_name: str,
                   server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue(key.public_key(), common_name, server=server)
        cert_path, key_path = directory / f"{stem}.pem.crt", directory / f"{stem}.private.pem.key"
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(key_path, _pem_key(key), 0o600)
        return cert_path, key_path


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def certificate_id(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_id(public_key) -> str:
    """SHA-256 of a public key's DER SubjectPublicKeyInfo, to compare keys in the record."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin")


# ------------------------------------------------------------- the stand-in

class StandIn:
    """mosquitto plus the fleet provisioning responder, in ``workdir``."""

    def __init__(self, workdir: Path, serial: str = DEFAULT_SERIAL,
                 template: str = DEFAULT_TEMPLATE, faults: Faults | None = None,
                 key_factory: "Callable[[], rsa.RSAPrivateKey] | None" = None):
        self.workdir = Path(workdir)
        self.dir = self.workdir / "standin"
        self.serial = serial
        self.template = template
        self.faults = faults or Faults()
        # CreateKeysAndCertificate answers with an RSA-2048 key, as AWS does; a
        # benchmark may hand in keys made beforehand.
        self.key_factory = key_factory or (
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.port = 0
        self.events_path = self.dir / "events.jsonl"
        self.config_path = self.workdir / "ento.conf"
        self._broker: subprocess.Popen | None = None
        self._responder = None
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- life cycle

    def __enter__(self) -> "StandIn":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        mosquitto = find_mosquitto()
        if not mosquitto:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "claim").mkdir(exist_ok=True)
        self.ca = StandInCA()
        self.ca_path = self.dir / "ca.pem"
        _write(self.ca_path, self.ca.pem, 0o644)
        server_cert, server_key = self.ca.write_pair(self.dir, "server", "localhost", server=True)
        self.claim_cert, self.claim_key = self.ca.write_pair(self.workdir / "claim", "claim",
                                                             "fleet-claim")
        self._responder_files = self.ca.write_pair(self.dir, "responder", "standin-responder")
        self.port = _free_port()
        conf = self.dir / "mosquitto.conf"
        lines = [
            "per_listener_settings false",
            "persistence false",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            f"listener {self.port} 127.0.0.1",
            f"cafile {self.ca_path}",
            f"certfile {server_cert}",
            f"keyfile {server_key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
        if os.geteuid() == 0:
            # mosquitto drops root for user "mosquitto", which cannot read 0600 keys.
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self._broker_log = open(self.dir / "mosquitto.log", "ab")
        self._broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=self._broker_log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_for_port(5.0)
        self._start_responder()
        self.write_device_config()
        self.record("ready", port=self.port)

    def _wait_for_port(self, limit: float) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self._broker.poll() is not None:
                raise RuntimeError(f"mosquitto exited; see {self.dir / 'mosquitto.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def _start_responder(self) -> None:
        from awscrt import mqtt
        from awsiot import mqtt_connection_builder
        cert, key = self._responder_files
        self._responder = mqtt_connection_builder.mtls_from_path(
            endpoint="localhost", port=self.port, cert_filepath=str(cert),
            pri_key_filepath=str(key), ca_filepath=str(self.ca_path),
            client_id=f"standin-responder-{secrets.token_hex(3)}", clean_session=True,
            keep_alive_secs=30, enable_metrics_collection=False)
        self._responder.connect().result(10)
        filters = [CREATE, CREATE_CSR, f"{REGISTER_PREFIX}+{REGISTER_SUFFIX}", BOOTED_FILTER]
        futures = [self._responder.subscribe(t, mqtt.QoS.AT_LEAST_ONCE, callback=self._on_message)[0]
                   for t in filters]
        for fut in futures:
            fut.result(10)

    def stop(self) -> None:
        if self._responder is not None:
            try:
                self._responder.disconnect().result(3)
            except Exception:
                pass
            self._responder = None
        if self._broker is not None:
            self._broker.terminate()
            try:
                self._broker.wait(5)
            except subprocess.TimeoutExpired:
                self._broker.kill()
                self._broker.wait()
            self._broker = None
            self._broker_log.close()

    def stop_broker(self) -> None:
        """Take the broker away, as a dead link would (the port then refuses)."""
        self.stop()

    def issued_tokens(self) -> list[str]:
        """Every ownership token handed out, so tests can look for leaks."""
        return list(self._tokens)

    # -- the device's files

    def write_device_config(self, **overrides) -> Path:
        device = {
            "SERIAL_ID": self.serial,
            "ENDPOINT_URL": "localhost",
            "PORT": self.port,
            "PROVISION_STATUS": "False",
            "TEMPLATE_NAME": self.template,
            "CLAIM_CERT": "claim/claim.pem.crt",
            "CLAIM_KEY": "claim/claim.private.pem.key",
            "ROOT_CA": "standin/ca.pem",
            "CERT_DIR": "cert",
        }
        device.update(overrides)
        doc = {"device": device, "camera": {"CAPTURE_INTERVAL_S": 60, "NOTE": "kept as is"}}
        _write(self.config_path, (json.dumps(doc, indent=2) + "\n").encode(), 0o640)
        return self.config_path

    # -- the record

    def record(self, event: str, **fields) -> None:
        line = json.dumps({"t": time.time(), "event": event, **fields})
        with self._lock, open(self.events_path, "a") as f:
            f.write(line + "\n")

    def events(self, name: str | None = None) -> list[dict]:
        try:
            lines = self.events_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        events = [json.loads(line) for line in lines if line]
        return [e for e in events if name is None or e["event"] == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise TimeoutError(f"no {count} {name!r} event(s) in {timeout} s")

    # -- the responder

    def _on_message(self, topic: str, payload: bytes, **_) -> None:
        try:
            self._handle(topic, bytes(payload))
        except Exception:
            log.exception("stand-in responder failed on %s", topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic.startswith("cameraDevice/"):
            self.record("boot", topic=topic, payload=payload.decode("utf-8", "replace"))
            return
        if topic == CREATE:
            self.record("create-request")
            if not self._dropped("create"):
                self._answer(CREATE, *self._create(None))
        elif topic == CREATE_CSR:
            self.record("csr-request")
            if not self._dropped("create"):
                self._answer(CREATE_CSR, *self._create(payload))
        elif topic.startswith(REGISTER_PREFIX) and topic.endswith(REGISTER_SUFFIX):
            template = topic[len(REGISTER_PREFIX):-len(REGISTER_SUFFIX)]
            if self._dropped("register"):
                self.record("register-request", template=template, dropped=True)
            else:
                self._answer(topic, *self._register(template, payload))

    def _dropped(self, kind: str) -> bool:
        if not self.faults.should_drop(kind):
            return False
        self._kick(self.serial)
        return True

    def _kick(self, client_id: str) -> None:
        """Drop a device's connection: MQTT lets a new client take over its client ID."""
        def takeover() -> None:
            from awsiot import mqtt_connection_builder
            cert, key = self._responder_files
            conn = mqtt_connection_builder.mtls_from_path(
                endpoint="localhost", port=self.port, cert_filepath=str(cert),
                pri_key_filepath=str(key), ca_filepath=str(self.ca_path), client_id=client_id,
                clean_session=True, keep_alive_secs=30, enable_metrics_collection=False)
            try:
                conn.connect().result(5)
                self.record("dropped", client_id=client_id)
                conn.disconnect().result(5)
            except Exception:
                log.exception("could not drop %s", client_id)

        threading.Thread(target=takeover, daemon=True).start()

    def _answer(self, request_topic: str, accepted: bool, body) -> None:
        if self.faults.no_answer:
            self.record("no-answer", topic=request_topic)
            return
        topic = f"{request_topic}/{'accepted' if accepted else 'rejected'}"
        data = body if isinstance(body, bytes) else json.dumps(body).encode()

        def send() -> None:
            from awscrt import mqtt
            if self._responder is None:
                return
            self._responder.publish(topic, data, mqtt.QoS.AT_LEAST_ONCE)
            fields = sorted(body) if isinstance(body, dict) else None
            self.record("answer", topic=topic, fields=fields,
                        holds_private_key=b"PRIVATE KEY" in data)

        if self.faults.delay > 0:
            threading.Timer(self.faults.delay, send).start()
        else:
            send()

    @staticmethod
    def _error(rejection: Rejection) -> dict:
        return {"statusCode": rejection.status, "errorCode": rejection.code,
                "errorMessage": rejection.message}

    def _create(self, csr_payload: bytes | None):
        kind = "create" if csr_payload is None else "csr"
        rejection = (self.faults.take(kind, self.faults.reject_create)
                     or self.faults.throttled("create"))
        if rejection:
            return False, self._error(rejection)
        key_pem = None
        if csr_payload is None:
            key = self.key_factory()
            public_key, key_pem = key.public_key(), _pem_key(key).decode()
        else:
            try:
                doc = json.loads(csr_payload)
                csr = x509.load_pem_x509_csr(doc["certificateSigningRequest"].encode())
                if not csr.is_signature_valid:
                    raise ValueError("bad signature")
                self.record("csr-parsed", public_key=public_key_id(csr.public_key()),
                            subject=csr.subject.rfc4514_string())
            except (ValueError, KeyError, TypeError, AttributeError):
                return False, self._error(Rejection(400, "InvalidCsr",
                                                    "the certificate signing request is invalid"))
            public_key = csr.public_key()
        cert = self.ca.issue(public_key, "AWS IoT Certificate")
        cert_id = certificate_id(cert)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = cert_id
        body = {"certificateId": cert_id,
                "certificatePem": cert.public_bytes(serialization.Encoding.PEM).decode(),
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
        except (ValueError, KeyError, TypeError):
            self.record("register-request", template=template, valid=False)
            return False, self._error(Rejection(400, "InvalidPayload", "malformed request"))
        cert_id = self._tokens.get(token)
        self.record("register-request", template=template, parameters=params,
                    token_valid=cert_id is not None)
        rejection = (self.faults.take("register", self.faults.reject_register)
                     or self.faults.throttled("register"))
        if rejection:
            return False, self._error(rejection)
        if template != self.template:
            return False, self._error(Rejection(404, "ResourceNotFoundException",
                                                f"template {template} does not exist"))
        if cert_id is None:
            return False, self._error(Rejection(400, "InvalidCertificateOwnershipToken",
                                                "the ownership token is not valid"))
        serial = params.get("SerialNumber") if isinstance(params, dict) else None
        if not isinstance(serial, str) or not serial:
            return False, self._error(Rejection(400, "InvalidParameters",
                                                "parameter SerialNumber is required"))
        thing = f"ento-{serial}"
        self.record("register-accepted", thingName=thing, certificateId=cert_id)
        how = self.faults.malformed_register
        if how == "not-json":
            return True, b"not json"
        if how == "empty-thing":
            thing = ""
        return True, {"deviceConfiguration": {}, "thingName": thing}


# ------------------------------------------------------------ command line

def _serve(args) -> int:
    faults = Faults(
        reject_create=Rejection.parse(args.reject_create) if args.reject_create else None,
        reject_register=Rejection.parse(args.reject_register) if args.reject_register else None,
        reject_times=args.reject_times, no_answer=args.no_answer, delay=args.delay,
        malformed_create=args.malformed_create, malformed_register=args.malformed_register,
        drop_after=args.drop_after)
    standin = StandIn(Path(args.dir), serial=args.serial, template=args.template, faults=faults)
    try:
        standin.start()
    except RuntimeError as exc:
        log.error("%s", exc)
        return os.EX_UNAVAILABLE
    if args.refuse_connections:
        standin.stop_broker()
        log.info("broker stopped: connections to localhost:%s are refused", standin.port)
    log.info("stand-in ready on localhost:%s; device config %s; events %s",
             standin.port, standin.config_path, standin.events_path)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


def _listing(root: Path) -> str:
    rows = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and "standin" not in path.parts:
            st = path.stat()
            rows.append(f"  {oct(st.st_mode & 0o777)[2:]:>4}  {st.st_size:6d}  "
                        f"{path.relative_to(root)}")
    return "\n".join(rows)


def _demo(args) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ento-demo-") as tmp, StandIn(Path(tmp)) as standin:
        root = Path(tmp)
        out = sys.stdout
        out.write(f"Stand-in for AWS IoT on localhost:{standin.port} (mosquitto, mutual TLS)\n")
        out.write(f"Simulated device {standin.serial} in {root}\n\n")
        for label in ("First boot (provisions)", "Second boot (reports only)"):
            out.write(f"== {label}: boot.py --config {standin.config_path}\n")
            out.flush()
            t0 = time.monotonic()
            rc = subprocess.run([sys.executable, str(HERE / "boot.py"), "--config",
                                 str(standin.config_path)], stdin=subprocess.DEVNULL).returncode
            out.write(f"-> exit code {rc} in {time.monotonic() - t0:.2f} s\n\n")
            out.flush()
            if rc != 0:
                return 1
        standin.wait_for("boot", 2)
        out.write("Files the device holds (mode, bytes, path):\n" + _listing(root) + "\n\n")
        device = json.loads(standin.config_path.read_text())["device"]
        out.write("ento.conf \"device\" now:\n" + json.dumps(device, indent=2) + "\n\n")
        out.write("Boot messages the stand-in received:\n")
        for event in standin.events("boot"):
            out.write(f"  {event['topic']}  {event['payload']}\n")
        requests = [e["event"] for e in standin.events() if e["event"].endswith("-request")]
        out.write(f"\nProvisioning requests the service saw: {', '.join(requests)}\n")
        out.write(f"Demo finished in {time.monotonic() - started:.2f} s\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve until interrupted")
    run.add_argument("--dir", required=True)
    run.add_argument("--serial", default=DEFAULT_SERIAL)
    run.add_argument("--template", default=DEFAULT_TEMPLATE)
    run.add_argument("--reject-create", metavar="STATUS:CODE[:MESSAGE]")
    run.add_argument("--reject-register", metavar="STATUS:CODE[:MESSAGE]")
    run.add_argument("--reject-times", type=int, metavar="K",
                     help="reject only the first K requests of each kind")
    run.add_argument("--no-answer", action="store_true", help="record requests, answer none")
    run.add_argument("--delay", type=float, default=0.0, help="delay every answer (seconds)")
    run.add_argument("--malformed-create", choices=["not-json", "missing-cert", "bad-pem",
                                                    "wrong-key"])
    run.add_argument("--malformed-register", choices=["not-json", "empty-thing"])
    run.add_argument("--drop-after", choices=["create", "register"],
                     help="drop the device's connection after this request, once")
    run.add_argument("--refuse-connections", action="store_true",
                     help="write the device's files, then close the broker's port")
    sub.add_parser("demo", help="provision a simulated device and show the result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "run":
        return _serve(args)
    try:
        return _demo(args)
    except RuntimeError as exc:
        log.error("%s", exc)
        return os.EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
