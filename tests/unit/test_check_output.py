"""boot.py --check's output: one line per check, secrets redacted, JSON lines, its options."""
import io
import json
import os

import pytest

import boot
from entomologist import check, check_local, check_network, logs
from entomologist.errors import ConfigError, StorageError, TransientError
from disk import fill, take_inodes, tmpfs
from fakes import CAM42_CLAIM


def test_a_failed_check_prints_its_problem_and_hint_on_one_line_without_secrets():
    out = []
    checks = check.Checks(out.append)
    logs.redact("hunter2-proxy-password")

    def failing():
        raise ConfigError("the proxy said hunter2-proxy-password\nforged line",
                          hint="HTTP_PROXY")
    with pytest.raises(check.Failed):
        checks.run("proxy", failing)
    line = check.human_line(out[0])
    assert "hunter2-proxy-password" not in line and "\n" not in line
    assert line.startswith("FAIL proxy       the proxy said [redacted]\\nforged line; "
                           "check HTTP_PROXY (")
    assert checks.exit_code() == 78


def test_the_exit_code_is_the_first_failures_in_the_boots_order():
    checks = check.Checks(lambda result: None)
    for name, error in (("storage", StorageError("read-only")), ("tcp", TransientError("down"))):
        def failing(error=error):
            raise error
        with pytest.raises(check.Failed):
            checks.run(name, failing)
    assert checks.exit_code() == 73
    # A provisioned camera writes its status only after the boot message: the link first.
    assert checks.exit_code(frozenset({"storage"})) == 75


def test_a_warning_does_not_change_the_exit_code():
    checks = check.Checks(lambda result: None)
    checks.run("lock", lambda: check_local.Warn("a boot is running now"))
    assert [r.status for r in checks.results] == ["warn"] and checks.exit_code() == 0


def test_a_bug_in_a_check_is_a_failure_with_70_not_a_crash():
    checks = check.Checks(lambda result: None)
    with pytest.raises(check.Failed):
        checks.run("dns", lambda: 1 / 0)
    assert checks.results[0].detail == "unexpected error (a bug): ZeroDivisionError"
    assert checks.exit_code() == 70


def test_json_output_is_one_object_per_line_ending_with_the_result(tmp_path):
    out = io.StringIO()
    code = check.run(tmp_path / "missing.conf", 5, True, False, out)
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert code == 78
    assert [o["name"] for o in objects] == ["config", "result"]
    assert objects[0]["status"] == "fail" and objects[0]["exit_code"] == 78
    assert objects[0]["detail"] == f"config file {tmp_path / 'missing.conf'} does not exist"
    assert objects[1]["exit_code"] == 78


def test_the_summary_gives_the_checks_time_in_milliseconds(tmp_path, monkeypatch):
    times = iter([100.0])  # when the check started; every later reading is 2.5 s on
    monkeypatch.setattr(check.time, "monotonic", lambda: next(times, 102.5))
    out = io.StringIO()
    check.run(tmp_path / "missing.conf", 5, True, False, out)
    assert json.loads(out.getvalue().splitlines()[-1])["milliseconds"] == 2500


@pytest.mark.parametrize("argv", [["--json"], ["--connect-as-thing"], ["--check", "--force"]])
def test_check_options_are_refused_where_they_mean_nothing(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        boot.main(argv)
    assert exc.value.code == 2


def test_the_help_says_why_connecting_as_the_thing_is_off_by_default(capsys):
    with pytest.raises(SystemExit):
        boot.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("--connect-as-thing with --check on a provisioned camera: also open an MQTT "
            "connection as THING_NAME. Off by default: AWS IoT keeps one connection per "
            "client ID, so this drops the camera application's own connection if it uses "
            "that client ID") in help_text


# ------------------------------------------------ the claim connection, on AWS's terms

def claim_check(device, cloud):
    from entomologist import config as configuration
    from entomologist.retries import Deadline
    config = device.config()
    settings = configuration.provisioning_settings(config)
    return check_network.check_claim_mqtt(config, settings, Deadline(5), cloud)


def test_the_claim_check_connects_subscribes_to_the_answers_and_publishes_nothing(device,
                                                                                 cloud):
    detail = claim_check(device, cloud)
    assert cloud.calls == [
        ("connect", CAM42_CLAIM, "claim.pem.crt"),
        ("subscribe", "$aws/certificates/create/json/accepted"),
        ("subscribe", "$aws/certificates/create/json/rejected"),
        ("subscribe", "$aws/provisioning-templates/Fleet/provision/json/accepted"),
        ("subscribe", "$aws/provisioning-templates/Fleet/provision/json/rejected"),
        ("close",)]
    assert detail.endswith("subscribed to $aws/certificates/create/* and "
                           "$aws/provisioning-templates/Fleet/provision/*; nothing published")


def test_the_claim_check_in_csr_mode_subscribes_to_the_csr_answers(device, cloud):
    device.update(PROVISIONING_API="CreateCertificateFromCsr")
    claim_check(device, cloud)
    assert ("subscribe", "$aws/certificates/create-from-csr/json/accepted") in cloud.calls
    assert not [c for c in cloud.calls if c[0] == "publish"]


def test_a_subscription_aws_refuses_is_named_with_the_claim_policy_hint(device, cloud):
    # AWS answers a SUBSCRIBE its policy denies with 0x80 and keeps the connection.
    cloud.fail_with("subscribe", None, None, "refused")
    with pytest.raises(TransientError) as refused:
        claim_check(device, cloud)
    assert str(refused.value) == ("the broker refused the subscription to "
                                  "$aws/provisioning-templates/Fleet/provision/json/accepted")
    assert refused.value.hint.startswith("the claim policy")
    assert "it needs iot:Publish, iot:Receive and iot:Subscribe on " \
           "$aws/certificates/create/* and $aws/provisioning-templates/Fleet/provision/*" \
           in refused.value.hint
    assert cloud.calls[-1] == ("close",)


# ------------------------------------------------ a CERT_DIR or a folder the boot cannot use

def check_lines(device) -> tuple[int, dict]:
    out = io.StringIO()
    code = check.run(device.config_path, 5, True, False, out)
    return code, {o["name"]: o for o in map(json.loads, out.getvalue().splitlines())}


def test_a_cert_dir_the_boot_would_refuse_fails_its_line_and_the_checks_after_it_say_why_not(
        device):
    device.cert_dir.mkdir(mode=0o700)
    os.chmod(device.cert_dir, 0o777)
    code, lines = check_lines(device)
    assert code == 78
    assert lines["cert-dir"]["status"] == "fail"
    assert "can be written by group or others" in lines["cert-dir"]["detail"]
    for name in ("lock", "credentials", "storage"):
        assert (lines[name]["status"], lines[name]["detail"]) == ("skip", "needs CERT_DIR")
    assert lines["result"]["exit_code"] == 78


def test_a_folder_root_owns_without_its_write_bit_fails_the_storage_line_with_73(device):
    if os.geteuid() != 0:
        pytest.skip("the unit's case: root without capabilities")
    folder = device.config_path.parent
    os.chmod(folder, 0o555)
    try:
        code, lines = check_lines(device)
    finally:
        os.chmod(folder, 0o755)
    assert lines["storage"]["status"] == "fail" and lines["storage"]["exit_code"] == 73
    assert lines["storage"]["detail"] == (
        f"the folder of CERT_DIR {folder} is not writable by root without privileges (the "
        f"unit's case); the next boot must write there")
    assert code == 73


def test_a_full_disk_under_cert_dir_fails_the_storage_line_with_73(device, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    with tmpfs(tmp_path / "data", "256k", 0o755) as data:
        fill(data)
        device.update(CERT_DIR=str(data / "cert"))
        code, lines = check_lines(device)
    assert lines["storage"]["status"] == "fail" and lines["storage"]["exit_code"] == 73
    assert lines["storage"]["detail"] == (f"the folder of CERT_DIR {data} has less than 128 KiB "
                                          f"free; the next boot must write there")
    assert code == 73


def test_a_disk_without_free_inodes_under_cert_dir_fails_the_storage_line_with_73(device,
                                                                                  tmp_path):
    # Free blocks but no free inodes (many small files on a card): the boot cannot
    # create CERT_DIR, its lock or its records, and ends in 73.
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    with tmpfs(tmp_path / "data", "4m", 0o755, inodes=64) as data:
        take_inodes(data)
        assert os.statvfs(data).f_favail == 0 and os.statvfs(data).f_bavail > 32
        device.update(CERT_DIR=str(data / "cert"))
        code, lines = check_lines(device)
    assert lines["storage"]["status"] == "fail" and lines["storage"]["exit_code"] == 73, lines
    assert lines["storage"]["detail"].startswith(f"the folder of CERT_DIR {data} has fewer "
                                                 f"than "), lines["storage"]
    assert code == 73
