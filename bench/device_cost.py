"""Cost on the device: peak memory and start-up time of a first and a later boot.

Start-up is from process start to its first connection attempt (the moment
a proxy in front of the broker accepts the connection).  Each figure is the
median of several runs, for each provisioning mode and for the baseline.

    python bench/device_cost.py [--runs 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import BASELINE, PRODUCT, machine, median, reset_device, run_device, save, table
from rtt_proxy import DelayProxy

from iot_standin import StandIn

VARIANTS = [
    ("product, CreateKeysAndCertificate", PRODUCT, {}),
    ("product, CSR EC-P256", PRODUCT, {"PROVISIONING_API": "CreateCertificateFromCsr"}),
    ("product, CSR RSA-2048", PRODUCT, {"PROVISIONING_API": "CreateCertificateFromCsr",
                                        "KEY_ALGORITHM": "RSA-2048"}),
    ("baseline (IotIdentityClientV2)", BASELINE, {}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    rows, out = [], {"machine": machine(), "runs": args.runs, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp, StandIn(Path(tmp), mode="Both", hook=False) as standin:
        proxy = DelayProxy(standin.port)
        try:
            for name, script, config in VARIANTS:
                samples = {"first": [], "later": []}
                for _ in range(args.runs):
                    reset_device(standin, PORT=proxy.port, **config)
                    for boot in ("first", "later"):
                        seen = len(proxy.accepts)
                        run = run_device(script, standin.config_path)
                        if run.code != 0:
                            sys.exit(f"{name} failed:\n{run.stderr}")
                        startup = proxy.accepts[seen] - run.started
                        samples[boot].append((run.max_rss_kib, startup, run.seconds))
                result = {}
                for boot, values in samples.items():
                    rss, startup, total = (median([v[i] for v in values]) for i in range(3))
                    result[boot] = {"peak_rss_mib": round(rss / 1024, 1),
                                    "startup_s": round(startup, 3), "total_s": round(total, 3)}
                    rows.append([name, boot, rss / 1024, startup, total])
                out["variants"][name] = result
        finally:
            proxy.close()
    print(table(["variant", "boot", "peak MiB", "start-up s", "total s"], rows))
    print(f"saved {save('device_cost', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
