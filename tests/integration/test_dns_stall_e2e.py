"""A DNS server that stops answering: boot.py --check as a real process in a private
network and mount namespace whose resolv.conf points at a loopback server that answers
the first lookups and then stays silent (resolv.conf asks for 30 s x 2 per lookup)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from e2e import ROOT, device_doc

HERE = ROOT / "tests"
# Inside the namespace: loopback up, a resolv.conf naming 127.0.0.1, a hosts file
# without localhost (so that it is asked of DNS), then the server and the command.
IN_NAMESPACE = ('ip link set lo up && mount --bind "$0" /etc/resolv.conf && '
                'mount --bind "$1" /etc/hosts && shift && exec "$@"')


@pytest.fixture
def stalled_dns(tmp_path):
    resolv, hosts = tmp_path / "resolv.conf", tmp_path / "hosts"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:2\n")
    hosts.write_text("")

    def start(answers: int, proxy_port: int, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c", IN_NAMESPACE,
             str(resolv), str(hosts), sys.executable, str(HERE / "stalled_dns.py"),
             str(answers), str(proxy_port), sys.executable, str(ROOT / "boot.py"), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    return start


def finish(proc: subprocess.Popen, limit: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=limit)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_check_ends_at_its_timeout_when_dns_stops_answering_after_the_dns_check(
        standin, stalled_dns):
    started = time.monotonic()
    # The dns check's two lookups (A and AAAA) are answered; check_tcp's are not.
    proc = stalled_dns(2, 0, "--check", "--timeout", "3", "--config", str(standin.config_path))
    out, err = finish(proc, 30)
    took = time.monotonic() - started
    assert proc.returncode == 75, out + err
    assert "ok   dns" in out and "FAIL tcp" in out, out + err
    assert "no DNS answer for localhost" in out, out
    assert took < 3 + 2.5, (took, out, err)


def behind_a_refusing_proxy(standin, port: int):
    doc = device_doc(standin)
    doc["device"]["HTTP_PROXY"] = f"http://localhost:{port}"
    standin.config_path.write_text(json.dumps(doc))


@pytest.mark.heavy
def test_a_boot_behind_a_refusing_proxy_ends_at_its_timeout_when_dns_stops_answering(
        standin, stalled_dns):
    # awscrt's lookups of the proxy are answered; the proxy probe's are not.
    behind_a_refusing_proxy(standin, 3128)
    started = time.monotonic()
    proc = stalled_dns(2, 3128, "--timeout", "5", "--config", str(standin.config_path))
    out, err = finish(proc, 60)
    took = time.monotonic() - started
    assert proc.returncode == 75, err
    # Which wait the deadline ends depends on how many of awscrt's queries (A,
    # AAAA, retries) the server answered before it went silent: either way
    # the run ends at its time limit, transient.
    assert ("asking it again failed (TimeoutError)" in err
            or "no answer in 5 s" in err), err
    assert took < 5 + 3, (took, err)


def test_sigterm_during_a_stalled_lookup_ends_the_boot_at_once(standin, stalled_dns):
    behind_a_refusing_proxy(standin, 3128)
    proc = stalled_dns(2, 3128, "--timeout", "100", "--config", str(standin.config_path))
    time.sleep(4)
    assert proc.poll() is None, finish(proc, 5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc, 60)
    took = time.monotonic() - sent
    assert proc.returncode == 75, err
    assert "SIGTERM" in err, err
    assert took < 2, (took, err)


@pytest.mark.heavy
def test_a_boot_whose_broker_lookup_stalls_in_awscrt_ends_at_its_timeout(standin, stalled_dns):
    # No answer at all: awscrt's own resolver asks, in its own thread; the wait on
    # the connect is what bounds it.
    started = time.monotonic()
    proc = stalled_dns(0, 0, "--timeout", "5", "--config", str(standin.config_path))
    out, err = finish(proc, 60)
    took = time.monotonic() - started
    assert proc.returncode == 75, err
    assert "no answer in 5 s" in err, err
    assert took < 5 + 3, (took, err)
