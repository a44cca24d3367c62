"""Report that this camera booted, then record PROVISION_STATUS "True".

Connects to AWS IoT with the device's own certificate (client ID THING_NAME,
else SERIAL_ID), publishes {"serialID": "<SERIAL_ID>", "bootStatus": true} with
QoS 1 on cameraDevice/<SERIAL_ID>/booted, waits for the broker's
acknowledgement, and only then writes PROVISION_STATUS "True" to the config.
boot.py calls update_boot_status() at the end of every boot; run alone:

    python update_boot_status.py [--config PATH] [--timeout SECONDS] [-v]

Exit codes: 0 done; 75 transient (network, broker, time limit: try later);
78 configuration (bad config, or no installed credentials: run boot.py);
73 the config cannot be written; 70 a bug.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import ento

log = logging.getLogger("entomologist.boot_status")


def boot_topic(serial_id: str) -> str:
    return f"cameraDevice/{serial_id}/booted"


def boot_message(serial_id: str) -> bytes:
    return json.dumps({"serialID": serial_id, "bootStatus": True}).encode()


def update_boot_status(config: ento.Config, deadline: ento.Deadline,
                       connect: ento.Connector | None = None,
                       sleep: Callable[[float], None] = time.sleep,
                       clock: Callable[[], float] = time.time,
                       credentials_checked: bool = False) -> None:
    """Publish the boot message with the installed credentials, then set the status.

    ``credentials_checked``: the caller has just checked (or installed) the pair.
    """
    connect = connect or ento.connect_mqtt
    problem = None if credentials_checked else ento.installed_credentials_problem(config)
    if problem:
        raise ento.ConfigError(f"no device credentials: {problem}",
                               hint="that boot.py has provisioned this device")
    ca = config.ca_copy_path if config.ca_copy_path.exists() else config.root_ca
    ento.check_clock(config.path, [config.cert_path, ca], clock)
    endpoint = ento.Endpoint(config.host, config.port, ca)
    client_id = config.thing_name or config.serial_id
    topic = boot_topic(config.serial_id)

    def attempt() -> None:
        session = connect(endpoint, config.cert_path, config.key_path, client_id,
                          deadline.step("connect with the device certificate"))
        try:
            session.publish(topic, boot_message(config.serial_id),
                            deadline.step("boot message"))
        finally:
            session.close()

    ento.with_retries(attempt, deadline, "boot message", sleep=sleep)
    log.info("boot message acknowledged on %s (client ID %s)", topic, client_id)
    if not config.provisioned:
        ento.update_device_config(config.path, {"PROVISION_STATUS": "True"})
        log.info("PROVISION_STATUS set to True in %s", config.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ento.DEFAULT_CONFIG)
    parser.add_argument("--timeout", type=float, default=ento.RUN_TIMEOUT,
                        help="limit for the whole run, in seconds (default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    ento.setup_logging(args.verbose)

    def body() -> None:
        deadline = ento.Deadline(args.timeout)
        with ento.RunLock(args.config) as lock:
            lock.acquire(deadline)
            config = ento.load_config(args.config)
            ento.remove_stray_temp_files(config)
            update_boot_status(config, deadline)

    return ento.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
