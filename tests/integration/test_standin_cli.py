"""The stand-in as users run it: a process with fault options on its command line."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import iot_standin as standin_cli
from e2e import ROOT, run_script
from standin.responder import Faults, Rejection


def start(tmp_path, *options, preexec_fn=None):
    proc = subprocess.Popen([sys.executable, str(ROOT / "iot_standin.py"), "run", "--dir",
                             str(tmp_path), *options], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    end = time.monotonic() + 20
    for line in proc.stderr:
        if "stand-in ready" in line:
            return proc
        assert time.monotonic() < end
    raise AssertionError(f"the stand-in did not start (exit {proc.wait()})")


def stop(proc):
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0


@pytest.mark.parametrize("options,expected", [
    (["--reject-register", "400:InvalidParameters:bad serial"],
     Faults(reject_register=Rejection(400, "InvalidParameters", "bad serial"))),
    (["--reject-create", "429:Throttling", "--reject-times", "1"],
     Faults(reject_create=Rejection(429, "Throttling"), reject_times=1)),
    (["--malformed-create", "wrong-key"], Faults(malformed_create="wrong-key")),
    (["--malformed-register", "empty-thing"], Faults(malformed_register="empty-thing")),
    (["--drop-after", "create"], Faults(drop_after="create")),
    (["--drop-after", "register"], Faults(drop_after="register")),
    (["--drop-register-answers"], Faults(drop_register_answers=True)),
    (["--no-answer"], Faults(no_answer=True)),
    (["--delay", "1.5"], Faults(delay=1.5)),
    ([], Faults()),
])
def test_each_fault_option_sets_the_fault_the_in_process_fault_tests_exercise(options, expected):
    # What each fault does to a boot is tested with these same Faults in
    # test_faults_service, test_spend_bound_e2e, test_boot_flow and
    # test_standin_responder; here, that the command line asks for exactly that.
    args = standin_cli.parser().parse_args(["run", "--dir", "unused", *options])
    assert standin_cli.faults_from(args) == expected


@pytest.mark.heavy
@pytest.mark.parametrize("options,code,expected", [
    ([], 0, "boot message acknowledged"),
    (["--reject-register", "400:InvalidParameters:bad serial"], 65,
     "errorCode=InvalidParameters errorMessage='bad serial'"),
    (["--drop-register-answers"], 75, "allows iot:Receive on $aws/provisioning-templates/"),
    (["--refuse-connections"], 75, "CONNECTION_REFUSED"),
])
def test_fault_options_from_the_command_line(tmp_path, options, code, expected):
    proc = start(tmp_path, *options)
    try:
        # Room for retries where it must succeed, and for both requests where an
        # unanswered RegisterThing ends the run; short where it must give up at once.
        timeout = "20" if code == 0 else "6" if "register" in " ".join(options) else "2"
        result = run_script("boot.py", tmp_path / "ento.conf", "--timeout", timeout)
    finally:
        stop(proc)
    assert result.code == code, result.stderr
    assert expected in result.stderr


def test_demo_shows_files_boot_messages_and_the_claim_pair_alone_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "iot_standin.py"), "demo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "600    " in proc.stdout and "cert/private.pem.key" in proc.stdout
    assert proc.stdout.count('cameraDevice/CAM-0001/booted  {"serialID": "CAM-0001", '
                             '"bootStatus": true}') == 2
    # Through the stack an operator deploys: its template, its claim and device policies.
    assert "Applying cloud/stack.yaml: template ento-fleet-template, claim policy for " \
           "ProvisioningMode CreateKeysAndCertificate" in proc.stdout
    assert ('RegisterThing through template ento-fleet-template: thing ento-CAM-0001, '
            'attributes {"serialNumber": "CAM-0001"}, deviceConfiguration '
            '{"BootTopic": "cameraDevice/CAM-0001/booted"}') in proc.stdout
    assert "topic write cameraDevice/CAM-0001/booted" in proc.stdout
    assert "644      50  cert/device-configuration.json" in proc.stdout
    assert "Policy denials: 0" in proc.stdout
    assert "ReregistrationWindowHours is 0 here" in proc.stdout
    assert [line.rsplit("(hook: ", 1)[-1] for line in proc.stdout.splitlines()
            if line.startswith("  RegisterThing for ")] == [
        "unknown-serial)", "wrong-secret)", "already-provisioned)"]


def test_run_applies_the_mode_and_the_stack_given(tmp_path):
    proc = start(tmp_path, "--mode", "CreateCertificateFromCsr")
    try:
        assert json.loads((tmp_path / "ento.conf").read_text())["device"][
            "PROVISIONING_API"] == "CreateCertificateFromCsr"
        result = run_script("boot.py", tmp_path / "ento.conf", "--timeout", "20")
    finally:
        stop(proc)
    assert result.code == 0, result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "cloud" / "stack.yaml").read_text().replace(
        '{"Ref": "SerialNumber"}]]', '{"Fn::GetAtt": ["thing", "Name"]}]]'))
    proc = subprocess.run([sys.executable, str(ROOT / "iot_standin.py"), "run", "--dir",
                           str(tmp_path / "other"), "--stack", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78 and "Fn::GetAtt is not supported" in proc.stderr, proc.stderr


@pytest.mark.parametrize("options", [
    ["--reject-create", "nonsense"], ["--reject-register", "200:OK"], ["--delay", "nan"],
    ["--delay", "-1"], ["--reject-times", "-2"], ["--malformed-create", "other"],
])
def test_a_malformed_fault_option_is_a_usage_error_not_a_traceback(tmp_path, options, capsys):
    with pytest.raises(SystemExit) as stopped:
        standin_cli.main(["run", "--dir", str(tmp_path), *options])
    assert stopped.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_usage_error_ends_the_process_with_2_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "iot_standin.py"), "run", "--dir",
                           str(tmp_path), "--delay", "nan"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_never_overwrites_a_device_already_in_its_folder(tmp_path):
    (tmp_path / "ento.conf").write_text('{"device": {"SERIAL_ID": "mine"}}')
    proc = subprocess.run([sys.executable, str(ROOT / "iot_standin.py"), "run", "--dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 73, proc.stderr
    assert "--overwrite" in proc.stderr
    assert (tmp_path / "ento.conf").read_text() == '{"device": {"SERIAL_ID": "mine"}}'
    assert not (tmp_path / "claim").exists()


def test_overwrite_makes_a_device_that_provisions_not_one_left_with_the_old_cas_pair(
        tmp_path):
    # Run again with --overwrite (a new CA, a new claim pair, a new config): the pair
    # the old stand-in's CA signed would be taken as installed and never connect.
    proc = start(tmp_path)
    try:
        assert run_script("boot.py", tmp_path / "ento.conf").code == 0
    finally:
        stop(proc)
    old = (tmp_path / "cert" / "certificate.pem.crt").read_bytes()
    proc = start(tmp_path, "--overwrite")
    try:
        result = run_script("boot.py", tmp_path / "ento.conf", "--timeout", "20")
    finally:
        stop(proc)
    assert result.code == 0, result.stderr
    assert (tmp_path / "cert" / "certificate.pem.crt").read_bytes() != old


def test_sigterm_stops_the_stand_in_and_its_mosquitto(tmp_path):
    proc = start(tmp_path)
    port = json.loads((tmp_path / "ento.conf").read_text())["device"]["PORT"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_run_puts_the_device_in_the_fleet_inventory_and_its_secret_beside_its_config(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "iot_standin.py"), "run", "--dir",
                             str(tmp_path), "--serial", "CAM-0042"], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "fleet inventory:" in line:
                break
        assert any("stand-in ready" in line for line in lines), lines
        device = json.loads((tmp_path / "ento.conf").read_text())["device"]
        secret = tmp_path / device["PROVISIONING_SECRET_FILE"]
        assert oct(secret.stat().st_mode & 0o777) == "0o600"
        env_file = tmp_path / "standin" / "aws.env"
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"
        environment = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        operator = subprocess.run(
            [sys.executable, str(ROOT / "cloud" / "inventory.py"), "show", "CAM-0042"],
            capture_output=True, text=True, timeout=60,
            env={"PATH": os.environ.get("PATH", ""), "AWS_CONFIG_FILE": "/dev/null",
                 **environment})
        assert operator.returncode == 0, operator.stderr
        assert json.loads(operator.stdout)["state"] == "manufactured"
        assert secret.read_text().strip() not in (tmp_path / "standin" /
                                                  "events.jsonl").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_sigint_stops_the_stand_in_and_its_mosquitto_even_when_started_with_it_ignored(
        tmp_path):
    # As `nohup` or `&` in a script start it: SIGINT ignored, inherited through exec.
    proc = start(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    port = json.loads((tmp_path / "ento.conf").read_text())["device"]["PORT"]
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_stand_in_stopped_while_it_starts_never_reports_ready(tmp_path):
    # A harness waits for "stand-in ready": a SIGTERM during the start must not be
    # followed by that line (and a device then sent to a port nobody serves).
    proc = subprocess.Popen([sys.executable, str(ROOT / "iot_standin.py"), "run", "--dir",
                             str(tmp_path)], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 20
    while not (tmp_path / "ento.conf").exists():  # written during the start, before ready
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "stand-in ready" not in stderr
    port = json.loads((tmp_path / "ento.conf").read_text())["device"]["PORT"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_folder_another_user_owns_is_refused_and_nothing_is_written_through_its_links(
        tmp_path):
    # README's `run --dir /tmp/device`: whoever makes /tmp/device first owns it, and
    # a link planted in it would have the stand-in (root, often) write over any file.
    if os.geteuid() != 0:
        pytest.skip("handing a folder to another user needs root")
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's own\n")
    victim.chmod(0o600)
    folder = tmp_path / "device"
    (folder / "standin").mkdir(parents=True)
    (folder / "standin" / "mosquitto.conf").symlink_to(victim)
    for path in (folder, folder / "standin", folder / "standin" / "mosquitto.conf"):
        os.lchown(path, 65534, 65534)
    proc = subprocess.run([sys.executable, str(ROOT / "iot_standin.py"), "run", "--dir",
                           str(folder)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == os.EX_CANTCREAT, proc.stderr
    assert f"{folder}" in proc.stderr and "owned by uid 65534" in proc.stderr, proc.stderr
    assert victim.read_bytes() == b"root's own\n"
    assert sorted(p.name for p in folder.rglob("*")) == ["mosquitto.conf", "standin"]
