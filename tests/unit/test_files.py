"""Durable writes, config rewrites, the run lock, and exit codes."""
import fcntl
import json
import logging
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from entomologist import config as configuration, config_file, errors, files, lock, retries


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_atomic_write_gives_the_final_mode_despite_the_umask(tmp_path, strict_umask):
    files.write_file_atomic(tmp_path / "cert", b"public", 0o644)
    files.write_file_atomic(tmp_path / "key", b"secret", 0o600)
    assert (mode(tmp_path / "cert"), mode(tmp_path / "key")) == (0o644, 0o600)
    assert sorted(os.listdir(tmp_path)) == ["cert", "key"]


def test_a_secret_is_never_visible_with_a_wider_mode(tmp_path, monkeypatch):
    modes = []
    real_write = os.write

    def spy(fd, data):
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    files.write_file_atomic(tmp_path / "key", b"secret", 0o600)
    assert modes and set(modes) == {0o600}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "file"
    target.write_bytes(b"old")

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(errors.StorageError, match="No space left"):
        files.write_file_atomic(target, b"new", 0o644)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file"]


def test_a_failed_replace_keeps_the_old_entry_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "cert"
    target.mkdir()
    (target / "inside").write_bytes(b"x")  # a folder where the file belongs: rename fails
    with pytest.raises(errors.StorageError, match="cannot write"):
        files.write_file_atomic(target, b"new", 0o644)
    assert sorted(os.listdir(tmp_path)) == ["cert"]
    assert os.listdir(target) == ["inside"]


def test_syncing_a_folder_leaves_no_descriptor_open(tmp_path):
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        files.fsync_dir(tmp_path)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_file_of_exactly_the_limit_is_read_whole_and_one_byte_more_is_refused(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    assert files.read_bounded(path, "file", 100) == b"a" * 100
    path.write_bytes(b"a" * 101)
    with pytest.raises(errors.ConfigError, match="too large"):
        files.read_bounded(path, "file", 100)


def test_a_chain_of_40_symlinks_is_followed_and_a_41st_is_a_loop_as_for_the_kernel(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    previous = target
    for n in range(41):
        link = tmp_path / f"link{n}"
        link.symlink_to(previous)
        previous = link
    assert files.trusted_path(tmp_path / "link39", "file") == target
    assert (tmp_path / "link39").read_text() == "x"  # the kernel follows 40 too
    with pytest.raises(errors.ConfigError, match="a symlink loop"):
        files.trusted_path(tmp_path / "link40", "file")
    with pytest.raises(OSError):
        (tmp_path / "link40").read_text()


def test_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append("dir" if stat.S_ISDIR(st.st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    files.write_file_atomic(tmp_path / "f", b"x", 0o644)
    assert synced == ["file", "dir"]


MINIMAL = {"SERIAL_ID": "A", "ENDPOINT_URL": "example.com"}


def write_config(path, doc, mode=0o640):
    path.write_text(json.dumps(doc))
    os.chmod(path, mode)
    return configuration.load_config(path)


def test_config_rewrite_keeps_unknown_keys_sections_order_and_mode(tmp_path):
    path = tmp_path / "ento.conf"
    doc = {"zeta": 1, "device": {**MINIMAL, "X_UNKNOWN": [1, {"b": None}]},
           "camera": {"fps": 2}}
    config = write_config(path, doc, 0o604)
    configuration.update_device_config(config, {"PROVISION_STATUS": "True"})
    after = json.loads(path.read_text())
    assert list(after) == ["zeta", "device", "camera"]
    assert after["device"] == {**MINIMAL, "X_UNKNOWN": [1, {"b": None}],
                               "PROVISION_STATUS": "True"}
    assert after["camera"] == {"fps": 2}
    assert mode(path) == 0o604


def test_config_rewrite_keeps_the_owner(tmp_path):
    path = tmp_path / "ento.conf"
    config = write_config(path, {"device": MINIMAL})
    if os.geteuid() == 0:
        owner = (0, 4321)
    else:
        owner = (os.getuid(), ([g for g in os.getgroups() if g != os.getgid()]
                               or [os.getgid()])[0])
    os.chown(path, *owner)
    configuration.update_device_config(config, {"THING_NAME": "b"})
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == owner


def test_an_unchanged_config_is_not_rewritten(tmp_path):
    path = tmp_path / "ento.conf"
    config = write_config(path, {"device": {**MINIMAL, "PROVISION_STATUS": "True"}})
    inode = os.stat(path).st_ino
    assert configuration.update_device_config(config, {"PROVISION_STATUS": "True"}) is False
    assert os.stat(path).st_ino == inode


@pytest.mark.parametrize("text", [
    '{"device": {"SERIAL_ID": "A", "ENDPOINT_URL": "example.com"}, '
    '"camera": {"gain": 1.0000000000000001, "big": 1e400, "tiny": -0.0, "exp": 2.5E-3, '
    '"int": 123456789012345678901234567890, "neg": -0, "sixty": 6e1, "small": 0.00000001}}',
    '{"device": {"SERIAL_ID": "A", "ENDPOINT_URL": "example.com", "NOTE": "\\ud800 lone"}, '
    '"x": ["\\u00e9t\\u00e9", "\\u2028", {"": []}]}',
])
def test_a_rewrite_keeps_every_value_it_does_not_own_exactly(tmp_path, text):
    from decimal import Decimal
    path = tmp_path / "ento.conf"
    path.write_text(text)
    config = configuration.load_config(path)
    configuration.update_device_config(config, {"PROVISION_STATUS": "True"})

    def exact(raw):
        return json.loads(raw, parse_float=Decimal)

    before, after = exact(text), exact(path.read_text())
    after["device"].pop("PROVISION_STATUS")
    assert after == before
    # Every number keeps the text it was written with, not a float's or a Decimal's.
    import re
    for key, literal in re.findall(r'"(\w+)": (-?[0-9][0-9.eE+-]*)', text):
        assert f'"{key}": {literal}' in path.read_text()


def test_a_config_that_would_grow_too_large_is_refused_before_anything(tmp_path):
    path = tmp_path / "ento.conf"
    filler = "x" * (config_file.MAX_CONFIG_BYTES - 200)
    config = write_config(path, {"device": MINIMAL, "notes": filler})
    with pytest.raises(errors.ConfigError, match="would grow"):
        configuration.rehearse_update(config)
    assert sorted(os.listdir(tmp_path)) == ["ento.conf"]


def test_a_second_run_waits_for_the_lock_then_proceeds(tmp_path, clock):
    first = lock.RunLock(tmp_path)
    first.acquire(retries.Deadline(1, clock=clock))
    polled = clock.sleep

    def sleep(seconds):
        polled(seconds)
        if len(clock.sleeps) == 3:
            first.release()  # the other run ends while this one waits

    clock.sleep = sleep
    with lock.RunLock(tmp_path) as second:
        second.acquire(retries.Deadline(5, clock=clock))
        assert lock.holder(tmp_path) == tmp_path / "run.lock"
    assert clock.sleeps == [0.1] * 3


def test_waiting_for_the_lock_is_bounded_by_the_run_deadline(tmp_path, clock):
    with lock.RunLock(tmp_path) as first:
        first.acquire(retries.Deadline(1, clock=clock))
        started = clock.monotonic()
        with pytest.raises(errors.TransientError, match="lock"):
            lock.RunLock(tmp_path).acquire(retries.Deadline(0.3, clock=clock))
    assert clock.sleeps and clock.monotonic() - started <= 0.3 + 1e-9


def test_the_lock_is_a_0600_file_in_cert_dir_that_others_cannot_open(tmp_path):
    with lock.RunLock(tmp_path) as held:
        held.acquire(retries.Deadline(1))
    assert os.listdir(tmp_path) == ["run.lock"]
    assert mode(tmp_path / "run.lock") == 0o600


def test_a_lock_file_others_could_open_is_refused(tmp_path):
    (tmp_path / "run.lock").touch()
    os.chmod(tmp_path / "run.lock", 0o644)
    with pytest.raises(errors.ConfigError, match="not a 0600 file"):
        lock.RunLock(tmp_path).acquire(retries.Deadline(1))


def test_a_lock_file_refused_inside_the_run_is_one_config_error_and_closes_its_descriptor(
        tmp_path):
    (tmp_path / "run.lock").touch()
    os.chmod(tmp_path / "run.lock", 0o644)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(errors.ConfigError, match="not a 0600 file"):
        with lock.RunLock(tmp_path) as held:  # as locked_run holds it
            held.acquire(retries.Deadline(1))
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_lock_that_cannot_be_opened_is_a_storage_error_inside_the_run(tmp_path):
    (tmp_path / "run.lock").mkdir()  # a folder where the lock file belongs
    with pytest.raises(errors.StorageError, match="cannot open the lock"):
        with lock.RunLock(tmp_path) as held:
            held.acquire(retries.Deadline(1))


def test_the_lock_holder_is_found_without_creating_or_taking_the_lock(tmp_path):
    assert lock.holder(tmp_path) is None
    assert os.listdir(tmp_path) == []  # no lock file: nothing runs, and none is made
    with lock.RunLock(tmp_path) as held:
        held.acquire(retries.Deadline(1))
        assert lock.holder(tmp_path) == tmp_path / "run.lock"
    assert lock.holder(tmp_path) is None
    with lock.RunLock(tmp_path) as again:  # the probe left nothing held
        again.acquire(retries.Deadline(0.5))


def test_the_lock_holder_is_found_in_the_runtime_directory_and_on_the_folder(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    cert_dir = tmp_path / "cert"
    cert_dir.mkdir()
    fd = os.open(runtime / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert lock.holder(cert_dir, str(runtime)) == runtime / "run.lock"
        assert lock.holder(cert_dir) is None
    finally:
        os.close(fd)


def test_a_lock_on_the_folder_is_a_boots_only_where_the_folder_cannot_take_the_lock_file(
        tmp_path, read_only):
    # A run locks the folder itself only when it can neither create run.lock nor use
    # a RuntimeDirectory (a read-only CERT_DIR from before the file existed); where it
    # could create it, a lock on the folder (anyone may open a 0755 one) is nobody's boot.
    cert_dir = tmp_path / "cert"
    cert_dir.mkdir(mode=0o755)
    for writable in (True, False):
        if not writable:
            read_only(cert_dir)
        fd = os.open(cert_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert lock.holder(cert_dir) == (None if writable else cert_dir)
        finally:
            os.close(fd)


@pytest.mark.parametrize("error,code", [
    (errors.ConfigError("bad"), 78), (errors.TransientError("later"), 75),
    (errors.ServiceError("no"), 65), (errors.StorageError("disk"), 73),
    (ZeroDivisionError("bug"), 70),
])
def test_outcomes_map_to_sysexits_in_one_place(error, code, caplog):
    def body():
        raise error

    with caplog.at_level(logging.ERROR):
        assert errors.run_main(body) == code
    assert (caplog.records[-1].exc_info is not None) == (code == 70)


def test_an_expected_failure_is_one_line_with_what_to_check(caplog):
    def body():
        raise errors.ServiceError("RegisterThing rejected: statusCode=400", hint="the template")

    with caplog.at_level(logging.ERROR):
        errors.run_main(body)
    assert caplog.messages == ["RegisterThing rejected: statusCode=400; check the template"]


def test_success_is_zero():
    assert errors.run_main(lambda: None) == 0


def test_a_read_only_cert_dir_without_its_lock_file_locks_in_the_units_runtime_directory(
        tmp_path, monkeypatch):
    cert_dir, runtime = tmp_path / "cert", tmp_path / "run"
    cert_dir.mkdir(mode=0o755)
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    real_open = os.open

    def read_only(path, flags, *args):
        # As on a read-only file system: nothing can be created in CERT_DIR.
        if str(path).startswith(str(cert_dir)) and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with lock.RunLock(cert_dir) as held:
        held.acquire(retries.Deadline(1))
        assert held.path == runtime / "run.lock"
    assert os.listdir(cert_dir) == []


def ends_within(seconds, call):
    """``call``'s result, failing (not hanging the suite) if it blocks."""
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("value", call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"blocked for more than {seconds} s"
    return result.get("value")


def test_a_fifo_planted_as_the_lock_file_never_blocks_the_lock_probe(tmp_path):
    os.mkfifo(tmp_path / "run.lock", 0o600)
    assert ends_within(5, lambda: lock.holder(tmp_path)) is None


def test_a_fifo_planted_as_the_lock_file_of_a_read_only_cert_dir_never_blocks_a_run(
        tmp_path, read_only):
    cert_dir = tmp_path / "cert"
    cert_dir.mkdir(mode=0o700)
    os.mkfifo(cert_dir / "run.lock", 0o600)
    read_only(cert_dir)

    def take():
        try:
            with lock.RunLock(cert_dir) as held:
                held.acquire(retries.Deadline(1))
            return "taken"
        except errors.EntoError as exc:
            return f"refused: {exc}"

    assert ends_within(5, take) is not None


def test_a_run_as_another_user_trusts_roots_files_and_its_own_and_no_one_elses(tmp_path):
    # Every path on a root image is root's: a run as a service user must trust them,
    # and its own, but not a third user's.
    if os.geteuid() != 0:
        pytest.skip("changing to another user needs root")
    import tempfile
    folder = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        os.chmod(folder, 0o755)
        (folder / "roots").write_text("x")
        for name, uid in (("mine", 65534), ("theirs", 65533)):
            (folder / name).write_text("x")
            os.chown(folder / name, uid, uid)
        os.chmod(folder / "roots", 0o644)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                files.trusted_path(folder / "roots", "a file")
                files.trusted_path(folder / "mine", "a file")
                try:
                    files.trusted_path(folder / "theirs", "a file")
                except errors.ConfigError as exc:
                    code = 0 if "owned by uid 65533" in str(exc) else 3
                else:
                    code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(folder)
