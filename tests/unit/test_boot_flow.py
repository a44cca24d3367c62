"""boot.py's flow over the real IotIdentityClient and a fake MQTT connection:
real files in tmp_path, modes asserted."""
import json
import logging
import os
import stat

import pytest

import boot
from entomologist import errors
from entomologist.credentials import CertDir
from entomologist.retries import Deadline
from fakes import CAM42_CLAIM, CREATE, ClaimClientId, FakeClock, crt_error

REGISTER = "$aws/provisioning-templates/Fleet/provision/json"
CERT, KEY, CA = "certificate.pem.crt", "private.pem.key", "AmazonRootCA1.pem"
LOCK = "run.lock"
SPEND = "provisioning-spend.json"
RECORD = "installed-for.json"
VALID_ID = "ab" * 32


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def run(device, cloud, force=False, seconds=60.0, sleeps=None, step=0.2, clock=None):
    clock = clock or FakeClock()
    if sleeps is not None:
        clock.sleeps = sleeps
    boot.boot(device.config_path, Deadline(seconds, clock=clock, step_limit=step), force=force,
              build=cloud)


def assert_no_credentials(device):
    assert not (device.cert_dir / CERT).exists()
    assert not (device.cert_dir / KEY).exists()


def test_first_boot_installs_credentials_with_their_modes(device, cloud):
    run(device, cloud)
    cert_dir = device.cert_dir
    assert mode(cert_dir) == 0o700
    assert mode(cert_dir / CERT) == 0o644
    assert mode(cert_dir / KEY) == 0o600
    assert mode(cert_dir / CA) == 0o644
    issued = cloud.issued[0]
    assert (cert_dir / CERT).read_text() == issued["certificatePem"]
    assert (cert_dir / KEY).read_text() == issued["privateKey"]
    assert (cert_dir / CA).read_text() == cloud.ca.pem
    assert sorted(os.listdir(cert_dir)) == [CA, CERT, RECORD, KEY, LOCK]


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


def test_claim_connection_subscribes_once_then_creates_and_registers(device, cloud):
    run(device, cloud)
    claim_calls = cloud.calls[:cloud.calls.index(("close",)) + 1]
    kinds = [c[0] if c[0] != "publish" else ("publish", c[1]) for c in claim_calls]
    assert kinds == ["connect"] + ["subscribe"] * 4 + [("publish", CREATE),
                                                       ("publish", REGISTER), "close"]
    subscribed = [c[1] for c in claim_calls if c[0] == "subscribe"]
    assert sorted(subscribed) == sorted([CREATE + "/accepted", CREATE + "/rejected",
                                         REGISTER + "/accepted", REGISTER + "/rejected"])
    assert claim_calls[0] == ("connect", CAM42_CLAIM, "claim.pem.crt")


def test_all_four_subscriptions_are_sent_before_any_suback_is_awaited(device, cloud):
    cloud.hold_subacks = 4
    run(device, cloud, step=0.5)
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_refused_subscription_names_the_topic_and_the_claim_policy(device, cloud):
    cloud.fail_with("subscribe", *[None, None, "refused", None] * 30)
    with pytest.raises(errors.TransientError) as err:
        run(device, cloud, seconds=3)
    text = f"{err.value} {err.value.hint}"
    assert "refused the subscription to $aws/provisioning-templates/Fleet/provision/json" in text
    assert "policy" in err.value.hint and "network link" not in err.value.hint
    assert cloud.published(CREATE) == []


def test_register_thing_sends_token_and_default_parameters(device, cloud):
    run(device, cloud)
    (_, payload), = cloud.registers()
    assert json.loads(payload) == {
        "certificateOwnershipToken": cloud.issued[0]["certificateOwnershipToken"],
        "parameters": {"SerialNumber": "CAM-42"}}


def test_register_thing_sends_configured_template_parameters(device, cloud):
    device.update(TEMPLATE_PARAMETERS={"SerialNumber": "CAM-42", "Site": "north"})
    run(device, cloud)
    (_, payload), = cloud.registers()
    assert json.loads(payload)["parameters"] == {"SerialNumber": "CAM-42", "Site": "north"}


@pytest.mark.parametrize("parameters", [{"Notes": "x" * (120 * 1024)},
                                        {"Notes": "\u00e9" * (22 * 1024)},  # sent as \u00e9
                                        {f"K{i}": "v" * 100 for i in range(1200)}])
def test_template_parameters_too_big_for_one_message_are_78_before_any_certificate(
        device, cloud, parameters):
    device.update(TEMPLATE_PARAMETERS=parameters)
    with pytest.raises(errors.ConfigError, match="TEMPLATE_PARAMETERS.*128 KiB") as caught:
        run(device, cloud)
    assert errors.exit_code(caught.value) == 78
    assert cloud.calls == [] and cloud.connections == []


def test_template_parameters_that_fit_one_message_with_any_token_are_sent(device, cloud):
    device.update(TEMPLATE_PARAMETERS={"Notes": "x" * (100 * 1024)})
    run(device, cloud)
    (_, payload), = cloud.registers()
    assert len(payload) < 128 * 1024


def test_new_key_and_certificate_are_staged_durably_before_register_thing_is_sent(device, cloud):
    seen = {}

    def on_register(payload):
        staged_key = device.cert_dir / "private.pem.key.staging"
        staged_cert = device.cert_dir / "certificate.pem.crt.staging"
        seen.update(key_mode=mode(staged_key), key=staged_key.read_text(),
                    cert=staged_cert.read_text(),
                    installed=(device.cert_dir / CERT).exists())

    cloud.on_register = on_register
    run(device, cloud)
    assert seen == {"key_mode": 0o600, "key": cloud.issued[0]["privateKey"],
                    "cert": cloud.issued[0]["certificatePem"], "installed": False}
    assert sorted(os.listdir(device.cert_dir)) == [CA, CERT, RECORD, KEY, LOCK]


def test_boot_message_uses_device_certificate_and_thing_name(device, cloud):
    run(device, cloud)
    last = cloud.connections[-1]
    assert (last.client_id, last.cert_name) == ("thing-CAM-42", CERT)
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
    run(device, cloud)
    assert len(cloud.issued) == 1
    assert device.device["PROVISION_STATUS"] == "True"


def test_true_status_without_credentials_warns_and_provisions_again(device, cloud, caplog):
    device.update(PROVISION_STATUS="True")
    with caplog.at_level(logging.WARNING):
        run(device, cloud)
    assert "PROVISION_STATUS is True but" in caplog.text
    assert len(cloud.issued) == 1


def test_a_key_that_does_not_match_the_certificate_counts_as_no_credentials(device, cloud):
    run(device, cloud)
    _, other_key = cloud.ca.pair()
    (device.cert_dir / KEY).write_text(other_key)
    run(device, cloud)
    assert len(cloud.issued) == 2
    assert CertDir.open(device.cert_dir).installed_problem() is None


@pytest.mark.parametrize("garbage", [b"\x00\xff garbage", b"-----BEGIN PRIVATE KEY-----\n!!\n"
                                     b"-----END PRIVATE KEY-----\n", b""])
def test_an_undecodable_installed_key_means_provision_again(device, cloud, garbage):
    run(device, cloud)
    (device.cert_dir / KEY).write_bytes(garbage)
    run(device, cloud)
    assert len(cloud.issued) == 2


@pytest.mark.parametrize("garbage", [b"\x00\xff", b"-----BEGIN CERTIFICATE-----\n@@@\n"
                                     b"-----END CERTIFICATE-----\n"])
def test_an_undecodable_installed_certificate_means_provision_again(device, cloud, garbage):
    run(device, cloud)
    (device.cert_dir / CERT).write_bytes(garbage)
    run(device, cloud)
    assert len(cloud.issued) == 2


def test_a_key_without_certificate_counts_as_no_credentials(device, cloud):
    device.cert_dir.mkdir(mode=0o700)
    _, key = cloud.ca.pair()
    (device.cert_dir / KEY).write_text(key)
    run(device, cloud)
    assert len(cloud.issued) == 1


def test_force_provisions_again_and_replaces_the_credentials(device, cloud):
    run(device, cloud)
    run(device, cloud, force=True)
    assert len(cloud.issued) == 2
    assert (device.cert_dir / CERT).read_text() == cloud.issued[1]["certificatePem"]
    assert device.device["CERTIFICATE_ID"] == cloud.issued[1]["certificateId"]
    assert sorted(os.listdir(device.cert_dir)) == [CA, CERT, RECORD, KEY, LOCK]


@pytest.mark.parametrize("refused", ["create", "register"])
def test_force_keeps_the_old_credentials_and_the_status_when_the_service_refuses(
        device, cloud, refused):
    run(device, cloud)
    old_cert = (device.cert_dir / CERT).read_bytes()
    getattr(cloud, f"{refused}_answers").append(
        ("rejected", {"statusCode": 400, "errorCode": "Nope", "errorMessage": "no"}))
    with pytest.raises(errors.ServiceError):
        run(device, cloud, force=True)
    assert (device.cert_dir / CERT).read_bytes() == old_cert
    assert CertDir.open(device.cert_dir).installed_problem() is None
    assert device.device["PROVISION_STATUS"] == "True"
    if refused == "create":  # nothing was made, nothing is recorded
        assert sorted(os.listdir(device.cert_dir)) == [CA, CERT, RECORD, KEY, LOCK]
    else:  # the refused certificate stays recorded until a pair is installed
        assert sorted(os.listdir(device.cert_dir)) == [CA, CERT, RECORD, KEY, SPEND, LOCK]
        assert mode(device.cert_dir / SPEND) == 0o600


def test_a_staged_key_left_by_a_killed_force_run_is_cleaned_on_a_normal_boot(device, cloud):
    run(device, cloud)
    staged = device.cert_dir / "private.pem.key.staging"
    staged.write_text("left over")
    run(device, cloud)
    assert not staged.exists()


def test_register_rejected_with_4xx_is_final_and_installs_nothing(device, cloud):
    cloud.register_answers.append(("rejected", {
        "statusCode": 400, "errorCode": "InvalidParameters",
        "errorMessage": "SerialNumber is bad"}))
    with pytest.raises(errors.ServiceError) as err:
        run(device, cloud)
    assert "statusCode=400 errorCode=InvalidParameters" in str(err.value)
    assert "SerialNumber is bad" in str(err.value)
    assert "TEMPLATE_NAME" in err.value.hint
    assert_no_credentials(device)
    assert device.device["PROVISION_STATUS"] == "False"
    assert len(cloud.issued) == 1
    assert sorted(os.listdir(device.cert_dir)) == [SPEND, LOCK]
    spent = json.loads((device.cert_dir / SPEND).read_text())["entries"]
    assert [(e["kind"], e["certificateId"]) for e in spent] == [
        ("register-rejected", cloud.issued[0]["certificateId"])]


def test_create_rejected_with_403_is_final_and_points_at_the_claim_policy(device, cloud):
    cloud.create_answers.append(("rejected", {"statusCode": 403, "errorCode": "Forbidden",
                                              "errorMessage": "policy"}))
    with pytest.raises(errors.ServiceError, match="CreateKeysAndCertificate rejected") as err:
        run(device, cloud)
    assert "$aws/certificates/create/*" in err.value.hint
    assert_no_credentials(device)


def test_a_rejection_with_odd_field_types_is_still_one_clean_error(device, cloud):
    cloud.create_answers.append(("rejected", {"statusCode": "x" * 500, "errorCode": ["a"],
                                              "errorMessage": {"nested": "\n"}}))
    with pytest.raises(errors.ServiceError) as err:
        run(device, cloud)
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_a_rejections_fields_are_shown_cut_the_status_at_8_characters_the_code_at_64(
        device, cloud):
    cloud.create_answers.append(("rejected", {"statusCode": "4" * 20, "errorCode": "E" * 100,
                                              "errorMessage": "no"}))
    with pytest.raises(errors.ServiceError) as err:
        run(device, cloud)
    assert str(err.value) == (
        "CreateKeysAndCertificate rejected: statusCode=44444444...[12 more characters] "
        f"errorCode={'E' * 64}...[36 more characters] errorMessage='no'")


@pytest.mark.parametrize("status,code", [(429, "Throttling"), (500, "InternalError"),
                                         (503, "ServiceUnavailable"), (400, "Throttling"),
                                         (429, "AnErrorCodeNotKnownToday"),
                                         (500, "AnErrorCodeNotKnownToday")])
def test_a_busy_service_is_asked_again_on_the_same_connection(device, cloud, status, code):
    rejected = ("rejected", {"statusCode": status, "errorCode": code, "errorMessage": "busy"})
    cloud.register_answers.extend([rejected, rejected])
    sleeps = []
    run(device, cloud, sleeps=sleeps)
    assert len(sleeps) == 2
    assert [c for c in cloud.calls if c[0] == "connect"] == [
        ("connect", CAM42_CLAIM, "claim.pem.crt"), ("connect", "thing-CAM-42", CERT)]
    registers = cloud.registers()
    assert len(registers) == 3 and len(set(registers)) == 1
    assert len(cloud.issued) == 1
    assert device.device["PROVISION_STATUS"] == "True"


def test_silence_is_retried_from_a_new_connection(device, cloud):
    cloud.create_answers.append(None)
    sleeps = []
    run(device, cloud, sleeps=sleeps)
    assert len(sleeps) == 1
    assert [c for c in cloud.calls if c[0] == "connect"][:2] == [
        ("connect", CAM42_CLAIM, "claim.pem.crt")] * 2
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_connection_lost_while_awaiting_an_answer_is_retried_at_once(device, cloud):
    cloud.create_answers.append("drop")
    sleeps = []
    run(device, cloud, sleeps=sleeps, step=30)
    assert len(sleeps) == 1
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_suback_that_never_comes_is_bounded(device, cloud, clock):
    cloud.fail_with("subscribe", *["never"] * 200)
    started = clock.monotonic()
    with pytest.raises(errors.TransientError, match="no SUBACK"):
        run(device, cloud, seconds=120, step=20, clock=clock)
    assert clock.waits and max(clock.waits) <= 20 + 1e-9  # end - now, in floating point
    assert clock.monotonic() - started <= 120 + 1e-9


def test_a_puback_that_never_comes_is_bounded(device, cloud, clock):
    cloud.fail_with("publish", *["never"] * 200)
    started = clock.monotonic()
    with pytest.raises(errors.TransientError, match="no PUBACK"):
        run(device, cloud, seconds=120, step=20, clock=clock)
    assert clock.waits and max(clock.waits) <= 20 + 1e-9  # end - now, in floating point
    assert clock.monotonic() - started <= 120 + 1e-9


def test_transient_failures_stop_at_the_run_deadline(device, cloud, clock):
    started = clock.monotonic()
    deadline = Deadline(30.0, clock=clock, step_limit=0.01)
    # Failures that spend nothing at the service (see test_fleet_guard for those that do).
    cloud.fail_with("connect", *[crt_error("AWS_IO_SOCKET_TIMEOUT")] * 100)

    with pytest.raises(errors.TransientError, match="time limit"):
        boot.boot(device.config_path, deadline, build=cloud)
    assert clock.sleeps and clock.monotonic() - started <= 30.0 + 1e-9
    assert_no_credentials(device)


def test_a_refused_connection_is_transient(device, cloud):
    cloud.fail_with("connect", *[crt_error("AWS_IO_SOCKET_CONNECTION_REFUSED")] * 3)
    run(device, cloud)
    assert device.device["PROVISION_STATUS"] == "True"


def _create(**fields):
    cert, key = fields.pop("pair", (None, None))
    body = {"certificateId": VALID_ID, "certificatePem": cert, "privateKey": key,
            "certificateOwnershipToken": "t" * 8}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize("body,why", [
    (b"<html>not json</html>", "not a JSON object"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "not a JSON object"),
    (_create(privateKey="k"), "lacks certificatePem"),
    (_create(certificatePem="-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n",
             privateKey="k"), "does not parse"),
    (_create(certificateId="", certificatePem="c", privateKey="k"), "lacks certificateId"),
    (_create(certificateId="x\n" * 20, certificatePem="c", privateKey="k"),
     "invalid certificateId"),
    (_create(certificatePem=["not", "a", "string"], privateKey="k"), "lacks certificatePem"),
    (_create(certificatePem="c" * 20000, privateKey="k"), "over"),
])
def test_malformed_create_answers_fail_with_nothing_installed(device, cloud, body, why):
    cloud.create_answers.append(("accepted", body))
    with pytest.raises(errors.ServiceError, match=why) as err:
        run(device, cloud)
    assert "\n" not in str(err.value)
    assert_no_credentials(device)
    assert device.device["PROVISION_STATUS"] == "False"
    assert cloud.registers() == []


def test_a_certificate_that_does_not_match_the_key_is_refused(device, cloud):
    cert, _ = cloud.ca.pair()
    _, key = cloud.ca.pair()
    cloud.create_answers.append(("accepted", _create(pair=(cert, key))))
    with pytest.raises(errors.ServiceError, match="does not belong"):
        run(device, cloud)
    assert_no_credentials(device)


@pytest.mark.parametrize("body", [{"thingName": ""}, {"deviceConfiguration": {}}, b"nope",
                                  {"thingName": "bad/name"}, {"thingName": "x" * 129}])
def test_malformed_register_answers_fail_with_nothing_installed(device, cloud, body):
    cloud.register_answers.append(("accepted", body))
    with pytest.raises(errors.ServiceError):
        run(device, cloud)
    assert_no_credentials(device)


def test_device_configuration_from_the_template_is_kept_beside_the_pair(device, cloud):
    cloud.register_answers.append(("accepted", {"thingName": "cam",
                                                "deviceConfiguration": {"Fps": "2"}}))
    run(device, cloud)
    path = device.cert_dir / "device-configuration.json"
    assert json.loads(path.read_text()) == {"Fps": "2"}
    assert mode(path) == 0o644


@pytest.mark.parametrize("configuration", [{"Fps": 2}, {"Camera": {"Fps": "2", "On": True}},
                                           {"Zones": [1, None, 2.5]}, {"Fps": "2", "N": 1}])
def test_a_device_configuration_that_is_not_all_strings_is_kept_as_it_came_with_one_warning(
        device, cloud, caplog, configuration):
    cloud.register_answers.append(("accepted", {"thingName": "cam",
                                                "deviceConfiguration": configuration}))
    run(device, cloud)
    assert device.device["PROVISION_STATUS"] == "True"
    path = device.cert_dir / "device-configuration.json"
    assert json.loads(path.read_text()) == configuration and mode(path) == 0o644
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "deviceConfiguration" in warnings[0], warnings
    assert len(cloud.registers()) == 1


@pytest.mark.parametrize("configuration", [[1], "Fps=2", 5, {"Big": "x" * (200 * 1024)}])
def test_a_device_configuration_that_is_no_object_or_too_big_is_not_stored_but_the_thing_is(
        device, cloud, caplog, configuration):
    cloud.register_answers.append(("accepted", {"thingName": "cam",
                                                "deviceConfiguration": configuration}))
    run(device, cloud)
    assert device.device["THING_NAME"] == "cam" and device.device["PROVISION_STATUS"] == "True"
    assert not (device.cert_dir / "device-configuration.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "deviceConfiguration" in warnings[0], warnings
    assert "x" * 200 not in warnings[0]
    assert len(cloud.registers()) == 1


def test_answers_for_other_requests_are_ignored(device, cloud):
    # A register answer arriving while CreateKeysAndCertificate is awaited is
    # someone else's (another device on a shared broker).
    original = cloud.respond

    def respond(connection, topic, payload):
        if topic == CREATE:
            connection.deliver(REGISTER + "/accepted", b'{"thingName": "other"}')
        original(connection, topic, payload)

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


def test_stray_temporary_files_from_a_killed_run_are_removed_by_name_only(device, cloud):
    device.cert_dir.mkdir(mode=0o700)
    stray = device.cert_dir / ".certificate.pem.crt.0badf00d.tmp"
    stray.write_text("half")
    config_stray = device.config_path.parent / ".ento.conf.12345678.tmp"
    config_stray.write_text("{")
    kept = device.config_path.parent / ".camera-notes.tmp"
    kept.write_text("not ours")
    run(device, cloud)
    assert not stray.exists() and not config_stray.exists()
    assert kept.exists()


def test_a_new_cert_dir_is_0700_and_an_existing_one_keeps_its_mode(device, cloud):
    run(device, cloud)
    assert mode(device.cert_dir) == 0o700
    # A folder we did not make (CERT_DIR set to a shared folder by mistake)
    # is never chmodded; the key in it is 0600 whatever the folder's mode.
    os.chmod(device.cert_dir, 0o755)
    run(device, cloud, force=True)
    assert mode(device.cert_dir) == 0o755
    assert mode(device.cert_dir / KEY) == 0o600


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
    with pytest.raises(errors.ConfigError, match="claim key"):
        run(device, cloud)
    assert cloud.calls == []


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02", b"-----BEGIN CERTIFICATE-----\n%%\n"
                                     b"-----END CERTIFICATE-----\n"])
def test_a_garbled_claim_certificate_is_a_config_error(device, cloud, garbage):
    (device.root / "claim" / "claim.pem.crt").write_bytes(garbage)
    with pytest.raises(errors.ConfigError, match="claim files unusable"):
        run(device, cloud)
    assert cloud.calls == []


def test_a_claim_key_of_another_certificate_is_a_config_error(device, cloud):
    _, other = cloud.ca.pair()
    (device.root / "claim" / "claim.key").write_text(other)
    with pytest.raises(errors.ConfigError, match="does not belong"):
        run(device, cloud)


def test_claim_files_are_never_modified(device, cloud):
    claim = device.root / "claim"
    before = {p.name: (p.read_bytes(), os.stat(p).st_mode) for p in claim.iterdir()}
    run(device, cloud)
    run(device, cloud, force=True)
    assert {p.name: (p.read_bytes(), os.stat(p).st_mode) for p in claim.iterdir()} == before


def test_a_long_token_echoed_by_the_service_never_reaches_the_error_even_in_part(device, cloud):
    cert, key = cloud.ca.pair()
    token = "T0k" + "".join(f"{i:03d}" for i in range(350))  # about 1 KB, as AWS's
    cloud.create_answers.append(("accepted", _create(pair=(cert, key),
                                                     certificateOwnershipToken=token)))
    cloud.register_answers.append(("rejected", {"statusCode": 400, "errorCode": token,
                                                "errorMessage": f"bad token {token[100:400]}"}))
    with pytest.raises(errors.ServiceError) as err:
        run(device, cloud)
    text = f"{err.value} {err.value.hint}"
    assert not any(token[i:i + 23] in text for i in range(len(token) - 23))


@pytest.mark.parametrize("outcome", ["accepted", "rejected"])
def test_an_answer_that_came_before_its_request_is_ignored_with_a_warning(device, cloud, outcome,
                                                                         caplog):
    # A misbehaving broker answers RegisterThing before the device asked.
    original = cloud.respond
    early = {"accepted": {"thingName": "someone-else"},
             "rejected": {"statusCode": 400, "errorCode": "Early", "errorMessage": "x"}}[outcome]

    def respond(connection, topic, payload):
        original(connection, topic, payload)
        if topic == CREATE:
            connection.deliver(f"{REGISTER}/{outcome}", json.dumps(early).encode())

    cloud.respond = respond
    run(device, cloud)
    assert device.device["THING_NAME"] == "thing-CAM-42"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "ignoring a RegisterThing answer that came before the request"]


def test_a_lost_pair_makes_the_status_false_before_provisioning_again(device, cloud):
    run(device, cloud)
    (device.cert_dir / CERT).unlink()
    cloud.create_answers.append(("rejected", {"statusCode": 403, "errorCode": "Forbidden",
                                              "errorMessage": "no"}))
    with pytest.raises(errors.ServiceError):
        run(device, cloud)
    assert device.device["PROVISION_STATUS"] == "False"


def test_the_claim_client_id_is_the_serial_and_random_hex_new_for_every_attempt(device, cloud):
    cloud.create_answers.append(None)
    run(device, cloud, sleeps=[])
    claim_ids = [c[1] for c in cloud.calls if c[0] == "connect" and c[2] == "claim.pem.crt"]
    assert len(claim_ids) == 2
    assert all(cid == ClaimClientId("CAM-42") for cid in claim_ids)
    assert claim_ids[0] != claim_ids[1]
    assert "CAM-42" not in claim_ids


def test_a_claim_client_id_of_a_128_character_serial_keeps_its_random_part():
    from entomologist.client_id import claim_client_id
    serial = "S" * 128
    cid = claim_client_id(serial)
    assert len(cid) == 128
    assert cid == ClaimClientId("S" * 111)


def test_the_created_answer_never_shows_its_private_key_or_token_in_its_repr():
    from entomologist.fleet import Created
    created = Created("ab" * 32, b"-----BEGIN CERTIFICATE-----", b"private-key-bytes",
                      "ownership-token-text")
    assert "private-key-bytes" not in repr(created)
    assert "ownership-token-text" not in repr(created)
    assert "ab" * 32 in repr(created)
