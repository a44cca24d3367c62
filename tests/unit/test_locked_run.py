"""The locked prologue both scripts share (entomologist/run.py)."""
import os

import pytest

import boot
from entomologist import errors, files, lock, run
from entomologist.retries import Deadline
from fakes import FakeClock


@pytest.fixture
def counted(monkeypatch):
    """How often each run loads the config and sweeps a folder."""
    calls = {"load": 0, "sweep": []}
    real_load, real_sweep = run.load_config, files.remove_stray_temp_files

    def load(path):
        calls["load"] += 1
        return real_load(path)

    def sweep(directory):
        calls["sweep"].append(directory.name)
        return real_sweep(directory)

    monkeypatch.setattr(run, "load_config", load)
    monkeypatch.setattr(files, "remove_stray_temp_files", sweep)
    return calls


def test_a_run_sweeps_stray_files_under_the_lock_in_the_config_folder_and_cert_dir(device):
    device.cert_dir.mkdir(mode=0o700)
    strays = [device.config_path.parent / ".ento.conf.1a2b3c4d.tmp",
              device.cert_dir / ".private.pem.key.1a2b3c4d.tmp"]
    for path in strays:
        path.write_bytes(b"half")
    with run.locked_run(device.config_path, Deadline(5)) as current:
        assert current.config.serial_id == "CAM-42"
        assert current.cert_dir.path == device.cert_dir
        assert lock.holder(device.cert_dir) is not None
        assert [p for p in strays if p.exists()] == []
    assert lock.holder(device.cert_dir) is None


def test_without_cert_dir_a_run_that_may_not_create_it_is_a_config_error(device):
    with pytest.raises(errors.ConfigError, match="no device credentials"):
        with run.locked_run(device.config_path, Deadline(5)):
            pass
    assert not device.cert_dir.exists()


def test_a_run_that_may_create_cert_dir_makes_it_0700(device):
    with run.locked_run(device.config_path, Deadline(5), create=True):
        pass
    assert os.stat(device.cert_dir).st_mode & 0o777 == 0o700


def test_a_first_boot_loads_the_config_three_times_and_sweeps_once(device, cloud, counted):
    boot.boot(device.config_path, Deadline(30, clock=FakeClock()), build=cloud)
    # To find CERT_DIR, under the lock, and after install() rewrote it.
    assert counted["load"] == 3
    assert sorted(counted["sweep"]) == ["cert", "etc"]


def test_a_provisioned_boot_loads_the_config_twice_and_sweeps_once(device, cloud, counted):
    boot.boot(device.config_path, Deadline(30, clock=FakeClock()), build=cloud)
    counted["load"], counted["sweep"] = 0, []
    boot.boot(device.config_path, Deadline(30, clock=FakeClock()), build=cloud)
    assert counted["load"] == 2
    assert sorted(counted["sweep"]) == ["cert", "etc"]
