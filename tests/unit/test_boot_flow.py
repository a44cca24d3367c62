"""boot.py's flow against the fake cloud: real files in tmp_path, modes asserted."""
import json
import logging
import os
import stat

import pytest

import boot
import ento
from fakes import CREATE

REGISTER = "$aws/provisioning-templates/Fleet/provision/json"


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def run(device, cloud, force=False, seconds=60.0, sleeps=None):
    sleeps = [] if sleeps is None else sleeps
    boot.boot(device.config_path, ento.Deadline(seconds), force=force, connect=cloud,
              sleep=sleeps.append)


def assert_no_credentials(device):
    assert not (device.cert_dir / ento.CERT_FILE).exists()
    assert not (device.cert_dir / ento.KEY_FILE).exists()


def test_first_boot_installs_credentials_with_their_modes(device, cloud):
    run(device, cloud)
    cert_dir = device.cert_dir
    assert mode(cert_dir) == 0o700
    assert mode(cert_dir / "certificate.pem.crt") == 0o644
    assert mode(cert_dir / "private.pem.key") == 0o600
    assert mode(cert_dir / "AmazonRootCA1.pem") == 0o644
    issued = cloud.issued[0]
    assert (cert_dir / "certificate.pem.crt").read_text() == issued["certificatePem"]
    assert (cert_dir / "private.pem.key").read_text() == issued["privateKey"]
    assert (cert_dir / "AmazonRootCA1.pem").read_text() == cloud.ca.pem
    assert sorted(os.listdir(cert_dir)) == ["AmazonRootCA1.pem", "certificate.pem.crt",
                                           "private.pem.key"]


def test_first_boot_records_thing_certificate_and_status_keeping_other_keys(device, cloud):
    before = device.doc()
    run(device, cloud)
    after = device.doc()
    assert after["camera"] == before["camera"]
    for key, value in before["device"].items():
        if key != "PROVISION_STATUS":
            assert after["device"][key] == value
    assert after["device"]["PROVISION_STATUS"] == "True"
    assert after["device"]["THING_NAME"] == "thing-CAM-42"
    assert after["device"]["CERTIFICATE_ID"] == cloud.issued[0]["certificateId"]
    assert mode(device.config_path) == 0o640


def test_claim_connection_makes_only_connect_subscribe_create_register(device, cloud):
    run(device, cloud)
    claim_calls = cloud.calls[:cloud.calls.index(("close",)) + 1]
    kinds = [c[0] if c[0] != "publish" else ("publish", c[1]) for c in claim_calls
             if c[0] != "receive"]
    assert kinds == ["connect", "subscribe", ("publish", CREATE), ("publish", REGISTER), "close"]
    subscribed = claim_calls[1][1]
    assert sorted(subscribed) == sorted([CREATE + "/accepted", CREATE + "/rejected",
                                         REGISTER + "/accepted", REGISTER + "/rejected"])
    assert claim_calls[0] == ("connect", "CAM-42", "claim.pem.crt")


def test_register_thing_sends_token_and_default_parameters(device, cloud):
    run(device, cloud)
    (_, payload), = cloud.published(REGISTER)
    assert json.loads(payload) == {
        "certificateOwnershipToken": cloud.issued[0]["certificateOwnershipToken"],
        "parameters": {"SerialNumber": "CAM-42"}}


def test_register_thing_sends_configured_template_parameters(device, cloud):
    device.update(TEMPLATE_PARAMETERS={"SerialNumber": "CAM-42", "Site": "north"})
    run(device, cloud)
    (_, payload), = cloud.published(REGISTER)
    assert json.loads(payload)["parameters"] == {"SerialNumber": "CAM-42", "Site": "north"}


def test_new_key_is_staged_durably_before_register_thing_is_sent(device, cloud):
    seen = {}

    def on_register(payload):
        staged = device.cert_dir / ento.STAGING_KEY_FILE
        seen["mode"] = mode(staged)
        seen["key"] = staged.read_text()
        seen["cert_installed"] = (device.cert_dir / ento.CERT_FILE).exists()

    cloud.on_register = on_register
    run(device, cloud)
    assert seen == {"mode": 0o600, "key": cloud.issued[0]["privateKey"], "cert_installed": False}
    assert not (device.cert_dir / ento.STAGING_KEY_FILE).exists()


def test_boot_message_uses_device_certificate_and_thing_name(device, cloud):
    run(device, cloud)
    assert cloud.connections[-1][:2] == ("thing-CAM-42", "certificate.pem.crt")
    assert cloud.published("cameraDevice/") == [
        ("cameraDevice/CAM-42/booted", b'{"serialID": "CAM-42", "bootStatus": true}')]


def test_later_boot_only_reports_and_does_not_rewrite_the_config(device, cloud):
    run(device, cloud)
    inode = os.stat(device.config_path).st_ino
    cloud.calls.clear()
    run(device, cloud)
    assert [c[0] for c in cloud.calls] == ["connect", "publish", "close"]
    assert len(cloud.issued) == 1
    assert os.stat(device.config_path).st_ino == inode


def test_installed_credentials_win_over_a_false_status(device, cloud):
    run(device, cloud)
    device.update(PROVISION_STATUS="False")
    cloud.calls.clear()
    run(device, cloud)
    assert len(cloud.issued) == 1
    assert device.device["PROVISION_STATUS"] == "True"


def test_true_status_without_credentials_warns_and_provisions_again(device, cloud, caplog):
    device.update(PROVISION_STATUS="True")
    with caplog.at_level(logging.WARNING):
        run(device, cloud)
    assert "PROVISION_STATUS is True but no certificate" in caplog.text
    assert len(cloud.issued) == 1


def test_a_key_that_does_not_match_the_certificate_counts_as_no_credentials(device, cloud):
    run(device, cloud)
    _, other_key = cloud.ca.pair()
    (device.cert_dir / ento.KEY_FILE).write_text(other_key)
    run(device, cloud)
    assert len(cloud.issued) == 2
    assert ento.installed_credentials_problem(device.config()) is None


def test_a_key_without_certificate_counts_as_no_credentials(device, cloud):
    device.cert_dir.mkdir(mode=0o700)
    _, key = cloud.ca.pair()
    (device.cert_dir / ento.KEY_FILE).write_text(key)
    run(device, cloud)
    assert len(cloud.issued) == 1


def test_force_provisions_again_and_replaces_the_credentials(device, cloud):
    run(device, cloud)
    run(device, cloud, force=True)
    assert len(cloud.issued) == 2
    assert (device.cert_dir / ento.CERT_FILE).read_text() == cloud.issued[1]["certificatePem"]
    assert device.device["CERTIFICATE_ID"] == cloud.issued[1]["certificateId"]


def test_force_keeps_the_old_credentials_when_registration_is_refused(device, cloud):
    run(device, cloud)
    old_cert = (device.cert_dir / ento.CERT_FILE).read_bytes()
    cloud.register_answers.append(("rejected", {"statusCode": 400, "errorCode": "Nope",
                                                "errorMessage": "no"}))
    with pytest.raises(ento.ServiceError):
        run(device, cloud, force=True)
    assert (device.cert_dir / ento.CERT_FILE).read_bytes() == old_cert
    assert ento.installed_credentials_problem(device.config()) is None
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_staged_key_left_by_a_killed_force_run_is_cleaned_on_a_normal_boot(device, cloud):
    run(device, cloud)
    staged = device.cert_dir / ento.STAGING_KEY_FILE
    staged.write_text("left over")
    run(device, cloud)
    assert not staged.exists()


def test_register_rejected_with_4xx_is_final_and_installs_nothing(device, cloud):
    cloud.register_answers.append(("rejected", {
        "statusCode": 400, "errorCode": "InvalidParameters",
        "errorMessage": "SerialNumber is bad"}))
    with pytest.raises(ento.ServiceError) as err:
        run(device, cloud)
    assert "statusCode=400 errorCode=InvalidParameters" in str(err.value)
    assert "SerialNumber is bad" in str(err.value)
    assert_no_credentials(device)
    assert device.device["PROVISION_STATUS"] == "False"
    assert len(cloud.issued) == 1


def test_create_rejected_with_403_is_final(device, cloud):
    cloud.create_answers.append(("rejected", {"statusCode": 403, "errorCode": "Forbidden",
                                              "errorMessage": "policy"}))
    with pytest.raises(ento.ServiceError, match="CreateKeysAndCertificate rejected"):
        run(device, cloud)
    assert_no_credentials(device)


@pytest.mark.parametrize("status,code", [(429, "Throttling"), (500, "InternalError"),
                                         (503, "ServiceUnavailable"), (400, "Throttling")])
def test_a_busy_service_is_asked_again_on_the_same_connection(device, cloud, status, code):
    rejected = ("rejected", {"statusCode": status, "errorCode": code, "errorMessage": "busy"})
    cloud.register_answers.extend([rejected, rejected])
    sleeps = []
    run(device, cloud, sleeps=sleeps)
    assert len(sleeps) == 2
    assert [c for c in cloud.calls if c[0] == "connect"] == [
        ("connect", "CAM-42", "claim.pem.crt"), ("connect", "thing-CAM-42", "certificate.pem.crt")]
    registers = cloud.published(REGISTER)
    assert len(registers) == 3 and len(set(registers)) == 1
    assert len(cloud.issued) == 1
    assert device.device["PROVISION_STATUS"] == "True"


def test_silence_is_retried_from_a_new_connection(device, cloud):
    cloud.create_answers.append(None)
    sleeps = []
    run(device, cloud, sleeps=sleeps)
    assert len(sleeps) == 1
    assert [c for c in cloud.calls if c[0] == "connect"][:2] == [
        ("connect", "CAM-42", "claim.pem.crt")] * 2
    assert device.device["PROVISION_STATUS"] == "True"


def test_backoff_grows_exponentially_with_full_jitter():
    backoff = ento.Backoff(base=1.0, cap=8.0)

    class Rng:
        def uniform(self, low, high):
            return high

    assert [backoff.delay(n, Rng()) for n in range(1, 6)] == [2.0, 4.0, 8.0, 8.0, 8.0]


def test_transient_failures_stop_at_the_run_deadline(device, cloud):
    clock = [0.0]
    deadline = ento.Deadline(30.0, clock=lambda: clock[0])
    cloud.create_answers.extend([None] * 100)

    def sleep(seconds):
        clock[0] += seconds

    with pytest.raises(ento.TransientError, match="time limit"):
        boot.boot(device.config_path, deadline, connect=cloud, sleep=sleep)
    assert clock[0] <= 30.0
    assert_no_credentials(device)


def test_a_refused_connection_is_transient(device, cloud):
    cloud.fail_with("connect", *[ento.TransientError("connect failed: refused")] * 3)
    run(device, cloud)
    assert device.device["PROVISION_STATUS"] == "True"


@pytest.mark.parametrize("body,why", [
    (b"<html>not json</html>", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    ({"certificateId": "x", "privateKey": "k", "certificateOwnershipToken": "t"},
     "lacks certificatePem"),
    ({"certificateId": "x", "certificatePem": "-----BEGIN CERTIFICATE-----\nxx\n"
      "-----END CERTIFICATE-----\n", "privateKey": "k", "certificateOwnershipToken": "t"},
     "does not parse"),
    ({"certificateId": "", "certificatePem": "c", "privateKey": "k",
      "certificateOwnershipToken": "t"}, "lacks certificateId"),
])
def test_malformed_create_answers_fail_with_nothing_installed(device, cloud, body, why):
    cloud.create_answers.append(("accepted", body))
    with pytest.raises(ento.ServiceError, match=why):
        run(device, cloud)
    assert_no_credentials(device)
    assert device.device["PROVISION_STATUS"] == "False"


def test_a_certificate_that_does_not_match_the_key_is_refused(device, cloud):
    cert, _ = cloud.ca.pair()
    _, key = cloud.ca.pair()
    cloud.create_answers.append(("accepted", {"certificateId": "x", "certificatePem": cert,
                                              "privateKey": key,
                                              "certificateOwnershipToken": "t"}))
    with pytest.raises(ento.ServiceError, match="does not belong"):
        run(device, cloud)
    assert_no_credentials(device)


@pytest.mark.parametrize("body", [{"thingName": ""}, {"deviceConfiguration": {}}, b"nope",
                                  {"thingName": "bad/name"}])
def test_malformed_register_answers_fail_with_nothing_installed(device, cloud, body):
    cloud.register_answers.append(("accepted", body))
    with pytest.raises(ento.ServiceError):
        run(device, cloud)
    assert_no_credentials(device)


def test_answers_for_other_requests_are_ignored(device, cloud):
    # A register answer arriving while CreateKeysAndCertificate is awaited is
    # someone else's (another device on a shared broker).
    session_noise = (REGISTER + "/accepted", b'{"thingName": "other"}')
    original = cloud.respond

    def respond(session, topic, payload):
        if topic == CREATE:
            session.inbox.append(session_noise)
        original(session, topic, payload)

    cloud.respond = respond
    run(device, cloud)
    assert device.device["THING_NAME"] == "thing-CAM-42"


def test_no_secret_reaches_the_log(device, cloud, caplog):
    with caplog.at_level(logging.DEBUG):
        run(device, cloud)
        run(device, cloud, force=True)
    text = caplog.text
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    for issued in cloud.issued:
        assert issued["certificateOwnershipToken"] not in text


def test_stray_temporary_files_from_a_killed_run_are_removed(device, cloud):
    device.cert_dir.mkdir(mode=0o700)
    stray = device.cert_dir / ".certificate.pem.crt.0badf00d.tmp"
    stray.write_text("half")
    config_stray = device.config_path.parent / ".ento.conf.12345678.tmp"
    config_stray.write_text("{")
    run(device, cloud)
    assert not stray.exists() and not config_stray.exists()


def test_an_existing_cert_dir_with_loose_mode_is_tightened(device, cloud):
    device.cert_dir.mkdir(mode=0o755)
    os.chmod(device.cert_dir, 0o755)
    run(device, cloud)
    assert mode(device.cert_dir) == 0o700


def test_provisioning_needs_template_and_claim_files_only_when_needed(device, cloud):
    run(device, cloud)
    doc = device.doc()
    for key in ("TEMPLATE_NAME", "CLAIM_CERT", "CLAIM_KEY"):
        doc["device"].pop(key)
    device.config_path.write_text(json.dumps(doc))
    run(device, cloud)
    assert len(cloud.issued) == 1


def test_missing_claim_files_are_a_config_error_when_provisioning(device, cloud):
    device.update(CLAIM_KEY=str(device.root / "nowhere.key"))
    with pytest.raises(ento.ConfigError, match="claim key"):
        run(device, cloud)
    assert cloud.calls == []


def test_a_claim_key_of_another_certificate_is_a_config_error(device, cloud):
    _, other = cloud.ca.pair()
    (device.root / "claim" / "claim.key").write_text(other)
    with pytest.raises(ento.ConfigError, match="does not belong"):
        run(device, cloud)


def test_claim_files_are_never_modified(device, cloud):
    claim = device.root / "claim"
    before = {p.name: (p.read_bytes(), os.stat(p).st_mode) for p in claim.iterdir()}
    run(device, cloud)
    run(device, cloud, force=True)
    assert {p.name: (p.read_bytes(), os.stat(p).st_mode) for p in claim.iterdir()} == before
