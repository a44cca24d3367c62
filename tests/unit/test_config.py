"""Reading and checking ento.conf."""
import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from entomologist import config as configuration, errors

GOOD = {"SERIAL_ID": "CAM-1", "ENDPOINT_URL": "abc123-ats.iot.eu-west-1.amazonaws.com"}


def load(tmp_path, device=None, raw=None):
    path = tmp_path / "ento.conf"
    if raw is None:
        raw = json.dumps({"device": device}).encode()
    path.write_bytes(raw)
    return configuration.load_config(path)


def test_defaults(tmp_path):
    config = load(tmp_path, GOOD)
    assert (config.host, config.port, config.provisioned) == (
        "abc123-ats.iot.eu-west-1.amazonaws.com", 8883, False)
    assert config.cert_dir == configuration.DEFAULT_CERT_DIR
    assert config.root_ca == configuration.SHIPPED_ROOT_CA and config.root_ca.exists()
    assert config.thing_name is None


@pytest.mark.parametrize("url,host,port", [
    ("abc-ats.iot.eu-west-1.amazonaws.com", "abc-ats.iot.eu-west-1.amazonaws.com", 8883),
    ("mqtts://abc-ats.iot.eu-west-1.amazonaws.com", "abc-ats.iot.eu-west-1.amazonaws.com", 8883),
    ("https://abc-ats.iot.eu-west-1.amazonaws.com/", "abc-ats.iot.eu-west-1.amazonaws.com", 8883),
    ("abc-ats.iot.eu-west-1.amazonaws.com:443", "abc-ats.iot.eu-west-1.amazonaws.com", 443),
    ("mqtts://localhost:1234/", "localhost", 1234),
    ("  Host.Example.COM  ", "host.example.com", 8883),
])
def test_endpoint_tolerates_scheme_port_and_slash(tmp_path, url, host, port):
    config = load(tmp_path, {**GOOD, "ENDPOINT_URL": url})
    assert (config.host, config.port) == (host, port)


@pytest.mark.parametrize("value,port", [(443, 443), ("8884", 8884), (1, 1), (65535, 65535)])
def test_port_key_wins_over_the_port_in_the_url(tmp_path, value, port):
    config = load(tmp_path, {**GOOD, "ENDPOINT_URL": "h.example.com:9999", "PORT": value})
    assert config.port == port


@pytest.mark.parametrize("value,expected", [("True", True), ("true", True), ("TRUE", True),
                                            ("False", False), ("false", False), (True, True),
                                            (False, False)])
def test_provision_status_accepts_strings_any_case_and_booleans(tmp_path, value, expected):
    assert load(tmp_path, {**GOOD, "PROVISION_STATUS": value}).provisioned is expected


def test_relative_paths_are_taken_from_the_config_folder(tmp_path):
    config = load(tmp_path, {**GOOD, "CERT_DIR": "cert", "ROOT_CA": "ca/root.pem"})
    assert config.cert_dir == tmp_path / "cert"
    assert config.root_ca == tmp_path / "ca" / "root.pem"


BAD_DEVICES = [
    ({"ENDPOINT_URL": "h.example.com"}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": ""}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": "a/b"}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": "a#"}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": "a+b"}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": "a b"}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": "a\u0000b"}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": "x" * 129}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": 1234}, "SERIAL_ID"),
    ({**GOOD, "SERIAL_ID": "caméra"}, "SERIAL_ID"),
    ({"SERIAL_ID": "CAM-1"}, "ENDPOINT_URL"),
    ({**GOOD, "ENDPOINT_URL": ""}, "ENDPOINT_URL"),
    ({**GOOD, "ENDPOINT_URL": None}, "ENDPOINT_URL"),
    ({**GOOD, "ENDPOINT_URL": "http://h.example.com"}, "ENDPOINT_URL"),
    ({**GOOD, "ENDPOINT_URL": "h.example.com/path"}, "ENDPOINT_URL"),
    ({**GOOD, "ENDPOINT_URL": "h.example.com:99999"}, "ENDPOINT_URL"),
    ({**GOOD, "ENDPOINT_URL": "h.example.com:0"}, "ENDPOINT_URL"),
    ({**GOOD, "ENDPOINT_URL": "bad host"}, "ENDPOINT_URL"),
    ({**GOOD, "ENDPOINT_URL": "arn:aws:iot:eu-west-1:123:thing/x"}, "ENDPOINT_URL"),
    ({**GOOD, "PORT": 0}, "PORT"),
    ({**GOOD, "PORT": 65536}, "PORT"),
    ({**GOOD, "PORT": "88a"}, "PORT"),
    ({**GOOD, "PORT": True}, "PORT"),
    ({**GOOD, "PORT": 8883.5}, "PORT"),
    ({**GOOD, "PORT": "-1"}, "PORT"),
    ({**GOOD, "PROVISION_STATUS": "yes"}, "PROVISION_STATUS"),
    ({**GOOD, "PROVISION_STATUS": 1}, "PROVISION_STATUS"),
    ({**GOOD, "CERT_DIR": ""}, "CERT_DIR"),
    ({**GOOD, "CERT_DIR": 5}, "CERT_DIR"),
    ({**GOOD, "ROOT_CA": ["a"]}, "ROOT_CA"),
    ({**GOOD, "THING_NAME": "a/b"}, "THING_NAME"),
]


@pytest.mark.parametrize("device,key", BAD_DEVICES)
def test_invalid_values_are_config_errors_naming_the_key(tmp_path, device, key):
    with pytest.raises(errors.ConfigError, match=key):
        load(tmp_path, device)


TOKEN = {**GOOD, "KEY_STORAGE": "pkcs11", "PROVISIONING_API": "CreateCertificateFromCsr",
         "PKCS11_LIBRARY": "/usr/lib/softhsm/libsofthsm2.so", "PKCS11_TOKEN_LABEL": "camera",
         "PKCS11_PIN_FILE": "/etc/entomologist/pin"}


@pytest.mark.parametrize("key,label", [("PKCS11_TOKEN_LABEL", "x" * 33),
                                       ("PKCS11_KEY_LABEL", "é" * 17),  # 34 bytes
                                       ("PKCS11_KEY_LABEL", "key\nlabel")])
def test_a_token_or_key_label_longer_than_32_bytes_or_unprintable_is_refused(tmp_path, key,
                                                                               label):
    with pytest.raises(errors.ConfigError,
                       match=f"{key}.*must be 1 to 32 bytes of printable text"):
        load(tmp_path, {**TOKEN, key: label})


@pytest.mark.parametrize("value,said", [(True, "a boolean"), (False, "a boolean"),
                                        (12, "a number"), (1.5, "a number"),
                                        ({"a": 1}, "an object"), ([1], "an array")])
def test_a_value_of_the_wrong_json_type_is_named_by_its_type(tmp_path, value, said):
    with pytest.raises(errors.ConfigError, match=f"KEY_STORAGE.*must be a string, not {said}$"):
        load(tmp_path, {**GOOD, "KEY_STORAGE": value})


@pytest.mark.parametrize("raw,why", [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'"text"', "JSON object"),
    (b"{}", "'device'"),
    (b'{"device": []}', "'device'"),
    (b'{"device": {"SERIAL_ID": "a", "SERIAL_ID": "b"}}', "duplicate key 'SERIAL_ID'"),
    (b'{"device": {"PORT": NaN}}', "NaN"),
    (b"\xef\xbb\xbf" + json.dumps({"device": GOOD}).encode(), "byte-order mark"),
    (b'{"device": {"SERIAL_ID": "\xff"}}', "not UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_unreadable_documents_are_config_errors(tmp_path, raw, why):
    with pytest.raises(errors.ConfigError, match=why):
        load(tmp_path, raw=raw)


def test_missing_file_directory_symlink_loop_and_huge_file(tmp_path):
    with pytest.raises(errors.ConfigError, match="does not exist"):
        configuration.load_config(tmp_path / "absent.conf")
    (tmp_path / "dir.conf").mkdir()
    with pytest.raises(errors.ConfigError, match="not a regular file"):
        configuration.load_config(tmp_path / "dir.conf")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(errors.ConfigError, match="cannot be opened"):
        configuration.load_config(tmp_path / "loop")
    huge = tmp_path / "huge.conf"
    with open(huge, "wb") as f:
        f.truncate(50 * 1024 * 1024)
    with pytest.raises(errors.ConfigError, match="too large"):
        configuration.load_config(huge)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": GOOD}))
    real_open = os.open

    def denied(p, *args, **kwargs):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(p, *args, **kwargs)

    # Root reads any file, so the denial is injected.
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(errors.ConfigError, match="cannot be opened: Permission denied"):
        configuration.load_config(path)


def provisioning(tmp_path, **device):
    return configuration.provisioning_settings(load(tmp_path, {**GOOD, **device}))


@pytest.mark.parametrize("device,key", [
    ({}, "TEMPLATE_NAME"),
    ({"TEMPLATE_NAME": ""}, "TEMPLATE_NAME"),
    ({"TEMPLATE_NAME": "a/b"}, "TEMPLATE_NAME"),
    ({"TEMPLATE_NAME": "T", "TEMPLATE_PARAMETERS": []}, "TEMPLATE_PARAMETERS"),
    ({"TEMPLATE_NAME": "T", "TEMPLATE_PARAMETERS": {"SerialNumber": 5}},
     "TEMPLATE_PARAMETERS.SerialNumber"),
    ({"TEMPLATE_NAME": "T", "TEMPLATE_PARAMETERS": {"A": "b", "On": True}},
     "TEMPLATE_PARAMETERS.On"),
    ({"TEMPLATE_NAME": "T", "TEMPLATE_PARAMETERS": {"A": None}}, "TEMPLATE_PARAMETERS.A"),
])
def test_provisioning_settings_are_checked_when_provisioning(tmp_path, device, key):
    with pytest.raises(errors.ConfigError, match=key):
        provisioning(tmp_path, **device)


@pytest.mark.heavy
@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(), lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=12), children, max_size=5),
                    max_leaves=20))
def test_any_json_document_loads_or_is_a_config_error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("cfg") / "ento.conf"
    for doc in (document, {"device": document}, {"device": {**GOOD, "PORT": document}}):
        path.write_text(json.dumps(doc))
        try:
            config = configuration.load_config(path)
        except errors.ConfigError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert configuration.SERIAL_RE.fullmatch(config.serial_id)
            assert 1 <= config.port <= 65535


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_load_or_are_a_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "ento.conf"
    path.write_bytes(raw)
    with pytest.raises(errors.ConfigError):
        configuration.load_config(path)
