"""The key of a CERT_DIR certificate inside a PKCS#11 token: looked for without
changing anything, or given its final label.

A pair is a certificate and the token key whose public key it carries.  The key
is made under the staging label and renamed to the final one once its
certificate is installed; a run killed in between leaves it under the staging
label, or two keys under the final one.
"""
from __future__ import annotations

import logging

from . import certs
from .errors import StorageError

log = logging.getLogger("entomologist")


def look(settings, cert_pem: bytes) -> tuple[str | None, bool]:
    """(why the token holds no key of ``cert_pem``, or None; whether promoting it
    would change the token: a key not under the final label yet, another key
    there, or a stale staged key).  Reads only."""
    from . import pkcs11_key
    problem = certs.certificate_problem(cert_pem)
    if problem:
        return problem, False
    spki = pkcs11_key.certificate_public_key_der(cert_pem)
    with pkcs11_key.open_token(settings) as token:
        pair = token.matching(spki)
        if pair is None:
            return f"no key in token {settings.token_label!r} belongs to the certificate", False
        finals = token.pairs(settings.key_label, accept=spki)
        unpromoted = (pair.label != settings.key_label or len(finals) > 1
                      or bool(token.pairs(settings.staging_label, accept=spki)))
    return None, unpromoted


def holds(settings, cert_pem: bytes) -> bool:
    """Whether the token holds the key of ``cert_pem``, under either label."""
    from . import pkcs11_key
    spki = pkcs11_key.certificate_public_key_der(cert_pem)
    with pkcs11_key.open_token(settings) as token:
        return any(pair.public_key_der() == spki
                   for label in (settings.staging_label, settings.key_label)
                   for pair in token.pairs(label))


def promote(settings, cert_pem: bytes) -> None:
    """Give the key of the installed ``cert_pem`` the final label (finishing a
    promotion a killed run left half done) and delete the key it replaces; once
    the installed pair is known, a staged key is stale (no registration waits for
    it): it goes, so no orphan piles up in the token."""
    from . import pkcs11_key
    problem = certs.certificate_problem(cert_pem)
    if problem:
        raise StorageError(f"cannot install the token key: {problem}", hint="the token")
    spki = pkcs11_key.certificate_public_key_der(cert_pem)
    with pkcs11_key.open_token(settings) as token:
        pair = token.reconcile(spki)
        if pair is not None and token.delete_label(settings.staging_label):
            log.info("removed a key a run killed before registering left in the token")
    if pair is None:
        raise StorageError(f"cannot install the token key: no key in token "
                           f"{settings.token_label!r} belongs to the certificate",
                           hint="the token")
