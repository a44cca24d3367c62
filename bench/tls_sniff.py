"""A TCP relay that reads the TLS version each connection negotiates from the ServerHello.

TLS 1.3 announces itself in the ServerHello's supported_versions extension
(RFC 8446 4.2.1); without that extension the legacy version field is the
version (0x0303: TLS 1.2).  The relay reads only those plaintext bytes and
forwards everything unchanged.
"""
from __future__ import annotations

import socket
import threading

VERSIONS = {0x0301: "TLSv1.0", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
SUPPORTED_VERSIONS = 0x002B


def server_hello_version(data: bytes) -> str | None:
    """The version a ServerHello at the start of ``data`` selects; None if there is none yet."""
    if len(data) < 9 or data[0] != 0x16 or data[5] != 0x02:
        return None
    length = int.from_bytes(data[6:9], "big")
    if len(data) < 9 + length:
        return None                           # the rest is still on its way
    hello = data[9:9 + length]
    try:
        legacy = int.from_bytes(hello[0:2], "big")
        pos = 2 + 32
        pos += 1 + hello[pos]                 # session id
        pos += 2 + 1                          # cipher suite, compression
        end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(hello[pos:pos + 2], "big")
            size = int.from_bytes(hello[pos + 2:pos + 4], "big")
            if kind == SUPPORTED_VERSIONS and size == 2:
                return VERSIONS.get(int.from_bytes(hello[pos + 4:pos + 6], "big"))
            pos += 4 + size
    except IndexError:
        return None
    return VERSIONS.get(legacy)


class SniffProxy:
    """Listens on a free loopback port and relays to ``target_port``; ``versions`` holds
    one entry per connection whose ServerHello it saw."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.versions: list[str | None] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        seen = b""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if from_server and seen is not None:
                    seen += data
                    version = server_hello_version(seen)
                    if version or len(seen) > 16384:
                        self.versions.append(version)
                        seen = None
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def __enter__(self) -> "SniffProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
