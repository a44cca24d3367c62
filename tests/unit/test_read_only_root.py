"""A read-only root: the config folder and CERT_DIR on a real read-only mount (as
camera images mount / to spare the SD card, and as the unit's ProtectSystem=strict
shows every path it does not list in ReadWritePaths=)."""
import os

import pytest

import boot
from entomologist import errors, files, retries
from fakes import FakeClock


def provisioned(device, cloud):
    boot.boot(device.config_path, retries.Deadline(30, clock=FakeClock()), build=cloud)
    cloud.calls.clear()
    cloud.connections.clear()


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_removing_a_missing_file_from_a_read_only_mount_is_no_error(tmp_path, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(folder)
    with pytest.raises(OSError) as raised:
        os.unlink(folder / "absent")
    assert raised.value.errno == 30  # what the kernel says, so what must be handled
    files.remove_durably(folder / "absent")


def test_removing_a_file_that_exists_on_a_read_only_mount_is_a_storage_error(
        tmp_path, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "present").write_text("x")
    read_only(folder)
    with pytest.raises(errors.StorageError, match="cannot remove .*present: Read-only"):
        files.remove_durably(folder / "present")
    assert (folder / "present").read_text() == "x"


def test_a_provisioned_camera_on_a_read_only_root_reports_every_boot_and_writes_nothing(
        device, cloud, read_only):
    provisioned(device, cloud)
    assert device.device["PROVISION_STATUS"] == "True"
    folder = read_only(device.config_path.parent)
    before = snapshot(folder)
    for _ in range(2):
        boot.boot(device.config_path, retries.Deadline(10, clock=FakeClock()), build=cloud)
    assert [topic for topic, _ in cloud.published()] == ["cameraDevice/CAM-42/booted"] * 2
    assert snapshot(folder) == before
    assert set(os.listdir(folder / "cert")) == {"certificate.pem.crt", "private.pem.key",
                                                 "AmazonRootCA1.pem", "run.lock",
                                                 "installed-for.json"}


def test_a_leftover_of_a_refused_force_run_on_a_read_only_root_is_kept_and_the_boot_reported(
        device, cloud, read_only, caplog):
    # A --force run refused in CSR mode keeps its device-made key for the next run; an
    # image made read-only after it still reports every boot, the key left where it is.
    provisioned(device, cloud)
    leftover = device.cert_dir / "private.pem.key.device-made"
    leftover.write_bytes((device.cert_dir / "private.pem.key").read_bytes())
    leftover.chmod(0o600)
    folder = read_only(device.config_path.parent)
    before = snapshot(folder)
    boot.boot(device.config_path, retries.Deadline(10, clock=FakeClock()), build=cloud)
    assert [topic for topic, _ in cloud.published()] == ["cameraDevice/CAM-42/booted"]
    assert snapshot(folder) == before
    assert oct(leftover.stat().st_mode & 0o777) == "0o600"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(leftover) in warnings[0], warnings


def test_a_false_status_on_a_read_only_root_reports_the_boot_warns_once_and_exits_0(
        device, cloud, read_only, monkeypatch, capsys):
    provisioned(device, cloud)
    device.update(PROVISION_STATUS="False")
    folder = read_only(device.config_path.parent)
    before = snapshot(folder)
    monkeypatch.setattr(boot.mqtt, "build_connection", cloud)
    assert boot.main(["--config", str(device.config_path), "--timeout", "10"]) == 0
    assert [topic for topic, _ in cloud.published()] == ["cameraDevice/CAM-42/booted"]
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if not line.startswith("INFO")]
    assert len(warnings) == 1, warnings
    assert "PROVISION_STATUS" in warnings[0] and "read-only" in warnings[0].lower()
    assert snapshot(folder) == before
    assert device.device["PROVISION_STATUS"] == "False"


def test_a_read_only_cert_dir_alone_still_lets_the_status_be_recorded(
        device, cloud, read_only):
    provisioned(device, cloud)
    device.update(PROVISION_STATUS="False")
    read_only(device.cert_dir)
    boot.boot(device.config_path, retries.Deadline(10, clock=FakeClock()), build=cloud)
    assert len(cloud.published()) == 1
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_first_boot_on_a_read_only_root_spends_nothing_and_exits_73(
        device, cloud, read_only, monkeypatch):
    device.cert_dir.mkdir(mode=0o700)
    read_only(device.config_path.parent)
    monkeypatch.setattr(boot.mqtt, "build_connection", cloud)
    assert boot.main(["--config", str(device.config_path), "--timeout", "10"]) == 73
    assert cloud.calls == []


def first_boot_error(device, cloud, monkeypatch, capsys):
    monkeypatch.setattr(boot.mqtt, "build_connection", cloud)
    code = boot.main(["--config", str(device.config_path), "--timeout", "10"])
    errors_ = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("ERROR")]
    assert (code, len(errors_)) == (73, 1), errors_
    assert cloud.calls == []
    return errors_[0]


def test_under_the_unit_a_read_only_view_of_a_writable_folder_names_the_sandbox(
        device, cloud, read_only, monkeypatch, capsys):
    device.cert_dir.mkdir(mode=0o700)
    read_only(device.config_path.parent)  # as ProtectSystem=strict shows /data
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    line = first_boot_error(device, cloud, monkeypatch, capsys)
    assert "Read-only file system" in line
    assert "ProtectSystem=strict" in line and "ReadWritePaths=" in line


def test_by_hand_a_read_only_bind_mount_is_named_and_the_sandbox_is_not(
        device, cloud, read_only, monkeypatch, capsys):
    device.cert_dir.mkdir(mode=0o700)
    read_only(device.config_path.parent)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    line = first_boot_error(device, cloud, monkeypatch, capsys)
    assert "read-only bind mount" in line and "ProtectSystem" not in line


def test_under_the_unit_a_file_system_mounted_read_only_is_not_blamed_on_the_sandbox(
        device, cloud, monkeypatch, capsys, tmp_path):
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root (CAP_SYS_ADMIN)")
    device.cert_dir.mkdir(mode=0o700)
    folder = device.config_path.parent
    saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(folder)],
                   check=True)
    try:
        (folder / "cert").mkdir(mode=0o700)
        for name, data in saved.items():
            (folder / name).write_bytes(data)
            os.chmod(folder / name, 0o640)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
        line = first_boot_error(device, cloud, monkeypatch, capsys)
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert "Read-only file system" in line and "ProtectSystem" not in line


def test_by_hand_a_read_only_cert_dir_without_its_lock_file_waits_for_the_units_run(
        tmp_path, read_only, monkeypatch, clock):
    # An image made before run.lock existed: the unit locks in its RuntimeDirectory;
    # a run by hand must find that same lock, or both publish as THING_NAME at once
    # (each connection dropping the other's) and the boot is reported twice.
    from entomologist import lock
    cert_dir = tmp_path / "cert"
    cert_dir.mkdir(mode=0o700)
    runtime = tmp_path / "run-entomologist"
    runtime.mkdir(mode=0o700)
    read_only(cert_dir)
    monkeypatch.setattr(lock, "UNIT_RUNTIME_DIRECTORY", str(runtime), raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    with lock.RunLock(cert_dir) as units:
        units.acquire(retries.Deadline(1, clock=clock))
        monkeypatch.delenv("RUNTIME_DIRECTORY")
        with pytest.raises(errors.TransientError, match="still holds the lock"):
            with lock.RunLock(cert_dir) as by_hand:
                by_hand.acquire(retries.Deadline(0.5, clock=clock))
    assert os.listdir(cert_dir) == []
