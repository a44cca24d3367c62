"""entomologist.mqtt: the connection awscrt's builder makes (built, never connected here)."""

import pytest

from entomologist import errors, mqtt
from fakes import FakeClock, FakeCloud, MiniCA, crt_error

# The unit tests' conftest replaces it for each test, so that no test connects; building
# a connection does not connect.
REAL_BUILD = mqtt.build_connection


def test_the_connect_carries_no_sdk_metrics_in_its_username(tmp_path):
    ca = MiniCA()
    cert, key = ca.pair()
    tls = mqtt.Tls(tmp_path / "c.pem", cert.encode(), key.encode(), ca.pem.encode())
    connection = REAL_BUILD(mqtt.Endpoint("127.0.0.1", 8883, tmp_path / "ca.pem"), tls,
                            "CAM-42", 5, lambda **_: None)
    # With metrics on, awscrt appends the SDK's name, version and platform to the CONNECT
    # packet's username (awscrt.mqtt.Connection keeps that in _metrics).
    assert connection.username is None and connection._metrics is None
    assert connection.client_id == "CAM-42"


def test_a_tls_negotiation_failure_names_the_system_clock_with_the_time_it_reads(tmp_path):
    # A clock far ahead (a broken or hostile time server) makes the broker's certificate
    # look expired, and awscrt says only AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE.
    ca = MiniCA()
    cert, key = ca.pair()
    for name, pem in (("c.pem", cert), ("k.pem", key), ("ca.pem", ca.pem)):
        (tmp_path / name).write_text(pem)
    cloud, clock = FakeCloud(ca), FakeClock(start=3_786_912_000.0)  # 2090-01-01
    cloud.fail_with("connect", crt_error("AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE"))
    with pytest.raises(errors.TransientError) as err:
        mqtt.connect(mqtt.Endpoint("localhost", 8883, tmp_path / "ca.pem"), tmp_path / "c.pem",
                     tmp_path / "k.pem", "CAM-42", 5, build=cloud, clock=clock)
    assert "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE" in str(err.value)
    assert "the system clock (it reads 2090-01-01T00:00:00Z)" in err.value.hint
    assert err.value.hint.startswith(mqtt.NETWORK_HINT)
