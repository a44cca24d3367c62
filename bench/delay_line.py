"""Round trips on a real link: boot.py and the baseline through a packet-level delay line.

Two network namespaces, made and removed by this benchmark: the stand-in's
broker in one, the device in the other.  Every IP packet between them is
delayed by rtt/2 each way, in order, without a bandwidth limit: netem on a
veth pair where the kernel has it, else a TUN device in each namespace and a
forwarder process holding each packet.  Unlike a TCP proxy (which answers
the handshake and acknowledges data itself), this leaves the TCP handshake,
the acknowledgements and Nagle's algorithm to the two ends' kernels, across
the delay, as on a field link.

    python bench/delay_line.py [--runs 3] [--rtts 0,50,200,600] [--broker-nagle]
    python bench/delay_line.py --evidence     # one traced first boot at 200 ms

Needs root (namespaces, TUN).  Variants: boot.py as shipped (TCP_NODELAY set
on awscrt's socket), boot.py with that step left out, the V2 baseline as AWS's
samples write it, and the baseline with TCP_NODELAY set the same way.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from common import (BASELINE, PRODUCT, ROOT, fit_line, machine, median, reset_device, run_device,
                    save, table)

# Two connections of TCP + TLS 1.3 + CONNECT (3 each), one batch of
# subscriptions, two requests, one acknowledged publish; a later boot is one
# connection and the publish.
FLOOR_FIRST_BOOT = 2 * 3 + 1 + 2 + 1
FLOOR_LATER_BOOT = 3 + 1

BROKER_IP, DEVICE_IP = "10.12.0.1", "10.12.0.2"
NAGLE = str(ROOT / "bench" / "client_nagle.py")
VARIANTS = {
    "boot.py": PRODUCT,
    "boot.py-nagle": [NAGLE, "--nagle", *PRODUCT],
    "baseline": BASELINE,
    "baseline-nodelay": [NAGLE, "--nodelay", *BASELINE],
}
DEFAULT_VARIANTS = "boot.py,boot.py-nagle,baseline"

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def setns(name: str) -> None:
    """Move this thread (and the threads and processes it starts) into namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class DelayLine:
    """Namespaces ``broker`` and ``device`` joined by a link of a settable round-trip time."""

    def __init__(self, trace: Path | None = None):
        tag = f"{os.getpid()}"
        self.broker, self.device = f"ento-dl{tag}-broker", f"ento-dl{tag}-device"
        self.kind = ""
        self._forwarder: subprocess.Popen | None = None
        self._veth = (f"dl{tag}b", f"dl{tag}d")
        self._trace = trace

    def __enter__(self) -> "DelayLine":
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        for ns in (self.broker, self.device):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        b, d = self._veth
        ip("link", "add", b, "netns", self.broker, "type", "veth", "peer", "name", d,
           "netns", self.device)
        probe = subprocess.run(["tc", "-n", self.broker, "qdisc", "add", "dev", b, "root",
                                "netem", "delay", "0ms"], capture_output=True, text=True) \
            if shutil.which("tc") else None
        if probe and probe.returncode == 0 and not self._trace:
            self.kind = "veth + netem"
            subprocess.run(["tc", "-n", self.device, "qdisc", "add", "dev", d, "root", "netem",
                            "delay", "0ms"], check=True, capture_output=True)
        else:
            # No netem in this kernel (or a trace was asked for): TUN devices made
            # here and moved into the namespaces; the forwarder keeps their descriptors.
            ip("-n", self.broker, "link", "del", b)
            self.kind = "TUN + forwarder"
            fds = []
            try:
                for name, ns in zip(self._veth, (self.broker, self.device)):
                    fds.append(open_tun(name))
                    ip("link", "set", name, "netns", ns)
                cmd = [sys.executable, __file__, "--forward", str(fds[0]), str(fds[1])]
                self._forwarder = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, text=True)
            finally:
                for fd in fds:
                    os.close(fd)
        for ns, dev, mine, peer in ((self.broker, b, BROKER_IP, DEVICE_IP),
                                    (self.device, d, DEVICE_IP, BROKER_IP)):
            ip("-n", ns, "addr", "add", mine, "peer", peer, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        if self._trace:
            self._command(f"trace {self._trace}")

    def _command(self, line: str) -> None:
        self._forwarder.stdin.write(line + "\n")
        self._forwarder.stdin.flush()
        if self._forwarder.stdout.readline().strip() != "ok":
            raise RuntimeError(f"forwarder did not take {line!r}")

    def set_rtt(self, ms: float) -> None:
        if self._forwarder:
            self._command(f"rtt {ms}")
            return
        for ns, dev in zip((self.broker, self.device), self._veth):
            subprocess.run(["tc", "-n", ns, "qdisc", "change", "dev", dev, "root", "netem",
                            "delay", f"{ms / 2}ms", "limit", "100000"], check=True,
                           capture_output=True)

    def close(self) -> None:
        if self._forwarder:
            self._forwarder.stdin.close()
            try:
                self._forwarder.wait(5)
            except subprocess.TimeoutExpired:
                self._forwarder.kill()
                self._forwarder.wait()
            self._forwarder = None
        for ns in (self.broker, self.device):
            ip("netns", "del", ns, check=False)


# ------------------------------------------------------------- the forwarder

def forward(fd_broker: int, fd_device: int) -> int:
    """Hold every packet rtt/2, in order; commands on stdin: ``rtt MS``, ``trace PATH|off``."""
    state = {"half": 0.0, "trace": None}
    lock = threading.Lock()

    def pump(src: int, dst: int, direction: str) -> None:
        queue: deque = deque()
        ready = threading.Condition()

        def deliver() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, packet = queue.popleft()
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                try:
                    os.write(dst, packet)
                except OSError:
                    pass  # the other side is gone: the bench is closing

        threading.Thread(target=deliver, daemon=True).start()
        while True:
            try:
                packet = os.read(src, 65536)
            except OSError:
                return
            now = time.monotonic()
            with ready:
                queue.append((now + state["half"], packet))
                ready.notify()
            out = state["trace"]
            if out is not None:
                with lock:
                    out.write(json.dumps([round(now, 6), direction, *summary(packet)]) + "\n")

    threads = [threading.Thread(target=pump, args=(fd_device, fd_broker, "up"), daemon=True),
               threading.Thread(target=pump, args=(fd_broker, fd_device, "down"), daemon=True)]
    for t in threads:
        t.start()
    for line in sys.stdin:
        word, _, value = line.strip().partition(" ")
        if word == "rtt":
            state["half"] = float(value) / 2000
        elif word == "trace":
            with lock:
                if state["trace"]:
                    state["trace"].close()
                state["trace"] = None if value == "off" else open(value, "a", buffering=1)
        print("ok", flush=True)
    return 0


def summary(packet: bytes) -> list:
    """[sport, dport, tcp flags, payload length, TLS record type of the payload's start]."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != 6:
        return [0, 0, "", len(packet), None]
    ihl = (packet[0] & 0x0F) * 4
    tcp = packet[ihl:]
    sport, dport = struct.unpack("!HH", tcp[:4])
    flags = "".join(c for c, bit in zip("FSRPA", (1, 2, 4, 8, 16)) if tcp[13] & bit)
    payload = tcp[(tcp[12] >> 4) * 4:]
    return [sport, dport, flags, len(payload), payload[0] if payload else None]


# ------------------------------------------------------------- measuring

def measure(standin, line, script, rtts, runs):
    first, later = {}, {}
    prefix = ["ip", "netns", "exec", line.device]
    for rtt in rtts:
        line.set_rtt(rtt)
        first[rtt], later[rtt] = [], []
        for _ in range(runs):
            reset_device(standin, PORT=standin.port)
            for store in (first, later):
                run = run_device(script, standin.config_path, prefix=prefix)
                if run.code != 0:
                    raise RuntimeError(f"{script} failed at {rtt} ms:\n{run.stderr}")
                store[rtt].append(run.seconds)
    return first, later


def evidence(standin, line, trace: Path) -> int:
    """One first boot per variant at 200 ms, traced: when each client segment left."""
    line.set_rtt(200)
    prefix = ["ip", "netns", "exec", line.device]
    for name in ("boot.py", "boot.py-nagle"):
        reset_device(standin, PORT=standin.port)
        start = time.monotonic()
        run = run_device([*VARIANTS[name], "-v"], standin.config_path, prefix=prefix)
        end = time.monotonic()
        print(f"\n== {name}: first boot {run.seconds:.3f} s at 200 ms RTT")
        for text in run.stderr.splitlines():
            if "NODELAY" in text:
                print("  " + text.strip())
        packets = [json.loads(t) for t in trace.read_text().splitlines()]
        packets = [p for p in packets if start <= p[0] <= end]
        print("  first connection, device -> broker data segments (ms after SYN), "
              "and the broker's flights:")
        syn = next(p for p in packets if p[1] == "up" and p[4] == "S")
        conn = [p for p in packets if syn[2] in (p[2], p[3])]
        names = {20: "CCS", 21: "alert", 22: "handshake", 23: "app data"}
        for p in conn:
            if p[5] and p[0] - syn[0] < 1.6:
                print(f"    {1000 * (p[0] - syn[0]):7.1f}  {p[1]:4}  {p[5]:5} bytes  "
                      f"{names.get(p[6], p[6])}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtts", default="0,50,200,600")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--broker-nagle", action="store_true",
                        help="the stand-in's mosquitto without set_tcp_nodelay")
    parser.add_argument("--evidence", action="store_true")
    parser.add_argument("--forward", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.forward:
        return forward(*args.forward)
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("delay_line: needs root and iproute2 (network namespaces); skipped")
        return 0
    rtts = [int(x) for x in args.rtts.split(",")]
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    # A run killed by SIGTERM still removes its namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from iot_standin import StandIn
    with tempfile.TemporaryDirectory() as tmp, \
            DelayLine(trace=Path(tmp) / "trace.jsonl" if args.evidence else None) as line:
        setns(line.broker)
        with StandIn(Path(tmp) / "device", hook=False, host=BROKER_IP,
                     tcp_nodelay=not args.broker_nagle) as standin:
            if args.evidence:
                return evidence(standin, line, Path(tmp) / "trace.jsonl")
            results = {name: measure(standin, line, VARIANTS[name], rtts, args.runs)
                       for name in names}
    broker = "mosquitto without set_tcp_nodelay" if args.broker_nagle else \
        "mosquitto with set_tcp_nodelay true"
    out = {"machine": machine(), "link": line.kind, "broker": broker, "runs": args.runs,
           "rtts_ms": rtts}
    rows = []
    for kind, index, floor in (("first boot", 0, FLOOR_FIRST_BOOT),
                               ("later boot", 1, FLOOR_LATER_BOOT)):
        med = {name: [median(results[name][index][r]) for r in rtts] for name in names}
        fits = {name: fit_line([r / 1000 for r in rtts], med[name]) for name in names}
        for i, rtt in enumerate(rtts):
            rows.append([kind, rtt, *(med[name][i] for name in names)])
        rows.append([kind, "RTTs", *(f"{fits[name][0]:.1f}" for name in names)])
        out[kind] = {name: {"median_s": dict(zip(map(str, rtts), med[name])),
                            "round_trips": round(fits[name][0], 2),
                            "intercept_s": round(fits[name][1], 3)} for name in names}
        out[kind]["floor_round_trips"] = floor
    print(f"delay line ({line.kind}), {broker}; medians of {args.runs} runs, seconds")
    print(table(["boot", "rtt ms", *names], rows))
    print(f"RTTs: dependent round trips (least-squares slope); floor {FLOOR_FIRST_BOOT} "
          f"(first boot), {FLOOR_LATER_BOOT} (later boot)")
    name = "delay_line_broker_nagle" if args.broker_nagle else "delay_line"
    print(f"saved {save(name, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
