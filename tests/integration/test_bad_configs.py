"""A bad config ends a real run with 78, one line naming the problem, the file untouched."""
import json
import os
import time

import pytest

from e2e import Result, run_script


def with_device(standin, **changes):
    doc = json.loads(standin.config_path.read_text())
    doc["device"].update(changes)
    for key, value in list(doc["device"].items()):
        if value is None:
            del doc["device"][key]
    return json.dumps(doc).encode()


def D(**changes):
    return lambda s: with_device(s, **changes)


def raw(data):
    return lambda s: data


CASES = {
    # the document
    "empty file": (raw(b""), "not valid JSON"),
    "not JSON": (raw(b"{device: }"), "not valid JSON"),
    "truncated JSON": (lambda s: with_device(s)[:-7], "not valid JSON"),
    "trailing garbage": (lambda s: with_device(s) + b" x", "not valid JSON"),
    "null document": (raw(b"null"), "JSON object"),
    "not an object": (raw(b"[1, 2, 3]"), "JSON object"),
    "no device section": (raw(b'{"camera": {}}'), "'device'"),
    "device not an object": (raw(b'{"device": "CAM-1"}'), "'device'"),
    "duplicate keys": (raw(b'{"device": {"SERIAL_ID": "a", "SERIAL_ID": "b"}}'),
                       "duplicate key 'SERIAL_ID'"),
    "NaN": (lambda s: with_device(s).replace(b'"False"', b"NaN"), "NaN"),
    "nested too deeply": (raw(b'{"device": ' + b"[" * 50000 + b"]" * 50000 + b"}"),
                          "nested too deeply"),
    "byte-order mark": (lambda s: b"\xef\xbb\xbf" + with_device(s), "byte-order mark"),
    "not UTF-8": (lambda s: with_device(s).replace(b"CAM-0001", b"CAM-\xff"), "not UTF-8"),
    # SERIAL_ID
    "serial missing": (D(SERIAL_ID=None), "SERIAL_ID"),
    "serial empty": (D(SERIAL_ID=""), "SERIAL_ID"),
    "serial with a slash": (D(SERIAL_ID="cam/1"), "SERIAL_ID"),
    "serial with a hash": (D(SERIAL_ID="cam#"), "SERIAL_ID"),
    "serial with a plus": (D(SERIAL_ID="cam+1"), "SERIAL_ID"),
    "serial with a NUL": (D(SERIAL_ID="cam\u00001"), "SERIAL_ID"),
    "serial with spaces": (D(SERIAL_ID="cam 1"), "SERIAL_ID"),
    "serial of 200 characters": (D(SERIAL_ID="C" * 200), "SERIAL_ID"),
    "serial a number": (D(SERIAL_ID=1234), "SERIAL_ID"),
    # ENDPOINT_URL
    "endpoint missing": (D(ENDPOINT_URL=None), "ENDPOINT_URL"),
    "endpoint empty": (D(ENDPOINT_URL=""), "ENDPOINT_URL"),
    "endpoint a number": (D(ENDPOINT_URL=42), "ENDPOINT_URL"),
    "endpoint with a path": (D(ENDPOINT_URL="h.example.com/x"), "ENDPOINT_URL"),
    "endpoint plain http": (D(ENDPOINT_URL="http://h.example.com"), "ENDPOINT_URL"),
    "endpoint port not a number": (D(ENDPOINT_URL="h.example.com:abc"), "ENDPOINT_URL"),
    # PORT
    "port out of range": (D(PORT=70000), "PORT"),
    "port zero": (D(PORT=0), "PORT"),
    "port a boolean": (D(PORT=True), "PORT"),
    "port a fraction": (D(PORT=8883.5), "PORT"),
    "port letters": (D(PORT="88a3"), "PORT"),
    # PROVISION_STATUS
    "status not a boolean": (D(PROVISION_STATUS="maybe"), "PROVISION_STATUS"),
    "status a number": (D(PROVISION_STATUS=1), "PROVISION_STATUS"),
    # provisioning settings (checked because this device is not provisioned)
    "template missing": (D(TEMPLATE_NAME=None), "TEMPLATE_NAME"),
    "template empty": (D(TEMPLATE_NAME=""), "TEMPLATE_NAME"),
    "template with a slash": (D(TEMPLATE_NAME="a/b"), "TEMPLATE_NAME"),
    "parameters a list": (D(TEMPLATE_PARAMETERS=["CAM-0001"]), "TEMPLATE_PARAMETERS"),
    "parameter a number": (D(TEMPLATE_PARAMETERS={"SerialNumber": 7}),
                           "TEMPLATE_PARAMETERS.SerialNumber"),
    "parameter a boolean": (D(TEMPLATE_PARAMETERS={"SerialNumber": "a", "Indoor": True}),
                            "TEMPLATE_PARAMETERS.Indoor"),
    "parameter an object": (D(TEMPLATE_PARAMETERS={"Site": {"id": "1"}}),
                            "TEMPLATE_PARAMETERS.Site"),
    "claim certificate missing": (D(CLAIM_CERT="claim/none.crt"), "claim certificate"),
    "claim key a folder": (D(CLAIM_KEY="claim"), "claim key"),
    "claim key of another certificate": (D(CLAIM_KEY="standin/server.private.pem.key"),
                                         "does not belong"),
    # paths and recorded values
    "cert dir empty": (D(CERT_DIR=""), "CERT_DIR"),
    "root CA a number": (D(ROOT_CA=5), "ROOT_CA"),
    "root CA missing": (D(ROOT_CA="nowhere.pem"), "ROOT_CA"),
    "thing name invalid": (D(THING_NAME="a b"), "THING_NAME"),
}


# Every case through boot.main() in this process, and one in seven of them as a
# process too: the table is about the config's checks, which a process adds nothing
# to, and 56 interpreter starts were 5 s of the suite's CPU.
AS_A_PROCESS = sorted(CASES)[::7]


def boot_in_process(config, capsys) -> Result:
    import boot
    capsys.readouterr()
    started = time.monotonic()
    code = boot.main(["--config", str(config)])
    return Result(code, capsys.readouterr().err, time.monotonic() - started)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_exits_78_and_leaves_the_file_untouched(device_files, case, capsys):
    make, expected = CASES[case]
    raw = make(device_files)
    device_files.config_path.write_bytes(raw)
    os.chmod(device_files.config_path, 0o640)
    results = [boot_in_process(device_files.config_path, capsys)]
    if case in AS_A_PROCESS:
        results.append(run_script("boot.py", device_files.config_path))
    for result in results:
        assert result.code == 78, result.stderr
        assert len(result.errors) == 1 and expected in result.errors[0], result.stderr
        assert "Traceback" not in result.stderr
    assert device_files.config_path.read_bytes() == raw


def test_there_are_at_least_forty_hand_picked_cases():
    assert len(CASES) >= 40


def test_missing_config_file_exits_78(tmp_path):
    result = run_script("boot.py", tmp_path / "ento.conf")
    assert result.code == 78 and "does not exist" in result.stderr
    assert len(result.lines) == 1


def make_loop(path):
    os.symlink(path, path)


def make_fifo(path):
    os.mkfifo(path)


def make_huge(path):
    with open(path, "wb") as f:
        f.truncate(50 * 1024 * 1024)


@pytest.mark.parametrize("make,expected", [
    (os.mkdir, "not a regular file"), (make_loop, "cannot be opened"),
    (make_fifo, "not a regular file"), (make_huge, "too large"),
])
def test_something_other_than_a_config_file_exits_78_untouched(tmp_path, make, expected):
    path = tmp_path / "ento.conf"
    make(path)
    before = os.lstat(path)
    result = run_script("boot.py", path)
    assert result.code == 78, result.stderr
    assert len(result.errors) == 1 and expected in result.errors[0], result.stderr
    after = os.lstat(path)
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (
        before.st_mode, before.st_size, before.st_mtime_ns)


def test_update_boot_status_rejects_a_bad_config_the_same_way(device_files):
    raw_bytes = with_device(device_files, PORT="x")
    device_files.config_path.write_bytes(raw_bytes)
    result = run_script("update_boot_status.py", device_files.config_path)
    assert result.code == 78 and "PORT" in result.errors[0]
    assert device_files.config_path.read_bytes() == raw_bytes
