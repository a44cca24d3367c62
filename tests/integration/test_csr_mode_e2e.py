"""CreateCertificateFromCsr mode end to end: the private key never crosses the network."""
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from e2e import DeviceState, device_doc, run_and_kill, run_script
from iot_standin import Rejection, StandIn
from standin.ca import public_key_id


@pytest.fixture
def standin(tmp_path):
    """The stack deployed with ProvisioningMode Both: its claim policy allows either
    mode (test_the_record_does_show_a_private_key_in_the_default_mode uses the other)."""
    with StandIn(tmp_path, mode="Both") as s:
        yield s


def csr_mode(standin, **extra):
    standin.write_device_config(PROVISIONING_API="CreateCertificateFromCsr", **extra)


def installed_key_id(standin):
    pem = (standin.workdir / "cert" / "private.pem.key").read_bytes()
    return public_key_id(load_pem_private_key(pem, None).public_key())


def test_first_boot_in_csr_mode_and_no_answer_held_a_private_key(standin):
    csr_mode(standin)
    state = DeviceState(standin)
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert state.check([result.stderr], completed=True) == {"installed": True, "status": True}
    assert len(standin.events("csr-request")) == 1 and standin.events("create-request") == []
    parsed, = standin.events("csr-parsed")
    assert parsed["subject"] == "CN=CAM-0001"
    assert parsed["public_key"] == installed_key_id(standin)
    answers = standin.events("answer")
    assert answers and not any(a["holds_private_key"] for a in answers)


def test_the_record_does_show_a_private_key_in_the_default_mode(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    assert any(a["holds_private_key"] for a in standin.events("answer"))


def test_rsa_keys_in_csr_mode(standin):
    csr_mode(standin, KEY_ALGORITHM="RSA-2048")
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert "BEGIN PRIVATE KEY" in (standin.workdir / "cert" / "private.pem.key").read_text()
    assert load_pem_private_key((standin.workdir / "cert" / "private.pem.key").read_bytes(),
                                None).key_size == 2048


def test_second_boot_in_csr_mode_only_reports(standin):
    csr_mode(standin)
    assert run_script("boot.py", standin.config_path).code == 0
    key_id = installed_key_id(standin)
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert len(standin.events("csr-request")) == 1
    assert len(standin.wait_for("boot", 2)) == 2
    assert installed_key_id(standin) == key_id


def test_a_rejected_csr_exits_65_with_nothing_installed(standin):
    csr_mode(standin)
    standin.faults.reject_create = Rejection(400, "InvalidCsr", "the CSR is invalid")
    state = DeviceState(standin)
    result = run_script("boot.py", standin.config_path)
    assert result.code == 65, result.stderr
    assert "CreateCertificateFromCsr rejected: statusCode=400 errorCode=InvalidCsr" in \
        result.errors[0]
    assert state.check([result.stderr], completed=False) == {"installed": False, "status": False}
    # Only the key made here stays, for the next run to reuse (a rejected create
    # spent nothing: no spend record).
    assert sorted(p.name for p in (standin.workdir / "cert").iterdir()) == [
        "private.pem.key.device-made", "run.lock"]


def test_killed_between_key_and_certificate_the_next_run_reuses_the_key(standin):
    csr_mode(standin)
    standin.faults.delay = 0.5
    state = DeviceState(standin)
    killed, output = run_and_kill(standin, lambda: bool(standin.events("csr-parsed")))
    assert killed
    staged = standin.workdir / "cert" / "private.pem.key.device-made"
    assert staged.exists()
    first_key = standin.events("csr-parsed")[0]["public_key"]
    state.check([output], completed=False)
    standin.faults.delay = 0.0
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert "reusing the EC-P256 key staged by an interrupted run" in result.stderr
    assert [e["public_key"] for e in standin.events("csr-parsed")] == [first_key, first_key]
    assert installed_key_id(standin) == first_key
    assert state.check([output, result.stderr], completed=True) == {"installed": True,
                                                                   "status": True}
    assert device_doc(standin)["device"]["PROVISION_STATUS"] == "True"
