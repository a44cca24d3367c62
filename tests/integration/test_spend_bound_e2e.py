"""The fleet guard's device side end to end: boot.py as systemd runs it, with the
camera's provisioning secret, against the stand-in's fleet inventory and hook; and
bounded spend against a stand-in that carries out every RegisterThing and never
answers it (a claim policy without iot:Receive)."""
import json
import os
import re
import secrets
import stat

import pytest

from e2e import DeviceState, run_script

RUNS = 10
# Long enough for a claim connection and both requests; the spend bound does not
# depend on it (the wait after an unanswered RegisterThing is a minute).
TIMEOUT = "6"


def claim_connections(standin) -> int:
    # The claim connection's client ID: the serial and a random part per attempt.
    seen = re.compile(rf" as {re.escape(standin.serial)}-[0-9a-f]{{16}} ")
    return len(seen.findall((standin.dir / "mosquitto.log").read_text()))




def secret_nowhere(standin, secret, outputs):
    for text in outputs:
        assert secret not in text and secret[:16] not in text
    cert_dir = standin.workdir / "cert"
    for path in [standin.config_path, *cert_dir.iterdir()]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_camera_with_its_secret_provisions_through_the_fleet_inventory(guarded):
    state = DeviceState(guarded)
    result = run_script("boot.py", guarded.config_path)
    assert result.code == 0, result.stderr
    assert state.check([result.stderr], completed=True) == {"installed": True, "status": True}
    hook, = guarded.events("hook")
    assert hook["allowProvisioning"] is True
    assert guarded.inventory.show(guarded.serial)["state"] == "provisioned"
    secret_nowhere(guarded, guarded.secret, [result.stderr])


def test_force_after_the_window_is_refused_by_the_inventory_until_the_operator_allows_it(
        after_window):
    guarded = after_window
    assert run_script("boot.py", guarded.config_path).code == 0
    cert_dir = guarded.workdir / "cert"
    installed = (cert_dir / "certificate.pem.crt").read_bytes()
    refused = run_script("boot.py", guarded.config_path, "--force")
    assert refused.code == 65, refused.stderr
    assert len(refused.errors) == 1, refused.stderr
    assert (f"the fleet inventory refused this camera (serial {guarded.serial}): RegisterThing "
            f"rejected: statusCode=403 errorCode=ACCESS_DENIED") in refused.errors[0]
    assert f"allow-reprovision {guarded.serial}" in refused.errors[0]
    assert (cert_dir / "certificate.pem.crt").read_bytes() == installed
    guarded.inventory.allow_reprovision(guarded.serial)
    again = run_script("boot.py", guarded.config_path, "--force")
    assert again.code == 0, again.stderr
    assert (cert_dir / "certificate.pem.crt").read_bytes() != installed
    assert not (cert_dir / "provisioning-spend.json").exists()
    secret_nowhere(guarded, guarded.secret, [refused.stderr, again.stderr])


def test_a_wrong_secret_is_refused_65_naming_the_inventory(guarded):
    guarded.secret_path.write_text("not-this-cameras-secret-0123456789\n")
    result = run_script("boot.py", guarded.config_path)
    assert result.code == 65, result.stderr
    assert "the fleet inventory refused this camera" in result.errors[0]
    assert [d["reason"] for d in guarded.events("hook")[-1]["decisions"]] == ["wrong-secret"]


@pytest.mark.heavy
def test_unanswered_registrations_back_to_back_mint_at_most_2_certificates(guarded):
    standin = guarded
    device = json.loads(standin.config_path.read_text())["device"]
    if "PROVISIONING_SECRET_FILE" in device:  # the factory's, made by the stand-in
        secret = (standin.config_path.parent / device["PROVISIONING_SECRET_FILE"]
                  ).read_text().strip()
    else:
        secret = secrets.token_urlsafe(32)
        secret_file = standin.workdir / "provisioning-secret"
        secret_file.write_text(secret + "\n")
        os.chmod(secret_file, 0o600)
        standin.write_device_config(PROVISIONING_SECRET_FILE="provisioning-secret")
    standin.faults.drop_register_answers = True

    results = []
    for run in range(RUNS):
        requests_before = [e for e in standin.events() if e["event"].endswith("-request")]
        connections_before = claim_connections(standin)
        result = run_script("boot.py", standin.config_path, "--timeout", TIMEOUT)
        results.append(result)
        assert result.code == 75, result.stderr
        assert len(result.errors) == 1, result.stderr
        if run == 0:
            assert claim_connections(standin) > connections_before
            assert "RegisterThing: no answer" in result.errors[0]
            assert "check that the claim policy allows iot:Receive on " in result.errors[0]
            assert "the next provisioning attempt is allowed at" in result.errors[0]
            continue
        # Inside the wait: at once, nothing sent, not even a connection.
        assert "provisioning held back, nothing sent" in result.errors[0]
        assert "allowed at 20" in result.errors[0]
        assert result.seconds < 5
        assert [e for e in standin.events() if e["event"].endswith("-request")] == \
            requests_before
        assert claim_connections(standin) == connections_before

    created = standin.events("create-accepted")
    assert 1 <= len(created) <= 2
    # Each registration happened at the service (an orphan the bound keeps to few).
    assert len(standin.events("register-answer-dropped")) == len(created)
    registers = standin.events("register-request")
    # Sent with each (a stand-in may keep it out of its record).
    assert registers and all(r["parameters"].get("ProvisioningSecret") in (secret, "<redacted>")
                             for r in registers)

    cert_dir = standin.workdir / "cert"
    record = cert_dir / "provisioning-spend.json"
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
    assert "register-sent" in record.read_text()
    for result in results:
        assert secret not in result.stderr and secret[:16] not in result.stderr
    for path in [standin.config_path, *cert_dir.iterdir()]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_hook_refusal_is_65_at_once_with_one_line_naming_the_fleet_inventory(
        standin):
    from iot_standin import Rejection
    standin.faults.reject_register = Rejection(
        403, "ACCESS_DENIED", "ACCESS_DENIED: the pre-provisioning hook did not allow this")
    result = run_script("boot.py", standin.config_path, "--timeout", "20")
    assert result.code == 65, result.stderr
    assert len(result.errors) == 1, result.stderr
    line = result.errors[0]
    assert f"the fleet inventory refused this camera (serial {standin.serial})" in line
    assert f"`python cloud/inventory.py show {standin.serial}`" in line
    assert len(standin.events("register-request")) == 1
    assert not (standin.workdir / "cert" / "certificate.pem.crt").exists()


def after_a_lost_answer(standin):
    """A run whose RegisterThing answer is lost (75), then, once its wait has passed,
    the next run with answers coming again: that run's result."""
    from e2e import let_the_spend_wait_pass
    standin.faults.drop_register_answers = True
    first = run_script("boot.py", standin.config_path, "--timeout", TIMEOUT)
    assert first.code == 75, first.stderr
    assert let_the_spend_wait_pass(standin.workdir / "cert")
    standin.faults.drop_register_answers = False
    return run_script("boot.py", standin.config_path, "--timeout", TIMEOUT)


@pytest.mark.heavy
def test_a_lost_registerthing_answer_then_the_next_run_provisions_within_the_window(guarded):
    """The hook recorded the registration whose answer was lost as this camera's; the
    camera's next attempt, with its own secret, is a re-registration within the
    window: it provisions, and the lost one's certificate is named for the operator."""
    second = after_a_lost_answer(guarded)
    assert second.code == 0, second.stderr
    assert len(guarded.events("register-request")) == 2
    assert [h["allowProvisioning"] for h in guarded.events("hook")] == [True, True]
    decision, = guarded.events("hook")[-1]["decisions"]
    assert decision["reason"] == "reregistration-within-window"
    record = guarded.inventory.show(guarded.serial)
    assert record["state"] == "provisioned" and record["registrations"] == 2
    orphan, installed = record["certificateIds"]
    assert decision["replacesCertificateId"] == orphan
    assert [e["certificateId"] for e in guarded.events("register-accepted")] == [orphan,
                                                                                 installed]


@pytest.mark.heavy
def test_after_the_window_a_lost_answer_then_the_inventory_refusing_says_why(after_window):
    """Once the window has passed, the next registration is refused as already
    provisioned, and the line says the lost one may have been it (the operator's
    allow-reprovision is the way)."""
    guarded = after_window
    second = after_a_lost_answer(guarded)
    assert second.code == 65, second.stderr
    assert "got no answer and may have been that registration" in second.errors[0]
    assert f"allow-reprovision {guarded.serial}" in second.errors[0]
    assert [d["reason"] for d in guarded.events("hook")[-1]["decisions"]] == \
        ["already-provisioned"]
    guarded.inventory.allow_reprovision(guarded.serial)
    third = run_script("boot.py", guarded.config_path)
    assert third.code == 0, third.stderr
