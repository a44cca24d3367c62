"""KEY_STORAGE "pkcs11": boot.py and update_boot_status.py as processes, with the device
key in a SoftHSM2 token of the test's own, against the stand-in."""
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from entomologist import stop
from e2e import HELD_BACK, changed, let_the_spend_wait_pass, run_and_kill, run_script
from iot_standin import StandIn
from softhsm import SOFTHSM_MODULE, make_token

FINAL, STAGING = "entomologist-device", "entomologist-device.staging"


@pytest.fixture
def standin(tmp_path):
    """The stack deployed for CSR mode, the only mode a token key can use."""
    with StandIn(tmp_path, mode="CreateCertificateFromCsr") as s:
        yield s


@pytest.fixture
def token(tmp_path, monkeypatch):
    return make_token(tmp_path / "hsm", monkeypatch=monkeypatch)


@pytest.fixture
def device(standin, token):
    standin.write_device_config(PROVISIONING_API="CreateCertificateFromCsr",
                                KEY_STORAGE="pkcs11", PKCS11_LIBRARY=str(SOFTHSM_MODULE),
                                PKCS11_TOKEN_LABEL=token.label,
                                PKCS11_PIN_FILE=str(token.pin_file))
    return standin


def boot(device, token, *args, script="boot.py"):
    return run_script(script, device.config_path, *args, env=token.env)


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def labels(token) -> list[tuple[str, str]]:
    return [(cls, label) for cls, label, _ in token.objects()]


def no_key_files(device) -> None:
    for path in device.workdir.rglob("*"):
        if path.is_file() and "standin" not in path.parts and "hsm" not in path.parts:
            assert b"PRIVATE KEY" not in path.read_bytes() or "claim" in path.parts, path


def test_first_boot_makes_the_key_in_the_token_and_writes_no_key_file(device, token):
    result = boot(device, token)
    assert result.code == 0, result.stderr
    assert labels(token) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]
    attributes = token.private_key_attributes(FINAL)
    assert attributes["SENSITIVE"] and not attributes["EXTRACTABLE"] and attributes["TOKEN"]
    cert_dir = device.workdir / "cert"
    assert sorted(p.name for p in cert_dir.iterdir()) == [
        "AmazonRootCA1.pem", "certificate.pem.crt", "device-configuration.json",
        "installed-for.json", "run.lock"]
    no_key_files(device)
    cert = x509.load_pem_x509_certificate((cert_dir / "certificate.pem.crt").read_bytes())
    (public_der,) = [pub for pub in _token_public_keys(token)]
    assert spki(cert.public_key()) == public_der
    assert device.wait_for("boot", 1)
    assert json.loads(device.config_path.read_text())["device"]["PROVISION_STATUS"] == "True"


def _token_public_keys(token):
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.util.ec import encode_ec_public_key
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    try:
        with lib.get_token(token_label=token.label).open(user_pin="4711-test-pin") as s:
            return [encode_ec_public_key(k) for k in s.get_objects(
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: FINAL})]
    finally:
        lib.finalize()


def test_second_boot_asks_nothing_and_reports_with_the_token_key(device, token):
    assert boot(device, token).code == 0
    requests = len([e for e in device.events() if e["event"].endswith("-request")])
    for script in ("boot.py", "update_boot_status.py"):
        result = boot(device, token, script=script)
        assert result.code == 0, result.stderr
    assert len([e for e in device.events() if e["event"].endswith("-request")]) == requests
    assert len(device.wait_for("boot", 3)) == 3
    assert labels(token) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]


def test_a_wrong_pin_is_78_and_nothing_is_sent(device, token):
    token.pin_file.write_text("0000\n")
    result = boot(device, token)
    assert result.code == 78, result.stderr
    assert "0000" not in result.stderr
    assert [e for e in device.events() if e["event"].endswith("-request")] == []


def test_a_missing_module_is_75(device, token, tmp_path):
    device.write_device_config(PROVISIONING_API="CreateCertificateFromCsr",
                               KEY_STORAGE="pkcs11", PKCS11_LIBRARY=str(tmp_path / "none.so"),
                               PKCS11_TOKEN_LABEL=token.label,
                               PKCS11_PIN_FILE=str(token.pin_file))
    result = boot(device, token)
    assert result.code == 75, result.stderr


def stalled(token) -> None:
    """The token's store hangs on its next read (a card or a TPM that stops answering):
    SoftHSM opens its token.object, here a FIFO nobody writes, without a time limit."""
    import os
    path = token.token_file()
    path.unlink()
    os.mkfifo(path, 0o600)


@pytest.mark.heavy  # waits out a 3 s time limit and its backstop's grace
def test_a_token_that_stops_answering_ends_the_run_at_its_time_limit_with_75(device, token):
    stalled(token)
    result = run_script("boot.py", device.config_path, "--timeout", "3", env=token.env,
                        timeout=30)
    assert result.code == 75, result.stderr
    # The limit, the grace, and the interpreter's start on a loaded machine.
    assert result.seconds < 3 + stop.LIMIT_GRACE_S + 7, result.seconds
    assert len(result.errors) == 1 and "time limit (3 s)" in result.errors[0], result.stderr
    assert [e for e in device.events() if e["event"].endswith("-request")] == []


@pytest.mark.heavy  # waits out a 3 s time limit and its backstop's grace
def test_a_token_that_stops_answering_ends_the_check_at_its_time_limit_with_75(device, token):
    import os
    import subprocess
    import sys
    import time
    from e2e import ROOT
    stalled(token)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "boot.py"), "--config",
                           str(device.config_path), "--check", "--timeout", "3"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **token.env})
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert time.monotonic() - started < 3 + stop.LIMIT_GRACE_S + 7
    lines = proc.stdout.splitlines()
    assert lines[-2].startswith("FAIL token       did not end within the check's time limit "
                                "(3 s)"), proc.stdout
    assert lines[-1].startswith("exit 75: transient"), proc.stdout


def test_pkcs11_without_csr_mode_is_a_config_error(device, token):
    doc = json.loads(device.config_path.read_text())
    doc["device"]["PROVISIONING_API"] = "CreateKeysAndCertificate"
    device.config_path.write_text(json.dumps(doc))
    result = boot(device, token)
    assert result.code == 78 and "PROVISIONING_API" in result.errors[0], result.stderr


def test_the_key_object_gone_means_provision_again(device, token):
    assert boot(device, token).code == 0
    import pkcs11
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    try:
        with lib.get_token(token_label=token.label).open(rw=True,
                                                         user_pin="4711-test-pin") as s:
            for obj in s.get_objects({pkcs11.Attribute.LABEL: FINAL}):
                obj.destroy()
    finally:
        lib.finalize()
    result = boot(device, token)
    assert result.code == 0, result.stderr
    assert len(device.events("csr-request")) == 2
    assert labels(token) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]


def event_after(standin, name):
    since = len(standin.events(name))
    return lambda: len(standin.events(name)) > since


def file_after(standin, name):
    return changed(standin.workdir / "cert" / name)


STEPS = {
    "after the CSR request": (lambda s: event_after(s, "csr-request"), 0.3),
    "after the register request": (lambda s: event_after(s, "register-request"), 0.3),
    "after the registration record": (
        lambda s: lambda: (s.workdir / "cert" / "registration.json.staging").exists(), 0.0),
    "after installing": (lambda s: file_after(s, "certificate.pem.crt"), 0.0),
}


@pytest.mark.parametrize("force", [False, True], ids=["first boot", "--force"])
@pytest.mark.parametrize("step", list(STEPS))
def test_killed_at_each_step_the_next_run_completes_with_one_key_and_no_orphans(
        device, token, step, force):
    if force:
        assert boot(device, token).code == 0
    make_trigger, delay = STEPS[step]
    device.faults.delay = delay
    claim = device.claim_key.read_bytes()
    token_file = token.token_file().read_bytes()
    killed, output = run_and_kill(device, make_trigger(device),
                                  *(["--force"] if force else []), env=token.env)
    assert killed, step
    token.mend_torn_token_file(token_file)
    # Killed while the new key's label was being changed, SoftHSM may have lost
    # half of it: then the registration is gone with it, as a lost key file's would be.
    torn = token.torn_objects()
    device.faults.delay = 0.0
    result = boot(device, token)
    if result.code == 75 and HELD_BACK in result.stderr:
        # Killed awaiting RegisterThing's answer (or with the key torn): a new
        # certificate waits; then it may.
        assert (step == "after the register request" and not force) or torn, step
        assert let_the_spend_wait_pass(device.workdir / "cert")
        result = boot(device, token)
    assert result.code == 0, output + result.stderr
    doc = json.loads(device.config_path.read_text())["device"]
    assert doc["PROVISION_STATUS"] == "True" and device.wait_for("boot", 1 + force)
    assert device.claim_key.read_bytes() == claim
    names = sorted(p.name for p in (device.workdir / "cert").iterdir())
    if force and step in ("after the CSR request", "after the register request"):
        # The old pair stays installed, and with it the record of what the killed
        # run may have spent, until a pair is installed.
        names.remove("provisioning-spend.json")
    elif step == "after installing" and "provisioning-spend.json" in names:
        # Killed after the registration record went and before the spend record
        # did: a sound pair with a spend record is also what a --force run killed
        # before registering leaves, so it stays; it only ever holds back.
        names.remove("provisioning-spend.json")
    assert names == [
        "AmazonRootCA1.pem", "certificate.pem.crt", "device-configuration.json",
        "installed-for.json", "run.lock"]
    no_key_files(device)
    assert labels(token) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]
    cert = x509.load_pem_x509_certificate(
        (device.workdir / "cert" / "certificate.pem.crt").read_bytes())
    assert spki(cert.public_key()) == _token_public_keys(token)[0]


CONSTRUCTOR_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void ran(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("constructor ran\n", f); fclose(f); }
}
"""


def test_a_module_others_can_write_is_78_and_never_loaded(device, token, tmp_path):
    import subprocess
    open_folder = tmp_path / "anyone-writes"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    marker = tmp_path / "constructor-ran"
    source = tmp_path / "evil.c"
    source.write_text(CONSTRUCTOR_SOURCE)
    module = open_folder / "libevil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(module),
                    str(source)], check=True)
    module.chmod(0o777)
    device.write_device_config(PROVISIONING_API="CreateCertificateFromCsr",
                               KEY_STORAGE="pkcs11", PKCS11_LIBRARY=str(module),
                               PKCS11_TOKEN_LABEL=token.label,
                               PKCS11_PIN_FILE=str(token.pin_file))
    result = boot(device, token)
    assert result.code == 78, result.stderr
    assert not marker.exists()
    error = result.errors[-1]
    assert "PKCS#11 module" in error and "written by group or others" in error
    # The module itself tight, its folder still open to everyone: refused all the same.
    module.chmod(0o755)
    result = boot(device, token)
    assert result.code == 78, result.stderr
    assert not marker.exists()
    assert "anyone-writes" in result.errors[-1]


def test_a_folder_given_as_the_module_is_78(device, token, tmp_path):
    device.write_device_config(PROVISIONING_API="CreateCertificateFromCsr",
                               KEY_STORAGE="pkcs11", PKCS11_LIBRARY=str(tmp_path),
                               PKCS11_TOKEN_LABEL=token.label,
                               PKCS11_PIN_FILE=str(token.pin_file))
    result = boot(device, token)
    assert result.code == 78, result.stderr
    assert "not a regular file" in result.errors[-1]


def _add_foreign_pair(token, key_id: bytes | None) -> None:
    """Another program's RSA pair under our final label; ``key_id`` None: the same
    CKA_ID as the product's own pair."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    try:
        with lib.get_token(token_label=token.label).open(rw=True,
                                                         user_pin="4711-test-pin") as s:
            if key_id is None:
                (ours,) = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                         Attribute.LABEL: FINAL})
                key_id = bytes(ours[Attribute.ID])
            s.generate_keypair(pkcs11.KeyType.RSA, 2048, store=True, label=FINAL, id=key_id)
    finally:
        lib.finalize()


@pytest.mark.parametrize("key_id", [None, b"another-app"], ids=["same ID", "own ID"])
def test_a_key_pair_another_program_put_under_our_label_is_78_and_nothing_is_deleted(
        device, token, key_id):
    assert boot(device, token).code == 0
    _add_foreign_pair(token, key_id)
    before = token.objects()
    result = boot(device, token)
    assert result.code == 78, result.stderr
    assert "that this program did not make" in result.errors[-1] or \
        "share the CKA_ID" in result.errors[-1], result.stderr
    assert token.objects() == before
    assert len([e for e in device.events() if e["event"] == "register-request"]) == 1
