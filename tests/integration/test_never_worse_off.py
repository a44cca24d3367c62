"""Never worse off, never wasteful: the device as the unit runs it (root without
capabilities, so file modes bind), with another user's files, full and read-only
disks, and a failure at the most expensive moment."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e import ROOT, DeviceState, device_doc, privilege_drop, run_script
from iot_standin import StandIn
from disk import fill, tmpfs

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="other owners, modes that bind root, and mounts need root")


def run_as_service(standin, script="boot.py", *args):
    proc = subprocess.run([*privilege_drop(), sys.executable, str(ROOT / script), "--config",
                           str(standin.config_path), "--timeout", "20", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    return proc, errors


def registers(standin):
    return len(standin.events("register-request"))


# ------------------------------------------------------- no registration wasted

@needs_root
def test_a_failure_after_register_thing_is_completed_later_without_asking_again(standin):
    state = DeviceState(standin)
    folder = standin.workdir
    standin.faults.after_register = lambda: os.chmod(folder, 0o555)
    try:
        for _ in range(3):  # the unit retries 73: each retry must ask nothing
            proc, errors = run_as_service(standin)
            assert proc.returncode == 73, proc.stderr
            assert len(errors) == 1 and str(folder) in errors[0]
            state.check([proc.stderr], completed=False)
    finally:
        os.chmod(folder, 0o755)
    assert registers(standin) == 1 and len(standin.events("create-request")) == 1
    proc, _ = run_as_service(standin)
    assert proc.returncode == 0, proc.stderr
    assert registers(standin) == 1
    assert state.check([proc.stderr], completed=True) == {"installed": True, "status": True}


@needs_root
def test_a_config_whose_group_cannot_be_kept_is_refused_before_anything_is_asked(standin):
    os.chown(standin.config_path, 0, 4321)
    state = DeviceState(standin)
    proc, errors = run_as_service(standin)
    assert proc.returncode == 73, proc.stderr
    assert len(errors) == 1 and "owner or group cannot be kept" in errors[0]
    assert standin.events("create-request") == []
    assert state.check([proc.stderr], completed=False) == {"installed": False, "status": False}
    assert os.stat(standin.config_path).st_gid == 4321


@needs_root
def test_a_cert_dir_that_fills_while_register_thing_is_awaited_still_keeps_the_registration(
        standin):
    state = DeviceState(standin)
    with tmpfs(standin.workdir / "cert", "256k") as cert_dir:
        standin.faults.after_register = lambda: fill(cert_dir)
        proc, _ = run_as_service(standin)
        (cert_dir / "filler").unlink()
        assert registers(standin) == 1
        if proc.returncode != 0:  # the install itself may not fit: the next run finishes it
            assert proc.returncode == 73, proc.stderr
            standin.faults.after_register = None
            proc, _ = run_as_service(standin)
        assert proc.returncode == 0, proc.stderr
        assert registers(standin) == 1
        assert state.check([proc.stderr], completed=True)["installed"]


@needs_root
def test_a_full_cert_dir_is_found_before_anything_is_asked(standin):
    with tmpfs(standin.workdir / "cert", "256k") as cert_dir:
        fill(cert_dir)
        proc, errors = run_as_service(standin)
        assert proc.returncode == 73, proc.stderr
        assert len(errors) == 1 and "No space left" in errors[0]
        assert standin.events("create-request") == []
        assert sorted(p.name for p in cert_dir.iterdir()) == ["filler", "run.lock"]


# -------------------------------------------- --force never destroys the identity

@needs_root
def test_force_on_a_full_disk_keeps_the_working_identity(standin):
    with tmpfs(standin.workdir / "cert", "256k") as cert_dir:
        assert run_script("boot.py", standin.config_path).code == 0
        before = {p.name: p.read_bytes() for p in cert_dir.iterdir()}
        fill(cert_dir)
        proc, errors = run_as_service(standin, "boot.py", "--force")
        assert proc.returncode == 73, proc.stderr
        assert standin.events("create-request")[1:] == []
        (cert_dir / "filler").unlink()
        assert {p.name: p.read_bytes() for p in cert_dir.iterdir()} == before
        proc, _ = run_as_service(standin, "update_boot_status.py")
        assert proc.returncode == 0, proc.stderr


def test_force_refused_by_the_service_keeps_the_working_identity(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    cert_dir = standin.workdir / "cert"
    before = {p.name: p.read_bytes() for p in cert_dir.iterdir()}
    from iot_standin import Rejection
    standin.faults.reject_register = Rejection(400, "InvalidParameters", "no")
    assert run_script("boot.py", standin.config_path, "--force").code == 65
    after = {p.name: p.read_bytes() for p in cert_dir.iterdir()}
    # Beside the untouched pair: the refused certificate, recorded (AWS drops it).
    assert b'"register-rejected"' in after.pop("provisioning-spend.json")
    assert after == before
    standin.faults.reject_register = None
    assert run_script("update_boot_status.py", standin.config_path).code == 0


# ------------------------------------------------- nothing others can write

@needs_root
@pytest.mark.parametrize("what", ["config file", "config folder", "cert dir", "cert dir link"])
def test_what_another_user_can_write_is_refused_before_anything_is_asked(standin, what,
                                                                         tmp_path_factory):
    cert_dir = standin.workdir / "cert"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    if what == "config file":
        os.chmod(standin.config_path, 0o662)
        named = standin.config_path
    elif what == "config folder":
        os.chmod(standin.workdir, 0o777)
        named = standin.workdir
    elif what == "cert dir":
        cert_dir.mkdir(mode=0o700)
        os.chmod(cert_dir, 0o770)
        named = cert_dir
    else:
        os.chmod(elsewhere, 0o777)
        cert_dir.symlink_to(elsewhere)
        named = elsewhere
    try:
        proc, errors = run_as_service(standin)
    finally:
        os.chmod(standin.workdir, 0o755)
    assert proc.returncode == 78, proc.stderr
    assert len(errors) == 1 and str(named) in errors[0] and "written by group or others" in \
        errors[0]
    assert standin.events("create-request") == []
    assert list(elsewhere.iterdir()) == []
    if what == "cert dir link":
        assert os.stat(elsewhere).st_mode & 0o777 == 0o777  # never "fixed" through the link


def test_a_config_linked_into_a_trusted_folder_is_rewritten_at_its_target(standin):
    real = standin.workdir / "real"
    real.mkdir()
    target = real / "ento.conf"
    doc = json.loads(standin.config_path.read_text())
    for key in ("CLAIM_CERT", "CLAIM_KEY", "PROVISIONING_SECRET_FILE", "ROOT_CA", "CERT_DIR"):
        doc["device"][key] = str(standin.workdir / doc["device"][key])
    target.write_text(json.dumps(doc))
    os.chmod(target, 0o640)
    link = standin.workdir / "link.conf"
    link.symlink_to(target)
    result = run_script("boot.py", link)
    assert result.code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["device"]["PROVISION_STATUS"] == "True"


# ------------------------------------------------------- reporting needs no write

def config_in_its_own_folder(standin) -> Path:
    """The stand-in's config and CERT_DIR in a folder of their own (etc/), the claim
    files and the stand-in's state outside it: that folder can be mounted read-only."""
    etc = standin.workdir / "etc"
    etc.mkdir(mode=0o755, exist_ok=True)
    os.chmod(etc, 0o755)
    doc = json.loads(standin.config_path.read_text())
    for key in ("CLAIM_CERT", "CLAIM_KEY", "PROVISIONING_SECRET_FILE", "ROOT_CA"):
        doc["device"][key] = str(standin.workdir / doc["device"][key])
    doc["device"]["CERT_DIR"] = str(etc / "cert")
    (etc / "ento.conf").write_text(json.dumps(doc))
    os.chmod(etc / "ento.conf", 0o640)
    return etc / "ento.conf"


def run_config_as_service(config: Path, script="boot.py"):
    proc = subprocess.run([*privilege_drop(), sys.executable, str(ROOT / script), "--config",
                           str(config), "--timeout", "20"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    return proc, [line for line in proc.stderr.splitlines() if not line.startswith("INFO")]


@needs_root
def test_a_provisioned_camera_whose_root_is_mounted_read_only_reports_every_boot(
        standin, read_only):
    config = config_in_its_own_folder(standin)
    proc, _ = run_config_as_service(config)
    assert proc.returncode == 0, proc.stderr
    read_only(config.parent)
    for script in ("boot.py", "update_boot_status.py", "boot.py"):
        proc, noise = run_config_as_service(config, script)
        assert (proc.returncode, noise) == (0, []), proc.stderr
    assert len(standin.wait_for("boot", 4)) == 4


@needs_root
def test_a_false_status_on_a_read_only_root_is_reported_once_with_one_warning_and_exit_0(
        standin, read_only):
    config = config_in_its_own_folder(standin)
    assert run_config_as_service(config)[0].returncode == 0
    doc = json.loads(config.read_text())
    doc["device"]["PROVISION_STATUS"] = "False"
    config.write_text(json.dumps(doc))
    read_only(config.parent)
    proc, noise = run_config_as_service(config)
    assert proc.returncode == 0, proc.stderr
    assert len(noise) == 1 and noise[0].startswith("WARNING") and "PROVISION_STATUS" in noise[0]
    assert len(standin.wait_for("boot", 2)) == 2
    assert json.loads(config.read_text())["device"]["PROVISION_STATUS"] == "False"


@needs_root
def test_a_full_disk_at_the_status_write_retries_the_write_and_never_the_boot_message(
        standin, tmp_path):
    """One boot, one message: the unit's retries (73, every 60 s) redo only the write."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {"RUNTIME_DIRECTORY": str(runtime)}
    with tmpfs(standin.workdir / "etc", "256k"):
        config = config_in_its_own_folder(standin)
        assert run_script("boot.py", config).code == 0
        doc = json.loads(config.read_text())
        doc["device"]["PROVISION_STATUS"] = "False"
        config.write_text(json.dumps(doc))
        fill(config.parent)
        for _ in range(2):
            result = run_script("boot.py", config, env=env)
            assert result.code == 73, result.stderr
            assert "No space left" in result.errors[0]
        assert len(standin.wait_for("boot", 2)) == 2
        (config.parent / "filler").unlink()
        result = run_script("boot.py", config, env=env)
        assert result.code == 0, result.stderr
        assert json.loads(config.read_text())["device"]["PROVISION_STATUS"] == "True"
        assert len(standin.events("boot")) == 2
        # The next boot (a new /run) reports again.
        fresh = tmp_path / "run2"
        fresh.mkdir(mode=0o700)
        assert run_script("boot.py", config, env={"RUNTIME_DIRECTORY": str(fresh)}).code == 0
        assert len(standin.wait_for("boot", 3)) == 3


# ------------------------------------------------------------- bounded reads

@pytest.mark.parametrize("key", ["ROOT_CA", "CLAIM_CERT", "CLAIM_KEY"])
def test_a_fifo_where_a_file_belongs_is_a_config_error_not_a_hang(device_files, key):
    fifo = device_files.workdir / "fifo"
    os.mkfifo(fifo)
    doc = json.loads(device_files.config_path.read_text())
    doc["device"][key] = str(fifo)
    device_files.config_path.write_text(json.dumps(doc))
    result = run_script("boot.py", device_files.config_path, "--timeout", "5", timeout=20)
    assert result.code == 78, result.stderr
    assert "not a regular file" in result.errors[0]


def test_a_fifo_in_place_of_the_installed_ca_does_not_hang_the_boot_report(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    ca = standin.workdir / "cert" / "AmazonRootCA1.pem"
    ca.unlink()
    os.mkfifo(ca)
    result = run_script("update_boot_status.py", standin.config_path, "--timeout", "5",
                        timeout=20)
    assert result.code in (0, 78), result.stderr
    assert result.seconds < 10


def test_csr_mode_provisions_a_serial_id_longer_than_a_common_name(tmp_path):
    serial = "S" * 100
    with StandIn(tmp_path, serial=serial, mode="CreateCertificateFromCsr") as standin:
        assert device_doc(standin)["device"]["PROVISIONING_API"] == "CreateCertificateFromCsr"
        result = run_script("boot.py", standin.config_path)
        assert result.code == 0, result.stderr
        assert standin.wait_for("boot")[0]["topic"] == f"cameraDevice/{serial}/booted"


# ------------------------------------------------- what the hostile review found

HOSTILE = ["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups"]


@pytest.fixture
def open_standin():
    """A stand-in device in a folder other users can reach, as /etc/entomologist is."""
    import shutil
    import tempfile
    from iot_standin import StandIn
    root = Path(tempfile.mkdtemp(prefix="ento-open-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        with StandIn(root) as s:
            yield s
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_root
def test_another_user_holding_a_lock_on_the_config_folder_blocks_nothing(open_standin):
    holder = subprocess.Popen([*HOSTILE, "flock", "-x", str(open_standin.workdir),
                               "sleep", "30"])
    try:
        proc, _ = run_as_service(open_standin)
        assert proc.returncode == 0, proc.stderr
        # Nor can that user open the real lock, in CERT_DIR.
        attempt = subprocess.run([*HOSTILE, "flock", "-n", "-x",
                                  str(open_standin.workdir / "cert" / "run.lock"), "true"],
                                 capture_output=True)
        assert attempt.returncode != 0
    finally:
        holder.kill()
        holder.wait()


def test_a_symlinked_config_with_relative_paths_is_one_device_with_one_registration(standin):
    data = standin.workdir / "data"
    data.mkdir()
    doc = json.loads(standin.config_path.read_text())
    for key in ("CLAIM_CERT", "CLAIM_KEY", "PROVISIONING_SECRET_FILE", "ROOT_CA"):
        doc["device"][key] = "../" + doc["device"][key]
    (data / "ento.conf").write_text(json.dumps(doc))  # CERT_DIR "cert": data/cert
    os.chmod(data / "ento.conf", 0o640)
    etc = standin.workdir / "etc"
    etc.mkdir()
    (etc / "ento.conf").symlink_to(data / "ento.conf")
    for config in (etc / "ento.conf", data / "ento.conf", etc / "ento.conf"):
        result = run_script("boot.py", config)
        assert result.code == 0, result.stderr
    assert registers(standin) == 1
    assert (data / "cert" / "certificate.pem.crt").exists() and not (etc / "cert").exists()


@needs_root
def test_a_symlink_another_user_planted_in_a_sticky_folder_is_refused(standin,
                                                                     tmp_path_factory):
    sticky = tmp_path_factory.mktemp("sticky")
    os.chmod(sticky, 0o1777)
    victim = tmp_path_factory.mktemp("victim")
    os.chmod(victim, 0o755)
    link = sticky / "cert"
    link.symlink_to(victim)
    os.lchown(link, 4321, 4321)
    standin.write_device_config(CERT_DIR=str(link))
    proc, errors = run_as_service(standin)
    assert proc.returncode == 78, proc.stderr
    assert len(errors) == 1 and "belongs to uid 4321" in errors[0]
    assert os.stat(victim).st_mode & 0o777 == 0o755 and list(victim.iterdir()) == []
    assert standin.events("create-request") == []


@needs_root
def test_a_boot_record_in_a_runtime_folder_another_user_owns_never_spares_the_boot_message(
        standin, tmp_path):
    # RUNTIME_DIRECTORY says where this boot's message was noted as acknowledged: in a
    # folder another local user owns, that user could forge the note, and the run
    # would set the status without the boot's one message.
    assert run_script("boot.py", standin.config_path).code == 0
    assert len(standin.wait_for("boot", 1)) == 1
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    from update_boot_status import reported_mark
    cert = (standin.workdir / "cert" / "certificate.pem.crt").read_bytes()
    mark = reported_mark(cert, device_doc(standin)["device"]["SERIAL_ID"]).decode()
    folder = os.open(theirs, os.O_RDONLY | os.O_DIRECTORY)  # tmp_path is root's alone
    child = os.fork()
    if child == 0:  # the other user forges the note in their own folder
        try:
            os.setgid(65534)
            os.setuid(65534)
            fd = os.open("boot-reported", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=folder)
            os.write(fd, mark.encode())
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    os.close(folder)
    assert (theirs / "boot-reported").read_text() == mark
    result = run_script("update_boot_status.py", standin.config_path,
                        env={"RUNTIME_DIRECTORY": str(theirs)})
    assert result.code == 0, result.stderr
    assert len(standin.wait_for("boot", 2)) == 2, result.stderr


@needs_root
@pytest.mark.parametrize("name", ["private.pem.key", "certificate.pem.crt"])
def test_an_installed_file_the_run_cannot_read_is_never_provisioned_over(standin, name):
    # A credential file that is there but cannot be read (a failing card's EIO, a mode
    # the run cannot open) may be sound: provisioning over it would spend a
    # registration and leave the old certificate active with no device to hold it.
    assert run_script("boot.py", standin.config_path).code == 0
    cert_dir = standin.workdir / "cert"
    pair = {p: p.read_bytes() for p in (cert_dir / "certificate.pem.crt",
                                        cert_dir / "private.pem.key")}
    before = registers(standin)
    mode = os.stat(cert_dir / name).st_mode & 0o777
    os.chmod(cert_dir / name, 0)
    try:
        proc, errors = run_as_service(standin)
        assert proc.returncode == 73, proc.stderr
        assert len(errors) == 1 and str(cert_dir / name) in errors[0], proc.stderr
        assert "Permission denied" in errors[0]
        assert registers(standin) == before
        assert {p: p.read_bytes() for p in pair} == pair
    finally:
        os.chmod(cert_dir / name, mode)
    proc, errors = run_as_service(standin)
    assert (proc.returncode, errors) == (0, []), proc.stderr
    assert registers(standin) == before


@needs_root
def test_a_record_naming_another_camera_that_cannot_be_read_never_makes_its_pair_ours(standin):
    # An image copied after its first boot holds the pair of the camera it was copied
    # from, and installed-for.json names that camera. If that record is there but cannot
    # be read, it may name another camera: adopting the pair (and writing this camera's
    # serial over the record) would leave two cameras sharing one identity.
    assert run_script("boot.py", standin.config_path).code == 0
    record = standin.workdir / "cert" / "installed-for.json"
    doc = json.loads(record.read_text())
    record.write_text(json.dumps({**doc, "serialId": "CAM-COPIED-FROM"}))
    boots = len(standin.events("boot"))
    os.chmod(record, 0)
    try:
        proc, errors = run_as_service(standin)
        assert proc.returncode == 73, proc.stderr
        assert len(errors) == 1 and str(record) in errors[0], proc.stderr
        assert json.loads(record.read_text())["serialId"] == "CAM-COPIED-FROM"
        assert len(standin.events("boot")) == boots
    finally:
        os.chmod(record, 0o644)


@needs_root
def test_check_names_an_installed_key_the_run_cannot_read_as_a_storage_failure_to_read(
        standin):
    # --check says what the next boot would do: end with 73 on this file, and it is a
    # read that fails, not a write.
    assert run_script("boot.py", standin.config_path).code == 0
    key = standin.workdir / "cert" / "private.pem.key"
    os.chmod(key, 0)
    try:
        proc, _ = run_as_service(standin, "boot.py", "--check")
    finally:
        os.chmod(key, 0o600)
    assert proc.returncode == 73, proc.stdout
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("FAIL")] == ["cert-dir"]
    assert str(key) in lines[1] and "Permission denied" in lines[1]
    assert lines[-1].startswith("exit 73: ") and " read " in lines[-1], lines[-1]
