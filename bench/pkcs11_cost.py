"""A later boot's connection with a key in a PKCS#11 token (SoftHSM2) beside a key file.

For each key (EC-P256 and RSA-2048, file and token) a process connects to the
stand-in's broker through a proxy that adds a round-trip time, publishes one
boot message with QoS 1 and waits for its PUBACK (bench/connect_once.py).
Reported, medians of several runs: peak memory (/usr/bin/time %M), start-up
(process start to the proxy accepting its connection), connect time (TLS and
MQTT CONNECT) at 0 and at 200 ms RTT, the round trips that connect costs
(the slope of connect time against RTT over 0, 200 and 500 ms: the 500 ms
point keeps a loaded machine's noise small beside it), and the TLS version
seen in the ServerHello.

    python bench/pkcs11_cost.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, fit_line, machine, median, save, table
from rtt_proxy import DelayProxy
from tls_sniff import SniffProxy

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from iot_standin import StandIn

sys.path.insert(0, str(ROOT / "tests"))
from softhsm import SOFTHSM_MODULE, make_token  # noqa: E402

from entomologist.pkcs11_key import open_token  # noqa: E402

CONNECT_ONCE = ROOT / "bench" / "connect_once.py"
RTTS = (0.0, 0.2, 0.5)


def write_file_pair(standin, directory: Path, stem: str, key) -> list[str]:
    cert = standin.ca.issue(key.public_key(), standin.serial)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return ["--cert", str(cert_path), "--key", str(key_path)]


def write_token_pair(standin, directory: Path, token, algorithm: str, label: str) -> list[str]:
    with open_token(token.settings(key_label=label)) as t:
        der = t.generate(algorithm, label=label).public_key_der()
    cert = standin.ca.issue(serialization.load_der_public_key(der), standin.serial)
    cert_path = directory / f"{label}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ["--cert", str(cert_path), "--pkcs11-library", str(SOFTHSM_MODULE),
            "--token-label", token.label, "--pin-file", str(token.pin_file),
            "--key-label", label]


def run_once(args: list[str], port: int, ca: Path, proxy: DelayProxy, env: dict) -> dict:
    with tempfile.NamedTemporaryFile("r") as rss:
        seen = len(proxy.accepts)
        started = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", rss.name,
                               sys.executable, str(CONNECT_ONCE), "--port", str(port),
                               "--ca", str(ca), *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=env, timeout=60)
        if proc.returncode != 0:
            sys.exit(f"connect_once failed ({proc.returncode}):\n{proc.stderr}")
        timings = json.loads(proc.stdout)
        return {"rss_mib": int(rss.read().split()[-1]) / 1024,
                "startup_s": proxy.accepts[seen] - started,
                "connect_s": timings["connect_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    # Certificates signed for the bench, never registered: no stack policies.
    with tempfile.TemporaryDirectory() as tmp, \
            StandIn(Path(tmp) / "standin", policies=False, hook=False) as standin:
        work = Path(tmp)
        token = make_token(work / "hsm")
        os.environ["SOFTHSM2_CONF"] = str(token.conf)
        env = {**os.environ}
        variants = {
            "EC-P256 file": write_file_pair(standin, work, "ec", ec.generate_private_key(
                ec.SECP256R1())),
            "EC-P256 token": write_token_pair(standin, work, token, "EC-P256", "bench-ec"),
            "RSA-2048 file": write_file_pair(standin, work, "rsa", rsa.generate_private_key(
                public_exponent=65537, key_size=2048)),
            "RSA-2048 token": write_token_pair(standin, work, token, "RSA-2048", "bench-rsa"),
        }
        sniff = SniffProxy(standin.port)
        samples: dict[tuple[str, float], list[dict]] = {}
        versions: dict[str, set] = {name: set() for name in variants}
        try:
            for rtt in RTTS:
                proxy = DelayProxy(sniff.port, rtt)
                try:
                    # Interleaved, so that other load on the machine hits every variant alike.
                    for _ in range(args.runs):
                        for name, variant_args in variants.items():
                            before = len(sniff.versions)
                            samples.setdefault((name, rtt), []).append(
                                run_once(variant_args, proxy.port, standin.ca_path, proxy, env))
                            versions[name].update(sniff.versions[before:])
                finally:
                    proxy.close()
        finally:
            sniff.close()
    rows, out = [], {"machine": machine(), "runs": args.runs, "variants": {}}
    for name in variants:
        at = {rtt: {k: median([s[k] for s in samples[(name, rtt)]])
                    for k in ("rss_mib", "startup_s", "connect_s")} for rtt in RTTS}
        round_trips, _ = fit_line(list(RTTS), [at[r]["connect_s"] for r in RTTS])
        tls = ", ".join(sorted(v for v in versions[name] if v))
        out["variants"][name] = {"tls": tls, "connect_round_trips": round(round_trips, 2),
                                 **{f"rtt_{int(r * 1000)}ms": {k: round(v, 4)
                                                                for k, v in at[r].items()}
                                    for r in RTTS}}
        rows.append([name, tls, at[0.0]["rss_mib"], at[0.0]["startup_s"],
                     at[0.0]["connect_s"], at[0.2]["connect_s"], round_trips])
    print(table(["key", "TLS", "peak MiB", "start-up s", "connect s (0 ms)",
                 "connect s (200 ms)", "connect RTTs"], rows))
    print(f"saved {save('pkcs11_cost', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
