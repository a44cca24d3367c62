"""Shared by boot.py and update_boot_status.py: errors and exit codes, the
config file, durable file writes, the run lock, time limits and retries, the
credential check, and the one seam to MQTT (``connect_mqtt``).

Importing this module does nothing but define things.  awscrt is imported
only where it is used (the pair check, ``connect_mqtt``), so that a bad
config fails fast without loading the native library.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import queue
import random
import re
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

log = logging.getLogger("entomologist")

# ---------------------------------------------------------------- constants

DEFAULT_CONFIG = Path("/etc/entomologist/ento.conf")
DEFAULT_CERT_DIR = Path("/etc/entomologist/cert")
DEFAULT_CLAIM_CERT = Path("/etc/entomologist/claim/claim.pem.crt")
DEFAULT_CLAIM_KEY = Path("/etc/entomologist/claim/claim.private.pem.key")
SHIPPED_ROOT_CA = Path(__file__).resolve().parent / "AmazonRootCA1.pem"

CERT_FILE = "certificate.pem.crt"
KEY_FILE = "private.pem.key"
CA_FILE = "AmazonRootCA1.pem"
# Where a new key waits until its certificate is registered: one name for a
# key the service sent, another for one this device made (CSR mode), so that
# CSR mode never reuses a key that crossed the network.
STAGING_KEY_FILE = "private.pem.key.staging"
OWN_KEY_FILE = "private.pem.key.device-made"

PROVISIONING_APIS = ("CreateKeysAndCertificate", "CreateCertificateFromCsr")
KEY_ALGORITHMS = ("EC-P256", "RSA-2048")

DEFAULT_PORT = 8883
KEEP_ALIVE_SECS = 44
STEP_TIMEOUT = 20.0
RUN_TIMEOUT = 120.0
# Anything bigger is not a config file this product wrote; refusing it keeps
# a corrupted SD card from making the boot service read megabytes.
MAX_CONFIG_BYTES = 1 << 20

SERIAL_RE = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")
THING_NAME_RE = re.compile(r"[A-Za-z0-9_\-:]{1,128}")
TEMPLATE_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,36}")
HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


# ---------------------------------------------------------- errors, exits

class EntoError(Exception):
    """An expected failure: logged as one line, no traceback.

    ``hint`` says what a technician should check.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(EntoError):
    """The config file, or a file it names, is missing or wrong."""


class TransientError(EntoError):
    """Network, broker or service trouble that a later run may not meet."""


class ServiceBusy(TransientError):
    """The service answered but is busy (throttling, 5xx): ask again, same connection."""


class ServiceError(EntoError):
    """The service refused for good, or answered with something malformed."""


class StorageError(EntoError):
    """Credentials or the config cannot be written."""


# The one place where outcomes become exit codes (sysexits.h).
EXIT_CODES: dict[type[EntoError], int] = {
    ConfigError: os.EX_CONFIG,        # 78
    TransientError: os.EX_TEMPFAIL,   # 75
    ServiceError: os.EX_DATAERR,      # 65
    StorageError: os.EX_CANTCREAT,    # 73
}


def run_main(body: Callable[[], None]) -> int:
    """Run ``body`` and turn its outcome into an exit code.

    Expected errors become one log line; anything else is a bug and keeps its
    traceback (70).
    """
    try:
        body()
    except EntoError as exc:
        hint = f"; check {exc.hint}" if exc.hint else ""
        log.error("%s%s", exc, hint)
        return next(code for kind, code in EXIT_CODES.items() if isinstance(exc, kind))
    except KeyboardInterrupt:
        log.error("interrupted")
        return os.EX_TEMPFAIL
    except Exception:
        log.exception("unexpected error (a bug): please report it with this log")
        return os.EX_SOFTWARE
    return os.EX_OK


# ------------------------------------------------------------------ logging

class _JournalFormatter(logging.Formatter):
    """Syslog priority prefix and no timestamp: the journal adds its own."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                  logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITIES.get(record.levelno, 6)
        # The journal splits its stream at newlines: every line of a
        # traceback gets the priority of the event it belongs to.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(stream=None, env: Mapping[str, str] | None = None) -> bool:
    """True when stderr is the journal's stream (see systemd.exec, $JOURNAL_STREAM)."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(verbose: bool = False, stream=None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


# --------------------------------------------------------- time and retries

class Deadline:
    """The whole run's time budget; every wait asks it for a bounded slice."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        return self._end - self._clock()

    def step(self, what: str, limit: float = STEP_TIMEOUT) -> float:
        left = self.remaining()
        if left <= 0:
            raise TransientError(f"{what}: the run's time limit was reached",
                                 hint="the network link; the run will be retried")
        return min(limit, left)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (sleep uniformly in [0, min(cap, base*2^n)])."""

    base: float = 0.5
    cap: float = 20.0
    # Not worth sleeping if less than this would be left for the next try.
    min_attempt: float = 1.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0, min(self.cap, self.base * 2 ** attempt))


# Tuned with bench/fleet.py (50 devices, 5 requests/s per API): a throttled
# request is asked again on its open connection, which costs one publish, so
# a short cap keeps the fleet's makespan near N/R; reconnecting costs TCP and
# TLS handshakes, so it backs off further.
BUSY_BACKOFF = Backoff(base=0.5, cap=2.0)
RECONNECT_BACKOFF = Backoff(base=0.5, cap=20.0)


def with_retries(action: Callable[[], object], deadline: Deadline, what: str,
                 backoff: Backoff = RECONNECT_BACKOFF, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None,
                 retry_on: type[TransientError] = TransientError):
    """Call ``action`` until it does not raise ``retry_on`` or time runs out."""
    attempt = 0
    while True:
        try:
            return action()
        except retry_on as exc:
            attempt += 1
            pause = backoff.delay(attempt, rng)
            if deadline.remaining() - pause < backoff.min_attempt:
                raise TransientError(f"{exc} (gave up after {attempt} attempt(s): "
                                     f"the run's time limit was reached)",
                                     hint=exc.hint) from exc
            log.warning("%s: %s; retrying in %.1f s (attempt %d)", what, exc, pause, attempt + 1)
            sleep(pause)


# -------------------------------------------------------------- the config

@dataclass(frozen=True)
class Config:
    path: Path
    device: Mapping[str, object]
    serial_id: str
    host: str
    port: int
    provisioned: bool
    root_ca: Path
    cert_dir: Path
    thing_name: str | None

    @property
    def cert_path(self) -> Path:
        return self.cert_dir / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.cert_dir / KEY_FILE

    @property
    def ca_copy_path(self) -> Path:
        return self.cert_dir / CA_FILE

    @property
    def staging_key_path(self) -> Path:
        return self.cert_dir / STAGING_KEY_FILE

    @property
    def own_key_path(self) -> Path:
        return self.cert_dir / OWN_KEY_FILE


@dataclass(frozen=True)
class ProvisioningSettings:
    """What only a device that must provision needs; checked only then."""

    template_name: str
    template_parameters: dict[str, str]
    claim_cert: Path
    claim_key: Path
    api: str = "CreateKeysAndCertificate"
    key_algorithm: str = "EC-P256"

    @property
    def csr_mode(self) -> bool:
        return self.api == "CreateCertificateFromCsr"


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _reject_constant(name: str):
    raise ConfigError(f"{name} is not valid JSON")


def read_config_document(path: Path) -> dict:
    """The whole config file as a dict, or ConfigError with the reason."""
    where = f"config file {path}"
    hint = "the config file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist", hint=hint) from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be opened: {exc.strerror}", hint=hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{where} is not a regular file", hint=hint)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is too large ({st.st_size} bytes, at most "
                              f"{MAX_CONFIG_BYTES})", hint=hint)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}", hint=hint) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is too large", hint=hint)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 (byte {exc.start})", hint=hint) from None
    if text.startswith("\ufeff"):
        raise ConfigError(f"{where} starts with a byte-order mark; save it as plain UTF-8",
                          hint=hint)
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates,
                         parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}", hint=hint) from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", hint=hint) from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply", hint=hint) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must hold a JSON object", hint=hint)
    device = doc.get("device")
    if not isinstance(device, dict):
        raise ConfigError(f"{where}: key 'device' is missing or not an object", hint=hint)
    return doc


def _bad(key: str, problem: str) -> ConfigError:
    return ConfigError(f"config key {key!r} {problem}", hint="the config file")


def _string(device: Mapping, key: str, default: str | None = None) -> str | None:
    value = device.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(key, f"must be a string, not {type(value).__name__}")
    return value


def _path(config_path: Path, device: Mapping, key: str, default: Path) -> Path:
    value = _string(device, key)
    if value is None:
        return default
    if not value or "\0" in value:
        raise _bad(key, "must be a non-empty path")
    # A relative path is taken from the config file's folder, so that a
    # config and its files can be moved together (the local stand-in does).
    return (config_path.parent / value) if not os.path.isabs(value) else Path(value)


def parse_bool_status(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad("PROVISION_STATUS", 'must be "True" or "False"')


def parse_port(value: object) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _bad("PORT", "must be an integer from 1 to 65535")
    return value


def parse_endpoint(value: object) -> tuple[str, int | None]:
    """Host and optional port from ENDPOINT_URL, tolerating a scheme and a slash."""
    if not isinstance(value, str) or not value.strip():
        raise _bad("ENDPOINT_URL", "must be a non-empty host name")
    text = value.strip()
    try:
        parts = urlsplit(text if "://" in text else "//" + text)
        port = parts.port
    except ValueError:
        raise _bad("ENDPOINT_URL", "has an invalid port") from None
    if "://" in text and parts.scheme.lower() not in ("mqtts", "https"):
        raise _bad("ENDPOINT_URL", f"has scheme {parts.scheme!r}; use a bare host name")
    host = parts.hostname or ""
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise _bad("ENDPOINT_URL", "must be a host name, not a URL with a path")
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(HOST_LABEL_RE.fullmatch(p) for p in labels):
        raise _bad("ENDPOINT_URL", "is not a valid host name")
    if port == 0:
        raise _bad("ENDPOINT_URL", "has an invalid port")
    return host.rstrip(".").lower(), port


def load_config(path: Path) -> Config:
    """Read and check what every run needs.  Raises ConfigError."""
    device = read_config_document(path)["device"]
    serial = device.get("SERIAL_ID")
    if not isinstance(serial, str) or not SERIAL_RE.fullmatch(serial):
        raise _bad("SERIAL_ID", "must be 1 to 128 characters from A-Z a-z 0-9 _ - : .")
    if "ENDPOINT_URL" not in device:
        raise _bad("ENDPOINT_URL", "is missing")
    host, url_port = parse_endpoint(device["ENDPOINT_URL"])
    if "PORT" in device:
        port = parse_port(device["PORT"])
    else:
        port = url_port or DEFAULT_PORT
    provisioned = parse_bool_status(device.get("PROVISION_STATUS"))
    thing_name = _string(device, "THING_NAME")
    if thing_name is not None and not THING_NAME_RE.fullmatch(thing_name):
        raise _bad("THING_NAME", "is not a valid thing name")
    _string(device, "CERTIFICATE_ID")
    return Config(
        path=path, device=device, serial_id=serial, host=host, port=port,
        provisioned=provisioned, thing_name=thing_name,
        root_ca=_path(path, device, "ROOT_CA", SHIPPED_ROOT_CA),
        cert_dir=_path(path, device, "CERT_DIR", DEFAULT_CERT_DIR),
    )


def provisioning_settings(config: Config) -> ProvisioningSettings:
    """Check what provisioning needs, only when it is needed.  Raises ConfigError."""
    device = config.device
    name = _string(device, "TEMPLATE_NAME")
    if name is None:
        raise _bad("TEMPLATE_NAME", "is missing; it is needed to provision this device")
    if not TEMPLATE_NAME_RE.fullmatch(name):
        raise _bad("TEMPLATE_NAME", "must be 1 to 36 characters from A-Z a-z 0-9 _ -")
    params = device.get("TEMPLATE_PARAMETERS", {"SerialNumber": config.serial_id})
    if not isinstance(params, dict):
        raise _bad("TEMPLATE_PARAMETERS", "must be an object of strings")
    for key, value in params.items():
        if not isinstance(value, str):
            raise _bad(f"TEMPLATE_PARAMETERS.{key}",
                       f"must be a string, not {type(value).__name__}")
    api = _string(device, "PROVISIONING_API", PROVISIONING_APIS[0])
    if api not in PROVISIONING_APIS:
        raise _bad("PROVISIONING_API", f"must be one of {', '.join(PROVISIONING_APIS)}")
    algorithm = _string(device, "KEY_ALGORITHM", KEY_ALGORITHMS[0])
    if algorithm not in KEY_ALGORITHMS:
        raise _bad("KEY_ALGORITHM", f"must be one of {', '.join(KEY_ALGORITHMS)}")
    settings = ProvisioningSettings(
        template_name=name, template_parameters=dict(params),
        claim_cert=_path(config.path, device, "CLAIM_CERT", DEFAULT_CLAIM_CERT),
        claim_key=_path(config.path, device, "CLAIM_KEY", DEFAULT_CLAIM_KEY),
        api=api, key_algorithm=algorithm,
    )
    check_claim(settings)
    return settings


def check_claim(settings: ProvisioningSettings) -> None:
    pems = []
    for what, path in (("claim certificate", settings.claim_cert),
                       ("claim key", settings.claim_key)):
        try:
            pems.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{what} {path}: {exc.strerror}",
                              hint="CLAIM_CERT and CLAIM_KEY in the config") from None
    problem = pair_problem(*pems)
    if problem:
        raise ConfigError(f"claim files unusable: {problem}",
                          hint="CLAIM_CERT and CLAIM_KEY in the config")


def update_device_config(path: Path, changes: Mapping[str, object]) -> None:
    """Set keys under "device", keeping every other key, section, mode and owner."""
    doc = read_config_document(path)
    if all(doc["device"].get(k) == v for k, v in changes.items()):
        return
    doc["device"].update(changes)
    st = os.stat(path)
    data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_file_atomic(path, data, stat.S_IMODE(st.st_mode), owner=(st.st_uid, st.st_gid))


# -------------------------------------------------------- durable writes

def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")


def write_file_atomic(path: Path, data: bytes, mode: int,
                      owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data``: it is either the old or the new file, whole.

    The temporary file is created with its final mode (fchmod before any byte
    is written, because the umask would otherwise narrow a 0644 file).
    Raises StorageError.
    """
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     mode)
        try:
            os.fchmod(fd, mode)
            if owner is not None and (os.geteuid() == 0 or owner[0] == os.geteuid()):
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}",
                           hint=f"that {path.parent} is writable and the disk is not full"
                           ) from None


def remove_durably(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot remove {path}: {exc.strerror}",
                           hint=f"that {path.parent} is writable") from None
    fsync_dir(path.parent)


def remove_stray_temp_files(config: Config) -> None:
    """Delete the temporary files that a killed run left beside the config and credentials."""
    for directory in (config.path.parent, config.cert_dir):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                try:
                    os.unlink(directory / name)
                    log.debug("removed leftover %s", directory / name)
                except OSError:
                    pass


def ensure_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(directory.stat().st_mode) != 0o700:
            os.chmod(directory, 0o700)
    except OSError as exc:
        raise StorageError(f"cannot make {directory} a private folder: {exc.strerror}",
                           hint=f"that {directory} is ours and writable") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StorageError(f"{directory} is not writable", hint="its owner and mode")


# ----------------------------------------------------------------- lock

class RunLock:
    """An exclusive flock beside the config, so two runs never interleave."""

    def __init__(self, config_path: Path):
        self.path = config_path.with_name(config_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self, deadline: Deadline, poll: float = 0.1) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise ConfigError(f"config folder {self.path.parent} does not exist",
                              hint="--config") from None
        except OSError as exc:
            raise StorageError(f"cannot open lock file {self.path}: {exc.strerror}",
                               hint=f"that {self.path.parent} is writable") from None
        announced = False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if not announced:
                log.info("another run holds %s; waiting for it", self.path)
                announced = True
            if deadline.remaining() <= poll:
                raise TransientError("another run still holds the lock at the time limit",
                                     hint=f"for a hung process holding {self.path}")
            time.sleep(poll)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------- credentials

def installed_credentials_problem(config: Config) -> str | None:
    """None if CERT_DIR holds a certificate and its key, else what is wrong."""
    try:
        cert_pem = config.cert_path.read_bytes()
    except FileNotFoundError:
        return f"no certificate in {config.cert_dir}"
    except OSError as exc:
        return f"cannot read {config.cert_path}: {exc.strerror}"
    try:
        key_pem = config.key_path.read_bytes()
    except OSError as exc:
        return f"cannot read {config.key_path}: {exc.strerror}"
    return pair_problem(cert_pem, key_pem)


def pair_problem(cert_pem: bytes, key_pem: bytes) -> str | None:
    """None if ``key_pem`` is the private key of ``cert_pem``, else why not.

    The certificate must parse as X.509, and the TLS library that will present
    the pair must accept it: it refuses a key that does not belong to the
    certificate.  Asking it rather than cryptography keeps cryptography
    (10 MiB, 50 ms of start-up) out of every run but a CSR-mode first boot.
    """
    try:
        ders = pem_certificates(cert_pem)
        if not ders:
            raise ValueError("no certificate")
        not_valid_before(ders[0])
    except ValueError:
        return "the certificate does not parse"
    from awscrt import io
    from awscrt.exceptions import AwsCrtError
    try:
        io.ClientTlsContext(io.TlsContextOptions.create_client_with_mtls(cert_pem, key_pem))
    except (AwsCrtError, RuntimeError) as exc:  # the context raises RuntimeError
        text = f"{getattr(exc, 'name', '')} {exc}"
        if "AWS_IO_TLS_CTX_ERROR" in text or "AWS_ERROR_INVALID_ARGUMENT" in text:
            return "the private key does not belong to the certificate, or does not parse"
        raise
    return None


# ----------------------------------------------------------------- clock

def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER bytes of each PEM certificate in ``data``."""
    import base64
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----",
                        data, re.S)
    return [base64.b64decode(b"".join(block.split()), validate=True) for block in blocks]


def _der_item(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER item at ``pos``."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length, pos = der[pos], der[pos + 1], pos + 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or pos + size > len(der):
            raise ValueError("bad DER length")
        length, pos = int.from_bytes(der[pos:pos + size], "big"), pos + size
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def not_valid_before(der: bytes) -> float:
    """A certificate's notBefore, as a Unix time.

    Read straight from the DER (Certificate > TBSCertificate > [version],
    serial, signature, issuer, validity) so that the clock check at every boot
    does not load cryptography; anything unexpected is a ValueError, and the
    check then skips that file.
    """
    import calendar
    _, start, _ = _der_item(der, 0)             # Certificate
    _, pos, _ = _der_item(der, start)           # TBSCertificate
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:                             # [0] version
        pos = end
    for _ in range(3):                          # serial, signature, issuer
        pos = _der_item(der, pos)[2]
    tag, pos, _ = _der_item(der, pos)           # validity
    if tag != 0x30:
        raise ValueError("no validity")
    tag, start, end = _der_item(der, pos)       # notBefore
    text = der[start:end].decode("ascii")
    if tag == 0x17:                             # UTCTime, YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{year + (2000 if year < 50 else 1900)}{text[2:]}"
    elif tag != 0x18:                           # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise ValueError("unknown time type")
    if len(text) != 15 or not text.endswith("Z"):
        raise ValueError("unsupported time format")
    return float(calendar.timegm(time.strptime(text, "%Y%m%d%H%M%SZ")))


def check_clock(config_path: Path, certificate_files: Sequence[Path],
                now: Callable[[], float] = time.time) -> None:
    """Refuse to connect with a clock that is provably behind.

    A board without a real-time clock can boot years in the past; TLS would
    then fail only after a long delay, with an opaque error.  The clock cannot
    be earlier than a certificate's notBefore, nor than the config file's
    modification time (systemd-timesyncd reasons the same way).
    """
    floor, source = 0.0, ""
    try:
        floor, source = os.stat(config_path).st_mtime, f"the last change of {config_path}"
    except OSError:
        pass
    for path in certificate_files:
        try:
            starts = [not_valid_before(der) for der in pem_certificates(path.read_bytes())]
        except (OSError, ValueError):
            continue  # unreadable files are reported where they are used
        for start in starts:
            if start > floor:
                floor, source = start, f"the start of validity of {path}"
    current = now()
    if current < floor:
        raise TransientError(
            f"the system clock is not set: it reads {_utc(current)}, before {source} "
            f"({_utc(floor)}); the run will be retried",
            hint="time synchronisation (systemd-timesyncd, network time)")


# --------------------------------------------------------------- MQTT seam

class MqttSession(Protocol):
    """The only thing the flows know of MQTT.  Every method is bounded."""

    def subscribe(self, topics: Sequence[str], timeout: float) -> None:
        """Send all SUBSCRIBEs at once, then wait for every SUBACK."""

    def publish(self, topic: str, payload: bytes, timeout: float) -> None:
        """Publish with QoS 1 and wait for the PUBACK."""

    def receive(self, timeout: float) -> tuple[str, bytes]:
        """The next message on a subscribed topic; TransientError on timeout."""

    def close(self) -> None:
        """Disconnect, waiting a short bounded time."""


Connector = Callable[..., MqttSession]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    ca: Path


def endpoint_of(config: Config) -> Endpoint:
    return Endpoint(config.host, config.port, config.root_ca)


def _crt_failure(what: str, exc: BaseException) -> TransientError:
    name = getattr(exc, "name", None) or type(exc).__name__
    return TransientError(f"{what} failed: {name}",
                          hint="the network link, ENDPOINT_URL, PORT and ROOT_CA")


class _CrtSession:
    def __init__(self, connection, messages: "queue.Queue"):
        self._conn = connection
        self._messages = messages

    def subscribe(self, topics, timeout):
        from awscrt import mqtt

        def deliver(topic, payload, **_):
            self._messages.put((topic, bytes(payload)))

        started = time.monotonic()
        futures = [self._conn.subscribe(t, mqtt.QoS.AT_LEAST_ONCE, callback=deliver)[0]
                   for t in topics]
        for topic, fut in zip(topics, futures):
            left = max(0.0, timeout - (time.monotonic() - started))
            try:
                result = fut.result(left)
            except TimeoutError:
                raise TransientError(f"subscribe to {topic}: no SUBACK in {timeout:.0f} s",
                                     hint="the network link") from None
            except Exception as exc:
                raise _crt_failure(f"subscribe to {topic}", exc) from None
            if result.get("qos") is None:
                raise TransientError(f"the broker refused the subscription to {topic}",
                                     hint="the claim certificate's policy")

    def publish(self, topic, payload, timeout):
        from awscrt import mqtt
        fut, _ = self._conn.publish(topic, payload, mqtt.QoS.AT_LEAST_ONCE)
        try:
            fut.result(timeout)
        except TimeoutError:
            raise TransientError(f"publish to {topic}: no PUBACK in {timeout:.0f} s",
                                 hint="the network link") from None
        except Exception as exc:
            raise _crt_failure(f"publish to {topic}", exc) from None

    def receive(self, timeout):
        try:
            item = self._messages.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise TransientError(f"no answer from the service in {timeout:.0f} s",
                                 hint="the network link and that the provisioning "
                                      "service is reachable") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        try:
            self._conn.disconnect().result(2.0)
        except Exception:
            pass


def connect_mqtt(endpoint: Endpoint, cert: Path, key: Path, client_id: str,
                 timeout: float) -> MqttSession:
    """Open a mutual-TLS MQTT connection.  The real side of the seam."""
    for what, path in (("CA file", endpoint.ca), ("certificate", cert), ("key", key)):
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{what} {path} is missing or unreadable",
                              hint="the config's file paths")
    from awsiot import mqtt_connection_builder

    messages: queue.Queue = queue.Queue()

    def interrupted(connection, error, **_):
        # The flow restarts from scratch rather than trusting an automatic
        # reconnect to have kept its subscriptions.
        messages.put(_crt_failure("the connection", error))

    try:
        conn = mqtt_connection_builder.mtls_from_path(
            endpoint=endpoint.host, port=endpoint.port, cert_filepath=str(cert),
            pri_key_filepath=str(key), ca_filepath=str(endpoint.ca), client_id=client_id,
            clean_session=True, keep_alive_secs=KEEP_ALIVE_SECS,
            tcp_connect_timeout_ms=int(max(timeout, 0.1) * 1000),
            on_connection_interrupted=interrupted, enable_metrics_collection=False)
    except Exception as exc:
        raise ConfigError(f"cannot load TLS files ({getattr(exc, 'name', exc)})",
                          hint=f"{endpoint.ca}, {cert} and {key}") from None
    try:
        conn.connect().result(timeout)
    except TimeoutError:
        _CrtSession(conn, messages).close()
        raise TransientError(f"connect to {endpoint.host}:{endpoint.port}: no answer in "
                             f"{timeout:.0f} s", hint="the network link") from None
    except Exception as exc:
        raise _crt_failure(f"connect to {endpoint.host}:{endpoint.port}", exc) from None
    return _CrtSession(conn, messages)


def decode_json_object(topic: str, payload: bytes) -> dict:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ServiceError(f"the answer on {topic} is not JSON",
                           hint="that ENDPOINT_URL is an AWS IoT endpoint") from None
    if not isinstance(doc, dict):
        raise ServiceError(f"the answer on {topic} is not a JSON object",
                           hint="that ENDPOINT_URL is an AWS IoT endpoint")
    return doc

