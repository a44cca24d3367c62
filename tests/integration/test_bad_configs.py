"""A bad config ends a real run with 78, one line naming the problem, the file untouched."""
import json
import os

import pytest

from conftest import run_script


def with_device(standin, **changes):
    doc = json.loads(standin.config_path.read_text())
    doc["device"].update(changes)
    for key, value in list(doc["device"].items()):
        if value is None:
            del doc["device"][key]
    return json.dumps(doc).encode()


CASES = {
    "not JSON": (lambda s: b"{device: }", "not valid JSON"),
    "not an object": (lambda s: b"[1, 2, 3]", "JSON object"),
    "no device section": (lambda s: b'{"camera": {}}', "'device'"),
    "serial missing": (lambda s: with_device(s, SERIAL_ID=None), "SERIAL_ID"),
    "serial with a slash": (lambda s: with_device(s, SERIAL_ID="cam/1"), "SERIAL_ID"),
    "serial with a wildcard": (lambda s: with_device(s, SERIAL_ID="cam#"), "SERIAL_ID"),
    "endpoint missing": (lambda s: with_device(s, ENDPOINT_URL=None), "ENDPOINT_URL"),
    "endpoint with a path": (lambda s: with_device(s, ENDPOINT_URL="h.example.com/x"),
                             "ENDPOINT_URL"),
    "port out of range": (lambda s: with_device(s, PORT=70000), "PORT"),
    "status not a boolean": (lambda s: with_device(s, PROVISION_STATUS="maybe"),
                             "PROVISION_STATUS"),
    "template missing": (lambda s: with_device(s, TEMPLATE_NAME=None), "TEMPLATE_NAME"),
    "parameter not a string": (lambda s: with_device(s, TEMPLATE_PARAMETERS={"SerialNumber": 7}),
                               "TEMPLATE_PARAMETERS.SerialNumber"),
    "claim certificate missing": (lambda s: with_device(s, CLAIM_CERT="claim/none.crt"),
                                  "claim certificate"),
    "duplicate keys": (lambda s: b'{"device": {"SERIAL_ID": "a", "SERIAL_ID": "b"}}',
                       "duplicate key"),
    "byte-order mark": (lambda s: b"\xef\xbb\xbf" + with_device(s), "byte-order mark"),
    "not UTF-8": (lambda s: with_device(s).replace(b"CAM-0001", b"CAM-\xff"), "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_exits_78_and_leaves_the_file_untouched(standin, case):
    make, expected = CASES[case]
    raw = make(standin)
    standin.config_path.write_bytes(raw)
    os.chmod(standin.config_path, 0o640)
    result = run_script("boot.py", standin.config_path)
    assert result.code == 78, result.stderr
    assert len(result.errors) == 1 and expected in result.errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert standin.config_path.read_bytes() == raw
    assert standin.events("create-request") == []


def test_missing_config_file_exits_78(tmp_path):
    result = run_script("boot.py", tmp_path / "ento.conf")
    assert result.code == 78 and "does not exist" in result.stderr
    assert len(result.lines) == 1
