"""Report that this camera booted, then record PROVISION_STATUS "True".

Connects to AWS IoT with the device's own certificate (client ID THING_NAME,
else SERIAL_ID), publishes {"serialID": "<SERIAL_ID>", "bootStatus": true} with
QoS 1 on cameraDevice/<SERIAL_ID>/booted, waits for the broker's
acknowledgement, and only then writes PROVISION_STATUS "True" to the config
(no write at all when it already says so).  Under the unit, a retry after
that write failed sends no second message in the same boot; on a read-only
file system the boot stays reported and one warning says that the status
could not be recorded.  boot.py calls update_boot_status() at the end of
every boot; run alone:

    python update_boot_status.py [--config PATH] [--timeout SECONDS] [-v]

Exit codes: 0 done; 75 transient (network, broker, time limit: try later);
78 configuration (bad or untrusted config, or no installed credentials: run
boot.py); 73 the config cannot be written (but 0 with a warning when its file
system is read-only); 70 a bug.
"""
from __future__ import annotations

# First: a signal while the rest loads ends the run with one line and 75 (as a
# script only: a test that imports this module keeps its own handlers).
from entomologist.stop import stop_while_starting

if __name__ == "__main__":
    stop_while_starting()

import argparse  # noqa: E402
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from entomologist import certs, clock, files, logs, mqtt
from entomologist.config import DEFAULT_CONFIG, Config, update_device_config
from entomologist.credentials import CertDir, State
from entomologist.errors import ConfigError, EntoError, ReadOnlyStorage, run_main
from entomologist.run import locked_run
from entomologist.retries import RUN_TIMEOUT, Deadline, positive_seconds, with_retries
from entomologist.stop import Stop

log = logging.getLogger("entomologist.boot_status")


def boot_topic(serial_id: str) -> str:
    return f"cameraDevice/{serial_id}/booted"


def boot_message(serial_id: str) -> bytes:
    return json.dumps({"serialID": serial_id, "bootStatus": True}).encode()


REPORTED_FILE = "boot-reported"


def reported_mark(cert_pem: bytes, serial_id: str) -> bytes:
    """What says that this boot's message was acknowledged, for this certificate."""
    return f"{hashlib.sha256(cert_pem).hexdigest()} {serial_id}\n".encode()


def trusted_runtime_dir(runtime_dir: str | None) -> str | None:
    """``runtime_dir`` if nobody but root and us can write it (under the unit, systemd
    makes it root's); else None, with a warning: another user could forge the boot
    record there and spare the boot's message."""
    if not runtime_dir:
        return None
    try:
        return str(files.trusted_dir(Path(runtime_dir), "RUNTIME_DIRECTORY"))
    except ConfigError as exc:
        log.warning("not keeping this boot's record in RUNTIME_DIRECTORY: %s", exc)
        return None


def reported_this_boot(runtime_dir: str | None, mark: bytes) -> bool:
    if not runtime_dir:
        return False
    try:
        return files.read_bounded(Path(runtime_dir) / REPORTED_FILE, "boot record",
                                  4096) == mark
    except ConfigError:
        return False


def note_reported(runtime_dir: str | None, mark: bytes) -> None:
    if not runtime_dir:
        return
    try:
        files.write_file_atomic(Path(runtime_dir) / REPORTED_FILE, mark, 0o600)
    except EntoError as exc:
        log.warning("cannot record that this boot was reported (a retry would report it "
                    "again): %s", exc)


def update_boot_status(config: Config, deadline: Deadline,
                       build: mqtt.Builder | None = None,
                       credentials_checked: bool = False,
                       runtime_dir: str | None = None,
                       cert_dir: CertDir | None = None) -> None:
    """Publish the boot message with the installed credentials, then set the status.

    ``credentials_checked``: the caller has just found CERT_DIR SOUND (or installed
    the pair), so its state is not read again.
    ``runtime_dir``: the unit's RuntimeDirectory, which outlives the unit's
    restarts but not a reboot: once this boot's message is acknowledged, a
    retry (after the status write failed) only writes the status.
    """
    hint = "that boot.py has provisioned this device"
    cert_dir = cert_dir or CertDir.existing(config.cert_dir, config.token)
    if cert_dir is None:
        raise ConfigError(f"no device credentials: no folder {config.cert_dir}", hint=hint)
    if not credentials_checked:
        look = cert_dir.state(config.serial_id)
        if look.state is State.REGISTERED:
            raise ConfigError("new credentials are registered but not installed yet", hint=hint)
        if look.state is State.FOREIGN:
            raise ConfigError(f"the credentials in {cert_dir.path} were installed for "
                              f"{look.owner}, not this camera ({config.serial_id}): a copied "
                              f"image", hint="boot.py, which sets them aside and provisions "
                                             "this camera")
        if not look.installed:
            raise ConfigError(f"no device credentials: {look.problem}", hint=hint)
        if cert_dir.token is not None:
            # The key the connection uses must carry the final label.
            cert_dir.promote_token_key()
    ca = cert_dir.ca_for_connection(config.root_ca)
    clock.check_clock([cert_dir.cert, ca], deadline.clock.time)
    endpoint = mqtt.Endpoint(config.host, config.port, ca)
    client_id = config.thing_name or config.serial_id
    topic = boot_topic(config.serial_id)

    key, builder = cert_dir.key, build
    if config.token is not None:
        from entomologist import pkcs11_key
        key = pkcs11_key.token_key(config.token)
        builder = build or pkcs11_key.build_connection

    def attempt() -> None:
        link = mqtt.connect(endpoint, cert_dir.cert, key, client_id,
                            deadline.step("connect with the device certificate"), builder,
                            proxy=config.proxy, clock=deadline.clock)
        try:
            link.publish(topic, boot_message(config.serial_id), deadline.step("boot message"))
        finally:
            link.close()

    mark = reported_mark(files.read_bounded(cert_dir.cert, "certificate"), config.serial_id)
    runtime_dir = trusted_runtime_dir(runtime_dir)
    if reported_this_boot(runtime_dir, mark):
        log.info("this boot's message was already acknowledged on %s: not sent again", topic)
    else:
        with_retries(attempt, deadline, "boot message")
        log.info("boot message acknowledged on %s (client ID %s)", topic, client_id)
        note_reported(runtime_dir, mark)
    if config.provisioned:
        return
    try:
        if update_device_config(config, {"PROVISION_STATUS": "True"}):
            log.info("PROVISION_STATUS set to True in %s", config.path)
    except ReadOnlyStorage as exc:
        # The boot is reported, which is what the fleet needs; the installed pair,
        # not the status, decides what the next boot does, and a read-only mount
        # does not heal in a minute: a failed unit retrying for ever would only
        # fill the journal of a camera that works.
        log.warning("boot reported, but PROVISION_STATUS stays False: %s; check %s",
                    exc, exc.hint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--timeout", type=positive_seconds, default=RUN_TIMEOUT,
                        help="limit for the whole run, in seconds (default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logs.setup_logging(args.verbose)
    certs.trust_root_ca_only()

    def body() -> None:
        deadline = Deadline(args.timeout)
        with locked_run(args.config, deadline) as run:
            update_boot_status(run.config, deadline, cert_dir=run.cert_dir,
                               runtime_dir=os.environ.get("RUNTIME_DIRECTORY"))

    # No registration happens here: a signal ends the run at once.
    with Stop().installed() as stop:
        stop.time_limit(args.timeout)
        return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
