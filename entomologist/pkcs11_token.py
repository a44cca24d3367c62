"""A logged-in session on a PKCS#11 token, and the device's key pairs in it.

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
and nothing is deleted.  An untagged pair that matches the installed
certificate is still used.
"""
from __future__ import annotations

import logging
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ConfigError, TransientError
from .keys import KEY_ALGORITHMS

if TYPE_CHECKING:
    from .pkcs11_key import TokenSettings

log = logging.getLogger("entomologist")

# Marks the pairs this program made (then 8 random bytes).
ID_TAG = b"entomologist:"


def load_pkcs11():
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
        p = load_pkcs11()
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
        p = load_pkcs11()
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

    def __init__(self, settings: "TokenSettings", lib, session, pin: str):
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

    # -- finding

    def pairs(self, label: str, accept: bytes | None = None) -> list[KeyPair]:
        """Every pair whose private key has this label (after a crash in ``promote``,
        two under the final label)."""
        return [pair for pair in self._our_pairs(accept=accept) if pair.label == label]

    def _our_objects(self) -> list:
        p = load_pkcs11()
        objects = []
        with token_errors("list the token's keys"):
            for label in (self.settings.key_label, self.settings.staging_label):
                for cls in (p.ObjectClass.PRIVATE_KEY, p.ObjectClass.PUBLIC_KEY):
                    objects.extend(self._session.get_objects(
                        {p.Attribute.CLASS: cls, p.Attribute.LABEL: label}))
        return objects

    def _our_pairs(self, remove_orphans: bool = False,
                   accept: bytes | None = None) -> list[KeyPair]:
        """The pairs under our two labels; ConfigError if any object there is not ours.
        ``accept``: the installed certificate's key, whose pair is ours even untagged."""
        p = load_pkcs11()
        by_id: dict[bytes, dict] = {}
        with token_errors("list the token's keys"):
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
            with token_errors("remove incomplete key pairs"):
                # Private keys first: never leave one whose public key is gone.
                for obj in sorted(orphans, key=lambda o: o.object_class != p.ObjectClass.PRIVATE_KEY):
                    obj.destroy()
        return pairs

    def _not_ours(self, found: str) -> ConfigError:
        return ConfigError(f"token {self.settings.token_label!r} holds {found}; this "
                           f"program deletes nothing it did not make",
                           hint="the token's objects: remove or relabel the ones that are "
                                "not this camera's, or set PKCS11_KEY_LABEL to a label of "
                                "its own")

    def remove_orphans(self) -> None:
        """Delete half pairs under our labels (left by a run killed mid-operation)."""
        self._our_pairs(remove_orphans=True)

    # -- making, relabelling, deleting

    def generate(self, algorithm: str, label: str | None = None) -> KeyPair:
        """A new pair made inside the token, by default under the staging label."""
        p = load_pkcs11()
        label = label or self.settings.staging_label
        key_id = ID_TAG + secrets.token_bytes(8)
        private_template = {p.Attribute.TOKEN: True, p.Attribute.PRIVATE: True,
                            p.Attribute.SENSITIVE: True, p.Attribute.EXTRACTABLE: False}
        public_template = {p.Attribute.TOKEN: True}
        # An identity key only signs: no decrypting, unwrapping or deriving with it.
        capabilities = p.MechanismFlag.SIGN | p.MechanismFlag.VERIFY
        with token_errors(f"generate an {algorithm} key pair in the token",
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
        p = load_pkcs11()
        with token_errors("relabel a key pair in the token"):
            # Public key first: the private key's label is the commit point.
            pair.public[p.Attribute.LABEL] = label
            pair.private[p.Attribute.LABEL] = label
        pair.label = label
        return pair

    def delete(self, pair: KeyPair) -> None:
        with token_errors("delete a key pair from the token"):
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
        chosen = self.matching(certificate_public_key_der, remove_orphans=True)
        return None if chosen is None else self.promote(chosen)

    def matching(self, certificate_public_key_der: bytes,
                 remove_orphans: bool = False) -> KeyPair | None:
        """The pair whose public key the certificate carries (under the final label if
        there is one there), changing nothing but, when asked, removing half pairs."""
        pairs = self._our_pairs(remove_orphans=remove_orphans,
                                accept=certificate_public_key_der)
        matching = [pair for pair in pairs if pair.public_key_der() == certificate_public_key_der]
        final = self.settings.key_label
        return next((pair for pair in matching if pair.label == final),
                    matching[0] if matching else None)


@contextmanager
def token_errors(what: str, unsupported_hint: str | None = None):
    """PKCS#11 failures during an operation: TransientError (the token went away or
    failed), or ConfigError where the token cannot do what the config asks."""
    p = load_pkcs11()
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
