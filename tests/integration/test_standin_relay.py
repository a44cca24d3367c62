"""The stand-in's relay carries a device's TCP connection as a TCP connection would."""
import socket
import threading

from standin.enforce import Enforcer, Relay


def test_what_the_broker_sends_after_the_device_hangs_up_its_side_still_reaches_it(tmp_path):
    # AWS reads all a client sent before its FIN and answers it; a relay that tore
    # down both sides at the device's FIN could lose a SUBSCRIBE still in flight.
    upstream = socket.create_server(("127.0.0.1", 0))
    heard = []

    def broker():
        conn, _ = upstream.accept()
        with conn:
            data = b""
            while chunk := conn.recv(1024):
                data += chunk
            heard.append(data)
            conn.sendall(b"answer to " + data)

    serving = threading.Thread(target=broker, daemon=True)
    serving.start()
    log = tmp_path / "mosquitto.log"
    log.write_text("")
    relay = Relay("127.0.0.1", 0, upstream.getsockname(), Enforcer(log, lambda *a, **f: None),
                  bound=socket.create_server(("127.0.0.1", 0)))
    port = relay._bound.getsockname()[1]
    relay.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as device:
            device.sendall(b"SUBSCRIBE")
            device.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := device.recv(1024):
                received += chunk
        serving.join(5)
        assert heard == [b"SUBSCRIBE"]
        assert received == b"answer to SUBSCRIBE"
    finally:
        relay.stop()
        upstream.close()
