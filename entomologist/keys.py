"""CSR mode: a private key made on this device, and its certificate signing request.

Only a CSR-mode first boot loads cryptography.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from . import files

log = logging.getLogger("entomologist")

# The algorithms a device key may have, as KEY_ALGORITHM names them.
KEY_ALGORITHMS = ("EC-P256", "RSA-2048")

# X.520 caps a commonName at 64 characters.
MAX_COMMON_NAME = 64


def csr_common_name(serial_id: str) -> str:
    """The CSR's CN: the serial ID, or for one longer than a CN may be, its first 47
    characters, '-' and 16 hex digits of its SHA-256.  AWS IoT reads only the CSR's
    public key; this keeps the CSR valid, recognisable and distinct per device."""
    if len(serial_id) <= MAX_COMMON_NAME:
        return serial_id
    import hashlib
    digest = hashlib.sha256(serial_id.encode()).hexdigest()[:16]
    return f"{serial_id[:MAX_COMMON_NAME - 17]}-{digest}"


def algorithm_of(key) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return "EC-P256"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048:
        return "RSA-2048"
    return None


def _reusable(path: Path, algorithm: str):
    """The key staged at ``path`` by an earlier run of this product, or None.

    Only a regular file of ours with mode 0600 counts (in a CERT_DIR already
    checked to be writable by nobody else): a key someone else placed would
    give the device's registered certificate their key.
    """
    from cryptography.hazmat.primitives import serialization
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
            or stat.S_IMODE(st.st_mode) != 0o600:
        log.warning("not reusing %s: not a 0600 file of this user", path)
        return None
    try:
        key = serialization.load_pem_private_key(
            files.read_bounded(path, "staged key", 64 * 1024), None)
    except (files.FileProblem, ValueError, TypeError):
        log.warning("not reusing %s: it does not parse", path)
        return None
    if algorithm_of(key) != algorithm:
        log.info("not reusing %s: it is not %s", path, algorithm)
        return None
    return key


def staged_or_new_key(path: Path, algorithm: str):
    """The key staged by an interrupted run, if it is ours and of ``algorithm``; else a
    new one, durably staged (0600) before anything is sent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    key = _reusable(path, algorithm)
    if key is not None:
        log.info("reusing the %s key staged by an interrupted run", algorithm)
        return key
    if algorithm == "RSA-2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    files.write_file_atomic(path, pem, 0o600)
    return key


def make_csr(key, serial_id: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, csr_common_name(serial_id))])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def certificate_carries_key(cert_pem: bytes, key) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return False
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
