"""entomologist.mqtt: the connection awscrt's builder makes (built, never connected here)."""

from entomologist import mqtt
from fakes import MiniCA

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
