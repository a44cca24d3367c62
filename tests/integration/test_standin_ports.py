"""The stand-in's ports: chosen free, and a port taken before its listener binds it
(an outgoing connection's local port comes from the same range) costs no start."""
import socket

from iot_standin import StandIn


def test_mosquitto_whose_port_was_taken_meanwhile_starts_on_another(tmp_path):
    from standin.broker import Broker
    from standin.ca import StandInCA
    ca = StandInCA()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    cert, key = ca.write_pair(tmp_path, "server", "localhost", server=True,
                              hosts=("localhost", "127.0.0.1"))
    broker = Broker(tmp_path, tmp_path / "ca.pem", cert, key)
    taken = broker.port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", taken))
        squatter.listen(1)
        broker.start()
        try:
            assert broker.port != taken and broker.running
            assert f"listener {broker.port} 127.0.0.1" in broker.conf.read_text()
        finally:
            broker.stop()


def another_bind_takes_the_devices_port(tmp_path, reuse: bool) -> bool:
    """Whether a socket of another program binds the port a prepared stand-in wrote
    into the device's config (``reuse``: with SO_REUSEADDR, as mosquitto binds)."""
    standin = StandIn(tmp_path)
    standin.prepare()
    try:
        with socket.socket() as other:
            if reuse:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                other.bind(("127.0.0.1", standin.port))
                return True
            except OSError:
                return False
    finally:
        standin.stop()


def test_the_devices_port_is_held_from_the_moment_it_is_written_into_its_config(tmp_path):
    assert not another_bind_takes_the_devices_port(tmp_path, reuse=False)


def test_the_devices_port_is_held_even_from_a_bind_that_shares_ports_as_mosquitto_does(tmp_path):
    # mosquitto binds with SO_REUSEADDR: were the held socket to allow it too, a
    # mosquitto handed the same port by a race would listen first, and the
    # stand-in's relay would then fail its own listen (EADDRINUSE).
    assert not another_bind_takes_the_devices_port(tmp_path, reuse=True)
