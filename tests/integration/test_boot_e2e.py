"""boot.py and update_boot_status.py end to end over mutual TLS against the stand-in."""
import ctypes
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fakes import public_keys_equal
from e2e import device_doc, run_script


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_first_boot_provisions_installs_and_reports(standin):
    before = device_doc(standin)
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr

    cert_dir = standin.workdir / "cert"
    assert mode(cert_dir) == 0o700
    assert mode(cert_dir / "certificate.pem.crt") == 0o644
    assert mode(cert_dir / "private.pem.key") == 0o600
    assert mode(cert_dir / "AmazonRootCA1.pem") == 0o644
    # The stack's template returns a deviceConfiguration; it is kept beside the pair.
    assert mode(cert_dir / "device-configuration.json") == 0o644
    assert sorted(os.listdir(cert_dir)) == ["AmazonRootCA1.pem", "certificate.pem.crt",
                                           "device-configuration.json", "installed-for.json",
                                           "private.pem.key", "run.lock"]
    cert = x509.load_pem_x509_certificate((cert_dir / "certificate.pem.crt").read_bytes())
    key = load_pem_private_key((cert_dir / "private.pem.key").read_bytes(), None)
    assert public_keys_equal(cert.public_key(), key.public_key())
    assert cert.issuer == standin.ca.cert.subject
    assert (cert_dir / "AmazonRootCA1.pem").read_bytes() == standin.ca_path.read_bytes()

    after = device_doc(standin)
    assert after["camera"] == before["camera"]
    assert after["device"]["PROVISION_STATUS"] == "True"
    accepted = standin.events("register-accepted")[0]
    assert after["device"]["THING_NAME"] == accepted["thingName"] == "ento-CAM-0001"
    assert after["device"]["CERTIFICATE_ID"] == accepted["certificateId"]
    assert {k: v for k, v in after["device"].items()
            if k not in ("PROVISION_STATUS", "THING_NAME", "CERTIFICATE_ID")} == {
        k: v for k, v in before["device"].items() if k != "PROVISION_STATUS"}
    assert mode(standin.config_path) == 0o640

    boots = standin.wait_for("boot")
    assert [(b["topic"], b["payload"]) for b in boots] == [
        ("cameraDevice/CAM-0001/booted", '{"serialID": "CAM-0001", "bootStatus": true}')]
    register = standin.events("register-request")[0]
    # With the camera's secret from PROVISIONING_SECRET_FILE (the stand-in keeps it
    # out of its record).
    assert register["parameters"] == {"SerialNumber": "CAM-0001",
                                      "ProvisioningSecret": "<redacted>"}
    assert register["token_valid"] is True


def test_second_boot_reports_again_without_a_new_certificate(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    cert_dir = standin.workdir / "cert"
    files = {p.name: p.read_bytes() for p in cert_dir.iterdir()}
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert len(standin.wait_for("boot", 2)) == 2
    assert len(standin.events("create-request")) == 1
    assert len(standin.events("register-request")) == 1
    assert {p.name: p.read_bytes() for p in cert_dir.iterdir()} == files


def test_update_boot_status_alone_reports_with_the_installed_credentials(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    result = run_script("update_boot_status.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert len(standin.wait_for("boot", 2)) == 2


def test_update_boot_status_without_credentials_exits_78(standin):
    before = standin.config_path.read_bytes()
    result = run_script("update_boot_status.py", standin.config_path)
    assert result.code == 78
    assert len(result.lines) == 1 and "no device credentials" in result.stderr
    assert standin.config_path.read_bytes() == before


def test_no_secret_reaches_the_output(standin):
    result = run_script("boot.py", standin.config_path, "-v")
    assert result.code == 0
    assert "PRIVATE KEY" not in result.stderr and "BEGIN" not in result.stderr
    tokens = standin.issued_tokens()
    assert tokens
    for token in tokens:
        assert token not in result.stderr


def test_a_device_configuration_of_numbers_and_objects_is_kept_and_the_registration_used(
        standin):
    import json
    configuration = {"Fps": 2, "Zones": {"north": "on"}, "Night": True}
    standin.faults.device_configuration = configuration
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    stored = standin.workdir / "cert" / "device-configuration.json"
    assert json.loads(stored.read_text()) == configuration
    warnings = [line for line in result.lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "deviceConfiguration" in warnings[0]
    assert len(standin.events("register-request")) == 1
    assert device_doc(standin)["device"]["PROVISION_STATUS"] == "True"


def test_a_cloned_image_sets_the_other_cameras_pair_aside_and_provisions_itself(standin):
    import json
    assert run_script("boot.py", standin.config_path).code == 0
    cert_dir = standin.workdir / "cert"
    first = (cert_dir / "certificate.pem.crt").read_bytes()
    doc = device_doc(standin)
    doc["device"]["SERIAL_ID"] = "CAM-0002"  # the copy, given its own serial at flashing
    doc["device"]["PROVISIONING_SECRET_FILE"] = standin.inventory.add(
        "CAM-0002", standin.workdir).name  # and its own secret, as the factory makes them
    standin.config_path.write_text(json.dumps(doc))
    result = run_script("boot.py", standin.config_path, "--timeout", "30")
    assert result.code == 0, result.stderr
    warnings = [line for line in result.lines if line.startswith("WARNING")]
    assert any("CAM-0001" in line and "CAM-0002" in line for line in warnings), warnings
    assert (cert_dir / "foreign-CAM-0001" / "certificate.pem.crt").read_bytes() == first
    assert (cert_dir / "certificate.pem.crt").read_bytes() != first
    boots = standin.wait_for("boot", 2)
    assert boots[-1]["topic"] == "cameraDevice/CAM-0002/booted"


def test_an_image_copied_while_its_registration_waited_to_be_installed_is_not_adopted(standin):
    # The camera the image came from was cut off (power, a full disk) after
    # RegisterThing was accepted and before its pair was installed: its card holds
    # that camera's registration record and staged pair.  The copy must not install
    # them as its own: it would connect as the other camera's thing (dropping that
    # camera's connection) and be refused its boot message at every retry.
    import json
    from e2e import run_and_kill
    cert_dir = standin.workdir / "cert"
    marker = cert_dir / "registration.json.staging"
    killed, _ = run_and_kill(standin, marker.exists)
    assert killed and marker.exists()
    staged = (cert_dir / "certificate.pem.crt.staging").read_bytes()
    doc = device_doc(standin)
    doc["device"]["SERIAL_ID"] = "CAM-0002"  # the copy, given its own serial at flashing
    doc["device"]["PROVISIONING_SECRET_FILE"] = standin.inventory.add(
        "CAM-0002", standin.workdir).name
    standin.config_path.write_text(json.dumps(doc))
    result = run_script("boot.py", standin.config_path, "--timeout", "30")
    assert result.code == 0, result.stderr
    aside = cert_dir / "foreign-CAM-0001"  # neither used nor deleted
    assert (aside / "certificate.pem.crt.staging").read_bytes() == staged
    assert json.loads((aside / "registration.json.staging").read_text())["thingName"] == \
        "ento-CAM-0001"
    assert stat.S_IMODE(aside.stat().st_mode) == 0o700
    assert (cert_dir / "certificate.pem.crt").read_bytes() != staged
    assert device_doc(standin)["device"]["THING_NAME"] == "ento-CAM-0002"
    assert json.loads((cert_dir / "installed-for.json").read_text())["thingName"] == \
        "ento-CAM-0002"
    assert standin.wait_for("boot", 1)[-1]["topic"] == "cameraDevice/CAM-0002/booted"



def opens_of(path: Path) -> Callable[[], int]:
    """How many times ``path`` has been opened since this call (inotify's IN_OPEN)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, bytes(path), 0x20) >= 0, ctypes.get_errno()
    seen = []

    def count() -> int:
        while True:
            try:
                events = os.read(fd, 65536)
            except BlockingIOError:
                return len(seen)
            while events:
                _, mask, _, size = struct.unpack_from("iIII", events)
                seen.append(mask)
                events = events[16 + size:]
    return count


def test_no_run_reads_the_systems_ca_bundle(standin, tmp_path):
    # Every connection trusts ROOT_CA alone. The TLS library loads the system's
    # bundle into each context anyway before dropping it (4.5 ms a context, six in
    # a first boot): only cost, and a fallback no connection should have.
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
                       if Path("/etc/ssl/certs/ca-certificates.crt").exists() else b"")
    opened = opens_of(bundle)
    env = {"SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": str(tmp_path)}
    assert run_script("boot.py", standin.config_path, env=env).code == 0
    assert run_script("boot.py", standin.config_path, "--check", env=env).code == 0
    assert run_script("update_boot_status.py", standin.config_path, env=env).code == 0
    assert opened() == 0
    # The watch itself sees an open: the test would catch a run that read it.
    bundle.read_bytes()
    assert opened() == 1



@pytest.mark.heavy
def test_a_broker_certificate_that_does_not_verify_names_root_ca_and_the_clock_even_when_time_runs_out(
        standin):
    # A clock far ahead makes the broker's certificate look expired; awscrt answers a
    # certificate that does not verify only after 10-30 s, so the run's (or the step's)
    # time limit often comes first: that line too must name ROOT_CA and the clock, not
    # only "no answer ... the network link" from a broker that did answer.
    from standin.ca import StandInCA
    assert run_script("boot.py", standin.config_path).code == 0
    (standin.workdir / "cert" / "AmazonRootCA1.pem").write_bytes(StandInCA("Another CA").pem)
    result = run_script("update_boot_status.py", standin.config_path, "--timeout", "3")
    assert result.code == 75, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, result.stderr
    assert "ROOT_CA" in errors[0] and "the system clock (it reads " in errors[0], errors[0]


def test_the_largest_timeout_accepted_runs_without_a_traceback(standin):
    # "a finite positive number": 1e300 is one, and no wait may choke on it.
    for script, args in (("boot.py", ()), ("update_boot_status.py", ()),
                         ("boot.py", ("--check",))):
        result = run_script(script, standin.config_path, "--timeout", "1e300", *args)
        assert result.code == 0, result.stderr
        assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
