"""CreateCertificateFromCsr mode: the private key is made here and never sent."""
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

import boot
from entomologist import errors, keys, retries
from fakes import CREATE, CREATE_CSR, FakeClock, public_keys_equal

REGISTER = "$aws/provisioning-templates/Fleet/provision/json"
CERT, KEY = "certificate.pem.crt", "private.pem.key"
DEVICE_KEY, STAGED_KEY = "private.pem.key.device-made", "private.pem.key.staging"


def run(device, cloud, **kw):
    boot.boot(device.config_path, retries.Deadline(30, clock=FakeClock(), step_limit=0.2),
              build=cloud, **kw)


@pytest.fixture
def csr_device(device):
    device.update(PROVISIONING_API="CreateCertificateFromCsr")
    return device


def installed_key(device):
    return load_pem_private_key((device.cert_dir / KEY).read_bytes(), None)


@pytest.mark.parametrize("algorithm,kind", [("EC-P256", ec.EllipticCurvePrivateKey),
                                            ("RSA-2048", rsa.RSAPrivateKey)])
def test_key_made_here_with_the_chosen_algorithm_signs_the_csr(tmp_path, algorithm, kind):
    staged = tmp_path / "own.key"
    key = keys.staged_or_new_key(staged, algorithm)
    assert isinstance(key, kind)
    assert keys.algorithm_of(key) == algorithm
    assert stat.S_IMODE(os.stat(staged).st_mode) == 0o600
    assert public_keys_equal(load_pem_private_key(staged.read_bytes(), None).public_key(),
                                  key.public_key())
    csr = x509.load_pem_x509_csr(keys.make_csr(key, "CAM-42"))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "CAM-42"
    assert csr.signature_hash_algorithm.name == "sha256"
    assert public_keys_equal(csr.public_key(), key.public_key())


def test_a_staged_key_of_another_algorithm_is_replaced(tmp_path):
    staged = tmp_path / "own.key"
    rsa_key = keys.staged_or_new_key(staged, "RSA-2048")
    ec_key = keys.staged_or_new_key(staged, "EC-P256")
    assert not public_keys_equal(rsa_key.public_key(), ec_key.public_key())
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)


def test_first_boot_in_csr_mode_installs_its_own_key(csr_device, cloud):
    run(csr_device, cloud)
    cert = x509.load_pem_x509_certificate((csr_device.cert_dir / CERT).read_bytes())
    assert public_keys_equal(cert.public_key(), installed_key(csr_device).public_key())
    assert isinstance(installed_key(csr_device), ec.EllipticCurvePrivateKey)
    assert stat.S_IMODE(os.stat(csr_device.cert_dir / KEY).st_mode) == 0o600
    assert sorted(os.listdir(csr_device.cert_dir)) == ["AmazonRootCA1.pem",
                                                       "certificate.pem.crt",
                                                       "installed-for.json", "private.pem.key",
                                                       "run.lock"]
    assert csr_device.device["PROVISION_STATUS"] == "True"
    assert CREATE not in [topic for topic, _ in cloud.published()]


def test_csr_mode_subscribes_once_and_sends_only_the_csr(csr_device, cloud):
    run(csr_device, cloud)
    subscribed = [c[1] for c in cloud.calls if c[0] == "subscribe"]
    assert sorted(subscribed) == sorted([CREATE_CSR + "/accepted", CREATE_CSR + "/rejected",
                                              REGISTER + "/accepted", REGISTER + "/rejected"])
    for _, payload in cloud.published():
        assert b"PRIVATE KEY" not in payload


def test_the_key_is_on_disk_before_anything_is_sent(csr_device, cloud):
    seen = []
    cloud.on_publish = lambda topic: seen.append(
        (topic, (csr_device.cert_dir / DEVICE_KEY).exists()))
    run(csr_device, cloud)
    assert seen[0] == (CREATE_CSR, True)


def test_a_key_left_by_an_interrupted_run_is_reused(csr_device, cloud):
    csr_device.cert_dir.mkdir(mode=0o700)
    left = keys.staged_or_new_key(csr_device.cert_dir / DEVICE_KEY, "EC-P256")
    run(csr_device, cloud)
    assert public_keys_equal(installed_key(csr_device).public_key(), left.public_key())
    csr = x509.load_pem_x509_csr(cloud.csrs[0].encode())
    assert public_keys_equal(csr.public_key(), left.public_key())


def test_a_key_the_service_sent_is_never_reused_in_csr_mode(csr_device, cloud):
    csr_device.cert_dir.mkdir(mode=0o700)
    _, service_key = cloud.ca.pair()
    (csr_device.cert_dir / STAGED_KEY).write_text(service_key)
    run(csr_device, cloud)
    sent = load_pem_private_key(service_key.encode(), None)
    assert not public_keys_equal(installed_key(csr_device).public_key(), sent.public_key())
    assert not (csr_device.cert_dir / STAGED_KEY).exists()


def test_a_retry_on_a_new_connection_reuses_the_same_key(csr_device, cloud):
    cloud.create_answers.append(None)
    run(csr_device, cloud)
    keys = [x509.load_pem_x509_csr(c.encode()).public_key() for c in cloud.csrs]
    assert len(keys) == 2 and public_keys_equal(*keys)


def test_a_certificate_without_our_public_key_is_refused(csr_device, cloud):
    cert, _ = cloud.ca.pair()
    cloud.create_answers.append(("accepted", {"certificateId": "ab" * 32, "certificatePem": cert,
                                              "certificateOwnershipToken": "t" * 8}))
    with pytest.raises(errors.ServiceError, match="does not carry this device's key"):
        run(csr_device, cloud)
    assert not (csr_device.cert_dir / CERT).exists()


def test_a_certificate_that_does_not_parse_is_refused_as_not_carrying_our_key(csr_device,
                                                                             cloud):
    garbled = "-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    cloud.create_answers.append(("accepted", {"certificateId": "ab" * 32,
                                              "certificatePem": garbled,
                                              "certificateOwnershipToken": "t" * 8}))
    with pytest.raises(errors.ServiceError, match="does not carry this device's key"):
        run(csr_device, cloud)
    assert not (csr_device.cert_dir / CERT).exists()


def test_a_rejected_csr_is_final_and_points_at_the_claim_policy_for_csr_mode(csr_device, cloud):
    cloud.create_answers.append(("rejected", {"statusCode": 403, "errorCode": "Forbidden",
                                              "errorMessage": "bad"}))
    with pytest.raises(errors.ServiceError,
                       match="CreateCertificateFromCsr rejected.*Forbidden") as err:
        run(csr_device, cloud)
    assert "$aws/certificates/create-from-csr/*" in err.value.hint
    assert "TEMPLATE_NAME" not in err.value.hint
    assert not (csr_device.cert_dir / CERT).exists()


def test_after_a_rejection_the_device_made_key_is_kept_and_reused(csr_device, cloud):
    cloud.create_answers.append(("rejected", {"statusCode": 400, "errorCode": "InvalidCsr",
                                              "errorMessage": "bad"}))
    with pytest.raises(errors.ServiceError):
        run(csr_device, cloud)
    assert stat.S_IMODE(os.stat(csr_device.cert_dir / DEVICE_KEY).st_mode) == 0o600
    run(csr_device, cloud)
    first, second = (x509.load_pem_x509_csr(c.encode()).public_key() for c in cloud.csrs)
    assert public_keys_equal(first, second)
    assert not (csr_device.cert_dir / DEVICE_KEY).exists()


def test_a_serial_id_longer_than_a_common_name_still_makes_a_valid_csr(csr_device, cloud):
    serial = "S" * 100  # a valid SERIAL_ID, and room for the fake's thing-name prefix
    csr_device.update(SERIAL_ID=serial)
    run(csr_device, cloud)
    csr = x509.load_pem_x509_csr(cloud.csrs[0].encode())
    assert csr.is_signature_valid
    common_name = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert len(common_name) == 64 and common_name.startswith(serial[:47])
    assert json.loads(cloud.registers()[0][1])["parameters"] == {"SerialNumber": serial}


@pytest.mark.parametrize("planted", ["other owner", "loose mode", "symlink"])
def test_a_key_someone_else_could_have_planted_is_never_adopted(csr_device, cloud, planted,
                                                               tmp_path):
    csr_device.cert_dir.mkdir(mode=0o700)
    target = csr_device.cert_dir / DEVICE_KEY
    source = tmp_path / "planted.key"
    planted_key = keys.staged_or_new_key(source, "EC-P256")
    if planted == "symlink":
        target.symlink_to(source)
    else:
        target.write_bytes(source.read_bytes())
        os.chmod(target, 0o644 if planted == "loose mode" else 0o600)
        if planted == "other owner":
            if os.geteuid() != 0:
                pytest.skip("only root can give a file to another user")
            os.chown(target, 4321, 4321)
    run(csr_device, cloud)
    csr = x509.load_pem_x509_csr(cloud.csrs[0].encode())
    assert not public_keys_equal(csr.public_key(), planted_key.public_key())


@pytest.mark.parametrize("key,value", [("PROVISIONING_API", "CreateFromCsr"),
                                       ("PROVISIONING_API", 1), ("KEY_ALGORITHM", "RSA-1024"),
                                       ("KEY_ALGORITHM", "ec-p256")])
def test_unknown_api_or_algorithm_is_a_config_error(csr_device, cloud, key, value):
    csr_device.update(**{key: value})
    with pytest.raises(errors.ConfigError, match=key):
        run(csr_device, cloud)
    assert cloud.calls == []
