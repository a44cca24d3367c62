"""Storage that refuses writes, and two runs at once."""
import os
import resource
import subprocess
import sys

import pytest

from e2e import ROOT, DeviceState, privilege_drop, run_script


def run_boot_as_service(standin, preexec_fn=None, *args):
    """boot.py as the unit runs it: for root, no capabilities, so file modes bind."""
    state = DeviceState(standin)
    proc = subprocess.run([*privilege_drop(), sys.executable, str(ROOT / "boot.py"), "--config",
                           str(standin.config_path), "--timeout", "20", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          preexec_fn=preexec_fn)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    return state, proc, errors


@pytest.fixture
def foreign_owner():
    """A folder owned by someone else is not writable for a service without capabilities."""
    if os.geteuid() != 0:
        pytest.skip("handing a folder to another owner needs root")
    return 4321


def test_a_cert_dir_owned_by_another_user_exits_78_before_any_request(standin, foreign_owner):
    cert_dir = standin.workdir / "cert"
    cert_dir.mkdir(mode=0o700)
    os.chown(cert_dir, foreign_owner, foreign_owner)
    state, proc, errors = run_boot_as_service(standin)
    assert proc.returncode == 78, proc.stderr
    assert len(errors) == 1 and str(cert_dir) in errors[0] and "owned by uid 4321" in errors[0]
    assert state.check([proc.stderr], completed=True) == {"installed": False, "status": False}
    assert standin.events("create-request") == []


def test_a_config_folder_owned_by_another_user_exits_78_before_any_request(standin,
                                                                           foreign_owner):
    (standin.workdir / "cert").mkdir(mode=0o700)
    os.chown(standin.workdir, foreign_owner, foreign_owner)
    os.chmod(standin.workdir, 0o755)
    try:
        state, proc, errors = run_boot_as_service(standin)
    finally:
        os.chown(standin.workdir, 0, 0)
    assert proc.returncode == 78, proc.stderr
    assert len(errors) == 1 and "owned by uid 4321" in errors[0]
    assert standin.events("create-request") == []
    assert state.check([proc.stderr], completed=True) == {"installed": False, "status": False}


def small_files():
    # In the child: big enough for the config, too small for an RSA private key.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


def test_a_write_that_fails_part_way_exits_73_with_the_invariants_intact(standin):
    state, proc, errors = run_boot_as_service(standin, small_files)
    assert proc.returncode == 73, proc.stderr
    assert len(errors) == 1 and "File too large" in errors[0]
    assert state.check([proc.stderr], completed=True) == {"installed": False, "status": False}
    # The room for the registration record is taken before anything is asked.
    assert standin.events("create-request") == []


def test_after_storage_is_fixed_the_next_run_completes(standin):
    state, proc, _ = run_boot_as_service(standin, small_files)
    assert proc.returncode == 73
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert state.check([result.stderr], completed=True) == {"installed": True, "status": True}


def test_two_runs_started_together_provision_once_and_both_succeed(standin):
    state = DeviceState(standin)
    cmd = [sys.executable, str(ROOT / "boot.py"), "--config", str(standin.config_path)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(standin.events("create-request")) == 1
    assert len(standin.events("register-request")) == 1
    assert len(standin.wait_for("boot", 2)) == 2
    assert state.check(outputs, completed=True) == {"installed": True, "status": True}


def test_a_cert_dir_without_free_inodes_exits_73_before_any_request(standin, tmp_path):
    # Free blocks, but every inode taken bar a few (a card full of small files):
    # the room checked before anything is asked must count files, not only bytes,
    # or a certificate is created that cannot be staged.
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    from disk import take_inodes, tmpfs
    with tmpfs(tmp_path / "data", "4m", 0o755, inodes=64) as data:
        cert_dir = data / "cert"
        cert_dir.mkdir(mode=0o700)
        take_inodes(data)
        for n in range(3):  # room for the lock and the reserve, not for the records
            os.unlink(data / f"inode-{n}")
        standin.write_device_config(CERT_DIR=str(cert_dir))
        state, proc, errors = run_boot_as_service(standin)
    assert proc.returncode == 73, proc.stderr
    assert standin.events("create-request") == []
    assert len(errors) == 1 and str(cert_dir) in errors[0] and "inodes" in errors[0], errors
