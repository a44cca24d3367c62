"""Promises whose code could be deleted without any other test noticing."""
import io
import json
import logging
import os
import stat

import pytest

from entomologist import config as configuration, errors, files, logs


def synced_folders_after_each_call(monkeypatch, call):
    """The folders fsynced, in order, with the call they followed."""
    events = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync-folder", target))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, **kwargs)

    def unlink(path, **kwargs):
        events.append(("unlink", str(path)))
        return real_unlink(path, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    call()
    monkeypatch.undo()
    return events


def test_a_rename_is_made_durable_by_syncing_the_target_folder_after_it(tmp_path, monkeypatch):
    (tmp_path / "new").write_bytes(b"x")
    events = synced_folders_after_each_call(
        monkeypatch, lambda: files.rename_durably(tmp_path / "new", tmp_path / "final"))
    assert events == [("replace", str(tmp_path / "final")), ("fsync-folder", str(tmp_path))]


def test_a_removal_is_made_durable_by_syncing_the_folder_after_it(tmp_path, monkeypatch):
    (tmp_path / "old").write_bytes(b"x")
    events = synced_folders_after_each_call(
        monkeypatch, lambda: files.remove_durably(tmp_path / "old"))
    assert events == [("unlink", str(tmp_path / "old")), ("fsync-folder", str(tmp_path))]


def test_an_atomic_write_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = synced_folders_after_each_call(
        monkeypatch, lambda: files.write_file_atomic(tmp_path / "f", b"data", 0o600))
    assert events[-2:] == [("replace", str(tmp_path / "f")), ("fsync-folder", str(tmp_path))]


@pytest.fixture
def sticky_folder(tmp_path):
    """A folder like /tmp: anyone may create files in it, only owners remove them."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o1777
    return folder


def test_a_world_writable_sticky_folder_is_refused_as_cert_dir(sticky_folder):
    with pytest.raises(errors.ConfigError, match="can be written by group or others"):
        files.trusted_dir(sticky_folder, "CERT_DIR")


def test_a_file_where_a_folder_belongs_is_refused_naming_it(tmp_path):
    # A CERT_DIR set to the certificate's own path, or a file a failing card left.
    cert_dir = tmp_path / "cert"
    cert_dir.write_text("not a folder")
    os.chmod(cert_dir, 0o600)
    with pytest.raises(errors.ConfigError, match=f"CERT_DIR {cert_dir} is not a folder"):
        files.trusted_dir(cert_dir, "CERT_DIR", create=True)


def test_a_folder_inside_a_sticky_folder_is_trusted_when_it_is_ours(sticky_folder):
    inner = sticky_folder / "certs"
    inner.mkdir(mode=0o700)
    assert files.trusted_dir(inner, "CERT_DIR") == inner


def test_a_config_in_a_world_writable_sticky_folder_is_refused(sticky_folder):
    path = sticky_folder / "ento.conf"
    path.write_text(json.dumps({"device": {"SERIAL_ID": "CAM-1",
                                           "ENDPOINT_URL": "a-ats.iot.eu-west-1.amazonaws.com"}}))
    os.chmod(path, 0o600)
    with pytest.raises(errors.ConfigError, match="can be written by group or others"):
        configuration.load_config(path)


@pytest.mark.parametrize("raw,decoded", [("p%3Aw%40rd%25x", "p:w@rd%x"),
                                         ("pa%25%25ss-word", "pa%%ss-word")])
def test_a_percent_escaped_proxy_password_is_redacted_in_both_spellings(tmp_path, raw, decoded):
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": {
        "SERIAL_ID": "CAM-1", "ENDPOINT_URL": "a-ats.iot.eu-west-1.amazonaws.com",
        "HTTP_PROXY": f"http://camera:{raw}@proxy.example.com:3128"}}))
    os.chmod(path, 0o600)
    configuration.load_config(path)
    stream = io.StringIO()
    logs.setup_logging(stream=stream)
    logging.getLogger("entomologist").error("seen %s and %s", raw, decoded)
    out = stream.getvalue()
    assert raw not in out and decoded not in out
    assert out.count("[redacted]") == 2
