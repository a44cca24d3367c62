"""Provision this camera with AWS IoT on its first boot; report every boot.

Run by a systemd oneshot unit at every boot:

    python boot.py [--config PATH] [--force] [--timeout SECONDS] [-v]

If CERT_DIR holds no certificate with its private key (or with --force), it
connects with the fleet claim certificate, calls CreateKeysAndCertificate (or,
with PROVISIONING_API "CreateCertificateFromCsr", sends a CSR for a key made
here) and RegisterThing (AWS IoT fleet provisioning by claim), and installs
the new certificate and key.  Then, on every boot, update_boot_status()
publishes the boot message and records PROVISION_STATUS "True".

Exit codes: 0 done; 75 transient (network, broker, throttling, time limit:
systemd retries later); 78 configuration (config missing or invalid, claim
files or TEMPLATE_NAME missing when provisioning is needed); 65 the service
refused for good or answered with something malformed; 73 credentials or the
config cannot be written; 70 a bug (logged with its traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ento
from update_boot_status import update_boot_status

log = logging.getLogger("entomologist.boot")

CREATE_TOPIC = "$aws/certificates/create/json"
CREATE_CSR_TOPIC = "$aws/certificates/create-from-csr/json"
REGISTER_TOPIC = "$aws/provisioning-templates/{}/provision/json"
# Rejections worth another try; any other 4xx is final.
RETRYABLE_ERROR_CODES = {"Throttling", "ThrottlingException", "TooManyRequests",
                         "ServiceUnavailable", "InternalError", "InternalFailure"}


@dataclass(frozen=True)
class NewCredentials:
    certificate_id: str
    certificate_pem: bytes
    thing_name: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ento.DEFAULT_CONFIG)
    parser.add_argument("--force", action="store_true",
                        help="provision again although provisioned; the old credentials "
                             "stay until the new ones are registered")
    parser.add_argument("--timeout", type=float, default=ento.RUN_TIMEOUT,
                        help="limit for the whole run, in seconds (default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    ento.setup_logging(args.verbose)

    return ento.run_main(lambda: boot(args.config, ento.Deadline(args.timeout), args.force))


def boot(config_path: Path, deadline: ento.Deadline, force: bool = False,
         connect: ento.Connector | None = None,
         sleep: Callable[[float], None] = time.sleep,
         clock: Callable[[], float] = time.time) -> None:
    """The whole boot-time job, under the run lock."""
    with ento.RunLock(config_path) as lock:
        lock.acquire(deadline)
        config = ento.load_config(config_path)
        ento.remove_stray_temp_files(config)
        if force or needs_provisioning(config):
            settings = ento.provisioning_settings(config)
            provision(config, settings, deadline, connect, sleep, clock)
            config = ento.load_config(config_path)
        # Either needs_provisioning() found the pair sound or provision() has
        # just installed a checked one.
        update_boot_status(config, deadline, connect, sleep, clock, credentials_checked=True)


def needs_provisioning(config: ento.Config) -> bool:
    """Installed credentials, not PROVISION_STATUS, decide: only registered ones are installed."""
    problem = ento.installed_credentials_problem(config)
    if problem is None:
        # A --force run killed before it installed leaves a staged key; the
        # credentials in use are the installed ones.
        remove_staged_keys(config)
        return False
    if config.provisioned:
        log.warning("PROVISION_STATUS is True but %s: provisioning again", problem)
    else:
        log.info("not provisioned yet (%s)", problem)
    return True


def remove_staged_keys(config: ento.Config) -> None:
    ento.remove_durably(config.staging_key_path)
    ento.remove_durably(config.own_key_path)


def provision(config: ento.Config, settings: ento.ProvisioningSettings,
              deadline: ento.Deadline, connect: ento.Connector | None = None,
              sleep: Callable[[float], None] = time.sleep,
              clock: Callable[[], float] = time.time) -> NewCredentials:
    """Fleet provisioning by claim, retried from scratch on transient failures."""
    connect = connect or ento.connect_mqtt
    ento.ensure_private_dir(config.cert_dir)
    if not os.access(config.root_ca, os.R_OK):
        raise ento.ConfigError(f"ROOT_CA {config.root_ca} is missing or unreadable",
                               hint="ROOT_CA in the config")
    ento.check_clock(config.path, [settings.claim_cert, config.root_ca], clock)

    csr, staged = None, config.staging_key_path
    if settings.csr_mode:
        staged = config.own_key_path
        csr = make_csr(staged_or_new_key(staged, settings.key_algorithm), config.serial_id)

    def attempt() -> NewCredentials:
        log.info("connecting to %s:%s with the claim certificate as %s",
                 config.host, config.port, config.serial_id)
        session = connect(ento.endpoint_of(config), settings.claim_cert, settings.claim_key,
                          config.serial_id, deadline.step("connect with the claim certificate"))
        try:
            return request_credentials(session, settings, deadline, staged, csr, sleep)
        finally:
            session.close()

    started = time.monotonic()
    try:
        creds = ento.with_retries(attempt, deadline, "provisioning", sleep=sleep)
        install_credentials(config, creds, staged)
    finally:
        # A run that ends without installing leaves no staged key behind: its
        # registration is unknown or refused, and the next run starts afresh.
        # (Only a killed run leaves one: the next run replaces it, or in CSR
        # mode reuses it.)
        remove_staged_keys(config)
    log.info("provisioned as thing %s in %.1f s; credentials in %s",
             creds.thing_name, time.monotonic() - started, config.cert_dir)
    return creds


def request_credentials(session: ento.MqttSession, settings: ento.ProvisioningSettings,
                        deadline: ento.Deadline, staged: Path, csr: bytes | None = None,
                        sleep: Callable[[float], None] = time.sleep) -> NewCredentials:
    """CreateKeysAndCertificate (or CreateCertificateFromCsr with ``csr``), then
    RegisterThing, on one claim connection.

    All four response topics are subscribed in one batch before the first
    request: on a 600 ms link every extra round trip shows.  The key is on
    disk in the staging file before RegisterThing is sent (in CSR mode, before
    anything is sent), so a key whose certificate may be registered is never lost.
    """
    what, create_topic = (("CreateCertificateFromCsr", CREATE_CSR_TOPIC) if csr else
                          ("CreateKeysAndCertificate", CREATE_TOPIC))
    register_topic = REGISTER_TOPIC.format(settings.template_name)
    session.subscribe([f"{t}/{r}" for t in (create_topic, register_topic)
                       for r in ("accepted", "rejected")], deadline.step("subscribe"))

    request = {"certificateSigningRequest": csr.decode()} if csr else {}
    created = ask(session, create_topic, request, what, deadline, sleep)
    cert_id, cert_pem, token = (_required_string(created, field, what) for field in (
        "certificateId", "certificatePem", "certificateOwnershipToken"))
    if csr:
        key_pem = staged.read_bytes()
    else:
        key_pem = _required_string(created, "privateKey", what).encode()
    problem = ento.pair_problem(cert_pem.encode(), key_pem)
    if problem:
        raise ento.ServiceError(f"{what} answer is unusable: {problem}",
                                hint="the provisioning service")
    log.info("%s accepted: certificate %s", what, cert_id)
    if not csr:
        ento.write_file_atomic(staged, key_pem, 0o600)

    request = {"certificateOwnershipToken": token,
               "parameters": settings.template_parameters}
    registered = ask(session, register_topic, request, "RegisterThing", deadline, sleep)
    thing_name = _required_string(registered, "thingName", "RegisterThing")
    if not ento.THING_NAME_RE.fullmatch(thing_name):
        raise ento.ServiceError(f"RegisterThing answered an invalid thingName {thing_name!r}",
                                hint="the provisioning template")
    log.info("RegisterThing accepted: thing %s", thing_name)
    return NewCredentials(cert_id, cert_pem.encode(), thing_name)


def staged_or_new_key(staged: Path, algorithm: str):
    """The key staged by an interrupted run, if it is of ``algorithm``; else a new
    one, durably staged (0600) before anything is sent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    try:
        key = serialization.load_pem_private_key(staged.read_bytes(), None)
    except (OSError, ValueError, TypeError):
        key = None
    if key is not None and _algorithm_of(key) == algorithm:
        log.info("reusing the %s key staged by an interrupted run", algorithm)
        return key
    if algorithm == "RSA-2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    ento.write_file_atomic(staged, pem, 0o600)
    return key


def _algorithm_of(key) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return "EC-P256"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048:
        return "RSA-2048"
    return None


def make_csr(key, serial_id: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial_id)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def ask(session: ento.MqttSession, topic: str, request: dict, what: str,
        deadline: ento.Deadline, sleep: Callable[[float], None]) -> dict:
    """Send a request and await its answer.

    A busy service (throttling, 5xx) is asked again on the same connection:
    reconnecting would cost round trips and TLS handshakes, and a throttled
    RegisterThing keeps its ownership token instead of orphaning a certificate.
    """
    def once() -> dict:
        session.publish(topic, json.dumps(request).encode(), deadline.step(what))
        return await_answer(session, topic, what, deadline)

    return ento.with_retries(once, deadline, what, ento.BUSY_BACKOFF, sleep,
                             retry_on=ento.ServiceBusy)


def await_answer(session: ento.MqttSession, request_topic: str, what: str,
                 deadline: ento.Deadline) -> dict:
    """The accepted answer to ``request_topic``; a rejection raises."""
    end = time.monotonic() + deadline.step(what)
    while True:
        try:
            topic, payload = session.receive(end - time.monotonic())
        except ento.TransientError as exc:
            raise ento.TransientError(f"{what}: {exc}", hint=exc.hint) from None
        if topic == f"{request_topic}/accepted":
            return ento.decode_json_object(topic, payload)
        if topic == f"{request_topic}/rejected":
            raise rejection(what, ento.decode_json_object(topic, payload))
        log.debug("ignoring a message on %s", topic)


def rejection(what: str, answer: dict) -> ento.EntoError:
    status, code, message = (answer.get(k) for k in ("statusCode", "errorCode", "errorMessage"))
    text = f"{what} rejected: statusCode={status} errorCode={code} errorMessage={message!r}"
    retryable = (isinstance(status, int) and (status == 429 or status >= 500)) \
        or code in RETRYABLE_ERROR_CODES
    if retryable:
        return ento.ServiceBusy(text, hint="nothing: the service is busy; retrying")
    hint = ("the claim certificate, its policy and that it is active"
            if what == "CreateKeysAndCertificate" else
            "TEMPLATE_NAME, TEMPLATE_PARAMETERS and the template's pre-provisioning hook")
    return ento.ServiceError(text, hint=hint)


def _required_string(answer: dict, field: str, what: str) -> str:
    value = answer.get(field)
    if not isinstance(value, str) or not value:
        raise ento.ServiceError(f"{what} answer lacks {field}", hint="the provisioning service")
    return value


def install_credentials(config: ento.Config, creds: NewCredentials, staged: Path) -> None:
    """Install so that a certificate in CERT_DIR always has its key beside it.

    Order: the config first (it must never claim a boot the new credentials
    did not make), then the old certificate away, the CA and the key, and the
    certificate last: its presence is what marks the pair complete.
    """
    ento.update_device_config(config.path, {"THING_NAME": creds.thing_name,
                                            "CERTIFICATE_ID": creds.certificate_id,
                                            "PROVISION_STATUS": "False"})
    ento.remove_durably(config.cert_path)
    try:
        ca_pem = config.root_ca.read_bytes()
    except OSError as exc:
        raise ento.ConfigError(f"cannot read ROOT_CA {config.root_ca}: {exc.strerror}",
                               hint="ROOT_CA in the config") from None
    ento.write_file_atomic(config.ca_copy_path, ca_pem, 0o644)
    try:
        os.replace(staged, config.key_path)
        ento.fsync_dir(config.cert_dir)
    except OSError as exc:
        raise ento.StorageError(f"cannot install {config.key_path}: {exc.strerror}",
                                hint=f"that {config.cert_dir} is writable") from None
    ento.write_file_atomic(config.cert_path, creds.certificate_pem, 0o644)


if __name__ == "__main__":
    sys.exit(main())
