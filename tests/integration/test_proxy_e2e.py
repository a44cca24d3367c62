"""HTTP_PROXY: the scripts through Debian's tinyproxy, started per test on a free loopback port."""
import base64
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from e2e import device_doc, run_script
from standin.broker import free_port

SECRET = "Tr0ub4dor-and-3"


def find_tinyproxy():
    return shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/usr/bin")


class Tinyproxy:
    """tinyproxy in the foreground with its own config: CONNECT only to ``connect_ports``."""

    def __init__(self, directory, connect_ports, basic_auth=None):
        self.port = free_port()
        self.conf = directory / "tinyproxy.conf"
        self.log_path = directory / "tinyproxy.log"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 10",
                 "MaxClients 10", "LogLevel Info"]
        lines += [f"ConnectPort {port}" for port in connect_ports]
        if basic_auth:
            lines.append("BasicAuth {} {}".format(*basic_auth))
        if os.geteuid() == 0:
            lines += ["User nobody", "Group nogroup"]
        self.conf.write_text("\n".join(lines) + "\n")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([find_tinyproxy(), "-d", "-c", str(self.conf)],
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        end = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(f"tinyproxy did not start: {self.log()}")
                time.sleep(0.01)

    def url(self, credentials=""):
        return f"http://{credentials}127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connects(self, port, at_least: int = 1, within: float = 5.0) -> int:
        """The CONNECT requests to localhost:``port`` tinyproxy logged, once it has
        logged ``at_least`` of them or ``within`` seconds have passed: tinyproxy may
        write its line after the client has already finished."""
        deadline = time.monotonic() + within
        while True:
            count = self.log().count(f": CONNECT localhost:{port} HTTP/1.1")
            if count >= at_least or time.monotonic() > deadline:
                return count
            time.sleep(0.05)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session", autouse=True)
def tinyproxy_installed():
    if not find_tinyproxy():
        pytest.fail("tinyproxy is not installed: run `make test`, which installs it")


@pytest.fixture
def tinyproxy(tmp_path):
    started = []

    def start(connect_ports, basic_auth=None):
        proxy = Tinyproxy(tmp_path, connect_ports, basic_auth)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def test_first_and_later_boot_go_through_the_proxy(standin, tinyproxy):
    proxy = tinyproxy([standin.port])
    standin.write_device_config(HTTP_PROXY=proxy.url())
    first = run_script("boot.py", standin.config_path, "-v")
    assert first.code == 0, first.stderr
    assert len(standin.wait_for("boot")) == 1
    # The claim connection, then the device connection: both tunnelled.
    assert proxy.connects(standin.port, 2) == 2, proxy.log()
    assert f"tunnelling through the HTTP proxy 127.0.0.1:{proxy.port}" in first.stderr
    # awscrt's one socket goes to the proxy: that is where TCP_NODELAY lands.
    assert first.stderr.count(f"-> 127.0.0.1:{proxy.port} (") == 2, first.stderr
    assert device_doc(standin)["device"]["PROVISION_STATUS"] == "True"

    later = run_script("boot.py", standin.config_path)
    assert later.code == 0, later.stderr
    assert len(standin.wait_for("boot", 2)) == 2
    assert proxy.connects(standin.port, 3) == 3, proxy.log()


def test_a_proxy_that_is_down_is_transient_and_named(device_files):
    port = free_port()
    device_files.write_device_config(HTTP_PROXY=f"http://camera:{SECRET}@127.0.0.1:{port}")
    result = run_script("boot.py", device_files.config_path, "--timeout", "1", "-v")
    assert result.code == 75, result.stderr
    assert (f"cannot reach the HTTP proxy 127.0.0.1:{port}: AWS_IO_SOCKET_CONNECTION_REFUSED"
            in result.errors[-1]), result.stderr
    assert SECRET not in result.stderr


def test_a_proxy_that_cannot_reach_the_endpoint_is_transient_not_a_refusal(
        device_files, tinyproxy):
    # tinyproxy answers 500; awscrt reports it exactly as it reports a 403.
    proxy = tinyproxy([])
    port = free_port()
    device_files.write_device_config(PORT=port, HTTP_PROXY=proxy.url())
    result = run_script("boot.py", device_files.config_path, "--timeout", "1")
    assert result.code == 75, result.stderr
    assert (f"the HTTP proxy 127.0.0.1:{proxy.port} could not open a tunnel to "
            f"localhost:{port} (HTTP 500)") in result.errors[-1], result.stderr


def test_a_proxy_that_refuses_connect_to_the_port_is_a_config_error(standin, tinyproxy):
    # Debian's tinyproxy documents ConnectPort 443 and 563 (for HTTPS) in its config.
    proxy = tinyproxy([443, 563])
    standin.write_device_config(HTTP_PROXY=proxy.url())
    result = run_script("boot.py", standin.config_path)
    assert result.code == 78, result.stderr
    (error,) = result.errors
    assert (f"the HTTP proxy 127.0.0.1:{proxy.port} refused to CONNECT to "
            f"localhost:{standin.port} (HTTP 403)") in error
    assert f"allow CONNECT to port {standin.port}" in error and "PORT 443" in error
    assert f"Refused CONNECT method on port {standin.port}" in proxy.log()
    assert standin.events("boot") == []


def test_basic_credentials_work_and_never_reach_the_log(standin, tinyproxy):
    proxy = tinyproxy([standin.port], basic_auth=("camera", SECRET))
    standin.write_device_config(HTTP_PROXY=proxy.url(f"camera:{SECRET}@"))
    result = run_script("boot.py", standin.config_path, "-v")
    assert result.code == 0, result.stderr
    assert proxy.connects(standin.port, 2) == 2, proxy.log()
    assert len(standin.wait_for("boot")) == 1
    basic = base64.b64encode(f"camera:{SECRET}".encode()).decode()
    assert SECRET not in result.stderr and basic not in result.stderr


def test_wrong_credentials_are_refused_with_their_own_message(standin, tinyproxy):
    proxy = tinyproxy([standin.port], basic_auth=("camera", SECRET))
    standin.write_device_config(HTTP_PROXY=proxy.url("camera:not-the-password@"))
    result = run_script("boot.py", standin.config_path, "-v")
    assert result.code == 78, result.stderr
    (error,) = result.errors
    # tinyproxy answers wrong credentials with 401, none at all with 407.
    assert (f"the HTTP proxy 127.0.0.1:{proxy.port} refused the credentials in HTTP_PROXY "
            f"(HTTP 401)") in error
    assert "not-the-password" not in result.stderr
    assert standin.events("boot") == []


def test_port_443_through_a_proxy_allowing_only_443_offers_the_aws_iot_alpn(
        standin, tinyproxy, alpn_listener):
    proxy = tinyproxy([443, 563])
    standin.write_device_config(PORT=443, HTTP_PROXY=proxy.url())
    result = run_script("boot.py", standin.config_path, "--timeout", "2")
    assert result.code == 75, result.stderr
    assert alpn_listener == ["x-amzn-mqtt-ca"], result.stderr
    assert proxy.connects(443) >= 1, proxy.log()


class ScriptedProxy:
    """A loopback socket that reads each CONNECT and answers it as ``answer(sock, n)``
    says (``n``: the connection's number, from 0): a captive portal, a hostile or a
    broken proxy."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.stopping = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _serve(self):
        n = 0
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, n), daemon=True).start()
            n += 1

    def _handle(self, conn, n):
        with conn:
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    chunk = conn.recv(1024)
                    if not chunk:
                        return
                    head += chunk
                self.requests.append(head)
                self.answer(conn, n, self.stopping)
            except OSError:
                pass

    def stop(self):
        self.stopping.set()
        self.listener.close()


@pytest.fixture
def scripted_proxy():
    started = []

    def start(answer):
        proxy = ScriptedProxy(answer)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def status(code, reason="Whatever", headers=b""):
    def answer(conn, n, stopping):
        conn.sendall(f"HTTP/1.1 {code} {reason}\r\n".encode() + headers
                     + b"Content-Length: 0\r\n\r\n")
    return answer


def refused_then(hostile):
    """403 to awscrt's CONNECT, then ``hostile`` to the status probe that follows."""
    def answer(conn, n, stopping):
        (status(403) if n == 0 else hostile)(conn, n, stopping)
    return answer


def endless_continue(conn, n, stopping):
    while not stopping.is_set():
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.01)


def one_byte_a_second(conn, n, stopping):
    # Each byte comes well within any one read's time-out.
    for byte in b"HTTP/1.1 100 Continue\r\n\r\n" * 1000:
        conn.sendall(bytes([byte]))
        if stopping.wait(1):
            return


@pytest.mark.parametrize("hostile", [endless_continue, one_byte_a_second],
                         ids=["endless 100 Continue", "one byte a second"])
def test_the_proxy_status_probe_ends_by_the_runs_deadline(device_files, scripted_proxy, hostile):
    proxy = scripted_proxy(refused_then(hostile))
    device_files.write_device_config(HTTP_PROXY=proxy.url())
    result = run_script("boot.py", device_files.config_path, "--timeout", "3", timeout=60)
    assert result.code == 75, result.stderr
    # The deadline, plus the interpreter's start and one bounded disconnect.
    assert result.seconds < 3 + 4, result.stderr
    assert len(proxy.requests) >= 2, "the probe was never sent"


@pytest.mark.parametrize("code", [401, 403, 407])
def test_a_proxy_refusing_for_its_rules_or_credentials_is_78(device_files, scripted_proxy, code):
    proxy = scripted_proxy(status(code))
    device_files.write_device_config(HTTP_PROXY=proxy.url())
    result = run_script("boot.py", device_files.config_path, "--timeout", "4")
    assert result.code == 78, result.stderr
    assert f"(HTTP {code})" in result.errors[-1], result.stderr


@pytest.mark.parametrize("code", [101, 301, 302, 303, 307, 400, 404, 418])
def test_a_captive_portal_or_any_other_answer_is_transient(device_files, scripted_proxy, code):
    proxy = scripted_proxy(status(code, headers=b"Location: http://portal.example/login\r\n"))
    device_files.write_device_config(HTTP_PROXY=proxy.url())
    result = run_script("boot.py", device_files.config_path, "--timeout", "2")
    assert result.code == 75, result.stderr
    assert f"(HTTP {code})" in result.errors[-1], result.stderr


def test_a_proxy_that_allows_the_tunnel_then_closes_it_is_not_called_unreachable(
        device_files, scripted_proxy):
    proxy = scripted_proxy(status(200, "Connection established"))
    device_files.write_device_config(HTTP_PROXY=proxy.url())
    result = run_script("boot.py", device_files.config_path, "--timeout", "2", "-v")
    assert result.code == 75, result.stderr
    error = result.errors[-1]
    assert "cannot reach" not in error, result.stderr
    assert f"the HTTP proxy 127.0.0.1:{proxy.port} opened the tunnel" in error, result.stderr
