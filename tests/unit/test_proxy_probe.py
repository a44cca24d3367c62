"""What each proxy failure means: awscrt reports every refusal of CONNECT alike, and the
probe asks the proxy which status it answers."""
import pytest

from entomologist import errors, proxy, proxy_probe
from fakes import crt_error

SECRET = "s3cr3t-Pa55"

PROXY = proxy.Proxy("proxy.example.com", 3128, "camera", SECRET)


def failure(name, status=None, monkeypatch=None, probe_error=None):
    if monkeypatch is not None:
        def connect_status(p, host, port, timeout):
            assert (p, host, port) == (PROXY, "iot.example.com", 443)
            if probe_error:
                raise probe_error
            return status
        monkeypatch.setattr(proxy_probe, "connect_status", connect_status)
    return proxy_probe.failure(PROXY, "iot.example.com", 443, crt_error(name), 5.0)


def no_secret(exc):
    assert SECRET not in f"{exc} {exc.hint}"
    return exc


@pytest.mark.parametrize("name", ["AWS_IO_SOCKET_CONNECTION_REFUSED", "AWS_IO_SOCKET_TIMEOUT",
                                  "AWS_IO_DNS_INVALID_NAME"])
def test_an_unreachable_proxy_is_transient_and_named(name):
    exc = no_secret(failure(name))
    assert isinstance(exc, errors.TransientError) and errors.exit_code(exc) == 75
    assert f"cannot reach the HTTP proxy proxy.example.com:3128: {name}" == str(exc)


def test_something_else_than_a_proxy_on_that_port_is_transient_and_says_so():
    exc = no_secret(failure("AWS_ERROR_HTTP_PROTOCOL_ERROR"))
    assert errors.exit_code(exc) == 75 and "did not answer CONNECT as an HTTP proxy" in str(exc)


def test_a_tls_failure_inside_the_tunnel_names_the_endpoint_and_the_proxy():
    exc = no_secret(failure("AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE"))
    assert errors.exit_code(exc) == 75
    assert str(exc) == ("connect to iot.example.com:443 through the HTTP proxy "
                        "proxy.example.com:3128 failed: AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE")


def test_a_forbidden_connect_is_a_config_error_saying_what_to_check(monkeypatch):
    exc = no_secret(failure(proxy_probe.CONNECT_FAILED, 403, monkeypatch))
    assert errors.exit_code(exc) == 78
    assert str(exc) == ("the HTTP proxy proxy.example.com:3128 refused to CONNECT to "
                        "iot.example.com:443 (HTTP 403)")
    assert "allow CONNECT to port 443" in exc.hint and "ConnectPort" in exc.hint


@pytest.mark.parametrize("status", [401, 407])
def test_refused_credentials_are_a_config_error_pointing_at_the_credentials(monkeypatch, status):
    exc = no_secret(failure(proxy_probe.CONNECT_FAILED, status, monkeypatch))
    assert errors.exit_code(exc) == 78
    assert f"refused the credentials in HTTP_PROXY (HTTP {status})" in str(exc)
    assert "user name and password" in exc.hint


def test_credentials_asked_for_but_not_configured_say_to_add_them(monkeypatch):
    monkeypatch.setattr(proxy_probe, "connect_status", lambda *a: 407)
    exc = proxy_probe.failure(proxy.Proxy("10.0.0.1", 8888), "iot.example.com", 443,
                              crt_error(proxy_probe.CONNECT_FAILED), 5.0)
    assert errors.exit_code(exc) == 78 and "asks for credentials (HTTP 407)" in str(exc)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_a_proxy_that_cannot_reach_the_endpoint_is_transient(monkeypatch, status):
    # awscrt reports these exactly like a 403: retrying must not stop for them.
    exc = no_secret(failure(proxy_probe.CONNECT_FAILED, status, monkeypatch))
    assert errors.exit_code(exc) == 75 and f"(HTTP {status})" in str(exc)


def test_a_refusal_that_is_gone_when_asked_again_is_transient(monkeypatch):
    exc = no_secret(failure(proxy_probe.CONNECT_FAILED, 200, monkeypatch))
    assert errors.exit_code(exc) == 75 and "allowed it when asked again" in str(exc)


def test_a_closed_connection_that_the_proxy_allows_when_asked_says_the_tunnel_was_cut(
        monkeypatch):
    exc = no_secret(failure("AWS_IO_SOCKET_CLOSED", 200, monkeypatch))
    assert errors.exit_code(exc) == 75
    assert "opened the tunnel to iot.example.com:443, then the connection closed" in str(exc)


def test_a_closed_connection_that_the_proxy_refuses_when_asked_is_that_refusal(monkeypatch):
    exc = no_secret(failure("AWS_IO_SOCKET_CLOSED", 403, monkeypatch))
    assert errors.exit_code(exc) == 78 and "(HTTP 403)" in str(exc)


def test_a_proxy_that_closes_without_answering_says_so(monkeypatch):
    exc = no_secret(failure("AWS_IO_SOCKET_CLOSED", None, monkeypatch,
                            probe_error=proxy_probe.ClosedWithoutAnswer("closed")))
    assert errors.exit_code(exc) == 75
    assert "closes them without answering CONNECT" in str(exc)


def test_a_refusal_that_cannot_be_asked_about_again_is_transient(monkeypatch):
    exc = no_secret(failure(proxy_probe.CONNECT_FAILED, None, monkeypatch,
                            probe_error=ConnectionResetError()))
    assert errors.exit_code(exc) == 75 and "ConnectionResetError" in str(exc)
