"""boot.py --check against the stand-in: one line per check, the exit code the next boot
would end with, and nothing written, requested or published."""
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from disk import fill, tmpfs
from e2e import ROOT, device_doc, run_and_kill, run_script
from iot_standin import StandIn
from standin import template as templates
from standin.ca import StandInCA, write_new
from test_proxy_e2e import (scripted_proxy, status, tinyproxy,  # noqa: F401 (fixtures)
                            tinyproxy_installed)

def check(standin_or_path, *args, timeout=60, env=None, prefix=()):
    """Run --check as a process (under ``prefix``, a command such as faketime)."""
    config = getattr(standin_or_path, "config_path", standin_or_path)
    proc = subprocess.run([*prefix, sys.executable, str(ROOT / "boot.py"), "--config", str(config),
                           "--check", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return proc


def lines(proc) -> dict[str, str]:
    """Human output: {check name: its line}."""
    found = {}
    for line in proc.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in ("ok", "FAIL", "WARN", "skip"):
            found[parts[1]] = line
    return found


def records(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def snapshot(root, besides=("standin",)) -> dict:
    """Every entry under the device's folders (the stand-in's own folder aside):
    name, mode, owner, mtime and content."""
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in besides]
        for name in [".", *dirs, *names]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_mtime_ns,
                                                  content)
    return found


def published_by_device(standin) -> list[str]:
    """mosquitto's log lines of PUBLISHes it received from anyone but the responder."""
    log = (standin.dir / "mosquitto.log").read_text(errors="replace")
    return [line for line in log.splitlines()
            if "Received PUBLISH from" in line and "standin-responder" not in line]


REQUESTS = {"create-request", "csr-request", "register-request", "boot", "denied"}


def test_a_healthy_camera_checks_ok_before_and_after_provisioning_and_nothing_changes(standin):
    before = snapshot(standin.workdir)
    proc = check(standin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lines(proc)
    assert list(found) == ["config", "cert-dir", "lock", "claim", "clock", "storage", "secret",
                           "spend", "dns", "tcp", "tls", "mqtt"]
    assert all(line.startswith("ok ") for line in found.values()), proc.stdout
    assert "the next boot will provision the camera" in found["cert-dir"]
    assert re.search(r"CONNECT as CAM-0001-[0-9a-f]{16} with the claim certificate accepted; "
                     r"subscribed to \$aws/certificates/create/\* and "
                     r"\$aws/provisioning-templates/ento-fleet-template/provision/\*",
                     found["mqtt"]), found["mqtt"]
    assert proc.stdout.splitlines()[-1].startswith("exit 0: the next boot would succeed")
    assert snapshot(standin.workdir) == before
    assert not REQUESTS & {e["event"] for e in standin.events()}
    assert published_by_device(standin) == []
    assert re.search(rf" as {standin.serial}-[0-9a-f]{{16}} ",
                     (standin.dir / "mosquitto.log").read_text())

    assert run_script("boot.py", standin.config_path).code == 0
    before, events = snapshot(standin.workdir), len(standin.events())
    publishes = len(published_by_device(standin))
    for args in ((), ("--connect-as-thing",)):
        proc = check(standin, *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = lines(proc)
        assert "the next boot will only send its boot message" in found["cert-dir"]
        assert found["credentials"].startswith(
            f"ok   credentials certificate {standin.workdir / 'cert' / 'certificate.pem.crt'} "
            f"and its key in "), found["credentials"]
        assert "with the device certificate" in found["tls"]
        assert "nothing to write: PROVISION_STATUS is already True" in found["storage"]
    assert found["mqtt"].startswith("ok ")
    assert "CONNECT as ento-CAM-0001 with the device certificate accepted" in found["mqtt"]
    assert snapshot(standin.workdir) == before
    assert standin.events()[events:] == []
    assert len(published_by_device(standin)) == publishes


def test_a_provisioned_camera_makes_no_mqtt_connection_unless_asked(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    connects = standin.dir.joinpath("mosquitto.log").read_text().count("as ento-CAM-0001")
    proc = check(standin)
    assert proc.returncode == 0, proc.stdout
    assert lines(proc)["mqtt"].startswith(
        "skip mqtt        no MQTT CONNECT as ento-CAM-0001: it would drop the camera "
        "application's own connection (--connect-as-thing does it)")
    assert standin.dir.joinpath("mosquitto.log").read_text().count("as ento-CAM-0001") == connects


def test_json_output_is_one_object_per_line_and_check_then_the_result(standin):
    proc = check(standin, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    objects = records(proc)
    assert [o["name"] for o in objects] == ["config", "cert-dir", "lock", "claim", "clock",
                                            "storage", "secret", "spend", "dns", "tcp", "tls",
                                            "mqtt", "result"]
    for o in objects:
        assert set(o) == {"name", "status", "detail", "hint", "milliseconds", "exit_code"}
        assert o["status"] == "ok" and isinstance(o["milliseconds"], int)
    assert objects[-1]["exit_code"] == 0


@pytest.mark.parametrize("as_json", [False, True], ids=["lines", "json"])
def test_a_reader_gone_before_the_first_line_still_gets_the_verdict_and_no_traceback(
        standin, as_json):
    # `boot.py --check | grep -q FAIL`, `| head -1`: the reader leaves early; the exit
    # code is still the verdict (a script reads it through PIPESTATUS), and nothing
    # but log lines reaches stderr.
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "boot.py"), "--config",
                               str(standin.config_path), "--check",
                               *(["--json"] if as_json else [])],
                              stdin=subprocess.DEVNULL, stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.skipif(os.geteuid() != 0, reason="a small tmpfs needs root")
def test_a_report_written_to_a_full_disk_or_a_closed_output_still_gives_the_verdict(
        standin, tmp_path):
    # `boot.py --check > /var/log/station/check.txt` on a full disk, or run by a
    # station with its stdout closed: the report is lost, the verdict is not, and one
    # line says why the report is missing (not a traceback and exit 1).
    with tmpfs(tmp_path / "disk", "64k", mode=0o755) as disk:
        fill(disk)
        with open(disk / "report", "w") as report:
            proc = subprocess.run([sys.executable, str(ROOT / "boot.py"), "--config",
                                   str(standin.config_path), "--check"],
                                  stdin=subprocess.DEVNULL, stdout=report,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("WARNING") and proc.stderr.count("\n") == 1, proc.stderr
    assert "No space left on device" in proc.stderr
    closed = subprocess.run(f'"{sys.executable}" "{ROOT / "boot.py"}" --config '
                            f'"{standin.config_path}" --check --json >&-', shell=True,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=60)
    assert closed.returncode == 0, closed.stderr
    assert closed.stderr.startswith("WARNING") and closed.stderr.count("\n") == 1, closed.stderr


def test_a_server_certificate_from_another_ca_fails_the_tls_line_at_once_with_75(standin):
    write_new(standin.workdir / "other-ca.pem", StandInCA("Another CA").pem, 0o644)
    standin.write_device_config(ROOT_CA="other-ca.pem")
    proc = check(standin, "--json")
    assert proc.returncode == 75, proc.stdout
    tls = next(o for o in records(proc) if o["name"] == "tls")
    assert tls["status"] == "fail" and tls["exit_code"] == 75
    assert tls["detail"].startswith(f"TLS with localhost:{standin.port}: the server's "
                                    "certificate does not verify against ")
    assert "other-ca.pem (self-signed certificate in certificate chain)" in tls["detail"]
    assert tls["hint"].startswith("ROOT_CA in the config")
    assert next(o for o in records(proc) if o["name"] == "mqtt")["status"] == "skip"
    assert standin.events("denied") == []


def without_the_register_topics(stack):
    for statement in stack.claim_policies[0]["Statement"]:
        if statement["Action"] == "iot:Subscribe":
            statement["Resource"] = [r for r in statement["Resource"]
                                     if "provisioning-templates" not in r]


def test_a_claim_policy_without_the_answer_topics_fails_the_mqtt_line_with_75(tmp_path):
    stack = templates.load_stack()
    without_the_register_topics(stack)
    with StandIn(tmp_path, stack=stack) as standin:
        proc = check(standin, "--timeout", "3")
        # The broker logs the second refusal on its own time: the check may have
        # ended by then.
        denied = standin.wait_for("denied", 2)
        requests = REQUESTS & {e["event"] for e in standin.events()}
    assert proc.returncode == 75, proc.stdout
    line = lines(proc)["mqtt"]
    # The stand-in answers a denied SUBSCRIBE with 0x80, as AWS does, and keeps the
    # connection: the refused topic is named, with the claim policy.
    assert line.startswith("FAIL mqtt        the broker refused the subscription to "
                           "$aws/provisioning-templates/ento-fleet-template/provision/json/"), line
    assert "check the claim policy" in line and "iot:Subscribe on $aws/" in line
    # Both register answer topics are refused; the connection stays up for the second.
    assert {d["action"] for d in denied} == {"iot:Subscribe"}
    assert sorted(d["resource"].rsplit("/", 1)[1] for d in denied) == ["accepted", "rejected"]
    assert all("topicfilter/$aws/provisioning-templates/ento-fleet-template/provision/json/"
               in d["resource"] for d in denied)
    assert requests == {"denied"}


def test_the_broker_down_fails_the_tcp_line_with_75(device_files):
    proc = check(device_files)
    assert proc.returncode == 75, proc.stdout
    found = lines(proc)
    assert found["tcp"].startswith(f"FAIL tcp         connect to localhost:{device_files.port} "
                                   "failed: Connection refused; check the network link")
    assert found["tls"].startswith("skip tls         needs the network checks above")
    assert found["claim"].startswith("ok ")


def check_at(standin, when: str) -> dict:
    """The lines of a --check that exits 75, run where the clock reads ``when``
    (libfaketime: the process alone sees it, as a board without RTC would)."""
    if not shutil.which("faketime"):
        pytest.fail("faketime is not installed: run `make test`, which installs it")
    proc = check(standin, prefix=("faketime", "-f", f"@{when}"), env={"DONT_FAKE_MONOTONIC": "1"})
    assert proc.returncode == 75, proc.stdout + proc.stderr
    return lines(proc)


def test_a_clock_in_the_past_fails_the_clock_line_with_75_and_skips_the_handshake(standin):
    found = check_at(standin, "2021-01-01 00:00:00")  # years behind
    assert found["clock"].startswith("FAIL clock       the system clock is not set: it reads "
                                     "2021-01-01T00:00:0")
    assert "check time synchronisation" in found["clock"]
    assert found["tcp"].startswith("ok ")
    assert found["tls"].startswith("skip tls         needs the credentials and the clock")


def test_a_clock_far_ahead_fails_the_tls_line_naming_the_clock_not_the_ca(standin):
    # A hostile or broken time server: every certificate looks expired, and the CA and
    # the endpoint are as they should be.
    found = check_at(standin, "2090-01-01 00:00:00")
    assert found["clock"].startswith("ok ")
    assert "(certificate has expired)" in found["tls"], found["tls"]
    assert "check the system clock (it reads 2090-01-01T00:00:0" in found["tls"], found["tls"]


def test_a_claim_key_others_can_write_fails_the_claim_line_with_78(standin):
    os.chmod(standin.claim_key, 0o620)
    proc = check(standin)
    assert proc.returncode == 78, proc.stdout
    found = lines(proc)
    assert found["claim"].startswith(f"FAIL claim       refusing claim key {standin.claim_key}: "
                                     "it can be written by group or others")
    assert found["tcp"].startswith("ok ")  # the network still means something
    assert found["mqtt"].startswith("skip ")


def test_a_proxy_refusing_connect_to_the_port_fails_the_proxy_line_with_78(standin, tinyproxy):
    proxy = tinyproxy([443, 563])
    standin.write_device_config(HTTP_PROXY=proxy.url("camera:s3cret-Proxy-Pass@"))
    proc = check(standin)
    assert proc.returncode == 78, proc.stdout
    found = lines(proc)
    assert found["proxy"].startswith(
        f"FAIL proxy       the HTTP proxy 127.0.0.1:{proxy.port} refused to CONNECT to "
        f"localhost:{standin.port} (HTTP 403); check that the proxy's rules allow CONNECT")
    assert "s3cret-Proxy-Pass" not in proc.stdout + proc.stderr
    assert proxy.connects(standin.port) == 1


def test_a_running_boot_is_reported_without_waiting_and_its_lock_is_left_alone(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    lock_path = standin.workdir / "cert" / "run.lock"
    with open(lock_path) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = check(standin, "--timeout", "5")
    assert proc.returncode == 0, proc.stdout
    found = lines(proc)
    assert found["lock"].startswith(f"WARN lock        a boot is running now (it holds "
                                    f"{lock_path})")
    assert found["tls"].startswith("ok ")


def test_no_claim_connection_is_made_while_a_first_boot_runs(standin):
    # A second connection as SERIAL_ID would drop the boot's claim connection.
    cert_dir = standin.workdir / "cert"
    cert_dir.mkdir(mode=0o700)
    with open(os.open(cert_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = check(standin, "--timeout", "5")
    assert proc.returncode == 0, proc.stdout
    assert lines(proc)["mqtt"].startswith("skip mqtt        a boot is running: a second "
                                          "connection with its client ID would drop its own")
    assert f"as {standin.serial}" not in (standin.dir / "mosquitto.log").read_text()


def test_an_untrusted_config_fails_the_config_line_with_78_and_stops_there(standin):
    os.chmod(standin.config_path, 0o662)
    proc = check(standin)
    assert proc.returncode == 78, proc.stdout
    assert len(proc.stdout.splitlines()) == 2
    assert lines(proc)["config"].startswith(f"FAIL config      refusing config file "
                                            f"{standin.config_path}: it can be written by "
                                            "group or others")
    assert proc.stdout.splitlines()[1].startswith("exit 78: configuration")


def test_a_camera_without_its_lock_file_gets_none_from_the_check(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    (standin.workdir / "cert" / "run.lock").unlink()
    proc = check(standin)
    assert proc.returncode == 0, proc.stdout
    assert lines(proc)["lock"].startswith("ok   lock        no boot running")
    assert not (standin.workdir / "cert" / "run.lock").exists()


def test_a_read_only_device_folder_fails_storage_with_73_before_the_network(device_files):
    # A real read-only bind mount (chmod would not show it to root).
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    workdir = str(device_files.workdir)
    subprocess.run(["mount", "--bind", workdir, workdir], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", workdir], check=True)
        proc = check(device_files)
    finally:
        subprocess.run(["umount", workdir], check=True)
    assert proc.returncode == 73, proc.stdout
    found = lines(proc)
    assert found["storage"].startswith(
        f"FAIL storage     the folder of CERT_DIR {workdir} is on a read-only file system; "
        "the next boot must write there")
    assert found["tcp"].startswith("FAIL ")  # nothing listens: 75 too, but storage comes first
    assert device_doc(device_files)["device"]["PROVISION_STATUS"] == "False"


def test_a_token_camera_is_checked_without_touching_the_token(tmp_path, monkeypatch):
    from entomologist import pkcs11_key
    from softhsm import SOFTHSM_MODULE, make_token
    token = make_token(tmp_path / "hsm", monkeypatch=monkeypatch)
    with StandIn(tmp_path, mode="CreateCertificateFromCsr") as standin:
        standin.write_device_config(PROVISIONING_API="CreateCertificateFromCsr",
                                    KEY_STORAGE="pkcs11", PKCS11_LIBRARY=str(SOFTHSM_MODULE),
                                    PKCS11_TOKEN_LABEL=token.label,
                                    PKCS11_PIN_FILE=str(token.pin_file))
        assert run_script("boot.py", standin.config_path, env=token.env).code == 0
        # What a --force run killed before it registered leaves: a boot deletes it.
        with pkcs11_key.open_token(token.settings()) as t:
            t.generate("EC-P256", label="entomologist-device.staging")
        # SoftHSM2 rewrites its own store at every login, whoever logs in: the token is
        # compared by its objects, the device's other folders byte for byte.
        objects, files_before = token.objects(), snapshot(standin.workdir, ("standin", "hsm"))
        proc = check(standin, "--connect-as-thing", env=token.env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = lines(proc)
        assert found["token"].startswith(f"ok   token       module {SOFTHSM_MODULE}, token "
                                         f"'{token.label}': the PIN is accepted")
        assert found["tls"].startswith("ok   tls         the server's certificate for "
                                       "localhost verifies against ")
        assert "accepts the device certificate with the token's key" in found["tls"]
        assert "CONNECT as ento-CAM-0001 with the device certificate accepted" in found["mqtt"]
        assert token.objects() == objects
        assert snapshot(standin.workdir, ("standin", "hsm")) == files_before
        assert REQUESTS & {e["event"] for e in standin.events()} == {"csr-request",
                                                                     "register-request", "boot"}
        assert len(standin.events("boot")) == 1


def test_a_registration_waiting_to_be_installed_is_what_the_check_announces(standin):
    marker = standin.workdir / "cert" / "registration.json.staging"
    killed, _ = run_and_kill(standin, marker.exists)
    assert killed and marker.exists()
    requests = len([e for e in standin.events() if e["event"] in REQUESTS])
    proc = check(standin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lines(proc)
    assert "thing ento-CAM-0001 is registered and its credentials wait in" in found["cert-dir"]
    assert "the next boot will install them, without any request" in found["cert-dir"]
    assert found["storage"].startswith("ok ")
    assert "no client certificate presented (none is installed yet)" in found["tls"]
    assert found["mqtt"].startswith("skip mqtt        the next boot installs a registered pair")
    # And so it does.
    assert run_script("boot.py", standin.config_path).code == 0
    assert [e["event"] for e in standin.events() if e["event"] in REQUESTS][requests:] == ["boot"]


def test_a_device_certificate_the_service_does_not_accept_fails_the_tls_line_with_75(
        tmp_path, monkeypatch):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from softhsm import SOFTHSM_MODULE, make_token
    token = make_token(tmp_path / "hsm", monkeypatch=monkeypatch)
    with StandIn(tmp_path, mode="CreateCertificateFromCsr") as standin:
        standin.write_device_config(PROVISIONING_API="CreateCertificateFromCsr",
                                    KEY_STORAGE="pkcs11", PKCS11_LIBRARY=str(SOFTHSM_MODULE),
                                    PKCS11_TOKEN_LABEL=token.label,
                                    PKCS11_PIN_FILE=str(token.pin_file))
        assert run_script("boot.py", standin.config_path, env=token.env).code == 0
        # The token's key, certified by a CA the service does not know.
        installed = standin.workdir / "cert" / "certificate.pem.crt"
        public_key = x509.load_pem_x509_certificate(installed.read_bytes()).public_key()
        other = StandInCA("Not the service's CA").issue(public_key, "ento-CAM-0001")
        installed.write_bytes(other.public_bytes(serialization.Encoding.PEM))
        proc = check(standin, env=token.env)
    assert proc.returncode == 75, proc.stdout + proc.stderr
    found = lines(proc)
    assert found["cert-dir"].startswith("ok ")
    assert found["tls"].startswith(f"FAIL tls         TLS with localhost:{standin.port} with "
                                   "the device certificate and the token's key failed: ")
    assert f"check that {installed} is registered with AWS IoT and active" in found["tls"]


def test_through_a_proxy_that_allows_the_port_the_tls_check_runs_in_its_tunnel(standin,
                                                                              tinyproxy):
    proxy = tinyproxy([standin.port])
    standin.write_device_config(HTTP_PROXY=proxy.url())
    proc = check(standin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lines(proc)
    assert list(found) == ["config", "cert-dir", "lock", "claim", "clock", "storage", "secret",
                           "spend", "dns", "proxy", "tls", "mqtt"]
    assert found["dns"].startswith("ok   dns         the HTTP proxy's host 127.0.0.1 is "
                                   "127.0.0.1; the proxy resolves ENDPOINT_URL")
    assert found["proxy"].startswith(f"ok   proxy       the HTTP proxy 127.0.0.1:{proxy.port} "
                                     f"opened a tunnel to localhost:{standin.port}")
    # One tunnel for the TLS check, one for the claim connection's CONNECT.
    assert proxy.connects(standin.port, 2) == 2


def test_a_check_logs_only_warnings_unless_verbose_the_tunnels_info_line_shows_with_v(
        standin, tinyproxy):
    proxy = tinyproxy([standin.port])
    standin.write_device_config(HTTP_PROXY=proxy.url())
    quiet = check(standin)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert quiet.stderr == ""
    verbose = check(standin, "-v")
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert f"INFO tunnelling through the HTTP proxy 127.0.0.1:{proxy.port}" in verbose.stderr


@pytest.mark.heavy
def test_a_check_on_port_443_offers_the_aws_iot_alpn_as_the_boot_does(standin, alpn_listener):
    standin.write_device_config(PORT=443)
    proc = check(standin, "--timeout", "5")
    assert alpn_listener == ["x-amzn-mqtt-ca"], proc.stdout + proc.stderr


def test_an_endpoint_no_resolver_knows_fails_the_dns_line_with_75_and_names_it(device_files):
    # .invalid never resolves (RFC 6761): the resolver answers at once that it does not exist.
    device_files.write_device_config(ENDPOINT_URL="camera-endpoint.invalid")
    proc = check(device_files, "--timeout", "5")
    assert proc.returncode == 75, proc.stdout
    assert lines(proc)["dns"].startswith(
        "FAIL dns         cannot resolve ENDPOINT_URL camera-endpoint.invalid: "), proc.stdout
    assert "check DNS, ENDPOINT_URL (" in lines(proc)["dns"], proc.stdout


def test_a_check_run_by_another_user_names_the_folder_it_cannot_write():
    if os.geteuid() != 0:
        pytest.skip("changing to another user needs root")
    import tempfile
    from pathlib import Path
    # Not under pytest's tmp_path: its folders are root's alone (0700).
    folder = Path(tempfile.mkdtemp(prefix="entomologist-other-user-"))
    try:
        os.chmod(folder, 0o755)
        config = folder / "ento.conf"
        config.write_text(json.dumps({"device": {
            "SERIAL_ID": "CAM-1", "ENDPOINT_URL": "localhost", "PORT": 1,
            "PROVISION_STATUS": "False", "TEMPLATE_NAME": "Fleet",
            "CLAIM_CERT": str(folder / "claim.pem"), "CLAIM_KEY": str(folder / "claim.key"),
            "ROOT_CA": str(folder / "ca.pem"), "CERT_DIR": str(folder / "cert")}}))
        os.chmod(config, 0o644)
        proc = check_as_nobody(config, "--timeout", "3")
    finally:
        shutil.rmtree(folder)
    assert lines(proc)["storage"].startswith(
        f"FAIL storage     the folder of CERT_DIR {folder} is not writable by this user; the "
        "next boot must write there"), proc.stdout


def check_as_nobody(config, *args):
    """boot.py --check in a child of this process that became user 65534: nothing
    is executed from the checkout, which that user may not be able to read (a
    clone in a 0700 folder)."""
    import encodings.idna  # noqa: F401 (the child cannot read the stdlib under /root)
    import types

    import boot
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            code = boot.main(["--config", str(config), "--check", *args])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, errors="replace") as out:
        output = out.read()
    _, status = os.waitpid(pid, 0)
    return types.SimpleNamespace(returncode=os.waitstatus_to_exitcode(status), stdout=output)


def test_the_units_count_of_bugs_in_a_row_is_left_as_it_is(device_files, tmp_path):
    runtime = tmp_path / "run-entomologist"
    runtime.mkdir(mode=0o700)
    (runtime / "consecutive-bugs").write_text("2\n")
    before = snapshot(runtime)
    proc = check(device_files, env={"RUNTIME_DIRECTORY": str(runtime)})
    assert proc.returncode == 75, proc.stdout  # nothing listens
    assert snapshot(runtime) == before


@pytest.fixture
def tls13_only_listener(standin):
    """A TLS 1.3-only server with the stand-in's server certificate (AWS IoT's TLS13
    security policies), holding each connection open as a broker awaiting CONNECT;
    ``start(client_ca)`` trusts client certificates from that CA; returns its port."""
    import socket
    import ssl
    import threading
    from standin.broker import free_port
    sockets = []

    def start(client_ca):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(standin.dir / "server.pem.crt",
                            standin.dir / "server.private.pem.key")
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
        port = free_port("127.0.0.1")
        sock = socket.create_server(("127.0.0.1", port))
        sockets.append(sock)

        def hold(conn):
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                conn.close()

        def serve():
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                threading.Thread(target=hold, args=(conn,), daemon=True).start()
        threading.Thread(target=serve, daemon=True).start()
        return port

    yield start
    for sock in sockets:
        sock.close()


def test_a_tls13_only_server_is_checked_with_tls13_and_its_verdict_awaited(
        standin, tls13_only_listener):
    standin.write_device_config(PORT=tls13_only_listener(standin.ca_path))
    proc = check(standin, "--timeout", "5")
    tls = lines(proc)["tls"]
    assert tls.startswith("ok   tls         TLSv1.3 with the claim certificate: the server's "
                          "certificate for localhost verifies against"), proc.stdout
    assert lines(proc)["mqtt"].startswith("FAIL ")  # no broker behind it


def test_a_tls13_only_server_refusing_the_claim_certificate_fails_the_tls_line(
        standin, tls13_only_listener, tmp_path):
    other = tmp_path / "other-ca.pem"
    write_new(other, StandInCA("Not the claim's CA").pem, 0o644)
    standin.write_device_config(PORT=tls13_only_listener(other))
    proc = check(standin, "--timeout", "5")
    assert proc.returncode == 75, proc.stdout
    assert lines(proc)["tls"].startswith("FAIL tls         TLS with localhost:"), proc.stdout
    assert ": the server refused the claim certificate (" in lines(proc)["tls"]


def test_credentials_installed_for_another_camera_are_announced_as_set_aside(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    record = standin.workdir / "cert" / "installed-for.json"
    doc = json.loads(record.read_text())
    doc["serialId"] = "CAM-0002"
    record.write_text(json.dumps(doc))
    before = snapshot(standin.workdir)
    proc = check(standin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lines(proc)
    assert ("were installed for camera CAM-0002, not this one (an image copied after its "
            "first boot): they will be set aside; the next boot will provision the camera"
            ) in found["cert-dir"]
    assert found["claim"].startswith("ok ") and found["mqtt"].startswith("ok ")
    assert snapshot(standin.workdir) == before  # nothing moved by the check


def test_a_provisioned_camera_on_a_read_only_mount_warns_that_its_status_stays_false(
        standin):
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    assert run_script("boot.py", standin.config_path).code == 0
    standin.write_device_config(PROVISION_STATUS="False", THING_NAME="ento-CAM-0001")
    standin.stop()  # its own files live under the device's folder
    workdir = str(standin.workdir)
    subprocess.run(["mount", "--bind", workdir, workdir], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", workdir], check=True)
        proc = check(standin)
    finally:
        subprocess.run(["umount", workdir], check=True)
    found = lines(proc)
    assert found["storage"].startswith(
        f"WARN storage     the config's folder {workdir} is on a read-only file system: the "
        "boot will be reported, but PROVISION_STATUS will stay False"), proc.stdout
    # As the boot: that is no failure; the broker being away is.
    assert found["tcp"].startswith("FAIL ") and proc.returncode == 75


def test_a_captive_portal_proxy_fails_the_proxy_line_with_75_as_the_boot(device_files,
                                                                        scripted_proxy):
    proxy = scripted_proxy(status(302, headers=b"Location: http://portal.example/login\r\n"))
    device_files.write_device_config(HTTP_PROXY=proxy.url())
    proc = check(device_files, "--timeout", "4")
    assert proc.returncode == 75, proc.stdout
    assert lines(proc)["proxy"].startswith(
        "FAIL proxy       the HTTP proxy 127.0.0.1:"), proc.stdout
    assert "with something other than a tunnel (HTTP 302)" in lines(proc)["proxy"]


def check_through(device_files, scripted_proxy, behaviour, why: str) -> None:
    """--check through a proxy that behaves so: 75, its line naming ``why``."""
    proxy = scripted_proxy(behaviour)
    device_files.write_device_config(HTTP_PROXY=proxy.url())
    proc = check(device_files, "--timeout", "4")
    assert proc.returncode == 75, proc.stdout
    assert lines(proc)["proxy"].startswith(
        f"FAIL proxy       the HTTP proxy 127.0.0.1:{proxy.port} did not answer CONNECT as an "
        f"HTTP proxy ({why})"), proc.stdout


@pytest.mark.parametrize("after", [b"not TLS", b"\x16"], ids=["text", "one byte"])
def test_a_proxy_whose_200_is_followed_by_bytes_is_no_tunnel(device_files, scripted_proxy, after):
    def chatty(conn, n, stopping):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n" + after)
    check_through(device_files, scripted_proxy, chatty,
                  "bytes after the answer, before the tunnel was used")


def test_a_proxy_answering_100_continue_without_end_is_read_no_further_than_16_kib(
        device_files, scripted_proxy):
    def continues(conn, n, stopping):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000)  # 26 000 bytes at once
        stopping.wait(5)
    check_through(device_files, scripted_proxy, continues, "no final status in 16384 bytes")


@pytest.mark.heavy
def test_a_camera_held_back_by_its_spend_record_checks_75_naming_when_and_writes_nothing(
        standin):
    standin.faults.drop_register_answers = True
    first = run_script("boot.py", standin.config_path, "--timeout", "6")
    assert first.code == 75, first.stderr
    before, events = snapshot(standin.workdir), len(standin.events())
    proc = check(standin)
    assert proc.returncode == 75, proc.stdout + proc.stderr
    found = lines(proc)
    assert found["spend"].startswith("FAIL spend       provisioning held back, nothing sent: "
                                     "the next provisioning attempt is allowed at 20")
    assert found["secret"].startswith("ok ")
    assert snapshot(standin.workdir) == before
    assert not REQUESTS & {e["event"] for e in standin.events()[events:]}


def test_a_secret_file_others_can_read_fails_the_secret_line_with_78(standin):
    path = standin.workdir / "provisioning-secret"
    if not path.exists():
        write_new(path, b"0123456789abcdef0123456789abcdef\n", 0o600)
        standin.write_device_config(PROVISIONING_SECRET_FILE=path.name)
    os.chmod(path, 0o644)
    proc = check(standin)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    found = lines(proc)
    assert found["secret"].startswith("FAIL secret      provisioning secret file ")
    assert "0644" in found["secret"] and "0123456789abcdef" not in proc.stdout


@pytest.mark.parametrize("lock_file", [True, False], ids=["with run.lock", "before any run"])
def test_another_user_holding_a_readable_cert_dir_neither_fakes_a_running_boot_nor_skips_mqtt(
        lock_file):
    # CERT_DIR may be a folder the product did not make (0755): anyone can open it
    # and flock it.  Every run locks run.lock (0600) once it exists, so a lock held
    # on the folder is nobody's boot, and must not spare the claim policy's check;
    # nor before run.lock exists, when a lock on a folder anyone can open proves nothing.
    if os.geteuid() != 0:
        pytest.skip("changing to another user needs root")
    import tempfile
    import time
    from pathlib import Path
    # Not under pytest's tmp_path: its folders are root's alone (0700).
    folder = Path(tempfile.mkdtemp(prefix="entomologist-held-folder-"))
    os.chmod(folder, 0o755)
    stack = templates.load_stack()
    without_the_register_topics(stack)
    ready_r, ready_w = os.pipe()
    holder = None
    try:
        with StandIn(folder, stack=stack) as standin:
            cert_dir = standin.workdir / "cert"
            cert_dir.mkdir(mode=0o755)
            if lock_file:
                os.close(os.open(cert_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o600))
            holder = os.fork()
            if holder == 0:  # another local user: holds the folder until killed
                try:
                    os.setgroups([])
                    os.setresgid(65534, 65534, 65534)
                    os.setresuid(65534, 65534, 65534)
                    fd = os.open(cert_dir, os.O_RDONLY | os.O_DIRECTORY)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    os.write(ready_w, b"x")
                    time.sleep(60)
                finally:
                    os._exit(0)
            assert os.read(ready_r, 1) == b"x"
            proc = check(standin, "--timeout", "5")
    finally:
        if holder:
            os.kill(holder, 9)
            os.waitpid(holder, 0)
        os.close(ready_r)
        os.close(ready_w)
        shutil.rmtree(folder)
    found = lines(proc)
    assert found["lock"].startswith("ok   lock        no boot running"), proc.stdout
    assert found["mqtt"].startswith("FAIL mqtt        the broker refused the subscription"), \
        proc.stdout
    assert proc.returncode == 75, proc.stdout


def test_a_copied_images_spend_record_is_the_other_cameras_and_holds_this_one_back_not(
        standin):
    # The image was copied while its camera waited on RegisterThing's answer record:
    # the boot sets that camera's registration and spend record aside, and provisions
    # at once; the check must say so, not "held back" by the other camera's spend.
    from e2e import run_and_kill
    marker = standin.workdir / "cert" / "registration.json.staging"
    killed, _ = run_and_kill(standin, marker.exists)
    assert killed and (standin.workdir / "cert" / "provisioning-spend.json").exists()
    doc = device_doc(standin)
    doc["device"]["SERIAL_ID"] = "CAM-0002"
    doc["device"]["PROVISIONING_SECRET_FILE"] = standin.inventory.add(
        "CAM-0002", standin.workdir).name
    standin.config_path.write_text(json.dumps(doc))
    proc = check(standin, "--timeout", "10")
    found = lines(proc)
    assert "camera CAM-0001" in found["cert-dir"] and "set aside" in found["cert-dir"], \
        proc.stdout
    assert found["spend"].startswith("ok "), proc.stdout
    assert proc.returncode == 0, proc.stdout
    assert run_script("boot.py", standin.config_path, "--timeout", "30").code == 0
