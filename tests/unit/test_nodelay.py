"""TCP_NODELAY on the socket a connect() call opens, found through /proc, on real loopback sockets."""
import _socket
import logging
import os
import socket

import pytest

from entomologist import nodelay


@pytest.fixture
def listener():
    """A loopback TCP listener made by the test: the only network these tests use."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server


def open_connection(listener):
    """A client socket connected to ``listener``, past the unit tests' network guard.

    (The guard patches socket.socket.connect; the C method underneath is the real one.)
    """
    client = socket.socket()
    _socket.socket.connect(client, listener.getsockname())
    peer, _ = listener.accept()
    return client, peer


def nodelay_on(sock) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_the_socket_opened_in_the_block_gets_tcp_nodelay_and_stays_open(listener):
    host, port = listener.getsockname()
    with nodelay.after_connect(host, port, within=5) as watch:
        client, peer = open_connection(listener)
    with client, peer:
        assert not nodelay_on(peer)
        assert watch.done.wait(5)
        assert nodelay_on(client)
        applied = watch.applied
        assert applied.fd == client.fileno()
        assert applied.inode == os.fstat(client.fileno()).st_ino
        assert applied.remote == (host, port)
        assert applied.local == client.getsockname()
        assert applied.state == "ESTABLISHED"
        # The descriptor the option went through was a duplicate: the original works on.
        client.sendall(b"still open")
        assert peer.recv(100) == b"still open"
        assert not nodelay_on(peer)


def test_sockets_open_before_the_block_are_left_alone(listener, caplog):
    caplog.set_level(logging.DEBUG, logger="entomologist.nodelay")
    host, port = listener.getsockname()
    old_client, old_peer = open_connection(listener)
    with old_client, old_peer:
        with nodelay.after_connect(host, port, within=0.2) as watch:
            pass
        assert watch.done.wait(5)
        assert watch.applied is None
        assert not nodelay_on(old_client)
        assert "no new socket" in caplog.text


def test_a_new_socket_to_another_port_is_left_alone(listener):
    host, port = listener.getsockname()
    with socket.socket() as other_listener:
        other_listener.bind(("127.0.0.1", 0))
        other_listener.listen()
        with nodelay.after_connect(host, port, within=0.2) as watch:
            client, peer = open_connection(other_listener)
        with client, peer:
            assert watch.done.wait(5)
            assert watch.applied is None
            assert not nodelay_on(client)


def test_nothing_happens_when_the_block_raises(listener):
    host, port = listener.getsockname()
    with pytest.raises(RuntimeError):
        with nodelay.after_connect(host, port) as watch:
            raise RuntimeError("connect() failed")
    assert not watch.done.is_set()


def test_without_proc_it_does_nothing(listener, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="entomologist.nodelay")

    def no_proc():
        raise FileNotFoundError("/proc/self/fd")

    monkeypatch.setattr(nodelay, "socket_fds", no_proc)
    host, port = listener.getsockname()
    with nodelay.after_connect(host, port) as watch:
        client, peer = open_connection(listener)
    with client, peer:
        assert watch.done.is_set() and watch.applied is None
        assert not nodelay_on(client)
        assert "cannot list" in caplog.text


def test_a_failing_search_is_logged_at_debug_and_goes_no_further(listener, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="entomologist.nodelay")

    def broken_table():
        raise ValueError("unexpected /proc/net/tcp format")

    monkeypatch.setattr(nodelay, "tcp_table", broken_table)
    host, port = listener.getsockname()
    with nodelay.after_connect(host, port, within=5) as watch:
        client, peer = open_connection(listener)
    with client, peer:
        assert watch.done.wait(5)
        assert watch.applied is None
        assert not nodelay_on(client)
        assert [r.levelno for r in caplog.records] == [logging.DEBUG]
        assert "search failed" in caplog.text


def test_an_unresolvable_host_means_no_search(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="entomologist.nodelay")

    def no_answer(host, port, timeout):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(nodelay, "resolve", no_answer)
    with nodelay.after_connect("broker.example", 8883, within=5) as watch:
        pass
    assert watch.done.wait(5)
    assert watch.applied is None
    assert "cannot resolve" in caplog.text


def test_a_descriptor_reused_for_another_socket_is_not_touched(listener):
    client, peer = open_connection(listener)
    with client, peer:
        inode = os.fstat(client.fileno()).st_ino
        assert nodelay.set_on(client.fileno(), inode + 1) is None
        assert not nodelay_on(client)
        with nodelay.set_on(client.fileno(), inode) as dup:
            assert dup.fileno() != client.fileno()
        assert nodelay_on(client)


def test_a_descriptor_reused_for_a_file_of_the_same_inode_number_is_left_and_not_leaked(
        tmp_path):
    # Inode numbers are per file system: a file may carry the socket's number.
    with open(tmp_path / "file", "wb") as reused:
        inode = os.fstat(reused.fileno()).st_ino
        before = sorted(os.listdir("/proc/self/fd"))
        assert nodelay.set_on(reused.fileno(), inode) is None
        assert sorted(os.listdir("/proc/self/fd")) == before


def test_the_kernel_table_shows_the_connection_with_both_ends(listener):
    client, peer = open_connection(listener)
    with client, peer:
        inode = os.fstat(client.fileno()).st_ino
        assert nodelay.socket_fds()[inode] == client.fileno()
        local, remote, state = nodelay.tcp_table()[inode]
        assert (local, remote, state) == (client.getsockname(), listener.getsockname(),
                                         "ESTABLISHED")


def test_ipv6_and_ipv4_mapped_addresses_are_read_from_the_kernel_format():
    # /proc/net/tcp6 prints four 32-bit words in host order (little-endian here).
    assert nodelay.parse_address("00000000000000000000000001000000:22B3") == ("::1", 8883)
    assert nodelay.parse_address("0000000000000000FFFF00000100007F:01BB") == ("127.0.0.1", 443)
    assert nodelay.parse_address("0100007F:22B3") == ("127.0.0.1", 8883)


def test_the_pinned_awscrt_still_has_no_tcp_nodelay_option():
    """When this fails, awscrt can set TCP_NODELAY itself: use that and drop entomologist.nodelay."""
    import awscrt
    from awscrt.io import SocketOptions

    options = SocketOptions()
    assert [name for name in dir(options) if "delay" in name.lower()] == [], awscrt.__version__
