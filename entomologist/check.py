"""``boot.py --check``: whether the next boot would succeed, asked without doing it.

Every check a boot makes before it spends anything, in the order the boot
makes them, with the product's own functions (config loading, trust,
certificates, the clock, the proxy, the MQTT connection, AWS's
IotIdentityClient), one result each.  Nothing is written: no lock file, no
CERT_DIR, no config rewrite, no temporary file; a running boot is found by
a probe of its lock, never waited for.

The network is checked in the order a connection goes: DNS, the HTTP proxy
(CONNECT answered), TCP, the TLS handshake, then MQTT.  The TLS handshake is
Python's ssl against ROOT_CA rather than awscrt's: awscrt (s2n) answers a
server certificate that does not verify only after a 10 to 30 s delay (its
blinding), Python's ssl at once.  It is capped at TLS 1.2 when it presents a
certificate: the server's verdict on that certificate is then part of the
handshake (under TLS 1.3 it comes after the client has finished, so a server
that speaks only TLS 1.3 gets a second handshake and VERDICT_WAIT after it).

The exit code is the one the next boot would end with: that of the first
check that fails, in the boot's order; 0 if none does.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TextIO

from . import certs, clock, config as configuration, files, fleet, lock, logs, mqtt, secret, spend
from . import proxy as http_proxy
from .credentials import CertDir
from .errors import ConfigError, EntoError, StorageError, TransientError, exit_code
from .retries import Deadline

log = logging.getLogger("entomologist.check")

CHECK_TIMEOUT = 30.0
# Room a first boot needs in a folder it writes: the registration reserve (64 KiB)
# and a block each for a key, two certificates, the CA, the registration record,
# the device configuration and their temporary copies, with some margin.
ROOM_NEEDED = 128 * 1024
CONNECT_FLAG = "--connect-as-thing"
UNIT_RUNTIME_DIRECTORY = "/run/entomologist"  # the unit's RuntimeDirectory=entomologist
UNIT = "entomologist-provision.service"
SYSTEMCTL_TIMEOUT = 3.0
# How long a TLS 1.3-only server is given to refuse our certificate after the handshake.
VERDICT_WAIT = 1.0


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

    def _add(self, result: Result) -> None:
        result.detail = logs.clean_line(result.detail)
        result.hint = logs.clean_line(result.hint) if result.hint else None
        self.results.append(result)
        self.emit(result)

    def run(self, name: str, check: Callable[[], object]):
        """Run one check; its value, or Failed.  ``check`` returns the detail, or
        (detail, value), or a Warn, or raises EntoError."""
        started = time.monotonic()

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


@dataclass
class Warn:
    detail: str
    hint: str | None = None


@dataclass
class Plan:
    """What the next boot would do with CERT_DIR."""

    action: str                  # "provision", "install" or "report"
    why: str
    cert_dir: CertDir | None     # None: it does not exist yet


# ------------------------------------------------------------------ local checks

def check_config(path: Path):
    config = configuration.load_config(path)
    storage = "a PKCS#11 token" if config.token else "a key file"
    via = f", through the HTTP proxy {config.proxy}" if config.proxy else ""
    return (f"{path}: SERIAL_ID {config.serial_id}, endpoint {config.host}:{config.port}, "
            f"device key in {storage}{via}", config)


def check_token(config: configuration.Config):
    from . import pkcs11_key
    settings = config.token
    with pkcs11_key.open_token(settings) as token:
        pairs = len(token.pairs(settings.key_label))
    return (f"module {settings.library}, token {settings.token_label!r}: the PIN is accepted; "
            f"{pairs} key pair(s) labelled {settings.key_label!r}")


PLAN_WORDS = {"provision": "provision the camera",
              "install": "install them, without any request",
              "report": "only send its boot message"}


def check_cert_dir(config: configuration.Config):
    cert_dir = CertDir.existing(config.cert_dir, config.token)
    if cert_dir is None:
        files.trusted_path(Path(os.path.join(os.getcwd(), config.cert_dir)).parent,
                           "the folder of CERT_DIR")
        plan = Plan("provision", f"no {config.cert_dir} yet", None)
    elif (registration := cert_dir.registration(repair=False)) is not None:
        plan = Plan("install", f"thing {registration.thing_name} is registered and its "
                               f"credentials wait in {config.cert_dir}", cert_dir)
    elif (owner := cert_dir.installed_for()) not in (None, config.serial_id):
        plan = Plan("provision", f"the credentials in {config.cert_dir} were installed for "
                                 f"camera {owner}, not this one (an image copied after its "
                                 f"first boot): they will be set aside", cert_dir)
    elif (problem := cert_dir.installed_problem(repair=False)) is not None:
        plan = Plan("provision", f"not provisioned: {problem}", cert_dir)
    else:
        plan = Plan("report", f"provisioned (credentials in {config.cert_dir})", cert_dir)
    return f"{plan.why}; the next boot will {PLAN_WORDS[plan.action]}", plan


def check_lock(config: configuration.Config, plan: Plan):
    if plan.cert_dir is None:
        return "no boot running (no CERT_DIR yet)"
    # Run by hand, the unit's RuntimeDirectory is not in the environment.
    runtime = os.environ.get("RUNTIME_DIRECTORY") or UNIT_RUNTIME_DIRECTORY
    held = lock.holder(plan.cert_dir.path, runtime)
    if held is not None:
        return Warn(f"a boot is running now (it holds {held}); what follows may change "
                    "when it ends, and no MQTT connection is tried (it would drop the "
                    "boot's own)", hint="the journal: journalctl -u entomologist-provision")
    return "no boot running"


def check_claim(config: configuration.Config):
    settings = configuration.provisioning_settings(config)
    certs.check_claim(settings.claim_cert, settings.claim_key, config.root_ca)
    return (f"claim certificate {settings.claim_cert} and its key match; ROOT_CA "
            f"{config.root_ca} parses; template {settings.template_name}, {settings.api}",
            settings)


def check_secret(settings: configuration.ProvisioningSettings):
    if settings.secret_file is None:
        return ("no PROVISIONING_SECRET_FILE: RegisterThing carries no ProvisioningSecret (a "
                "template with the fleet inventory's hook refuses it)")
    text = secret.read_secret(settings.secret_file)
    return (f"provisioning secret file {settings.secret_file}: owner and mode trusted, "
            f"{len(text)} characters, sent as ProvisioningSecret")


def check_spend(plan: Plan, now: Callable[[], float]):
    """What the boot's spend record allows now, read as the boot reads it, written never."""
    if plan.cert_dir is None:
        return "CERT_DIR does not exist yet: no failed attempt recorded"
    record = spend.SpendRecord.open(plan.cert_dir.spend_record, now, settle=False)
    record.check()
    if not record.entries:
        return "no failed attempt recorded: nothing holds the next one back"
    return (f"{len(record.entries)} failed attempt(s) recorded in {plan.cert_dir.spend_record}; "
            f"none holds the next one back")


def device_ca(config: configuration.Config, plan: Plan) -> Path:
    return plan.cert_dir.ca_for_connection(config.root_ca)


def check_device_credentials(config: configuration.Config, plan: Plan):
    """What update_boot_status needs: the pair (already found sound) and its CA."""
    ca = device_ca(config, plan)
    hint = "ROOT_CA in the config"
    problem = certs.certificate_problem(files.read_bounded(ca, "CA file", hint=hint))
    if problem:
        raise ConfigError(f"CA file {ca}: {problem}", hint=hint)
    key = f"token {config.token.token_label!r}" if config.token else str(plan.cert_dir.key)
    return f"certificate {plan.cert_dir.cert} and its key in {key} match; CA {ca} parses"


def check_clock(certificate_files: list[Path], now: Callable[[], float]):
    clock.check_clock(certificate_files, now)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now()))} is after the start " \
           f"of validity of {', '.join(map(str, certificate_files))}"


def unit_write_rules() -> list[Path] | None:
    """The only folders the unit may write when its ``ProtectSystem=strict`` shows every
    other one read-only (its ``ReadWritePaths=``, drop-ins included), as the running
    systemd says; None when that does not apply or cannot be known: inside the unit
    (its mount table then shows its view), or with no systemd that knows the unit."""
    if os.environ.get("INVOCATION_ID"):
        return None
    try:
        proc = subprocess.run(["systemctl", "show", UNIT,
                               "--property=LoadState,ProtectSystem,ReadWritePaths"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=SYSTEMCTL_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    shown = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if (proc.returncode != 0 or shown.get("LoadState") != "loaded"
            or shown.get("ProtectSystem") != "strict"):
        return None
    # A leading "-" (ignore if missing) or "+" is no part of the path.
    return [Path(os.path.realpath(p.lstrip("-+"))) for p in shown.get("ReadWritePaths",
                                                                      "").split()]


def _unwritable(directory: Path, writable: list[Path] | None) -> tuple[str, bool] | None:
    """Why the boot could not create files in ``directory``, found without writing,
    and whether it is because the folder is read-only (None: it can).  ``writable``:
    the unit's write rules (``unit_write_rules``).

    The unit runs as root without capabilities: as root, only the owner's write
    bit of a folder root owns counts."""
    try:
        st = os.stat(directory)
        vfs = os.statvfs(directory)
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}", False
    if vfs.f_flag & os.ST_RDONLY:
        return "is on a read-only file system", True
    real = Path(os.path.realpath(directory))
    if writable is not None and not any(real == p or p in real.parents for p in writable):
        return ("is read-only inside the unit's sandbox (ProtectSystem=strict, and it is not "
                "under the unit's ReadWritePaths=)"), True
    if os.geteuid() == 0:
        if not (st.st_uid == 0 and st.st_mode & stat.S_IWUSR):
            return "is not writable by root without privileges (the unit's case)", False
    elif not os.access(directory, os.W_OK):
        return "is not writable by this user", False
    if vfs.f_bavail * vfs.f_frsize < ROOM_NEEDED:
        return f"has less than {ROOM_NEEDED // 1024} KiB free", False
    return None


def check_storage(config: configuration.Config, plan: Plan):
    folders: list[tuple[str, Path]] = []
    if plan.action in ("provision", "install"):
        if plan.action == "provision":
            configuration.longest_update(config)  # renders faithfully, within the limit
        if plan.cert_dir:
            folders.append(("CERT_DIR", plan.cert_dir.path))
        else:
            folders.append(("the folder of CERT_DIR",
                            Path(os.path.join(os.getcwd(), config.cert_dir)).parent))
    if plan.action != "report" or not config.provisioned:
        folders.append(("the config's folder", config.real_path.parent))
    writable = unit_write_rules() if folders else None
    for what, folder in folders:
        found = _unwritable(folder, writable)
        if found is None:
            continue
        problem, read_only = found
        hint = (files.SANDBOX_HINT if "sandbox" in problem
                else f"that {folder} is writable and the disk is not full")
        if plan.action == "report" and read_only:
            # As the boot: a reported boot whose status cannot be recorded on a
            # read-only mount is a warning, not a failure.
            return Warn(f"{what} {folder} {problem}: the boot will be reported, but "
                        f"PROVISION_STATUS will stay False", hint=hint)
        raise StorageError(f"{what} {folder} {problem}; the next boot must write there",
                           hint=hint)
    if not folders:
        return "nothing to write: PROVISION_STATUS is already True"
    return "can write " + " and ".join(f"{what} {folder}" for what, folder in folders)


# ----------------------------------------------------------------- the network

def _bounded(call: Callable[[], object], timeout: float, what: str):
    """``call`` in a thread, given up after ``timeout`` (getaddrinfo has no time limit)."""
    box: list = []

    def target() -> None:
        try:
            box.append((True, call()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box.append((False, exc))
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if not box:
        raise TransientError(f"{what}: no answer in {timeout:.0f} s", hint="the network link")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def check_dns(config: configuration.Config, deadline: Deadline):
    host, port = ((config.proxy.host, config.proxy.port) if config.proxy
                  else (config.host, config.port))
    what = f"the HTTP proxy's host {host}" if config.proxy else f"ENDPOINT_URL {host}"
    try:
        infos = _bounded(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                         deadline.step("DNS"), f"resolve {what}")
    except socket.gaierror as exc:
        raise TransientError(f"cannot resolve {what}: {exc.strerror}",
                             hint="DNS, ENDPOINT_URL" + (" and HTTP_PROXY" if config.proxy
                                                         else "")) from None
    addresses = sorted({info[4][0] for info in infos})
    note = "; the proxy resolves ENDPOINT_URL" if config.proxy else ""
    return f"{what} is {', '.join(addresses[:4])}{note}"


def check_proxy(config: configuration.Config, deadline: Deadline):
    proxy = config.proxy
    try:
        status, sock = http_proxy.open_tunnel(proxy, config.host, config.port,
                                              min(deadline.step("HTTP proxy"),
                                                  http_proxy.PROBE_LIMIT_S))
    except http_proxy.ProbeError as exc:
        raise TransientError(f"the HTTP proxy {proxy} did not answer CONNECT as an HTTP "
                             f"proxy ({exc})", hint=f"that {http_proxy.KEY} names the "
                                                    f"site's HTTP proxy") from None
    except OSError as exc:
        raise TransientError(f"cannot reach the HTTP proxy {proxy}: {type(exc).__name__}",
                             hint=f"that the proxy is running and reachable, and "
                                  f"{http_proxy.KEY}") from None
    if status != 200:
        sock.close()
        raise http_proxy.refusal(proxy, config.host, config.port, status)
    return f"the HTTP proxy {proxy} opened a tunnel to {config.host}:{config.port}", sock


def check_tcp(config: configuration.Config, deadline: Deadline):
    try:
        sock = socket.create_connection((config.host, config.port), deadline.step("TCP"))
    except OSError as exc:
        raise TransientError(f"connect to {config.host}:{config.port} failed: "
                             f"{exc.strerror or type(exc).__name__}",
                             hint="the network link, ENDPOINT_URL and PORT") from None
    peer = sock.getpeername()[0]
    return f"{config.host}:{config.port} ({peer}) accepts connections", sock


def tls_context(ca_pem: bytes, port: int, pair: tuple[Path, Path] | None,
                tls13: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    if port == 443:
        context.set_alpn_protocols(["x-amzn-mqtt-ca"])  # as the boot's builder offers on 443
    if pair is not None:
        # ssl reads them only by path: the claim files were found trusted, and
        # CERT_DIR, where nobody else can add or replace an entry, holds the device's.
        context.load_cert_chain(*pair)
        if not tls13:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


class ClosedAfterHandshake(Exception):
    """The server closed the connection once it had our certificate, without a word."""


def _handshake(context: ssl.SSLContext, sock: socket.socket, host: str, timeout: float,
               verdict_wait: float | None = None) -> str:
    """The TLS version, after a handshake on ``sock`` (closed after).  ``verdict_wait``:
    under TLS 1.3 the server judges our certificate after the handshake; wait that
    long for an alert or a close (a server that accepts it waits for MQTT)."""
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            if verdict_wait is not None and tls.version() == "TLSv1.3":
                tls.settimeout(verdict_wait)
                try:
                    if not tls.recv(1):
                        raise ClosedAfterHandshake()
                except TimeoutError:
                    pass
            return tls.version()
    finally:
        sock.close()


def token_handshake(config: configuration.Config, deadline: Deadline, cert: Path,
                    ca_pem: bytes) -> None:
    """A TLS handshake through awscrt, presenting ``cert`` with the token's key (Python's
    ssl cannot use a key it cannot read): an HTTP client connection, which sends nothing
    once its TLS session is up.  Called after the server's certificate has verified, so
    awscrt's delay on a server it does not trust never comes into play."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from awscrt import http, io

    from . import pkcs11_key
    key = pkcs11_key.token_key(config.token)
    cert_pem = files.read_bounded(cert, "certificate", hint="the certificate in CERT_DIR")
    options = io.TlsContextOptions.create_client_with_mtls_pkcs11(
        **key.mtls_kwargs(), cert_file_contents=cert_pem)
    options.override_default_trust_store(ca_pem)
    tls = io.ClientTlsContext(options).new_connection_options()
    tls.set_server_name(config.host)
    if config.port == 443:
        tls.set_alpn_list(["x-amzn-mqtt-ca"])
    step = deadline.step("TLS handshake with the token's key")
    socket_options = io.SocketOptions()
    socket_options.connect_timeout_ms = int(max(step, 0.1) * 1000)
    connecting = http.HttpClientConnection.new(
        config.host, config.port, socket_options=socket_options, tls_connection_options=tls,
        proxy_options=http_proxy.crt_options(config.proxy) if config.proxy else None)
    try:
        connection = connecting.result(step)
    except FutureTimeout:
        raise TransientError(f"TLS with {config.host}:{config.port} with the device "
                             f"certificate: no answer in {step:.0f} s",
                             hint=mqtt.NETWORK_HINT) from None
    except Exception as exc:
        raise mqtt.crt_failure(f"TLS with {config.host}:{config.port} with the device "
                               f"certificate and the token's key", exc,
                               hint=f"that {cert} is registered with AWS IoT and active, "
                                    f"the token, and the network link") from None
    connection.close()


def check_tls(config: configuration.Config, deadline: Deadline,
              connect: Callable[[], socket.socket], sock: socket.socket, ca: Path,
              pair: tuple[Path, Path] | None, whose: str, token_cert: Path | None = None):
    """``sock``: the connection the TCP or proxy check opened; ``connect`` opens another."""
    hint = "ROOT_CA in the config"
    ca_pem = files.read_bounded(ca, "CA file", hint=hint)
    where = f"TLS with {config.host}:{config.port}"
    try:
        context = tls_context(ca_pem, config.port, pair)
    except (ssl.SSLError, ValueError) as exc:
        sock.close()
        raise ConfigError(f"cannot load the TLS files ({type(exc).__name__})",
                          hint=f"{ca}" + (f", {pair[0]} and {pair[1]}" if pair else "")) from None
    verified = f"the server's certificate for {config.host} verifies against {ca}"
    try:
        try:
            version = _handshake(context, sock, config.host, deadline.step("TLS handshake"))
        except ssl.SSLError as exc:
            if pair is None or "PROTOCOL_VERSION" not in str(exc.reason).upper():
                raise
            # A server that speaks only TLS 1.3 (AWS IoT's TLS13 security policies).
            version = _handshake(tls_context(ca_pem, config.port, pair, tls13=True),
                                 connect(), config.host, deadline.step("TLS handshake"),
                                 verdict_wait=min(VERDICT_WAIT, deadline.step("TLS")))
    except ssl.SSLCertVerificationError as exc:
        raise TransientError(f"{where}: the server's certificate does not verify against "
                             f"{ca} ({exc.verify_message})",
                             hint=f"{hint}, and that ENDPOINT_URL is this account's "
                                  f"endpoint") from None
    except (ssl.SSLError, ClosedAfterHandshake) as exc:
        closed = isinstance(exc, ClosedAfterHandshake)
        reason = "it closed the connection" if closed else str(exc.reason or exc)
        if not closed and "ALERT" not in reason.upper():
            raise TransientError(f"{where} failed: {reason}", hint=mqtt.NETWORK_HINT) from None
        if pair is not None:
            raise TransientError(f"{where}: the server refused the {whose} certificate "
                                 f"({reason})",
                                 hint=f"that {pair[0]} is registered with AWS IoT and active, "
                                      f"and ENDPOINT_URL") from None
        if not any(word in reason.upper() for word in ("HANDSHAKE_FAILURE",
                                                       "CERTIFICATE_REQUIRED")):
            raise TransientError(f"{where} failed: {reason}", hint=mqtt.NETWORK_HINT) from None
        # Under TLS 1.2 a server asks for a certificate once ours has verified its
        # own, and refuses to go on without one.
        version = None
    except (OSError, TimeoutError) as exc:
        raise TransientError(f"{where} failed: {type(exc).__name__}",
                             hint=mqtt.NETWORK_HINT) from None
    if token_cert is not None:
        token_handshake(config, deadline, token_cert, ca_pem)
        return f"{verified}, and it accepts the device certificate with the token's key"
    if pair is None:
        return f"{verified}; no client certificate presented (none is installed yet)"
    return f"{version} with the {whose} certificate: {verified}"


def check_claim_mqtt(config: configuration.Config, settings: configuration.ProvisioningSettings,
                     deadline: Deadline, build: mqtt.Builder | None):
    link = mqtt.connect(mqtt.Endpoint(config.host, config.port, config.root_ca),
                        settings.claim_cert, settings.claim_key, config.serial_id,
                        deadline.step("connect with the claim certificate"), build,
                        proxy=config.proxy, clock=deadline.clock)
    try:
        service = fleet.FleetProvisioning(link, settings.template_name, settings.csr_mode,
                                          deadline)
        service.subscribe()
    finally:
        link.close()
    return (f"CONNECT as {config.serial_id} with the claim certificate accepted; subscribed "
            f"to {' and '.join(service.resources.values())}; nothing published")


def check_device_mqtt(config: configuration.Config, plan: Plan, deadline: Deadline,
                      build: mqtt.Builder | None):
    cert_dir = plan.cert_dir
    key, builder = cert_dir.key, build
    if config.token is not None:
        from . import pkcs11_key
        key = pkcs11_key.token_key(config.token)
        builder = build or pkcs11_key.build_connection
    client_id = config.thing_name or config.serial_id
    link = mqtt.connect(mqtt.Endpoint(config.host, config.port, device_ca(config, plan)),
                        cert_dir.cert, key, client_id,
                        deadline.step("connect with the device certificate"), builder,
                        proxy=config.proxy, clock=deadline.clock)
    link.close()
    return f"CONNECT as {client_id} with the device certificate accepted; nothing published"


# --------------------------------------------------------------------- the run

def last_checked(plan: Plan | None) -> frozenset[str]:
    """A provisioned camera's boot writes PROVISION_STATUS only after its boot message."""
    return frozenset({"storage"}) if plan is not None and plan.action == "report" \
        else frozenset()


def run_checks(config_path: Path, deadline: Deadline, emit: Callable[[Result], None],
               connect_as_thing: bool = False, build: mqtt.Builder | None = None,
               now: Callable[[], float] = time.time) -> int:
    """Every check, in the boot's order; the exit code the next boot would end with."""
    checks = Checks(emit)
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
            checks.run("spend", lambda: check_spend(plan, now))
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
                            f"({CONNECT_FLAG} does it)")
    else:
        checks.skip("mqtt", "the next boot installs a registered pair before it connects")
    return checks.exit_code(last_checked(plan))


# --------------------------------------------------------------------- output

EXIT_MEANINGS = {os.EX_OK: "the next boot would succeed as far as can be told",
                 os.EX_TEMPFAIL: "transient: the next boot would fail and be retried",
                 os.EX_CONFIG: "configuration: the next boot would fail until it is fixed",
                 os.EX_DATAERR: "the service would refuse",
                 os.EX_CANTCREAT: "the next boot could not write what it must",
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

    def emit(result: Result) -> None:
        out.write((json.dumps(asdict(result)) if as_json else human_line(result)) + "\n")
        out.flush()

    try:
        code = run_checks(config_path, Deadline(timeout), emit, connect_as_thing, build, now)
    except KeyboardInterrupt:
        out.write("interrupted\n")
        return os.EX_TEMPFAIL
    summary = Result("result", "ok" if code == os.EX_OK else "fail",
                     f"exit {code}: {EXIT_MEANINGS.get(code, '')}", None,
                     round((time.monotonic() - started) * 1000), code)
    if as_json:
        out.write(json.dumps(asdict(summary)) + "\n")
    else:
        out.write(f"{summary.detail} ({summary.milliseconds} ms)\n")
    out.flush()
    return code
