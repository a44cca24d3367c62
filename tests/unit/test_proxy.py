"""HTTP_PROXY: parsing it, handing it to awscrt, its password kept out of sight."""
import io
import json
import logging
import os
import re

import pytest
from awscrt import http

from entomologist import config as configuration, errors, logs, mqtt, proxy
from entomologist.retries import Deadline
from fakes import FakeClock

import boot
import update_boot_status

GOOD = {"SERIAL_ID": "CAM-1", "ENDPOINT_URL": "abc123-ats.iot.eu-west-1.amazonaws.com"}
SECRET = "s3cr3t-Pa55"
# A DNS name is at most 253 characters (labels of at most 63).
LONGEST_HOST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])


def load(tmp_path, value):
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": {**GOOD, "HTTP_PROXY": value}}))
    os.chmod(path, 0o600)  # it may hold a password
    return configuration.load_config(path)


@pytest.mark.parametrize("value,host,port,user,password", [
    ("http://proxy.example.com:3128", "proxy.example.com", 3128, None, None),
    ("http://Proxy.Example.COM.:8888/", "proxy.example.com", 8888, None, None),
    ("HTTP://10.1.2.3:8080", "10.1.2.3", 8080, None, None),
    ("http://[fd00::1]:3128", "fd00::1", 3128, None, None),
    (f"http://camera:{SECRET}@proxy.example.com:3128", "proxy.example.com", 3128, "camera",
     SECRET),
    # ':', '@' and '%' travel percent-encoded in a URL's credentials.
    ("http://cam%40site:p%3Aw%40rd%25@10.0.0.1:80", "10.0.0.1", 80, "cam@site", "p:w@rd%"),
    ("http://proxy-1.example.com:3128", "proxy-1.example.com", 3128, None, None),
    (f"http://{LONGEST_HOST}:3128", LONGEST_HOST, 3128, None, None),
])
def test_a_good_http_proxy_is_parsed_into_host_port_and_credentials(
        tmp_path, value, host, port, user, password):
    config = load(tmp_path, value)
    assert config.proxy == proxy.Proxy(host, port, user, password)


@pytest.mark.parametrize("value", [None, ""])
def test_no_http_proxy_or_an_empty_one_means_a_direct_connection(tmp_path, value):
    assert load(tmp_path, value).proxy is None
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": GOOD}))
    assert configuration.load_config(path).proxy is None


@pytest.mark.parametrize("value,problem", [
    (f"http://camera:{SECRET}@proxy.example.com", "port"),
    (f"https://camera:{SECRET}@proxy.example.com:3128", "http://"),
    (f"socks5://camera:{SECRET}@proxy.example.com:1080", "http://"),
    (f"camera:{SECRET}@proxy.example.com:3128", "http://"),
    ("proxy.example.com:3128", "http://"),
    (f"http://camera:{SECRET}@proxy.example.com:99999", "port"),
    (f"http://camera:{SECRET}@proxy.example.com:0", "port"),
    (f"http://camera:{SECRET}@proxy.example.com:3128/path", "path"),
    (f"http://camera:{SECRET}@proxy.example.com:3128/?q=1", "path"),
    (f"http://camera:{SECRET}/x@proxy.example.com:3128", "invalid host or port"),
    (f"http://:{SECRET}@proxy.example.com:3128", "user name"),
    ("http://camera@proxy.example.com:3128", "password"),
    (f"http://camera:{SECRET}@bad_host!:3128", "host"),
    (f"http://camera:{SECRET}@:3128", "host"),
    (f"http://camera:{SECRET} @proxy.example.com:3128", "spaces"),
    (f"http://camera:{SECRET}\n@proxy.example.com:3128", "control"),
    (3128, "string"),
    ({"host": "proxy", "password": SECRET}, "string"),
    (f"http://camera:{SECRET}@999.1.1.1:3128", "IPv4"),
    (f"http://camera:{SECRET}@1.2.3:3128", "IPv4"),
    (f"http://camera:{SECRET}@proxy.10:3128", "IPv4"),
    (f"http://camera:{SECRET}@[fe80::1%25eth0]:3128", "zone"),
    (f"http://cam%00era:{SECRET}@proxy.example.com:3128", "control"),
    (f"http://camera:{SECRET}%0A@proxy.example.com:3128", "control"),
    ("http://camera:@proxy.example.com:3128", "empty password"),
    (f"http://{LONGEST_HOST}a:3128", "host"),
])
def test_a_bad_http_proxy_is_a_config_error_naming_the_key_never_the_password(
        tmp_path, value, problem):
    with pytest.raises(errors.ConfigError) as caught:
        load(tmp_path, value)
    message = f"{caught.value} {caught.value.hint}"
    assert "'HTTP_PROXY'" in message and problem in message
    assert SECRET not in message and "camera" not in message
    assert errors.exit_code(caught.value) == 78


def test_the_password_is_in_no_repr_or_str_of_the_proxy_or_the_config(tmp_path):
    config = load(tmp_path, f"http://camera:{SECRET}@proxy.example.com:3128")
    assert config.proxy.password == SECRET
    for text in (repr(config.proxy), str(config.proxy), repr(config)):
        assert SECRET not in text
    assert str(config.proxy) == "proxy.example.com:3128"
    assert str(proxy.Proxy("fd00::1", 3128)) == "[fd00::1]:3128"


def test_the_password_is_redacted_from_any_log_line_once_the_config_is_read(tmp_path):
    load(tmp_path, f"http://camera:{SECRET}@proxy.example.com:3128")
    stream = io.StringIO()
    logs.setup_logging(stream=stream)
    logging.getLogger("entomologist").error("the proxy said %s", f"no to {SECRET}!")
    assert SECRET not in stream.getvalue() and "no to [redacted]!" in stream.getvalue()


@pytest.mark.parametrize("password", ["Q", "pw", "p4s"])
def test_a_short_password_is_redacted_too_where_it_stands_alone(tmp_path, password):
    load(tmp_path, f"http://camera:{password}@proxy.example.com:3128")
    stream = io.StringIO()
    logs.setup_logging(stream=stream)
    logging.getLogger("entomologist").error("the proxy said %s", f"no to {password}!")
    assert stream.getvalue().strip() == "ERROR the proxy said no to [redacted]!"
    assert logs.shown(f"({password})") == "([redacted])"


def test_the_connection_options_carry_a_tunnel_with_basic_credentials():
    tls = mqtt.Tls(None, b"", b"", b"ca")
    endpoint = mqtt.Endpoint("iot.example.com", 443, None,
                             proxy.Proxy("proxy.example.com", 3128, "camera", SECRET))
    options = mqtt.connection_options(endpoint, tls, "CAM-1", 5, None)
    crt = options["http_proxy_options"]
    assert (crt.host_name, crt.port) == ("proxy.example.com", 3128)
    assert crt.auth_type == http.HttpProxyAuthenticationType.Basic
    assert (crt.auth_username, crt.auth_password) == ("camera", SECRET)
    assert crt.connection_type == http.HttpProxyConnectionType.Tunneling
    # The broker's port, not the proxy's, chooses ALPN in the builder.
    assert (options["endpoint"], options["port"]) == ("iot.example.com", 443)


def test_no_proxy_means_no_proxy_options_and_no_credentials_without_a_user():
    tls = mqtt.Tls(None, b"", b"", b"ca")
    assert "http_proxy_options" not in mqtt.connection_options(
        mqtt.Endpoint("iot.example.com", 8883, None), tls, "CAM-1", 5, None)
    crt = proxy.crt_options(proxy.Proxy("10.0.0.1", 8888))
    assert crt.auth_type == http.HttpProxyAuthenticationType.Nothing
    assert crt.auth_username is None and crt.auth_password is None


def test_both_connections_of_a_first_boot_go_through_the_proxy(device, cloud):
    device.update(HTTP_PROXY=f"http://camera:{SECRET}@10.0.0.1:3128")
    boot.boot(device.config_path, Deadline(60, clock=FakeClock(), step_limit=0.2), build=cloud)
    assert len(cloud.connections) == 2
    expected = proxy.Proxy("10.0.0.1", 3128, "camera", SECRET)
    assert [c.endpoint.proxy for c in cloud.connections] == [expected, expected]
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_later_boot_goes_through_the_proxy(device, cloud):
    boot.boot(device.config_path, Deadline(60, clock=FakeClock(), step_limit=0.2), build=cloud)
    device.update(HTTP_PROXY="http://10.0.0.1:3128")
    cloud.connections.clear()
    update_boot_status.update_boot_status(device.config(), Deadline(60, clock=FakeClock(),
                                                                         step_limit=0.2),
                                          build=cloud)
    assert [c.endpoint.proxy for c in cloud.connections] == [proxy.Proxy("10.0.0.1", 3128)]


def test_the_https_proxy_variable_is_noted_once_and_its_value_never_shown(caplog, monkeypatch):
    monkeypatch.setattr(proxy, "_noted", [])
    env = {"https_proxy": f"http://camera:{SECRET}@proxy.example.com:3128"}
    with caplog.at_level(logging.WARNING):
        assert proxy.note_environment(env) == "https_proxy"
        assert proxy.note_environment(env) == "https_proxy"
    assert len(caplog.records) == 1 and SECRET not in caplog.text
    assert "https_proxy is set in the environment but not used" in caplog.text
    assert proxy.note_environment({}) is None


def test_a_boot_without_http_proxy_says_the_environments_https_proxy_is_not_used(
        device, cloud, caplog, monkeypatch):
    monkeypatch.setattr(proxy, "_noted", [])
    monkeypatch.setenv("HTTPS_PROXY", f"http://camera:{SECRET}@proxy.example.com:3128")
    boot.boot(device.config_path, Deadline(60, clock=FakeClock(), step_limit=0.2), build=cloud)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ["HTTPS_PROXY is set in the environment but not used: the connection goes "
                    "direct; set HTTP_PROXY in the config to use a proxy"]
    assert [c.endpoint.proxy for c in cloud.connections] == [None, None]


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o444])
def test_a_config_holding_the_proxy_password_that_others_can_read_is_78_with_the_fix(
        tmp_path, mode):
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": {
        **GOOD, "HTTP_PROXY": f"http://camera:{SECRET}@proxy.example.com:3128"}}))
    os.chmod(path, mode)
    with pytest.raises(errors.ConfigError) as caught:
        configuration.load_config(path)
    message = f"{caught.value}; check {caught.value.hint}"
    assert errors.exit_code(caught.value) == 78
    assert "HTTP_PROXY" in message and f"chmod 600 {path}" in message
    assert SECRET not in message and "\n" not in message


@pytest.mark.parametrize("mode,value", [
    (0o600, f"http://camera:{SECRET}@proxy.example.com:3128"),
    (0o640, f"http://camera:{SECRET}@proxy.example.com:3128"),  # a group chosen to read it
    (0o644, "http://proxy.example.com:3128"),  # nothing secret in it
])
def test_a_config_whose_secret_others_cannot_read_or_without_one_is_accepted(
        tmp_path, mode, value):
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": {**GOOD, "HTTP_PROXY": value}}))
    os.chmod(path, mode)
    assert configuration.load_config(path).proxy.host == "proxy.example.com"


def test_a_connect_through_the_proxy_that_never_completes_names_the_proxy_not_its_password(
        device, cloud):
    device.update(HTTP_PROXY=f"http://camera:{SECRET}@10.0.0.1:3128")
    cloud.fail_with("connect", *["never"] * 50)
    with pytest.raises(errors.TransientError) as err:
        boot.boot(device.config_path, Deadline(10, clock=FakeClock(), step_limit=2),
                  build=cloud)
    # The last attempt waits what is left of the run (the backoff is random).
    assert re.match(r"connect to example-ats\.iot\.eu-west-1\.amazonaws\.com:8883 through "
                    r"the HTTP proxy 10\.0\.0\.1:3128: no answer in [0-2] s \(gave up after "
                    r"\d+ attempt\(s\)", str(err.value)), str(err.value)
    assert SECRET not in str(err.value)
