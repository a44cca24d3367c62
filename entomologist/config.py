"""ento.conf: reading and checking it, and rewriting only the keys the product owns.

The file is JSON; the product owns THING_NAME, CERTIFICATE_ID and
PROVISION_STATUS under "device".  A rewrite keeps every other key and value
with its exact meaning: numbers keep their text (the standard library's json
would turn 1.0000000000000001 into 1.0 and 1e400 into Infinity, which is not
JSON), strings that UTF-8 cannot encode keep their escapes, and the result is
parsed back and compared before it may replace the file.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Mapping
from urllib.parse import urlsplit

from . import files, logs
from .errors import ConfigError
from .proxy import Proxy
from .proxy import parse as parse_proxy

if TYPE_CHECKING:
    from .pkcs11_key import TokenSettings

DEFAULT_CONFIG = Path("/etc/entomologist/ento.conf")
DEFAULT_CERT_DIR = Path("/etc/entomologist/cert")
DEFAULT_CLAIM_CERT = Path("/etc/entomologist/claim/claim.pem.crt")
DEFAULT_CLAIM_KEY = Path("/etc/entomologist/claim/claim.private.pem.key")
# The package sits beside the scripts, and AmazonRootCA1.pem beside them.
SHIPPED_ROOT_CA = Path(__file__).resolve().parent.parent / "AmazonRootCA1.pem"

PROVISIONING_APIS = ("CreateKeysAndCertificate", "CreateCertificateFromCsr")
KEY_ALGORITHMS = ("EC-P256", "RSA-2048")
KEY_STORAGES = ("file", "pkcs11")
OWNED_KEYS = ("THING_NAME", "CERTIFICATE_ID", "PROVISION_STATUS")

DEFAULT_PORT = 8883
# AWS IoT takes at most this in one MQTT message, RegisterThing's request included.
MAX_MESSAGE_BYTES = 128 * 1024
# Far above a real ownership token (about 1 KB); fleet refuses a longer one.
MAX_OWNERSHIP_TOKEN_CHARS = 16 * 1024
MAX_CONFIG_BYTES = files.MAX_FILE_BYTES
MAX_DEPTH = 64

SERIAL_RE = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")
THING_NAME_RE = re.compile(r"[A-Za-z0-9_\-:]{1,128}")
CERTIFICATE_ID_RE = re.compile(r"[0-9a-f]{64}")
TEMPLATE_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,36}")
HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
CONFIG_HINT = "the config file"


@dataclass(frozen=True)
class Config:
    path: Path          # as given (named in messages)
    real_path: Path     # the checked file behind any symlink (read, locked, rewritten)
    device: Mapping[str, object] = field(repr=False)  # HTTP_PROXY may hold a password
    serial_id: str
    host: str
    port: int
    provisioned: bool
    root_ca: Path
    cert_dir: Path
    thing_name: str | None
    # KEY_STORAGE "pkcs11": the device key lives in this token, not in CERT_DIR.
    token: "TokenSettings | None" = None
    proxy: Proxy | None = None  # HTTP_PROXY (entomologist.proxy)


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


# ------------------------------------------------------------- reading

def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _reject_constant(name: str):
    raise ConfigError(f"{name} is not valid JSON")


def _depth(value: object, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise ConfigError(f"nested more than {limit} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


class _Int(int):
    """An integer that remembers how it was written (-0 stays -0)."""
    text: str

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        self.text = text
        return self


class _Number(Decimal):
    """A fraction or an exponent, kept as written (6e1 stays 6e1, 1e400 is no Infinity)."""
    text: str

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        self.text = text
        return self


def parse_document(text: str, where: str) -> dict:
    if text.startswith("\ufeff"):
        raise ConfigError(f"{where} starts with a byte-order mark; save it as plain UTF-8",
                          hint=CONFIG_HINT)
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates,
                         parse_constant=_reject_constant, parse_float=_Number,
                         parse_int=_Int)
        _depth(doc, MAX_DEPTH)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}", hint=CONFIG_HINT) from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", hint=CONFIG_HINT) from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply", hint=CONFIG_HINT) from None
    except ValueError as exc:  # e.g. an integer longer than Python will convert
        raise ConfigError(f"{where} holds a value that cannot be read: {exc}",
                          hint=CONFIG_HINT) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must hold a JSON object", hint=CONFIG_HINT)
    if not isinstance(doc.get("device"), dict):
        raise ConfigError(f"{where}: key 'device' is missing or not an object", hint=CONFIG_HINT)
    return doc


def read_document(real_path: Path, shown_path: Path | None = None) -> dict:
    """The whole config file as a dict, or ConfigError with the reason."""
    where = f"config file {shown_path or real_path}"
    raw = files.read_bounded(real_path, "config file", MAX_CONFIG_BYTES, hint=CONFIG_HINT)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 (byte {exc.start})", hint=CONFIG_HINT) from None
    return parse_document(text, where)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, Decimal)):
        return "a number"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array"}.get(type(value), type(value).__name__)


def _bad(key: str, problem: str) -> ConfigError:
    return ConfigError(f"config key {key!r} {problem}", hint=CONFIG_HINT)


def _string(device: Mapping, key: str, default: str | None = None) -> str | None:
    value = device.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(key, f"must be a string, not {_json_type(value)}")
    return value


def _path(config_path: Path, device: Mapping, key: str, default: Path) -> Path:
    """``config_path`` is the real file: a relative path is taken from its folder,
    so that a config and its files move together (the stand-in does) and a run
    through a symlinked config finds the same files as a run through its target."""
    value = _string(device, key)
    if value is None:
        return default
    if not value or "\0" in value:
        raise _bad(key, "must be a non-empty path")
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
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _bad("PORT", "must be an integer from 1 to 65535")
    return int(value)


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
        raise _bad("ENDPOINT_URL", "has an unsupported scheme; use a bare host name")
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
    real = files.trusted_path(path, "config file", hint=f"the owner and mode of {path}")
    # Its folder is written to (the rewrite's temporary file, the sweep of
    # leftovers): a sticky bit, enough to pass through, is not enough here.
    files.trusted_dir(real.parent, "the config file's folder")
    device = read_document(real, path)["device"]
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
    proxy = parse_proxy(device.get("HTTP_PROXY"))
    if proxy is not None and proxy.password is not None:
        check_secret_mode(real, path, "the HTTP_PROXY password")
    return Config(
        path=path, real_path=real, device=device, serial_id=serial, host=host, port=port,
        provisioned=provisioned, thing_name=thing_name,
        root_ca=_path(real, device, "ROOT_CA", SHIPPED_ROOT_CA),
        cert_dir=_path(real, device, "CERT_DIR", DEFAULT_CERT_DIR),
        token=token_settings(real, device),
        proxy=proxy,
    )


def check_secret_mode(real: Path, shown: Path, secret: str) -> None:
    """A config holding a secret must not be readable by others (as the PIN file:
    a group given read access is the owner's choice)."""
    mode = stat.S_IMODE(os.stat(real).st_mode)
    if mode & stat.S_IROTH:
        raise ConfigError(f"config file {shown} holds {secret} and others may read it "
                          f"(mode {mode:04o})", hint=f"its mode: chmod 600 {real}")


def token_settings(path: Path, device: Mapping) -> "TokenSettings | None":
    """KEY_STORAGE and the PKCS11_* keys; None for a key file in CERT_DIR."""
    storage = _string(device, "KEY_STORAGE", "file")
    if storage not in KEY_STORAGES:
        raise _bad("KEY_STORAGE", 'must be "file" or "pkcs11"')
    if storage == "file":
        return None
    from .pkcs11_key import DEFAULT_KEY_LABEL, TokenSettings
    if device.get("PROVISIONING_API") != "CreateCertificateFromCsr":
        raise _bad("KEY_STORAGE", '"pkcs11" needs PROVISIONING_API "CreateCertificateFromCsr" '
                                  "(a key the service sends cannot be born in a token)")
    for key in ("PKCS11_LIBRARY", "PKCS11_TOKEN_LABEL", "PKCS11_PIN_FILE"):
        if not _string(device, key):
            raise _bad(key, 'is needed with KEY_STORAGE "pkcs11"')
    label = _string(device, "PKCS11_TOKEN_LABEL")
    key_label = _string(device, "PKCS11_KEY_LABEL", DEFAULT_KEY_LABEL)
    # PKCS#11 labels are 32 bytes, blank-padded.
    for key, value in (("PKCS11_TOKEN_LABEL", label), ("PKCS11_KEY_LABEL", key_label)):
        if not value or len(value.encode()) > 32 or not value.isprintable():
            raise _bad(key, "must be 1 to 32 bytes of printable text")
    return TokenSettings(library=_path(path, device, "PKCS11_LIBRARY", Path()),
                         token_label=label,
                         pin_file=_path(path, device, "PKCS11_PIN_FILE", Path()),
                         key_label=key_label)


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
            raise _bad(f"TEMPLATE_PARAMETERS.{logs.shown(key, 40)}",
                       f"must be a string, not {_json_type(value)}")
    # As AWS's client encodes the request (json.dumps), with the longest token
    # accepted: known too big before any certificate is created for it.
    request = json.dumps({"certificateOwnershipToken": "x" * MAX_OWNERSHIP_TOKEN_CHARS,
                          "parameters": params}).encode()
    if len(request) > MAX_MESSAGE_BYTES:
        raise _bad("TEMPLATE_PARAMETERS",
                   f"makes a RegisterThing request of up to {len(request)} bytes, over the "
                   f"128 KiB AWS IoT takes in one message")
    api = _string(device, "PROVISIONING_API", PROVISIONING_APIS[0])
    if api not in PROVISIONING_APIS:
        raise _bad("PROVISIONING_API", f"must be one of {', '.join(PROVISIONING_APIS)}")
    algorithm = _string(device, "KEY_ALGORITHM", KEY_ALGORITHMS[0])
    if algorithm not in KEY_ALGORITHMS:
        raise _bad("KEY_ALGORITHM", f"must be one of {', '.join(KEY_ALGORITHMS)}")
    return ProvisioningSettings(
        template_name=name, template_parameters=dict(params),
        claim_cert=_path(config.real_path, device, "CLAIM_CERT", DEFAULT_CLAIM_CERT),
        claim_key=_path(config.real_path, device, "CLAIM_KEY", DEFAULT_CLAIM_KEY),
        api=api, key_algorithm=algorithm,
    )


# ------------------------------------------------------------- rewriting

def _json_string(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: keep it as the \u escape it came as
        return json.dumps(text, ensure_ascii=True)
    return json.dumps(text, ensure_ascii=False)


def render(value: object, level: int = 0) -> str:
    """JSON text of a parsed config value, numbers as they were written."""
    pad, end = "\n" + "  " * (level + 1), "\n" + "  " * level
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{pad}{_json_string(k)}: {render(v, level + 1)}" for k, v in value.items())
        return "{" + ",".join(items) + end + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[" + ",".join(pad + render(v, level + 1) for v in value) + end + "]"
    if isinstance(value, str):
        return _json_string(value)
    if value is True or value is False or value is None:
        return json.dumps(value)
    if isinstance(value, (_Int, _Number)):
        return value.text
    if isinstance(value, (int, Decimal)):
        return str(value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def rendered_update(config_path: Path, doc: dict, changes: Mapping[str, object]) -> bytes:
    """The new file's bytes, checked to mean exactly ``doc`` with ``changes``."""
    new = {k: (dict(v, **changes) if k == "device" else v) for k, v in doc.items()}
    data = (render(new) + "\n").encode("utf-8")
    where = f"config file {config_path}"
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} would grow past {MAX_CONFIG_BYTES} bytes", hint=CONFIG_HINT)
    if parse_document(data.decode("utf-8"), where) != new:
        raise ConfigError(f"{where} cannot be rewritten faithfully", hint=CONFIG_HINT)
    return data


def update_device_config(config: Config, changes: Mapping[str, object]) -> bool:
    """Set owned keys under "device", keeping everything else, the mode and the owner.

    Returns False when nothing needed writing (no write at all then).
    """
    doc = read_document(config.real_path, config.path)
    if all(doc["device"].get(k) == v for k, v in changes.items()):
        return False
    data = rendered_update(config.path, doc, changes)
    st = os.stat(config.real_path)
    files.write_file_atomic(config.real_path, data, st.st_mode & 0o7777,
                            owner=(st.st_uid, st.st_gid))
    return True


def rehearse_update(config: Config) -> None:
    """Prove, before anything is spent, that the config can take the provisioning
    result: rendered faithfully with the longest values, within the size limit,
    and written in its folder with its mode and owner (which, under the unit's
    empty capability set, only works for an owner and group we already have)."""
    doc = read_document(config.real_path, config.path)
    data = rendered_update(config.path, doc, {"THING_NAME": "x" * 128,
                                              "CERTIFICATE_ID": "0" * 64,
                                              "PROVISION_STATUS": "False"})
    st = os.stat(config.real_path)
    files.rehearse_write(config.real_path, data, st.st_mode & 0o7777,
                         owner=(st.st_uid, st.st_gid))
