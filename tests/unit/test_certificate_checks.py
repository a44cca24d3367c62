"""The checks that run at every boot without loading cryptography."""
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from entomologist import certs, clock, config as configuration, errors
from fakes import MiniCA


def test_a_matching_pair_is_accepted():
    cert, key = MiniCA().pair()
    assert certs.pair_problem(cert.encode(), key.encode()) is None


@pytest.mark.parametrize("broken", ["other key", "garbage key", "garbage certificate",
                                    "empty key"])
def test_a_pair_that_does_not_belong_together_is_refused(broken):
    ca = MiniCA()
    cert, key = ca.pair()
    _, other = ca.pair()
    cert, key = {"other key": (cert, other), "garbage key": (cert, "garbage"),
                 "garbage certificate": ("garbage", key), "empty key": (cert, "")}[broken]
    problem = certs.pair_problem(cert.encode(), key.encode())
    expected = "no PEM certificate" if broken == "garbage certificate" else "does not belong"
    assert expected in problem


def certificate(not_before: dt.datetime, version=x509.Version.v3):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_before + dt.timedelta(days=1)))
    if version is x509.Version.v3:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize("when", [
    dt.datetime(1950, 1, 1, 0, 0, 0, tzinfo=dt.timezone.utc),        # first UTCTime year ("50")
    dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc),
    dt.datetime(2026, 11, 27, 8, 0, 0, tzinfo=dt.timezone.utc),
    dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc),   # last UTCTime year
    dt.datetime(2050, 1, 1, 0, 0, 0, tzinfo=dt.timezone.utc),        # GeneralizedTime
    dt.datetime(2100, 6, 1, 12, 30, 5, tzinfo=dt.timezone.utc),
])
def test_not_before_read_from_der_agrees_with_cryptography(when):
    cert = certificate(when)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert certs.not_valid_before(der) == cert.not_valid_before_utc.timestamp()


def test_the_shipped_amazon_root_ca_and_the_stand_in_certificates_parse():
    pem = configuration.SHIPPED_ROOT_CA.read_bytes()
    (der,) = certs.pem_certificates(pem)
    expected = x509.load_pem_x509_certificate(pem).not_valid_before_utc.timestamp()
    assert certs.not_valid_before(der) == expected
    ca = MiniCA()
    cert, _ = ca.pair()
    bundle = (cert + ca.pem).encode()
    assert len(certs.pem_certificates(bundle)) == 2


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x30\x85\x00\x00\x00\x00\x01",
                                 b"\x30\x03\x02\x01\x01", b"\x30\x82\xff\xff"])
def test_malformed_der_is_a_value_error(der):
    with pytest.raises(ValueError):
        certs.not_valid_before(der)


@pytest.mark.parametrize("der", [b"\x30\x80" + bytes(8), b"\x30\x85" + bytes(12)],
                         ids=["indefinite length", "5-byte length"])
def test_a_length_of_no_bytes_or_more_than_four_is_a_bad_der_length(der):
    # DER has no indefinite length, and a certificate is far under 4 GiB: either is
    # garbage, whatever bytes follow.
    with pytest.raises(ValueError, match="bad DER length"):
        certs.not_valid_before(der)


def test_a_file_whose_certificate_cannot_be_read_does_not_block_the_clock_check(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    clock.check_clock([bad, tmp_path / "absent.pem", tmp_path], now=lambda: 1.0)


def test_a_clock_before_two_certificates_of_the_same_start_names_the_first_file(tmp_path):
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    pem = certificate(when).public_bytes(serialization.Encoding.PEM)
    first, second = tmp_path / "claim.pem.crt", tmp_path / "ca.pem"
    first.write_bytes(pem)
    second.write_bytes(pem)
    with pytest.raises(errors.TransientError) as err:
        clock.check_clock([first, second], now=lambda: when.timestamp() - 60)
    assert f"before the start of validity of {first} (2026-01-01" in str(err.value)
