"""The device's key pair inside a PKCS#11 token (TPM 2.0, secure element, SoftHSM2).

The private key is born in the token (sensitive, never extractable, a token
object) and never leaves it: the CSR is signed by the token, and awscrt
connects through the same PKCS#11 module.

Objects and labels.  A pair is a private and a public key object sharing a
random ``CKA_ID``.  A new pair is made under the staging label
(``<PKCS11_KEY_LABEL>.staging``) and gets the final label only once its
certificate is registered and installed (``promote``).  The private key's
label is what counts: relabelling changes the public key first, so a run
killed in between leaves a pair still found under its staging label, and the
next run finishes the job.  Deleting removes the private key first: an
interrupted delete leaves a harmless public key, which the next ``open``
clears away with any other half pair under our two labels.  Objects under
other labels are never touched.

Only what this program made is ever deleted: its pairs' ``CKA_ID`` starts
with ID_TAG.  Anything else under our two labels (another program's pair, a
key sharing our ID) is a configuration error (78) that names what was found,
and nothing is deleted.  A pair from before the tag, matching the installed
certificate, is still used.

Errors: the module file missing, the token absent or failing → TransientError
(75: a TPM may not be up yet); a wrong or locked PIN → ConfigError (78), and a
PIN refused once is never offered again in this process, since a TPM counts
every wrong PIN towards its dictionary-attack lockout.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import files
from .errors import ConfigError, TransientError
from .keys import csr_common_name

log = logging.getLogger("entomologist")

DEFAULT_KEY_LABEL = "entomologist-device"
# Marks the pairs this program made (then 8 random bytes).
ID_TAG = b"entomologist:"
STAGING_SUFFIX = ".staging"
KEY_ALGORITHMS = ("EC-P256", "RSA-2048")
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
    return pin


# ----------------------------------------------------------------- the token

def _pkcs11():
    # Imported where used: a device with KEY_STORAGE "file" never loads it.
    import pkcs11
    return pkcs11


@dataclass
class KeyPair:
    """A private key object and its public key object (same CKA_ID) in an open token."""

    private: object = field(repr=False)
    public: object = field(repr=False)
    label: str
    id: bytes

    @property
    def algorithm(self) -> str | None:
        """'EC-P256', 'RSA-2048', or None for anything else."""
        p = _pkcs11()
        key_type = self.private.key_type
        if key_type == p.KeyType.EC:
            from asn1crypto.keys import ECDomainParameters
            params = ECDomainParameters.load(self.public[p.Attribute.EC_PARAMS])
            return "EC-P256" if params.chosen.native == "secp256r1" else None
        if key_type == p.KeyType.RSA:
            return "RSA-2048" if len(_unsigned(self.public[p.Attribute.MODULUS])) == 256 else None
        return None

    def public_key_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo (what a certificate carries)."""
        from asn1crypto import core, keys
        p = _pkcs11()
        if self.public.key_type == p.KeyType.EC:
            point = bytes(self.public[p.Attribute.EC_POINT])
            # The standard wraps the point in a DER OCTET STRING (67 bytes for P-256);
            # some tokens hand it raw (an uncompressed P-256 point: 0x04 and 64 bytes).
            if not (len(point) == 65 and point[0] == 4):
                point = core.OctetString.load(point).native
            return keys.PublicKeyInfo({
                "algorithm": {"algorithm": "ec",
                              "parameters": keys.ECDomainParameters.load(
                                  self.public[p.Attribute.EC_PARAMS])},
                "public_key": point}).dump()
        rsa_key = keys.RSAPublicKey({
            "modulus": int.from_bytes(self.public[p.Attribute.MODULUS], "big"),
            "public_exponent": int.from_bytes(self.public[p.Attribute.PUBLIC_EXPONENT], "big")})
        return keys.PublicKeyInfo.wrap(rsa_key, "rsa").dump()


def _unsigned(value: bytes) -> bytes:
    return bytes(value).lstrip(b"\0")


class Token:
    """A logged-in read-write session on the token.  Use ``open_token``; close before
    awscrt connects in this process (closing finalises python-pkcs11's hold on the module)."""

    def __init__(self, settings: TokenSettings, lib, session, pin: str):
        self.settings = settings
        self._lib = lib
        self._session = session
        self._pin = pin

    def __enter__(self) -> "Token":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._session is None:
            return
        try:
            self._session.close()
        except Exception:
            pass
        self._session = None
        try:
            self._lib.finalize()
        except Exception:
            pass

    @property
    def key(self) -> TokenKey:
        """For awscrt: the final key's label and the PIN that has just worked."""
        s = self.settings
        return TokenKey(s.library, s.token_label, s.key_label, self._pin)

    # -- finding

    def pairs(self, label: str, accept: bytes | None = None) -> list[KeyPair]:
        """Every pair whose private key has this label (after a crash in ``promote``,
        two under the final label)."""
        return [pair for pair in self._our_pairs(accept=accept) if pair.label == label]

    def find(self, label: str) -> KeyPair | None:
        found = self.pairs(label)
        return found[0] if found else None

    def _our_objects(self) -> list:
        p = _pkcs11()
        objects = []
        with _token_errors("list the token's keys"):
            for label in (self.settings.key_label, self.settings.staging_label):
                for cls in (p.ObjectClass.PRIVATE_KEY, p.ObjectClass.PUBLIC_KEY):
                    objects.extend(self._session.get_objects(
                        {p.Attribute.CLASS: cls, p.Attribute.LABEL: label}))
        return objects

    def _our_pairs(self, remove_orphans: bool = False,
                   accept: bytes | None = None) -> list[KeyPair]:
        """The pairs under our two labels; ConfigError if any object there is not ours.
        ``accept``: the installed certificate's key, whose pair is ours even untagged."""
        p = _pkcs11()
        by_id: dict[bytes, dict] = {}
        with _token_errors("list the token's keys"):
            for obj in self._our_objects():
                group = by_id.setdefault(bytes(obj[p.Attribute.ID]), {})
                group.setdefault(obj.object_class, []).append(obj)
        pairs, orphans = [], []
        for key_id, group in by_id.items():
            privates = group.get(p.ObjectClass.PRIVATE_KEY, [])
            publics = group.get(p.ObjectClass.PUBLIC_KEY, [])
            if len(privates) > 1 or len(publics) > 1:
                # This program never gives two keys one ID.
                raise self._not_ours(f"{len(privates)} private keys and {len(publics)} "
                                     f"public keys share the CKA_ID {key_id.hex()} under "
                                     f"label {(privates + publics)[0].label!r}")
            pair = (KeyPair(privates[0], publics[0], privates[0].label, key_id)
                    if privates and publics else None)
            if not key_id.startswith(ID_TAG) and not (
                    pair is not None and accept is not None and pair.public_key_der() == accept):
                what = ("a private key and a public key" if pair is not None
                        else "a private key" if privates else "a public key")
                raise self._not_ours(f"{what} under label {(privates + publics)[0].label!r} "
                                     f"(CKA_ID {key_id.hex()}) that this program did not make")
            if pair is not None:
                pairs.append(pair)
            else:
                orphans.extend(privates + publics)
        if remove_orphans and orphans:
            log.warning("removing %d key object(s) without their other half from the token",
                        len(orphans))
            with _token_errors("remove incomplete key pairs"):
                # Private keys first: never leave one whose public key is gone.
                for obj in sorted(orphans, key=lambda o: o.object_class != p.ObjectClass.PRIVATE_KEY):
                    obj.destroy()
        return pairs

    def _not_ours(self, found: str) -> ConfigError:
        return ConfigError(f"token {self.settings.token_label!r} holds {found}; this "
                           f"program deletes nothing it did not make",
                           hint=f"the token's objects: remove or relabel the ones that are "
                                f"not this camera's, or set PKCS11_KEY_LABEL to a label of "
                                f"its own")

    def remove_orphans(self) -> None:
        """Delete half pairs under our labels (left by a run killed mid-operation)."""
        self._our_pairs(remove_orphans=True)

    # -- making, relabelling, deleting

    def generate(self, algorithm: str, label: str | None = None) -> KeyPair:
        """A new pair made inside the token, by default under the staging label."""
        p = _pkcs11()
        label = label or self.settings.staging_label
        key_id = ID_TAG + secrets.token_bytes(8)
        private_template = {p.Attribute.TOKEN: True, p.Attribute.PRIVATE: True,
                            p.Attribute.SENSITIVE: True, p.Attribute.EXTRACTABLE: False}
        public_template = {p.Attribute.TOKEN: True}
        # An identity key only signs: no decrypting, unwrapping or deriving with it.
        capabilities = p.MechanismFlag.SIGN | p.MechanismFlag.VERIFY
        with _token_errors(f"generate an {algorithm} key pair in the token",
                           unsupported_hint="KEY_ALGORITHM: the token may not offer it"):
            if algorithm == "EC-P256":
                from pkcs11.util.ec import encode_named_curve_parameters
                params = self._session.create_domain_parameters(
                    p.KeyType.EC, {p.Attribute.EC_PARAMS:
                                   encode_named_curve_parameters("secp256r1")}, local=True)
                public, private = params.generate_keypair(
                    store=True, label=label, id=key_id, capabilities=capabilities,
                    public_template=public_template, private_template=private_template)
            elif algorithm == "RSA-2048":
                public, private = self._session.generate_keypair(
                    p.KeyType.RSA, 2048, store=True, label=label, id=key_id,
                    capabilities=capabilities,
                    public_template=public_template, private_template=private_template)
            else:
                raise ConfigError(f"KEY_ALGORITHM {algorithm!r} is not one of "
                                  f"{', '.join(KEY_ALGORITHMS)}", hint="the config file")
        log.info("generated an %s key pair in token %r under label %r",
                 algorithm, self.settings.token_label, label)
        return KeyPair(private, public, label, key_id)

    def staged_or_new(self, algorithm: str) -> KeyPair:
        """The staging pair an interrupted run left, if it is of this algorithm; else a
        new one.  Never more than one staging pair."""
        self.remove_orphans()
        keep = None
        for pair in self.pairs(self.settings.staging_label):
            if keep is None and pair.algorithm == algorithm:
                keep = pair
            else:
                self.delete(pair)
        if keep is not None:
            log.info("reusing the %s key pair staged in the token by an interrupted run",
                     algorithm)
            return keep
        return self.generate(algorithm)

    def relabel(self, pair: KeyPair, label: str) -> KeyPair:
        p = _pkcs11()
        with _token_errors("relabel a key pair in the token"):
            # Public key first: the private key's label is the commit point.
            pair.public[p.Attribute.LABEL] = label
            pair.private[p.Attribute.LABEL] = label
        pair.label = label
        return pair

    def delete(self, pair: KeyPair) -> None:
        with _token_errors("delete a key pair from the token"):
            # Private key first: a delete cut short leaves only a public key.
            pair.private.destroy()
            pair.public.destroy()

    def delete_label(self, label: str) -> int:
        """Delete every pair under ``label``; how many there were."""
        found = self.pairs(label)
        for pair in found:
            self.delete(pair)
        return len(found)

    def promote(self, pair: KeyPair) -> KeyPair:
        """Give a registered pair the final label, then delete the key it replaces (last)."""
        final = self.settings.key_label
        old = [other for other in self.pairs(final, accept=pair.public_key_der())
               if other.id != pair.id]
        if pair.label != final:
            self.relabel(pair, final)
        for other in old:
            self.delete(other)
        return pair

    def reconcile(self, certificate_public_key_der: bytes) -> KeyPair | None:
        """The final pair matching the installed certificate, finishing a promotion that
        a killed run left half done; None if no pair matches (provision again)."""
        pairs = self._our_pairs(remove_orphans=True, accept=certificate_public_key_der)
        matching = [pair for pair in pairs if pair.public_key_der() == certificate_public_key_der]
        if not matching:
            return None
        final = self.settings.key_label
        chosen = next((pair for pair in matching if pair.label == final), matching[0])
        return self.promote(chosen)

    def all_objects(self) -> list[tuple[str, str, bytes]]:
        """(class, label, id) of every object the user can see: for tests and diagnostics."""
        p = _pkcs11()
        with _token_errors("list the token's objects"):
            return sorted((obj.object_class.name, obj[p.Attribute.LABEL],
                           bytes(obj[p.Attribute.ID]))
                          for obj in self._session.get_objects())

    # -- signing

    def make_csr(self, pair: KeyPair, serial_id: str) -> bytes:
        """A PEM CSR for ``pair`` (subject CN from ``csr_common_name``), signed in the token."""
        from asn1crypto import csr, keys, pem, x509
        p = _pkcs11()
        info = csr.CertificationRequestInfo({
            "version": "v1",
            "subject": x509.Name.build({"common_name": csr_common_name(serial_id)}),
            "subject_pk_info": keys.PublicKeyInfo.load(pair.public_key_der()),
            "attributes": [],
        })
        body = info.dump()
        with _token_errors("sign the certificate request in the token",
                           unsupported_hint="KEY_ALGORITHM: the token may not offer it"):
            if pair.private.key_type == p.KeyType.EC:
                from pkcs11.util.ec import encode_ecdsa_signature
                # Raw CKM_ECDSA over our own SHA-256 digest: tokens (SoftHSM, TPMs)
                # offer it more widely than CKM_ECDSA_SHA256.
                raw = pair.private.sign(hashlib.sha256(body).digest(),
                                        mechanism=p.Mechanism.ECDSA)
                signature, algorithm = encode_ecdsa_signature(raw), "sha256_ecdsa"
            else:
                signature = pair.private.sign(body, mechanism=p.Mechanism.SHA256_RSA_PKCS)
                algorithm = "sha256_rsa"
        request = csr.CertificationRequest({
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": algorithm},
            "signature": bytes(signature),
        })
        return pem.armor("CERTIFICATE REQUEST", request.dump())


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


@contextmanager
def _token_errors(what: str, unsupported_hint: str | None = None):
    """PKCS#11 failures during an operation: TransientError (the token went away or
    failed), or ConfigError where the token cannot do what the config asks."""
    p = _pkcs11()
    try:
        yield
    except p.PKCS11Error as exc:
        name = type(exc).__name__
        if unsupported_hint and isinstance(exc, (
                p.MechanismInvalid, p.MechanismParamInvalid, p.KeySizeRange,
                p.DomainParamsInvalid, p.TemplateInconsistent, p.FunctionNotSupported)):
            raise ConfigError(f"cannot {what}: {name}", hint=unsupported_hint) from None
        raise TransientError(f"cannot {what}: {name}",
                             hint="that the token is present and working") from None


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
    p = _pkcs11()
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


def connect(endpoint, cert: Path, key: TokenKey, client_id: str, timeout: float):
    """mqtt.connect with the token's key: a Link, after a bounded wait for the CONNACK.
    Call it after the Token is closed (awscrt then initialises the module itself)."""
    from . import mqtt
    return mqtt.connect(endpoint, cert, key, client_id, timeout, build=build_connection)
