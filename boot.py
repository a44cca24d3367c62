"""Provision this camera with AWS IoT on its first boot; report every boot.

Run by a systemd oneshot unit at every boot:

    python boot.py [--config PATH] [--force] [--timeout SECONDS] [-v]
    python boot.py --check [--json] [--connect-as-thing] [--config PATH] [--timeout SECONDS]

If CERT_DIR holds no certificate with its private key (or with --force), it
connects with the fleet claim certificate, calls CreateKeysAndCertificate (or,
with PROVISIONING_API "CreateCertificateFromCsr", sends a CSR for a key made
here) and RegisterThing (AWS IoT fleet provisioning by claim), and installs
the new certificate and key.  Then, on every boot, update_boot_status()
publishes the boot message and records PROVISION_STATUS "True".

Exit codes: 0 done; 75 transient (network, broker, throttling, time limit:
systemd retries later); 78 configuration (config missing, invalid or
untrusted, claim files or TEMPLATE_NAME missing when provisioning is needed);
65 the service refused for good or answered with something malformed; 73
credentials or the config cannot be written; 70 a bug (logged with its
traceback).
"""
from __future__ import annotations

# First: a signal while the rest loads ends the run with one line and 75 (as a
# script only: a test that imports this module keeps its own handlers).
from entomologist.stop import stop_while_starting

if __name__ == "__main__":
    stop_while_starting()

import argparse  # noqa: E402
import logging
import os
import sys
from pathlib import Path

from entomologist import certs, clock, fleet, keys, logs, mqtt, secret, spend
from entomologist.bugs import note_outcome
from entomologist.client_id import claim_client_id
from entomologist.config import (DEFAULT_CONFIG, Config, ProvisioningSettings,
                                 provisioning_settings, rehearse_update, update_device_config)
from entomologist.credentials import CertDir, Look, Registration, State
from entomologist.errors import (ConfigError, EntoError, InventoryRefused, Rejected,
                                 ServiceBusy, ServiceError, SubscriptionRefused, TransientError,
                                 run_main)
from entomologist.run import locked_run
from entomologist.retries import CHECK_TIMEOUT, RUN_TIMEOUT, Deadline, positive_seconds, with_retries
from entomologist.spend import SpendRecord
from entomologist.stop import Stop
from update_boot_status import update_boot_status

log = logging.getLogger("entomologist.boot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--force", action="store_true",
                        help="provision again although provisioned; the old credentials "
                             "stay until the new ones are registered")
    parser.add_argument("--timeout", type=positive_seconds, default=None,
                        help=f"limit for the whole run, in seconds (default {RUN_TIMEOUT:.0f}; "
                             f"{CHECK_TIMEOUT:.0f} with --check)")
    parser.add_argument("-v", "--verbose", action="store_true")
    checking = parser.add_argument_group(
        "checking", "--check runs every check a boot makes before it spends anything, one "
        "line each, and exits with the code the next boot would end with (0: it would "
        "succeed as far as can be told).  It writes nothing and sends no request: on a "
        "camera not provisioned yet it connects with the claim certificate and subscribes "
        "to the provisioning answers, then disconnects; on a provisioned one it makes a TLS "
        "handshake with the device certificate.")
    checking.add_argument("--check", action="store_true",
                          help="check whether the next boot would succeed, without doing it")
    checking.add_argument("--json", action="store_true",
                          help="with --check: one JSON object per line and check")
    checking.add_argument("--connect-as-thing", action="store_true",
                          help="with --check on a provisioned camera: also open an MQTT "
                               "connection as THING_NAME.  Off by default: AWS IoT keeps one "
                               "connection per client ID, so this drops the camera "
                               "application's own connection if it uses that client ID")
    args = parser.parse_args(argv)
    if (args.json or args.connect_as_thing) and not args.check:
        parser.error("--json and --connect-as-thing go with --check")
    if args.check and args.force:
        parser.error("--check and --force exclude each other")
    logs.setup_logging(args.verbose)
    certs.trust_root_ca_only()
    if args.check:
        from entomologist import stop as stopping
        stopping.started()
        if not args.verbose:
            # The check's own lines are the report; the log keeps warnings.
            logging.getLogger().setLevel(logging.WARNING)
        # No note_outcome: a check writes nothing, not even the bug count.  Imported
        # here: a boot loads none of the checks (ssl, subprocess, the probes).
        from entomologist import check
        return check.run(args.config, args.timeout or CHECK_TIMEOUT, args.json,
                         args.connect_as_thing, sys.stdout)
    args.timeout = args.timeout or RUN_TIMEOUT
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY")
    with Stop(on_exit=lambda code: note_outcome(code, runtime_dir)).installed() as stop:
        stop.time_limit(args.timeout)
        code = run_main(lambda: boot(args.config, Deadline(args.timeout), args.force,
                                     runtime_dir=runtime_dir, stop=stop))
    note_outcome(code, runtime_dir)
    return code


def boot(config_path: Path, deadline: Deadline, force: bool = False,
         build: mqtt.Builder | None = None, runtime_dir: str | None = None,
         stop: Stop | None = None) -> None:
    """The whole boot-time job, under the run lock (``runtime_dir``: the unit's
    RuntimeDirectory, see update_boot_status; ``stop``: the run's signal handling).
    Every reading of time and every wait is the deadline's clock; CERT_DIR's state
    decides (entomologist.credentials has the table)."""
    # CERT_DIR holds the lock, so it exists (0700) before anything else happens.
    with locked_run(config_path, deadline, create=True) as run:
        config, cert_dir = run.config, run.cert_dir
        look = cert_dir.state(config.serial_id)
        if look.state is State.REGISTERED:
            # An earlier run registered this pair and did not finish installing it.
            log.info("installing thing %s, registered by an earlier run",
                     look.registration.thing_name)
            cert_dir.recover(look, config)
            config = run.reload()
        elif force or look.needs_provisioning:
            if look.state is State.FOREIGN:
                set_aside_foreign_pair(config, cert_dir, look)
            elif not force:
                if config.provisioned:
                    log.warning("PROVISION_STATUS is True but %s: provisioning again",
                                look.problem)
                else:
                    log.info("not provisioned yet (%s)", look.problem)
            provision(config, provisioning_settings(config), deadline, build,
                      lost=not force, stop=stop, cert_dir=cert_dir)
            config = run.reload()
        else:
            cert_dir.recover(look, config)
        # The pair was just found sound or just installed from checked files.
        update_boot_status(config, deadline, build, credentials_checked=True,
                           runtime_dir=runtime_dir, cert_dir=cert_dir)


def set_aside_foreign_pair(config: Config, cert_dir: CertDir, look: Look) -> None:
    """A pair installed for another SERIAL_ID came with a copied image: that
    camera's identity, refused at connect for this one.  It is not this camera's
    to use, nor to delete (the other camera, or an operator, may need it): moved
    aside, and this camera provisions afresh with the claim."""
    folder = cert_dir.recover(look, config)
    log.warning("%s holds credentials installed for camera %s, not this one (%s): an image "
                "copied after its first boot; moved them to %s, provisioning this camera",
                cert_dir.path, look.owner, config.serial_id, folder)


def provision(config: Config, settings: ProvisioningSettings, deadline: Deadline,
              build: mqtt.Builder | None = None, lost: bool = False,
              stop: Stop | None = None, cert_dir: CertDir | None = None) -> Registration:
    """Fleet provisioning by claim, retried from scratch on transient failures.

    ``lost``: the installed credentials are gone or broken (not --force), so a
    PROVISION_STATUS of True no longer holds and is set False first.

    Everything that can fail here is checked before the first request; every
    file is staged as soon as its content exists; once RegisterThing is
    accepted the registration is recorded in CERT_DIR, and a run that fails
    after that point is completed by the next one without any request.  A
    SIGTERM while RegisterThing's answer is on its way waits (bounded) for
    that record (``stop``).

    What each attempt spends is recorded in CERT_DIR (entomologist.spend)
    before it is spent; a run or an attempt that would overspend ends with
    75 before it connects.
    """
    stop = stop or Stop()
    now = deadline.clock.time
    certs.check_claim(settings.claim_cert, settings.claim_key, config.root_ca)
    parameters = secret.template_parameters(settings.template_parameters,
                                            settings.secret_file)
    clock.check_clock([settings.claim_cert, config.root_ca], now)
    rehearse_update(config)
    if lost and config.provisioned:
        update_device_config(config, {"PROVISION_STATUS": "False"})
    if cert_dir is None:
        cert_dir = CertDir.open(config.cert_dir, create=True, token=config.token)
    spent = SpendRecord.open(cert_dir.spend_record, deadline.clock)
    spent.check()
    cert_dir.reserve()

    csr, device_key = None, None
    if config.token is not None:
        device_key, csr = token_key_and_csr(config, settings)
    elif settings.csr_mode:
        device_key = keys.staged_or_new_key(cert_dir.device_key, settings.key_algorithm)
        csr = keys.make_csr(device_key, config.serial_id)

    def attempt() -> Registration:
        client = claim_client_id(config.serial_id)
        log.info("connecting to %s:%s with the claim certificate as %s",
                 config.host, config.port, client)
        link = fleet.connect_with_claim(config, settings, client, deadline, build)
        try:
            service = fleet.FleetProvisioning(link, settings.template_name, settings.csr_mode,
                                              deadline, serial=config.serial_id)
            try:
                service.subscribe()
            except SubscriptionRefused:
                spent.subscription_refused()
                raise
            spent.create_sent()
            try:
                created = service.create(csr)
            except (Rejected, ServiceBusy):
                spent.create_rejected()
                raise
            spent.created(created.certificate_id)
            check_created(created, cert_dir, device_key)
            cert_dir.stage_created(created.certificate_pem, created.private_key_pem)
            spent.register_sent(created.certificate_id)
            try:
                # Recorded before the disconnect, which may take its time.
                with stop.answer_awaited("RegisterThing"):
                    registered = service.register(created.token, parameters)
                    registration = Registration(registered.thing_name, created.certificate_id,
                                                registered.device_configuration,
                                                config.serial_id)
                    cert_dir.record_registration(registration)
            except Rejected as exc:
                spent.rejected(created.certificate_id)
                earlier = spent.unanswered_before(created.certificate_id)
                if isinstance(exc, InventoryRefused) and earlier is not None:
                    # The likely story: the inventory recorded that registration
                    # as this camera's, and refuses a second one.
                    raise InventoryRefused(f"{exc}; this camera's RegisterThing at "
                                           f"{spend.utc(earlier)} got no answer and may have "
                                           f"been that registration", hint=exc.hint) from None
                raise
            except ServiceBusy:
                spent.rejected(created.certificate_id)
                raise
            except TransientError:
                spent.unanswered(created.certificate_id)
                raise
        finally:
            link.close()
        return registration

    started = deadline.clock.monotonic()
    try:
        registration = with_retries(attempt, deadline, "provisioning", hold=spent.hold)
    except BaseException:
        try:
            cert_dir.discard_unregistered()
        except EntoError as exc:
            log.warning("could not clean up: %s", exc)
        raise
    cert_dir.install(config, registration, config.root_ca)
    log.info("provisioned as thing %s in %.1f s; credentials in %s",
             registration.thing_name, deadline.clock.monotonic() - started, cert_dir.path)
    return registration


def token_key_and_csr(config: Config, settings: ProvisioningSettings) -> tuple[bytes, bytes]:
    """The key pair made (or staged by an interrupted run) inside the token, and a CSR
    the token signed.  The token is closed again before anything connects: awscrt
    loads the same module for the device connection and never finalises it."""
    from entomologist import pkcs11_csr, pkcs11_key
    with pkcs11_key.open_token(config.token) as token:
        pair = token.staged_or_new(settings.key_algorithm)
        return pair.public_key_der(), pkcs11_csr.make_csr(pair, config.serial_id)


def check_created(created: fleet.Created, cert_dir: CertDir, device_key) -> None:
    """The new certificate must go with the key that will be installed beside it
    (``device_key``: a key made here, or a token key's public key DER)."""
    if isinstance(device_key, bytes):
        from entomologist import pkcs11_key
        try:
            carries = pkcs11_key.certificate_public_key_der(created.certificate_pem) == device_key
        except ConfigError:
            carries = False
        if not carries:
            raise ServiceError("CreateCertificateFromCsr answered a certificate that does not "
                               "carry the token's key", hint="the provisioning service")
        return
    if device_key is not None:
        if not keys.certificate_carries_key(created.certificate_pem, device_key):
            raise ServiceError("CreateCertificateFromCsr answered a certificate that does not "
                               "carry this device's key", hint="the provisioning service")
        return
    problem = certs.pair_problem(created.certificate_pem, created.private_key_pem)
    if problem:
        raise ServiceError(f"CreateKeysAndCertificate answer is unusable: {problem}",
                           hint="the provisioning service")


if __name__ == "__main__":
    sys.exit(main())
