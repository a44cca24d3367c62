"""The device's side of the fleet guard, over the real IotIdentityClient and a fake
connection, on one fake clock: the provisioning secret, a hook's refusal, and the
bound on what provisioning attempts spend."""
import json
import logging
import os
import stat

import pytest

import boot
from entomologist import errors, logs, retries, secret, spend
from entomologist.config import provisioning_settings
from entomologist.retries import Deadline
from fakes import CAM42_CLAIM

SECRET = "Zq0vH3-_pL9sXkT2mW8cR4yB6nJ1fA5dE7gU0iO3eKa"  # as secrets.token_urlsafe(32)
SPEND = "provisioning-spend.json"
CLAIM_CONNECT = ("connect", CAM42_CLAIM, "claim.pem.crt")


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def run(device, cloud, clock, seconds=60.0, force=False):
    boot.boot(device.config_path, Deadline(seconds, clock=clock, step_limit=0.2),
              force=force, build=cloud)


def connects(cloud):
    return [c for c in cloud.calls if c[0] == "connect" and c[2] == "claim.pem.crt"]


def entries(device):
    return json.loads((device.cert_dir / SPEND).read_text())["entries"]


def write_secret(device, text=SECRET + "\n", file_mode=0o600, name="provisioning-secret"):
    path = device.config_path.parent / name
    path.write_text(text)
    os.chmod(path, file_mode)
    device.update(PROVISIONING_SECRET_FILE=name)  # relative: from the config's folder
    return path


def register_parameters(cloud):
    return [json.loads(payload)["parameters"] for _, payload in cloud.registers()]


# ------------------------------------------------------- the provisioning secret

def test_the_secret_goes_out_as_ProvisioningSecret_with_RegisterThing_and_nowhere_else(
        device, cloud, clock):
    write_secret(device)
    run(device, cloud, clock)
    assert register_parameters(cloud) == [{"SerialNumber": "CAM-42",
                                           "ProvisioningSecret": SECRET}]
    others = [payload for topic, payload in cloud.published() if "/provision/" not in topic]
    assert others and not any(SECRET.encode() in payload for payload in others)
    assert device.device["PROVISION_STATUS"] == "True"


def test_without_PROVISIONING_SECRET_FILE_no_ProvisioningSecret_is_sent(device, cloud, clock):
    run(device, cloud, clock)
    assert register_parameters(cloud) == [{"SerialNumber": "CAM-42"}]


@pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o660, 0o644])
def test_a_secret_file_others_may_use_is_78_before_anything_is_sent(device, cloud, clock,
                                                                     file_mode):
    write_secret(device, file_mode=file_mode)
    with pytest.raises(errors.ConfigError, match="secret file .* group or others") as err:
        run(device, cloud, clock)
    assert errors.exit_code(err.value) == 78
    assert "PROVISIONING_SECRET_FILE" in err.value.hint
    assert cloud.calls == []


def test_a_stricter_mode_than_0600_is_fine(device, cloud, clock):
    write_secret(device, file_mode=0o400)
    run(device, cloud, clock)
    assert register_parameters(cloud)[0]["ProvisioningSecret"] == SECRET


def test_a_secret_file_owned_by_another_user_is_78(device, cloud, clock):
    path = write_secret(device)
    os.chown(path, 4242, 4242)
    with pytest.raises(errors.ConfigError, match="uid 4242"):
        run(device, cloud, clock)
    assert cloud.calls == []


def test_a_missing_secret_file_is_78(device, cloud, clock):
    write_secret(device).unlink()
    with pytest.raises(errors.ConfigError, match="does not exist"):
        run(device, cloud, clock)
    assert cloud.calls == []


@pytest.mark.parametrize("content", [
    "short-secret", "x" * 257, "with a space in it 0123456789", "zwei\nZeilen-0123456789abc",
    "non-ascii-\u00e9-0123456789", "", "\n",
])
def test_a_secret_of_the_wrong_length_or_characters_is_78_and_never_quoted(
        device, cloud, clock, content):
    write_secret(device, text=content)
    with pytest.raises(errors.ConfigError, match="16 to 256 printable ASCII") as err:
        run(device, cloud, clock)
    if content.strip():
        assert content.strip()[:12] not in str(err.value)
    assert cloud.calls == []


def test_a_secret_with_a_trailing_line_end_is_sent_without_it(device, cloud, clock):
    write_secret(device, text=SECRET + "\r\n")
    run(device, cloud, clock)
    assert register_parameters(cloud)[0]["ProvisioningSecret"] == SECRET


def test_TEMPLATE_PARAMETERS_holding_ProvisioningSecret_is_78(device, cloud, clock):
    device.update(TEMPLATE_PARAMETERS={"SerialNumber": "CAM-42", "ProvisioningSecret": SECRET})
    with pytest.raises(errors.ConfigError, match="must not hold ProvisioningSecret") as err:
        run(device, cloud, clock)
    assert SECRET not in str(err.value)
    assert cloud.calls == []


def test_the_secret_reaches_no_log_line_no_repr_and_no_other_file(tmp_path, device, cloud, clock):
    """Even when the template echoes it in deviceConfiguration, and when a bug's
    traceback quotes it."""
    secret_path = write_secret(device)
    cloud.register_answers.append(("accepted", {
        "thingName": "thing-CAM-42",
        "deviceConfiguration": {"echo": SECRET, "part": f"x{SECRET[4:30]}x", "ok": "1"}}))
    with open(tmp_path / "stderr", "w+") as stream:
        logs.setup_logging(verbose=True, stream=stream)
        assert errors.run_main(lambda: run(device, cloud, clock)) == 0
        try:
            raise RuntimeError(f"a bug quoting {SECRET}")
        except RuntimeError:
            logging.getLogger("entomologist.test").exception("unexpected error")
        stream.seek(0)
        text = stream.read()
    assert SECRET not in text and SECRET[4:30] not in text and "[redacted]" in text
    assert "Traceback" in text
    assert "left out a deviceConfiguration entry" in text
    settings = provisioning_settings(device.config())
    assert SECRET not in repr(settings) and SECRET not in repr(device.config())
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != secret_path]
    assert device.config_path in written and (device.cert_dir / "certificate.pem.crt") in written
    for path in written:
        data = path.read_bytes()
        assert SECRET.encode() not in data and SECRET[4:30].encode() not in data, path
    assert json.loads((device.cert_dir / "device-configuration.json").read_text()) == {"ok": "1"}


def test_a_thing_name_made_of_the_secret_is_never_written(device, cloud, clock):
    write_secret(device, text="Abcdefghijklmnop0123")
    cloud.register_answers.append(("accepted", {"thingName": "Abcdefghijklmnop0123"}))
    with pytest.raises(errors.ServiceError, match="thingName made of the provisioning secret"):
        run(device, cloud, clock)
    assert "Abcdefghijklmnop0123" not in device.config_path.read_text()
    for path in device.cert_dir.iterdir():
        assert b"Abcdefghijklmnop0123" not in path.read_bytes()


# ---------------------------------------------------------- the hook's refusal

@pytest.mark.parametrize("status,code", [(403, "AccessDenied"), (403, "ACCESS_DENIED"),
                                         (400, "AccessDeniedException")])
def test_a_hook_refusal_is_65_with_one_line_naming_the_fleet_inventory(
        tmp_path, device, cloud, clock, status, code):
    write_secret(device)
    cloud.register_answers.append(("rejected", {"statusCode": status, "errorCode": code,
                                                "errorMessage": "Access denied by the hook"}))
    with open(tmp_path / "stderr", "w+") as stream:
        logs.setup_logging(stream=stream)
        assert errors.run_main(lambda: run(device, cloud, clock)) == 65
        stream.seek(0)
        errors_logged = [line for line in stream.read().splitlines() if line.startswith("ERROR")]
    assert len(errors_logged) == 1
    line = errors_logged[0]
    assert "the fleet inventory refused this camera (serial CAM-42)" in line
    assert "`python cloud/inventory.py show CAM-42`" in line
    assert "allow-reprovision CAM-42" in line and "revoked" in line
    assert len(connects(cloud)) == 1 and len(cloud.registers()) == 1
    # Refused, so not registered: a cheap entry (AWS drops the certificate).
    assert [e["kind"] for e in entries(device)] == ["register-rejected"]


def test_other_register_rejections_keep_pointing_at_the_template(device, cloud, clock):
    cloud.register_answers.append(("rejected", {"statusCode": 400, "errorCode": "InvalidRequest",
                                                "errorMessage": "bad"}))
    with pytest.raises(errors.Rejected) as err:
        run(device, cloud, clock)
    assert "fleet inventory" not in str(err.value) and "TEMPLATE_NAME" in err.value.hint


# ---------------------------------------------------------- bounded spend

def test_a_register_without_answer_hints_at_the_claim_policys_receive_before_the_network(
        device, cloud, clock):
    cloud.register_answers.append(None)
    with pytest.raises(errors.TransientError) as err:
        run(device, cloud, clock)
    hint = err.value.hint
    assert hint.startswith("that the claim policy allows iot:Receive on "
                           "$aws/provisioning-templates/Fleet/provision/*")
    assert hint.index("iot:Receive") < hint.index("network")


def test_after_unanswered_registers_the_next_attempts_wait_1_min_10_min_1_h_then_6_h(
        device, cloud, clock):
    waits = []
    for attempt in range(5):
        cloud.register_answers.append(None)
        with pytest.raises(errors.TransientError, match="the next provisioning attempt is "
                                                        "allowed at"):
            run(device, cloud, clock)
        failed_at = clock.now()
        assert len(connects(cloud)) == attempt + 1  # one attempt: the wait is past the deadline
        # A run inside the wait exits at once, sending nothing, saying when.
        calls = len(cloud.calls)
        clock.advance(30)
        with pytest.raises(errors.TransientError, match="held back, nothing sent") as err:
            run(device, cloud, clock)
        assert errors.exit_code(err.value) == 75
        assert len(cloud.calls) == calls
        at, _ = spend.SpendRecord.open(device.cert_dir / SPEND, clock).next_attempt()
        waits.append(at - failed_at)
        assert spend.utc(at) in str(err.value)
        clock.advance(at - clock.now())
    assert waits == [60, 600, 3600, 6 * 3600, 6 * 3600]
    assert len(cloud.issued) == 5
    assert mode(device.cert_dir / SPEND) == 0o600
    # The next one is allowed and succeeds: the install clears the record.
    run(device, cloud, clock)
    assert device.device["PROVISION_STATUS"] == "True"
    assert not (device.cert_dir / SPEND).exists()


def test_at_most_6_unanswered_registers_per_camera_per_24_h(tmp_path, clock):
    record = spend.SpendRecord.open(tmp_path / SPEND, clock)
    first = clock.now()
    for n in range(6):
        cert = f"{n:064x}"
        record.created(cert)
        record.register_sent(cert)
        record.unanswered(cert)
        at, why = record.next_attempt()
        clock.advance(at - clock.now())
    # 1 min + 10 min + 1 h + 6 h + 6 h after the first, the 6th; 6 h after it
    # would be 19 h 11 min: the daily cap holds it to 24 h after the first.
    assert at == first + spend.DAY
    assert "6 RegisterThing requests in 24 h got no answer" in why


def test_a_wait_inside_the_deadline_is_slept_and_the_run_goes_on(device, cloud, clock):
    cloud.register_answers.append(None)
    run(device, cloud, clock, seconds=120)
    assert max(clock.sleeps) == pytest.approx(60, abs=1)
    assert len(cloud.issued) == 2 and device.device["PROVISION_STATUS"] == "True"
    assert not (device.cert_dir / SPEND).exists()


def test_certificates_never_registered_are_cheap_up_to_3_an_hour(
        device, cloud, clock):
    cloud.create_answers.extend(["drop", "drop", "drop"])
    with pytest.raises(errors.TransientError, match="3 certificates asked for in the last hour "
                                                    "were never registered"):
        run(device, cloud, clock, seconds=600)
    assert len(connects(cloud)) == 3 and len(cloud.registers()) == 0
    # The answers were lost: each request may have created a certificate.
    assert [e["kind"] for e in entries(device)] == ["create-sent"] * 3
    clock.advance(60)
    with pytest.raises(errors.TransientError, match="held back, nothing sent") as err:
        run(device, cloud, clock)
    assert err.value.hint.startswith("the network link")
    assert len(connects(cloud)) == 3
    clock.advance(3600)
    run(device, cloud, clock)
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_refused_subscription_names_topic_and_claim_policy_and_backs_off(device, cloud, clock):
    cloud.fail_with("subscribe", "refused")
    with pytest.raises(errors.TransientError) as err:
        run(device, cloud, clock)
    assert "the broker refused the subscription to $aws/certificates/create/json/" in str(
        err.value)
    assert "allowed at" in str(err.value)
    assert err.value.hint.startswith("the claim policy")
    assert "iot:Subscribe" in err.value.hint and "network" not in err.value.hint
    assert cloud.issued == []
    assert [e["kind"] for e in entries(device)] == ["subscription-refused"]
    clock.advance(59)
    with pytest.raises(errors.TransientError, match="held back, nothing sent"):
        run(device, cloud, clock)
    assert len(connects(cloud)) == 1
    clock.advance(2)
    run(device, cloud, clock)
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_record_dated_more_than_a_day_after_the_clock_is_taken_as_now_and_says_so(tmp_path, clock, caplog):
    path = tmp_path / SPEND
    path.write_text(json.dumps({"version": 1, "entries": [
        {"kind": "register-sent", "at": clock.now() + 10 * 365 * spend.DAY,
         "certificateId": "ab" * 32}]}))
    with caplog.at_level(logging.WARNING):
        record = spend.SpendRecord.open(path, clock)
    assert "dated after the clock" in caplog.text
    assert record.next_attempt()[0] == clock.now() + 60
    assert json.loads(path.read_text())["entries"][0]["at"] == clock.now()
    assert mode(path) == 0o600


@pytest.mark.parametrize("content", [b"\x00garbage", b'{"version": 1}', b'{"version": 2}',
                                     b'{"version": 1, "entries": [{"kind": "x", "at": 1}]}',
                                     b'{"version": 1, "entries": [{"kind": "created", '
                                     b'"at": NaN}]}', b"x" * (spend.MAX_RECORD_BYTES + 1),
                                     b"[" * 60000, b'{"version": 1, "entries": 7}'])
def test_an_unreadable_record_is_taken_as_one_unanswered_register_now_and_says_so(
        tmp_path, clock, caplog, content):
    path = tmp_path / SPEND
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        record = spend.SpendRecord.open(path, clock)
    assert "the worst it could hide" in caplog.text
    assert record.next_attempt()[0] == clock.now() + 60
    assert [e["kind"] for e in json.loads(path.read_text())["entries"]] == ["unreadable-record"]
    assert mode(path) == 0o600


def test_a_fifo_in_place_of_the_record_does_not_hang_and_is_replaced(tmp_path, clock):
    path = tmp_path / SPEND
    os.mkfifo(path)
    record = spend.SpendRecord.open(path, clock)
    assert record.next_attempt()[0] == clock.now() + 60
    assert stat.S_ISREG(os.lstat(path).st_mode)


def test_the_record_survives_a_new_process_as_it_survives_a_reboot(device, cloud, clock):
    cloud.register_answers.append(None)
    with pytest.raises(errors.TransientError):
        run(device, cloud, clock)
    saved = entries(device)
    assert [(e["kind"], e["certificateId"]) for e in saved] == [
        ("register-sent", cloud.issued[0]["certificateId"])]
    assert saved[0]["at"] == clock.now()


def test_secret_module_names_the_parameter_the_cloud_expects():
    assert secret.PARAMETER == "ProvisioningSecret"


def test_certificates_created_and_refused_or_never_sent_are_cheap(tmp_path, clock):
    record = spend.SpendRecord.open(tmp_path / SPEND, clock)
    first = clock.now()
    for n in range(3):
        # Nothing holds the 2nd or the 3rd back.
        assert record.next_attempt()[0] <= clock.now()
        record.create_sent()
        record.created(f"{n:064x}")
        if n == 1:
            record.register_sent(f"{n:064x}")
            record.rejected(f"{n:064x}")
        clock.advance(10)
    at, why = record.next_attempt()
    assert at == first + spend.HOUR and "3 certificates asked for in the last hour" in why
    kinds = [e["kind"] for e in json.loads((tmp_path / SPEND).read_text())["entries"]]
    assert kinds == ["created", "register-rejected", "created"]


def test_a_rejected_create_spent_nothing_and_leaves_no_record(device, cloud, clock):
    cloud.create_answers.append(("rejected", {"statusCode": 400, "errorCode": "InvalidRequest",
                                              "errorMessage": "no"}))
    with pytest.raises(errors.Rejected):
        run(device, cloud, clock)
    assert not (device.cert_dir / SPEND).exists()


def test_a_hook_refusal_after_an_unanswered_register_says_that_may_have_been_the_one(
        device, cloud, clock):
    """The inventory records an allowed registration as this camera's: when its answer
    was lost, the next one is refused as already provisioned."""
    write_secret(device)
    cloud.register_answers.extend([None, ("rejected", {
        "statusCode": 403, "errorCode": "ACCESS_DENIED", "errorMessage": "hook"})])
    with pytest.raises(errors.TransientError):
        run(device, cloud, clock)
    lost_at = clock.now()
    clock.advance(61)
    with pytest.raises(errors.InventoryRefused) as err:
        run(device, cloud, clock)
    assert errors.exit_code(err.value) == 65
    assert (f"this camera's RegisterThing at {spend.utc(lost_at)} got no answer and may have "
            f"been that registration") in str(err.value)
    assert "allow-reprovision CAM-42" in err.value.hint


def test_a_register_throttled_until_the_deadline_was_answered_and_costs_no_wait(
        device, cloud, clock, monkeypatch):
    # The longest backoff every time: how many certificates fit the 3 s run must not
    # depend on the jitter (3 unregistered in an hour do cost a wait, by design).
    monkeypatch.setattr(retries.random, "uniform", lambda low, high: high)
    throttled = ("rejected", {"statusCode": 429, "errorCode": "ThrottlingException",
                              "errorMessage": "Rate exceeded"})
    cloud.register_answers.extend([throttled] * 200)
    with pytest.raises(errors.TransientError, match="statusCode=429"):
        run(device, cloud, clock, seconds=3)
    assert {e["kind"] for e in entries(device)} == {"register-rejected"}
    cloud.register_answers.clear()
    run(device, cloud, clock)
    assert device.device["PROVISION_STATUS"] == "True"


def test_restarted_by_systemd_for_a_day_a_camera_whose_answers_never_come_mints_at_most_6(
        device, cloud, clock):
    """The unit's --timeout 120; restarts every 10 min here (every 60 s would only add
    runs that are held back)."""
    cloud.register_answers.extend([None] * 100)
    start, per_run = clock.now(), []
    while clock.now() - start < spend.DAY:
        before = len(cloud.issued)
        with pytest.raises(errors.TransientError):
            run(device, cloud, clock, seconds=120)
        per_run.append(len(cloud.issued) - before)
        clock.advance(600)
    # The first run tries twice (the minute's wait fits its deadline); then 10 min, 1 h,
    # 6 h, 6 h, and the day's cap.
    assert per_run[:3] == [2, 1, 0]
    assert sum(per_run) == 6
