"""Integration tests: the scripts run as real processes against the stand-in."""
import fcntl
import os
import socket
import ssl
import tempfile
import threading

import pytest

from iot_standin import StandIn, find_mosquitto


@pytest.fixture(scope="session", autouse=True)
def mosquitto_installed():
    if not find_mosquitto():
        pytest.fail("mosquitto is not installed: run `make test`, which installs it")


@pytest.fixture
def standin(tmp_path):
    with StandIn(tmp_path) as s:
        yield s


@pytest.fixture
def guarded(tmp_path):
    """The stand-in with the stack's pre-provisioning hook on, as deployed."""
    with StandIn(tmp_path, hook=True) as s:
        yield s


@pytest.fixture
def after_window(tmp_path):
    """The hook as it answers once a camera's re-registration window has passed."""
    with StandIn(tmp_path, hook=True, parameters={"ReregistrationWindowHours": "0"}) as s:
        yield s


@pytest.fixture
def device_files(tmp_path):
    """A simulated device's files and nothing listening: for runs that must fail
    before they connect (a connection attempt would end in 75, not 78)."""
    s = StandIn(tmp_path)
    s.prepare()
    return s


@pytest.fixture
def port_443():
    """Port 443 is one per machine: pytest-xdist's workers, and any other run of this
    suite here, take turns with it by a lock on one file in the temporary folder."""
    path = os.path.join(tempfile.gettempdir(), "entomologist-tests-port-443.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield 443
    finally:
        os.close(fd)


@pytest.fixture
def alpn_listener(standin, port_443):
    """A TLS listener on 127.0.0.1:443 that records the ALPN the client offered."""
    if os.geteuid() != 0:
        pytest.skip("binding port 443 needs root")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(standin.dir / "server.pem.crt", standin.dir / "server.private.pem.key")
    ctx.set_alpn_protocols(["x-amzn-mqtt-ca", "mqtt"])
    # The client insists on mutual TLS, as AWS IoT requires.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(standin.ca_path)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port_443))
    except OSError as exc:
        # Skipping would hide that the 443 path went untested on this machine.
        pytest.fail(f"port 443 is taken here ({exc}): stop what listens on it "
                    "(ss -ltnp 'sport = :443') to test the ALPN path")
    sock.listen()
    offered = []

    def serve():
        try:
            conn, _ = sock.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                offered.append(tls.selected_alpn_protocol())
        except OSError as exc:
            offered.append(exc)

    threading.Thread(target=serve, daemon=True).start()
    yield offered
    sock.close()
