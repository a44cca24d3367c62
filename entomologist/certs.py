"""Certificates and key pairs: PEM blocks, notBefore from the DER, and whether a
key belongs to a certificate.

A pair is checked by the TLS library that will present it rather than by
cryptography, which keeps cryptography (10 MiB, 50 ms of start-up) out of
every run but a CSR-mode first boot.
"""
from __future__ import annotations

import base64
import binascii
import calendar
import os
import re
import time
from pathlib import Path

from . import files
from .errors import ConfigError

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def trust_root_ca_only() -> None:
    """No TLS context of this process reads the system's CA bundle.

    Every connection trusts ROOT_CA alone (awscrt's trust-store override), yet
    the TLS library under awscrt (s2n over AWS-LC) loads the whole system bundle
    into each new context before dropping it: about 4.5 ms a context on an x86
    core, six contexts in a first boot. AWS-LC reads OpenSSL's variables for
    where that bundle is; pointing them at nothing spares the work, and leaves
    nothing to fall back on should a context ever be made without ROOT_CA.
    """
    os.environ["SSL_CERT_FILE"] = os.devnull
    os.environ["SSL_CERT_DIR"] = os.devnull


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER bytes of each PEM certificate in ``data``; ValueError if one is not base64."""
    try:
        return [base64.b64decode(b"".join(block.split()), validate=True)
                for block in _PEM_CERT.findall(data)]
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in a certificate: {exc}") from None


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
    """A certificate's notBefore as a Unix time, read straight from the DER
    (Certificate > TBSCertificate > [version], serial, signature, issuer,
    validity); anything unexpected is a ValueError."""
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
    try:
        text = der[start:end].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("notBefore is not ASCII") from None
    if tag == 0x17:                             # UTCTime, YYMMDDHHMMSSZ
        if len(text) != 13 or not text[:2].isdigit():
            raise ValueError("unsupported time format")
        year = int(text[:2])
        text = f"{year + (2000 if year < 50 else 1900)}{text[2:]}"
    elif tag != 0x18:                           # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise ValueError("unknown time type")
    if len(text) != 15 or not text.endswith("Z"):
        raise ValueError("unsupported time format")
    return float(calendar.timegm(time.strptime(text, "%Y%m%d%H%M%SZ")))


def certificate_problem(cert_pem: bytes) -> str | None:
    """None if ``cert_pem`` holds one parsable X.509 certificate first, else why not."""
    try:
        ders = pem_certificates(cert_pem)
        if not ders:
            return "it holds no PEM certificate"
        not_valid_before(ders[0])
    except ValueError:
        return "the certificate does not parse"
    return None


def pair_problem(cert_pem: bytes, key_pem: bytes) -> str | None:
    """None if ``key_pem`` is the private key of ``cert_pem``, else why not.

    The TLS library that will present the pair refuses a key that does not
    belong to the certificate, or that does not parse.
    """
    problem = certificate_problem(cert_pem)
    if problem:
        return problem
    from awscrt import io
    from awscrt.exceptions import AwsCrtError
    try:
        options = io.TlsContextOptions.create_client_with_mtls(cert_pem, key_pem)
        # Nothing is verified with this context: trusting the certificate itself spares
        # loading the system's CA bundle, most of the context's cost.
        options.override_default_trust_store(cert_pem)
        io.ClientTlsContext(options)
    except (AwsCrtError, RuntimeError, ValueError, TypeError):
        # Whatever the TLS library says of the files, it will not present them.
        return "the private key does not belong to the certificate, or does not parse"
    return None


def check_claim(claim_cert: Path, claim_key: Path, root_ca: Path) -> None:
    """The claim pair and the CA must be ours to trust and must work together."""
    hint = "CLAIM_CERT and CLAIM_KEY in the config"
    pems = []
    for what, path in (("claim certificate", claim_cert), ("claim key", claim_key)):
        real = files.trusted_path(path, what, hint=hint)
        pems.append(files.read_bounded(real, what, hint=hint))
    problem = pair_problem(*pems)
    if problem:
        raise ConfigError(f"claim files unusable: {problem}", hint=hint)
    ca = files.read_bounded(files.trusted_path(root_ca, "ROOT_CA"), "ROOT_CA",
                            hint="ROOT_CA in the config")
    if certificate_problem(ca):
        raise ConfigError(f"ROOT_CA {root_ca}: {certificate_problem(ca)}",
                          hint="ROOT_CA in the config")
