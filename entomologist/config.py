"""ento.conf: reading and checking it, and rewriting only the keys the product owns.

The file is JSON; the product owns THING_NAME, CERTIFICATE_ID and
PROVISION_STATUS under "device".  A rewrite keeps every other key and value
with its exact meaning (config_file reads and renders the JSON).
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping
from urllib.parse import urlsplit

from . import files, logs
from .config_file import HOST_LABEL_RE, bad_key, json_type, read_document, rendered_update
from .errors import ConfigError
from .keys import KEY_ALGORITHMS
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
KEY_STORAGES = ("file", "pkcs11")
OWNED_KEYS = ("THING_NAME", "CERTIFICATE_ID", "PROVISION_STATUS")

DEFAULT_PORT = 8883
# AWS IoT takes at most this in one MQTT message, RegisterThing's request included.
MAX_MESSAGE_BYTES = 128 * 1024
# Far above a real ownership token (about 1 KB); fleet refuses a longer one.
MAX_OWNERSHIP_TOKEN_CHARS = 16 * 1024

SERIAL_RE = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")
THING_NAME_RE = re.compile(r"[A-Za-z0-9_\-:]{1,128}")
CERTIFICATE_ID_RE = re.compile(r"[0-9a-f]{64}")
TEMPLATE_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,36}")
SECRET_PARAMETER = "ProvisioningSecret"
SECRET_MAX_CHARS = 256


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
    # PROVISIONING_SECRET_FILE: its content goes out as the ProvisioningSecret
    # parameter (entomologist.secret); None sends none.
    secret_file: Path | None = None

    @property
    def csr_mode(self) -> bool:
        return self.api == "CreateCertificateFromCsr"


# ------------------------------------------------------------- reading

def _device_string(device: Mapping, key: str, default: str | None = None) -> str | None:
    value = device.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_key(key, f"must be a string, not {json_type(value)}")
    return value


def _path(config_path: Path, device: Mapping, key: str, default: Path | None) -> Path | None:
    """``config_path`` is the real file: a relative path is taken from its folder,
    so that a config and its files move together (the stand-in does) and a run
    through a symlinked config finds the same files as a run through its target."""
    value = _device_string(device, key)
    if value is None:
        return default
    if not value or "\0" in value:
        raise bad_key(key, "must be a non-empty path")
    return (config_path.parent / value) if not os.path.isabs(value) else Path(value)


def parse_bool_status(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise bad_key("PROVISION_STATUS", 'must be "True" or "False"')


def parse_port(value: object) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise bad_key("PORT", "must be an integer from 1 to 65535")
    return int(value)


def parse_endpoint(value: object) -> tuple[str, int | None]:
    """Host and optional port from ENDPOINT_URL, tolerating a scheme and a slash."""
    if not isinstance(value, str) or not value.strip():
        raise bad_key("ENDPOINT_URL", "must be a non-empty host name")
    text = value.strip()
    try:
        parts = urlsplit(text if "://" in text else "//" + text)
        port = parts.port
    except ValueError:
        raise bad_key("ENDPOINT_URL", "has an invalid port") from None
    if "://" in text and parts.scheme.lower() not in ("mqtts", "https"):
        raise bad_key("ENDPOINT_URL", "has an unsupported scheme; use a bare host name")
    host = parts.hostname or ""
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise bad_key("ENDPOINT_URL", "must be a host name, not a URL with a path")
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(HOST_LABEL_RE.fullmatch(p) for p in labels):
        raise bad_key("ENDPOINT_URL", "is not a valid host name")
    if port == 0:
        raise bad_key("ENDPOINT_URL", "has an invalid port")
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
        raise bad_key("SERIAL_ID", "must be 1 to 128 characters from A-Z a-z 0-9 _ - : .")
    if "ENDPOINT_URL" not in device:
        raise bad_key("ENDPOINT_URL", "is missing")
    host, url_port = parse_endpoint(device["ENDPOINT_URL"])
    if "PORT" in device:
        port = parse_port(device["PORT"])
    else:
        port = url_port or DEFAULT_PORT
    provisioned = parse_bool_status(device.get("PROVISION_STATUS"))
    thing_name = _device_string(device, "THING_NAME")
    if thing_name is not None and not THING_NAME_RE.fullmatch(thing_name):
        raise bad_key("THING_NAME", "is not a valid thing name")
    _device_string(device, "CERTIFICATE_ID")
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
    storage = _device_string(device, "KEY_STORAGE", "file")
    if storage not in KEY_STORAGES:
        raise bad_key("KEY_STORAGE", 'must be "file" or "pkcs11"')
    if storage == "file":
        return None
    from .pkcs11_key import DEFAULT_KEY_LABEL, TokenSettings
    if device.get("PROVISIONING_API") != "CreateCertificateFromCsr":
        raise bad_key("KEY_STORAGE", '"pkcs11" needs PROVISIONING_API "CreateCertificateFromCsr" '
                                     "(a key the service sends cannot be born in a token)")
    for key in ("PKCS11_LIBRARY", "PKCS11_TOKEN_LABEL", "PKCS11_PIN_FILE"):
        if not _device_string(device, key):
            raise bad_key(key, 'is needed with KEY_STORAGE "pkcs11"')
    label = _device_string(device, "PKCS11_TOKEN_LABEL")
    key_label = _device_string(device, "PKCS11_KEY_LABEL", DEFAULT_KEY_LABEL)
    # PKCS#11 labels are 32 bytes, blank-padded.
    for key, value in (("PKCS11_TOKEN_LABEL", label), ("PKCS11_KEY_LABEL", key_label)):
        if not value or len(value.encode()) > 32 or not value.isprintable():
            raise bad_key(key, "must be 1 to 32 bytes of printable text")
    return TokenSettings(library=_path(path, device, "PKCS11_LIBRARY", Path()),
                         token_label=label,
                         pin_file=_path(path, device, "PKCS11_PIN_FILE", Path()),
                         key_label=key_label)


def provisioning_settings(config: Config) -> ProvisioningSettings:
    """Check what provisioning needs, only when it is needed.  Raises ConfigError."""
    device = config.device
    name = _device_string(device, "TEMPLATE_NAME")
    if name is None:
        raise bad_key("TEMPLATE_NAME", "is missing; it is needed to provision this device")
    if not TEMPLATE_NAME_RE.fullmatch(name):
        raise bad_key("TEMPLATE_NAME", "must be 1 to 36 characters from A-Z a-z 0-9 _ -")
    params = device.get("TEMPLATE_PARAMETERS", {"SerialNumber": config.serial_id})
    if not isinstance(params, dict):
        raise bad_key("TEMPLATE_PARAMETERS", "must be an object of strings")
    for key, value in params.items():
        if not isinstance(value, str):
            raise bad_key(f"TEMPLATE_PARAMETERS.{logs.shown(key, 40)}",
                          f"must be a string, not {json_type(value)}")
    if SECRET_PARAMETER in params:
        raise bad_key("TEMPLATE_PARAMETERS", f"must not hold {SECRET_PARAMETER}: a secret does not "
                                             f"belong in the config; name its file in "
                                             f"PROVISIONING_SECRET_FILE")
    secret_file = _path(config.real_path, device, "PROVISIONING_SECRET_FILE", None)
    sent = params if secret_file is None else {**params,
                                               SECRET_PARAMETER: "x" * SECRET_MAX_CHARS}
    # As AWS's client encodes the request (json.dumps), with the longest token
    # accepted: known too big before any certificate is created for it.
    request = json.dumps({"certificateOwnershipToken": "x" * MAX_OWNERSHIP_TOKEN_CHARS,
                          "parameters": sent}).encode()
    if len(request) > MAX_MESSAGE_BYTES:
        raise bad_key("TEMPLATE_PARAMETERS",
                      f"makes a RegisterThing request of up to {len(request)} bytes, over the "
                      f"128 KiB AWS IoT takes in one message")
    api = _device_string(device, "PROVISIONING_API", PROVISIONING_APIS[0])
    if api not in PROVISIONING_APIS:
        raise bad_key("PROVISIONING_API", f"must be one of {', '.join(PROVISIONING_APIS)}")
    algorithm = _device_string(device, "KEY_ALGORITHM", KEY_ALGORITHMS[0])
    if algorithm not in KEY_ALGORITHMS:
        raise bad_key("KEY_ALGORITHM", f"must be one of {', '.join(KEY_ALGORITHMS)}")
    return ProvisioningSettings(
        template_name=name, template_parameters=dict(params),
        claim_cert=_path(config.real_path, device, "CLAIM_CERT", DEFAULT_CLAIM_CERT),
        claim_key=_path(config.real_path, device, "CLAIM_KEY", DEFAULT_CLAIM_KEY),
        api=api, key_algorithm=algorithm, secret_file=secret_file,
    )


# ------------------------------------------------------------- rewriting

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
    data = longest_update(config)
    st = os.stat(config.real_path)
    files.rehearse_write(config.real_path, data, st.st_mode & 0o7777,
                         owner=(st.st_uid, st.st_gid))


def longest_update(config: Config) -> bytes:
    """The config as the provisioning result would leave it, with the longest values:
    checked to render faithfully and within the size limit (nothing is written)."""
    doc = read_document(config.real_path, config.path)
    return rendered_update(config.path, doc, {"THING_NAME": "x" * 128,
                                              "CERTIFICATE_ID": "0" * 64,
                                              "PROVISION_STATUS": "False"})
