"""Run a command where DNS stalls: ``python stalled_dns.py N PROXY_PORT CMD...``, started
inside a private network and mount namespace whose /etc/resolv.conf names 127.0.0.1.

A DNS server on 127.0.0.1:53 answers the first N queries (A -> 127.0.0.1, other
types empty), then never answers again: a lookup that gets past the first ones
waits for resolv.conf's timeout.  With a PROXY_PORT other than 0, an HTTP proxy
on 127.0.0.1:PROXY_PORT answers every CONNECT with 403.  SIGTERM is passed on to CMD; the exit code is
CMD's.
"""
import signal
import socket
import struct
import subprocess
import sys
import threading


def serve(sock: socket.socket, answers: int) -> None:
    asked = 0
    while True:
        data, peer = sock.recvfrom(2048)
        asked += 1
        if asked > answers:
            continue
        question = data[12:]
        question = question[:question.index(b"\0") + 5]
        qtype = struct.unpack(">H", question[-4:-2])[0]
        if qtype == 1:
            count, answer = 1, (b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4)
                                + socket.inet_aton("127.0.0.1"))
        else:
            count, answer = 0, b""
        sock.sendto(data[:2] + b"\x81\x80" + struct.pack(">HHHH", 1, count, 0, 0)
                    + question + answer, peer)


def refuse(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")


def main() -> int:
    answers, proxy_port, command = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    if proxy_port:
        listener = socket.create_server(("127.0.0.1", proxy_port))
        threading.Thread(target=refuse, args=(listener,), daemon=True).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    threading.Thread(target=serve, args=(sock, answers), daemon=True).start()
    child = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda signo, frame: child.send_signal(signo))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
