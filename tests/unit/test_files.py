"""Durable writes, config rewrites, the run lock, and exit codes."""
import json
import logging
import os
import stat
import threading
import time

import pytest

import ento


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_atomic_write_gives_the_final_mode_despite_the_umask(tmp_path, strict_umask):
    ento.write_file_atomic(tmp_path / "cert", b"public", 0o644)
    ento.write_file_atomic(tmp_path / "key", b"secret", 0o600)
    assert (mode(tmp_path / "cert"), mode(tmp_path / "key")) == (0o644, 0o600)
    assert sorted(os.listdir(tmp_path)) == ["cert", "key"]


def test_a_secret_is_never_visible_with_a_wider_mode(tmp_path, monkeypatch):
    modes = []
    real_write = os.write

    def spy(fd, data):
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    ento.write_file_atomic(tmp_path / "key", b"secret", 0o600)
    assert modes and set(modes) == {0o600}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "file"
    target.write_bytes(b"old")

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ento.StorageError, match="No space left"):
        ento.write_file_atomic(target, b"new", 0o644)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file"]


def test_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append("dir" if stat.S_ISDIR(st.st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ento.write_file_atomic(tmp_path / "f", b"x", 0o644)
    assert synced == ["file", "dir"]


def test_config_rewrite_keeps_unknown_keys_sections_order_and_mode(tmp_path):
    path = tmp_path / "ento.conf"
    doc = {"zeta": 1, "device": {"SERIAL_ID": "A", "X_UNKNOWN": [1, {"b": None}]},
           "camera": {"fps": 2}}
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o604)
    ento.update_device_config(path, {"PROVISION_STATUS": "True"})
    after = json.loads(path.read_text())
    assert list(after) == ["zeta", "device", "camera"]
    assert after["device"] == {"SERIAL_ID": "A", "X_UNKNOWN": [1, {"b": None}],
                               "PROVISION_STATUS": "True"}
    assert after["camera"] == {"fps": 2}
    assert mode(path) == 0o604


def test_config_rewrite_keeps_the_owner(tmp_path):
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": {}}))
    if os.geteuid() == 0:
        owner = (1234, 4321)
    else:
        owner = (os.getuid(), ([g for g in os.getgroups() if g != os.getgid()]
                               or [os.getgid()])[0])
    os.chown(path, *owner)
    ento.update_device_config(path, {"A": "b"})
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == owner


def test_an_unchanged_config_is_not_rewritten(tmp_path):
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": {"PROVISION_STATUS": "True"}}))
    inode = os.stat(path).st_ino
    ento.update_device_config(path, {"PROVISION_STATUS": "True"})
    assert os.stat(path).st_ino == inode


def test_a_second_run_waits_for_the_lock_then_proceeds(tmp_path):
    config = tmp_path / "ento.conf"
    first = ento.RunLock(config)
    first.acquire(ento.Deadline(1))
    threading.Timer(0.3, first.release).start()
    started = time.monotonic()
    with ento.RunLock(config) as second:
        second.acquire(ento.Deadline(5))
    assert 0.2 < time.monotonic() - started < 3


def test_waiting_for_the_lock_is_bounded_by_the_run_deadline(tmp_path):
    config = tmp_path / "ento.conf"
    with ento.RunLock(config) as first:
        first.acquire(ento.Deadline(1))
        with pytest.raises(ento.TransientError, match="lock"):
            ento.RunLock(config).acquire(ento.Deadline(0.3))


def test_the_lock_lives_beside_the_config(tmp_path):
    assert ento.RunLock(tmp_path / "ento.conf").path == tmp_path / "ento.conf.lock"


@pytest.mark.parametrize("error,code", [
    (ento.ConfigError("bad"), 78), (ento.TransientError("later"), 75),
    (ento.ServiceError("no"), 65), (ento.StorageError("disk"), 73),
    (ZeroDivisionError("bug"), 70),
])
def test_outcomes_map_to_sysexits_in_one_place(error, code, caplog):
    def body():
        raise error

    with caplog.at_level(logging.ERROR):
        assert ento.run_main(body) == code
    assert (caplog.records[-1].exc_info is not None) == (code == 70)


def test_an_expected_failure_is_one_line_with_what_to_check(caplog):
    def body():
        raise ento.ServiceError("RegisterThing rejected: statusCode=400", hint="the template")

    with caplog.at_level(logging.ERROR):
        ento.run_main(body)
    assert caplog.messages == ["RegisterThing rejected: statusCode=400; check the template"]


def test_success_is_zero():
    assert ento.run_main(lambda: None) == 0
