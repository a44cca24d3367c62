"""``boot.py --check``: whether the next boot would succeed, asked without doing it.

Every check a boot makes before it spends anything, in the order the boot
makes them, with the product's own functions (config loading, trust,
certificates, the clock, the proxy, the MQTT connection, AWS's
IotIdentityClient), one result each.  Nothing is written: no lock file, no
CERT_DIR, no config rewrite, no temporary file; a running boot is found by
a probe of its lock, never waited for.  The checks of local state are in
check_local, those of the network in check_network; this module runs them
in order and prints their results.

The exit code is the one the next boot would end with: that of the first
check that fails, in the boot's order; 0 if none does.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TextIO

from . import logs, mqtt, stop
from .check_local import (Plan, Warn, check_cert_dir, check_claim, check_clock, check_config,
                          check_device_credentials, check_lock, check_secret, check_spend,
                          check_storage, check_token, device_ca)
from .check_network import (check_claim_mqtt, check_device_mqtt, check_dns, check_proxy,
                            check_tcp, check_tls)
from .errors import EntoError, exit_code
from .retries import Deadline

log = logging.getLogger("entomologist.check")


@dataclass
class Result:
    name: str
    status: str          # "ok", "fail", "warn" or "skip"
    detail: str
    hint: str | None
    milliseconds: int
    exit_code: int       # what this result alone would make the boot end with


class Failed(Exception):
    """A check failed: the checks that need its result are skipped."""


class Checks:
    def __init__(self, emit: Callable[[Result], None]):
        self.emit = emit
        self.results: list[Result] = []
        self.current: tuple[str, float] | None = None  # the check running, and since when

    def _add(self, result: Result) -> None:
        result.detail = logs.clean_line(result.detail)
        result.hint = logs.clean_line(result.hint) if result.hint else None
        self.results.append(result)
        self.emit(result)

    def run(self, name: str, check: Callable[[], object]):
        """Run one check; its value, or Failed.  ``check`` returns the detail, or
        (detail, value), or a Warn, or raises EntoError."""
        started = time.monotonic()
        self.current = (name, started)

        def ms() -> int:
            return round((time.monotonic() - started) * 1000)
        try:
            outcome = check()
        except EntoError as exc:
            self._add(Result(name, "fail", str(exc), exc.hint, ms(), exit_code(exc)))
            raise Failed(name) from None
        except Exception as exc:
            log.exception("unexpected error in the %s check (a bug): please report it", name)
            self._add(Result(name, "fail", f"unexpected error (a bug): {type(exc).__name__}",
                             None, ms(), os.EX_SOFTWARE))
            raise Failed(name) from None
        if isinstance(outcome, Warn):
            self._add(Result(name, "warn", outcome.detail, outcome.hint, ms(), os.EX_OK))
            return None
        detail, value = outcome if isinstance(outcome, tuple) else (outcome, None)
        self._add(Result(name, "ok", detail, None, ms(), os.EX_OK))
        return value

    def skip(self, name: str, why: str) -> None:
        self._add(Result(name, "skip", why, None, 0, os.EX_OK))

    def exit_code(self, last: frozenset[str] = frozenset()) -> int:
        """The first failure's code; the checks named in ``last`` come after every other
        (what the boot does at its end, though shown where it belongs)."""
        failed = sorted((r for r in self.results if r.status == "fail"),
                        key=lambda r: r.name in last)
        return failed[0].exit_code if failed else os.EX_OK


# --------------------------------------------------------------------- the run

def last_checked(plan: Plan | None) -> frozenset[str]:
    """A provisioned camera's boot writes PROVISION_STATUS only after its boot message."""
    return frozenset({"storage"}) if plan is not None and plan.action == "report" \
        else frozenset()


def run_checks(config_path: Path, deadline: Deadline, emit: Callable[[Result], None],
               connect_as_thing: bool = False, build: mqtt.Builder | None = None,
               now: Callable[[], float] = time.time, checks: Checks | None = None) -> int:
    """Every check, in the boot's order; the exit code the next boot would end with."""
    checks = checks or Checks(emit)
    try:
        config = checks.run("config", lambda: check_config(config_path))
    except Failed:
        return checks.exit_code()

    plan = settings = None
    try:
        if config.token is not None:
            checks.run("token", lambda: check_token(config))
        plan = checks.run("cert-dir", lambda: check_cert_dir(config))
    except Failed:
        pass
    boot_running = False
    if plan is not None:
        checks.run("lock", lambda: check_lock(config, plan))
        boot_running = checks.results[-1].status == "warn"
    else:
        checks.skip("lock", "needs CERT_DIR")

    credentials_ok = False
    clock_files: list[Path] = []
    if plan is None:
        checks.skip("credentials", "needs CERT_DIR")
    else:
        try:
            if plan.action == "provision":
                settings = checks.run("claim", lambda: check_claim(config))
                clock_files = [settings.claim_cert, config.root_ca]
            elif plan.action == "report":
                checks.run("credentials", lambda: check_device_credentials(config, plan))
                clock_files = [plan.cert_dir.cert, device_ca(config, plan)]
            else:
                checks.skip("credentials", "the registered pair is installed from the files "
                                           "the run that registered it checked")
                clock_files = [config.root_ca]
            credentials_ok = True
        except Failed:
            pass

    clock_ok = False
    if clock_files:
        try:
            checks.run("clock", lambda: check_clock(clock_files, now))
            clock_ok = True
        except Failed:
            pass
    else:
        checks.skip("clock", "needs the certificates")

    if plan is not None:
        try:
            checks.run("storage", lambda: check_storage(config, plan))
        except Failed:
            pass
    else:
        checks.skip("storage", "needs CERT_DIR")

    # The provisioning secret and what earlier attempts spent, before the network, as
    # the boot reads them before its first request.
    if plan is not None and plan.action == "provision":
        if credentials_ok:
            try:
                checks.run("secret", lambda: check_secret(settings))
            except Failed:
                pass
        else:
            checks.skip("secret", "needs the config's provisioning settings")
        try:
            checks.run("spend", lambda: check_spend(plan, deadline.clock))
        except Failed:
            pass

    open_link = check_proxy if config.proxy is not None else check_tcp
    try:
        checks.run("dns", lambda: check_dns(config, deadline))
        sock = checks.run("proxy" if config.proxy is not None else "tcp",
                          lambda: open_link(config, deadline))
    except Failed:
        for name in ("tls", "mqtt"):
            checks.skip(name, "needs the network checks above")
        return checks.exit_code(last_checked(plan))

    if not (credentials_ok and clock_ok):
        sock.close()
        for name in ("tls", "mqtt"):
            checks.skip(name, "needs the credentials and the clock above")
        return checks.exit_code(last_checked(plan))

    if plan.action == "provision":
        pair, whose, ca = (settings.claim_cert, settings.claim_key), "claim", config.root_ca
    elif plan.action == "report" and config.token is None:
        pair, whose, ca = (plan.cert_dir.cert, plan.cert_dir.key), "device", \
            device_ca(config, plan)
    else:
        # A token's key cannot be handed to Python's ssl (awscrt presents it, once the
        # server has verified); a registration waiting to be installed has no
        # installed pair yet.
        pair, whose, ca = None, "", device_ca(config, plan) if plan.action == "report" \
            else config.root_ca
    token_cert = plan.cert_dir.cert if plan.action == "report" and config.token else None
    try:
        checks.run("tls", lambda: check_tls(config, deadline,
                                            lambda: open_link(config, deadline)[1], sock, ca,
                                            pair, whose, token_cert))
    except Failed:
        checks.skip("mqtt", "needs the TLS handshake")
        return checks.exit_code(last_checked(plan))

    if boot_running and (plan.action == "provision" or connect_as_thing):
        checks.skip("mqtt", "a boot is running: a second connection with its client ID "
                            "would drop its own")
    elif plan.action == "provision":
        try:
            checks.run("mqtt", lambda: check_claim_mqtt(config, settings, deadline, build))
        except Failed:
            pass
    elif plan.action == "report" and connect_as_thing:
        try:
            checks.run("mqtt", lambda: check_device_mqtt(config, plan, deadline, build))
        except Failed:
            pass
    elif plan.action == "report":
        checks.skip("mqtt", f"no MQTT CONNECT as {config.thing_name or config.serial_id}: it "
                            f"would drop the camera application's own connection "
                            "(--connect-as-thing does it)")
    else:
        checks.skip("mqtt", "the next boot installs a registered pair before it connects")
    return checks.exit_code(last_checked(plan))


# --------------------------------------------------------------------- output

EXIT_MEANINGS = {os.EX_OK: "the next boot would succeed as far as can be told",
                 os.EX_TEMPFAIL: "transient: the next boot would fail and be retried",
                 os.EX_CONFIG: "configuration: the next boot would fail until it is fixed",
                 os.EX_DATAERR: "the service would refuse",
                 os.EX_CANTCREAT: "storage: the next boot could not read or write what "
                                  "it must, and would be retried",
                 os.EX_SOFTWARE: "a bug"}


def human_line(result: Result) -> str:
    status = {"fail": "FAIL", "warn": "WARN"}.get(result.status, result.status)
    hint = f"; check {result.hint}" if result.hint else ""
    took = f" ({result.milliseconds} ms)" if result.status != "skip" else ""
    return f"{status:<5}{result.name:<12}{result.detail}{hint}{took}"


def run(config_path: Path, timeout: float, as_json: bool, connect_as_thing: bool,
        out: TextIO, build: mqtt.Builder | None = None,
        now: Callable[[], float] = time.time) -> int:
    """Print one line per check (JSON lines with ``as_json``) and a last summary line."""
    started = time.monotonic()
    reader_gone = False

    def write(line: str) -> None:
        nonlocal reader_gone
        if reader_gone:
            return
        try:
            if out is None:  # started with its stdout closed: sys.stdout is None
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            out.write(line + "\n")
            out.flush()
        except OSError as exc:
            # The reader left (`| grep -q FAIL`, `| head -1`), or the report cannot be
            # written (a full disk, a closed stdout): the checks go on, since the exit
            # code is the verdict; what is left to print goes nowhere, and the
            # interpreter's last flush finds no error either.
            reader_gone = True
            if not isinstance(exc, BrokenPipeError):
                log.warning("the report of --check cannot be written (%s): only its exit "
                            "code tells the verdict", exc.strerror or exc)
            if out is None:
                return
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, out.fileno())
                os.close(devnull)
            except (OSError, AttributeError, ValueError):
                pass

    def emit(result: Result) -> None:
        write(json.dumps(asdict(result)) if as_json else human_line(result))

    def summarise(code: int) -> None:
        summary = Result("result", "ok" if code == os.EX_OK else "fail",
                         f"exit {code}: {EXIT_MEANINGS.get(code, '')}", None,
                         round((time.monotonic() - started) * 1000), code)
        write(json.dumps(asdict(summary)) if as_json else
              f"{summary.detail} ({summary.milliseconds} ms)")

    checks = Checks(emit)

    def overdue() -> None:
        # Every wait of the checks' own is bounded; a call into a PKCS#11 module is not
        # (a token or device that stops answering holds it for ever): the report ends
        # here with the check that did not return, and the process with it.
        name, since = checks.current or ("config", started)
        checks._add(Result(name, "fail", f"did not end within the check's time limit "
                                         f"({timeout:g} s): a call that did not return",
                           "the PKCS#11 module and its token or device, which may have "
                           "stopped answering", round((time.monotonic() - since) * 1000),
                           os.EX_TEMPFAIL))
        summarise(os.EX_TEMPFAIL)
        os._exit(os.EX_TEMPFAIL)

    watchdog = stop.backstop(timeout, overdue, "the check")
    try:
        code = run_checks(config_path, Deadline(timeout), emit, connect_as_thing, build, now,
                          checks)
    except KeyboardInterrupt:
        write("interrupted")
        return os.EX_TEMPFAIL
    finally:
        if watchdog is not None:
            watchdog.cancel()
    summarise(code)
    return code
