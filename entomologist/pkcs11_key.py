"""The device's key pair inside a PKCS#11 token (TPM 2.0, secure element, SoftHSM2):
the settings, the trusted module, the PIN, the logged-in session, and awscrt's
connection through the same module.

The private key is born in the token (sensitive, never extractable, a token
object) and never leaves it: the CSR is signed by the token (pkcs11_csr), and
awscrt connects through the same PKCS#11 module.  The session's key pairs and
their labels are pkcs11_token's.

Errors: the module file missing, the token absent or failing → TransientError
(75: a TPM may not be up yet); a wrong or locked PIN → ConfigError (78), and a
PIN refused once is never offered again in this process, since a TPM counts
every wrong PIN towards its dictionary-attack lockout.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import files, logs
from .errors import ConfigError, TransientError
from .pkcs11_token import Token, load_pkcs11

DEFAULT_KEY_LABEL = "entomologist-device"
STAGING_SUFFIX = ".staging"
# A PIN is a few dozen bytes at most; anything bigger is not a PIN file.
MAX_PIN_FILE_BYTES = 256

# (module realpath, token label, SHA-256 of the PIN) refused by C_Login in this process.
_refused_pins: set[tuple[str, str, bytes]] = set()


@dataclass(frozen=True)
class TokenSettings:
    """The config keys PKCS11_LIBRARY, PKCS11_TOKEN_LABEL, PKCS11_PIN_FILE, PKCS11_KEY_LABEL."""

    library: Path
    token_label: str
    pin_file: Path
    key_label: str = DEFAULT_KEY_LABEL

    @property
    def staging_label(self) -> str:
        return self.key_label + STAGING_SUFFIX


@dataclass(frozen=True)
class TokenKey:
    """What awscrt needs to connect with the token's key.  The PIN stays out of repr."""

    library: Path
    token_label: str
    key_label: str
    pin: str = field(repr=False)

    def mtls_kwargs(self) -> dict:
        """Arguments for ``awsiot.mqtt_connection_builder.mtls_with_pkcs11``.

        DEFAULT, not STRICT: STRICT fails when python-pkcs11 has initialised the
        module in this process, and would finalise it under python-pkcs11's feet.
        """
        from awscrt.io import Pkcs11Lib
        lib = Pkcs11Lib(file=str(self.library),
                        behavior=Pkcs11Lib.InitializeFinalizeBehavior.DEFAULT)
        return {"pkcs11_lib": lib, "user_pin": self.pin, "token_label": self.token_label,
                "private_key_label": self.key_label}


def token_key(settings: "TokenSettings") -> TokenKey:
    """What awscrt needs to connect with the final key, the PIN read from its file;
    the module is the checked real path, since awscrt loads (runs) it."""
    return TokenKey(trusted_library(settings.library), settings.token_label,
                    settings.key_label, read_pin(settings.pin_file))


def trusted_library(path: Path) -> Path:
    """The real path of the PKCS#11 module, once it is known that nobody but root or
    us can change it or any folder above it.  Loading a module runs its code (its
    constructors first) in this process, as root under the unit: it gets the same
    checks as every file we trust, before anything loads it."""
    hint = "PKCS11_LIBRARY, and the module's and its folders' owner and mode"
    try:
        real = files.trusted_path(Path(path), "PKCS#11 module", hint=hint)
    except files.FileProblem as exc:
        if exc.missing:
            # A package not installed yet, or a module on a device that comes up late.
            raise TransientError(f"PKCS#11 module {path} is not there",
                                 hint="PKCS11_LIBRARY, and that its package is installed") from None
        raise
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise ConfigError(f"PKCS#11 module {path} is not a regular file", hint=hint)
    return real


# ------------------------------------------------------------------ the PIN

def read_pin(path: Path) -> str:
    """The user PIN from its file: a small regular file that only root or we can change
    (checked up the whole path, as for every file we trust), that others cannot read."""
    where, hint = f"PIN file {path}", "PKCS11_PIN_FILE and the file's owner and mode"
    real = files.trusted_path(path, "PIN file", hint=hint)
    if os.stat(real).st_mode & stat.S_IROTH:
        raise ConfigError(f"{where} has mode {stat.S_IMODE(os.stat(real).st_mode):04o}: "
                          "others may read it (use 0600 or 0640)", hint=hint)
    raw = files.read_bounded(real, "PIN file", MAX_PIN_FILE_BYTES, hint=hint)
    # One trailing line end is what `echo PIN > file` leaves; it is not part of the PIN.
    for ending in (b"\r\n", b"\n"):
        if raw.endswith(ending):
            raw = raw[:-len(ending)]
            break
    try:
        pin = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text", hint=hint) from None
    if not pin:
        raise ConfigError(f"{where} is empty", hint=hint)
    if len(raw) > MAX_PIN_FILE_BYTES or any(ord(c) < 0x20 or ord(c) == 0x7f for c in pin):
        raise ConfigError(f"{where} holds more than one line of text", hint=hint)
    logs.redact(pin)
    return pin


def certificate_public_key_der(cert_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER of a PEM certificate, to hand to ``Token.reconcile``.

    asn1crypto, not cryptography: a later boot never needs to load cryptography."""
    from asn1crypto import pem, x509
    try:
        _, _, der = pem.unarmor(cert_pem)
        return x509.Certificate.load(der).public_key.dump()
    except (ValueError, TypeError):
        raise ConfigError("the installed certificate is not a PEM certificate",
                          hint="the certificate file in CERT_DIR") from None


def open_token(settings: TokenSettings) -> Token:
    """Load the module, find the token by label, log in with the PIN file's PIN."""
    library = trusted_library(settings.library)
    pin = read_pin(Path(settings.pin_file))
    memo = (os.path.realpath(library), settings.token_label,
            hashlib.sha256(pin.encode()).digest())
    if memo in _refused_pins:
        raise ConfigError(f"the PIN in {settings.pin_file} was refused by token "
                          f"{settings.token_label!r} earlier in this run; not trying it again",
                          hint="PKCS11_PIN_FILE")
    p = load_pkcs11()
    try:
        lib = p.lib(str(library))
    except p.PKCS11Error as exc:
        if "loading" in str(exc):
            raise ConfigError(f"{library} cannot be loaded as a PKCS#11 module",
                              hint="PKCS11_LIBRARY") from None
        raise TransientError(f"PKCS#11 module {library} failed to start: {type(exc).__name__}",
                             hint="the token's configuration and that its device is up") from None
    try:
        token = lib.get_token(token_label=settings.token_label)
    except p.NoSuchToken:
        _finalize(lib)
        raise TransientError(f"no token labelled {settings.token_label!r} in {library}",
                             hint="PKCS11_TOKEN_LABEL, and that the TPM or secure element "
                                  "is up") from None
    except p.MultipleTokensReturned:
        _finalize(lib)
        raise ConfigError(f"more than one token labelled {settings.token_label!r}",
                          hint="PKCS11_TOKEN_LABEL") from None
    except p.PKCS11Error as exc:
        _finalize(lib)
        raise TransientError(f"cannot list the tokens of {library}: {type(exc).__name__}",
                             hint="that the TPM or secure element is up") from None
    try:
        session = token.open(rw=True, user_pin=pin)
    except (p.PinIncorrect, p.PinInvalid, p.PinLenRange) as exc:
        _refused_pins.add(memo)
        _finalize(lib)
        raise ConfigError(f"token {settings.token_label!r} refused the PIN in "
                          f"{settings.pin_file} ({type(exc).__name__}); not retried, since "
                          "wrong PINs count towards the token's lockout",
                          hint="PKCS11_PIN_FILE") from None
    except (p.PinLocked, p.PinExpired, p.UserPinNotInitialized) as exc:
        _refused_pins.add(memo)
        _finalize(lib)
        raise ConfigError(f"token {settings.token_label!r} cannot be used: "
                          f"{type(exc).__name__}",
                          hint="the token's user PIN (locked, expired or never set)") from None
    except p.PKCS11Error as exc:
        _finalize(lib)
        raise TransientError(f"cannot open a session on token {settings.token_label!r}: "
                             f"{type(exc).__name__}",
                             hint="that the TPM or secure element is up") from None
    return Token(settings, lib, session, pin)


def _finalize(lib) -> None:
    try:
        lib.finalize()
    except Exception:
        pass


# ----------------------------------------------------------- connecting

def build_connection(endpoint, tls, client_id: str, timeout: float, on_interrupted):
    """mqtt.build_connection's twin for a token key: a real awscrt ``mqtt.Connection``, not
    yet connected, whose private key operations run in the token.  awscrt 0.36.1 offers
    only TLS 1.2 with a PKCS#11 key (one more round trip than TLS 1.3)."""
    from awsiot import mqtt_connection_builder

    from .mqtt import connection_options
    return mqtt_connection_builder.mtls_with_pkcs11(
        **tls.key.mtls_kwargs(), cert_bytes=tls.cert_pem,
        **connection_options(endpoint, tls, client_id, timeout, on_interrupted))
