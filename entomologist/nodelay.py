"""TCP_NODELAY on awscrt's MQTT socket, which awscrt 0.36.1 cannot be asked for.

awscrt never sets TCP_NODELAY, so Nagle's algorithm holds each small write
until the previous one is acknowledged, and the broker delays that ACK: the
TLS 1.3 client's second flight, a batch of SUBSCRIBEs and a request behind an
unacknowledged PUBACK each cost an extra round trip (plus about 40 ms) on a
real link.  aws-c-io has the option upstream; the Python binding does not.

So, right after ``connect()`` is called, a short-lived thread looks for the
socket awscrt has just opened: a TCP socket of this process that did not exist
before the call and whose remote end (in the kernel's table, which shows it
even while the SYN is out) is the endpoint's address and port.  It sets the
option on a duplicate of that descriptor, so a descriptor closed and reused
meanwhile can never be touched, and the original is never closed.  When
nothing matches in time it does nothing: the connection works as before,
only slower.  Linux only (/proc); elsewhere it does nothing.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from . import lookup

log = logging.getLogger(__name__)

POLL_S = 0.002
# Long enough for a slow DNS answer plus a TCP handshake on a 600 ms link; the
# option only helps if it lands before the TLS handshake's second flight.
MAX_WAIT_S = 10.0

# /proc/net/tcp states (include/net/tcp_states.h)
STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
          6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
          11: "CLOSING"}


@dataclass
class Applied:
    """What the socket had done when the option landed (the proof of timing)."""
    fd: int
    inode: int
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    data_segments_out: int
    bytes_received: int


def socket_fds() -> dict[int, int]:
    """This process's sockets: inode -> descriptor."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            found[int(target[8:-1])] = int(name)
    return found


def parse_address(text: str) -> tuple[str, int]:
    """One address of /proc/net/tcp{,6}: 32-bit words in host order, then the port."""
    hexaddr, hexport = text.split(":")
    raw = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16))
                   for i in range(0, len(hexaddr), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(hexport, 16)


def tcp_table() -> dict[int, tuple[tuple[str, int], tuple[str, int], str]]:
    """The network namespace's TCP sockets: inode -> (local, remote, state)."""
    table = {}
    for path in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue  # no IPv6
        for line in lines:
            fields = line.split()
            inode = int(fields[9])
            if inode:
                table[inode] = (parse_address(fields[1]), parse_address(fields[2]),
                                STATES.get(int(fields[3], 16), fields[3]))
    return table


def resolve(host: str, port: int, timeout: float) -> set[str]:
    infos = lookup.getaddrinfo(host, port, timeout)
    out = set()
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        out.add(str(ip))
    return out


def _tcp_info(sock: socket.socket) -> tuple[int, int]:
    """(data segments sent, bytes received) from struct tcp_info; 0s if too old a kernel."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    if len(info) < 168:
        return 0, 0
    bytes_received = struct.unpack_from("=Q", info, 128)[0]
    data_segs_out = struct.unpack_from("=I", info, 156)[0]
    return data_segs_out, bytes_received


def set_on(fd: int, inode: int) -> socket.socket | None:
    """TCP_NODELAY through a duplicate of ``fd``, if it still is socket ``inode``.

    Returns the duplicate (the caller closes it), or None if ``fd`` was closed
    or reused meanwhile.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        if os.fstat(dup).st_ino != inode:
            os.close(dup)
            return None
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        return None
    return sock


class Watch:
    """Finds the TCP socket opened after it was made, to ``host``:``port``, and sets TCP_NODELAY."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.done = threading.Event()
        self._stopped = threading.Event()
        self.applied: Applied | None = None
        try:
            self._before = set(socket_fds())
        except OSError as exc:
            log.debug("TCP_NODELAY: cannot list this process's sockets (%s)", exc)
            self._before = None

    def start(self, within: float = MAX_WAIT_S) -> None:
        if self._before is None:
            self.done.set()
            return
        threading.Thread(target=self.run, args=(min(within, MAX_WAIT_S),),
                         name="tcp-nodelay", daemon=True).start()

    def stop(self) -> None:
        """The connection is up or has failed: a socket not found by now never will be."""
        self._stopped.set()

    def run(self, within: float) -> None:
        try:
            self.applied = self._search(time.monotonic() + within)
        except Exception as exc:  # never let a speed-up break a connection
            log.debug("TCP_NODELAY: search failed (%r); the connection goes on with Nagle", exc)
        finally:
            self.done.set()

    def _search(self, deadline: float) -> Applied | None:
        try:
            addresses = resolve(self.host, self.port, deadline - time.monotonic())
        except OSError as exc:
            log.debug("TCP_NODELAY: cannot resolve %s (%s)", self.host, exc)
            return None
        while True:
            fresh = {inode: fd for inode, fd in socket_fds().items()
                     if inode not in self._before}
            if fresh:
                table = tcp_table()
                for inode, fd in fresh.items():
                    row = table.get(inode)
                    if row is None or row[1][1] != self.port or row[1][0] not in addresses:
                        continue
                    sock = set_on(fd, inode)
                    if sock is None:
                        continue
                    with sock:
                        segments, received = _tcp_info(sock)
                    applied = Applied(fd, inode, row[0], row[1], row[2], segments, received)
                    log.debug("TCP_NODELAY set on fd %d, %s:%d -> %s:%d (%s, %d data "
                              "segments sent, %d bytes received)", fd, *row[0], *row[1],
                              row[2], segments, received)
                    return applied
            if time.monotonic() >= deadline or self._stopped.is_set():
                log.debug("TCP_NODELAY: no new socket to %s:%d found; the connection goes "
                          "on with Nagle", self.host, self.port)
                return None
            time.sleep(POLL_S)


@contextlib.contextmanager
def after_connect(host: str, port: int, within: float = MAX_WAIT_S):
    """Around an awscrt ``connect()`` call: TCP_NODELAY on the socket it opens.

    The search runs in a thread after the block, so the caller is not held up;
    the yielded Watch tells tests what happened.
    """
    watch = Watch(host, port)
    yield watch
    watch.start(within)
