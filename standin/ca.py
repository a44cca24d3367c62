"""The stand-in's test CA: the broker's server certificate, claim certificates,
and the device certificates the provisioning API hands out."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file the stand-in owns (its own folder, or a device it creates)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def certificate_id(cert: x509.Certificate) -> str:
    """AWS IoT's certificate ID: the SHA-256 of the DER certificate, in hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_id(public_key) -> str:
    """SHA-256 of a public key's DER SubjectPublicKeyInfo, to compare keys in the record."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


class StandInCA:
    def __init__(self, common_name: str = "Entomologist stand-in CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, public_key, common_name: str, *, server: bool = False,
              hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False))
        if server:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def write_pair(self, directory: Path, stem: str, common_name: str,
                   server: bool = False, **kwargs) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue(key.public_key(), common_name, server=server, **kwargs)
        cert_path, key_path = directory / f"{stem}.pem.crt", directory / f"{stem}.private.pem.key"
        write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        write_new(key_path, pem_key(key), 0o600)
        return cert_path, key_path
