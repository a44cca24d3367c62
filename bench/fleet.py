"""A fleet booting at once after a site-wide power cut.

N simulated devices start together, each with its own stand-in broker (a
broker delivers fleet provisioning answers to every subscriber), sharing a
limit of R requests per second for each provisioning API (token buckets, as
AWS IoT limits CreateKeysAndCertificate and RegisterThing separately); over
it the service answers 429 ThrottlingException.  A device that exits 75 is
started again after the unit's RestartSec, as systemd would.

    python bench/fleet.py [--devices 50] [--rate 5] [--restart-sec 60]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from common import PRODUCT, machine, reset_device, run_device, save, table

from iot_standin import Faults, StandIn


class TokenBucket:
    def __init__(self, rate: float, burst: float):
        self.rate, self.capacity, self.tokens = rate, burst, burst
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def allow(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rate", type=float, default=5.0, help="requests per second per API")
    parser.add_argument("--restart-sec", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="each run's --timeout")
    args = parser.parse_args(argv)
    n, rate = args.devices, args.rate
    buckets = {"create": TokenBucket(rate, rate), "register": TokenBucket(rate, rate)}
    limiter = {"on": False}

    def allow(kind: str) -> bool:
        return not limiter["on"] or buckets[kind].allow()

    # AWS sends RSA-2048 keys; making them is the stand-in's cost, not the devices'.
    pool = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(n)]

    def key_factory():
        return pool.pop() if pool else rsa.generate_private_key(65537, 2048)

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        standins = []
        for i in range(n):
            standin = StandIn(Path(tmp) / f"d{i:03d}", hook=False, serial=f"CAM-{i:04d}",
                              faults=Faults(limiter=allow), key_factory=key_factory)
            stack.enter_context(standin)
            standins.append(standin)

        single = run_device(PRODUCT, standins[0].config_path)
        if single.code != 0:
            sys.exit(f"a single device failed:\n{single.stderr}")
        reset_device(standins[0])
        for standin in standins:
            (standin.dir / "events.jsonl").unlink(missing_ok=True)

        limiter["on"] = True
        started = time.monotonic()
        finished: dict[int, float] = {}
        attempts = {i: 0 for i in range(n)}
        codes: dict[int, list[int]] = {i: [] for i in range(n)}

        def launch(i):
            attempts[i] += 1
            return subprocess.Popen([sys.executable, *PRODUCT, "--config",
                                     str(standins[i].config_path), "--timeout",
                                     str(args.timeout)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        running = {i: launch(i) for i in range(n)}
        waiting: dict[int, float] = {}
        while running or waiting:
            time.sleep(0.01)
            now = time.monotonic()
            for i, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[i]
                codes[i].append(proc.returncode)
                if proc.returncode == 75:
                    waiting[i] = now + args.restart_sec
                else:
                    finished[i] = now - started
            for i, due in list(waiting.items()):
                if now >= due:
                    del waiting[i]
                    running[i] = launch(i)
        makespan = max(finished.values())
        requests = [len(s.events("create-request")) + len(s.events("register-request"))
                    for s in standins]
        retries = [r - 2 for r in requests]
        timeline = {}
        for kind in ("create-request", "create-accepted", "register-accepted", "boot"):
            stamps = sorted(e["t"] for s in standins for e in s.events(kind))
            timeline[kind] = stamps
        wall0 = time.time() - (time.monotonic() - started)
    ideal = n / rate
    target = 1.3 * ideal + single.seconds
    # 50 processes starting at once on a 2-core machine spend seconds starved
    # of CPU before their first request, which cameras, each with its own
    # CPU, do not: the service's window (first request to last boot message)
    # is what the retry policy decides.
    window = max(timeline["boot"]) - min(timeline["create-request"])
    failures = sum(1 for c in codes.values() if c[-1] != 0)
    restarts = sum(a - 1 for a in attempts.values())
    result = {
        "machine": machine(), "devices": n, "rate_per_api": rate,
        "single_device_s": round(single.seconds, 3), "makespan_s": round(makespan, 3),
        "service_window_s": round(window, 3), "first_request_s": round(
            min(timeline["create-request"]) - wall0, 3),
        "ideal_s": ideal, "target_s": round(target, 3), "within_target": window <= target,
        "retries_per_device_mean": round(statistics.fmean(retries), 2),
        "retries_per_device_max": max(retries), "systemd_restarts": restarts,
        "failures": failures,
        "device_time_median_s": round(statistics.median(finished.values()), 3),
        "timeline_s": {kind: [round(t - wall0, 2) for t in stamps[:: max(1, n // 10)]] + (
            [round(stamps[-1] - wall0, 2)] if stamps else []) for kind, stamps in timeline.items()},
    }
    print(table(["devices", "R/s", "makespan s", "service window s", "ideal N/R s", "target s",
                 "retries/dev", "max retries", "restarts", "failures"],
                [[n, rate, makespan, window, ideal, target, result["retries_per_device_mean"],
                  max(retries), restarts, failures]]))
    print(f"one device alone: {single.seconds:.3f} s; first request after "
          f"{result['first_request_s']:.2f} s of start-up under {n}-fold CPU contention; "
          f"service window {'within' if result['within_target'] else 'OVER'} "
          f"1.3 x ideal + one device")
    print(f"saved {save('fleet', result)}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
