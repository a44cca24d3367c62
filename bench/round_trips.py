"""Round trips: boot.py and the AWS-samples baseline through a delaying proxy.

For each round-trip time, a first boot and a later boot are run several times
on a fresh simulated device; the slope of the median time against the
round-trip time is the number of dependent round trips.

    python bench/round_trips.py [--runs 3] [--rtts 0,50,100,200]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import (BASELINE, PRODUCT, fit_line, machine, median, reset_device, run_device,
                    save, table)
from rtt_proxy import DelayProxy

from iot_standin import StandIn

# Two connections, one batch of subscriptions, two requests, one acknowledged
# publish.  A connection costs the TLS 1.3 handshake and MQTT CONNECT: 2 round
# trips through this proxy, which completes the TCP handshake itself (a real
# link adds one more per connection: 10 and 4).
FLOOR_FIRST_BOOT = 2 + 1 + 1 + 1 + 2 + 1
FLOOR_LATER_BOOT = 2 + 1


def measure(standin, proxy, script, rtts, runs):
    first, later = {}, {}
    for rtt in rtts:
        proxy.rtt = rtt / 1000
        first[rtt], later[rtt] = [], []
        for _ in range(runs):
            reset_device(standin, PORT=proxy.port)
            for store in (first, later):
                run = run_device(script, standin.config_path)
                if run.code != 0:
                    sys.exit(f"{script[0]} failed at {rtt} ms:\n{run.stderr}")
                store[rtt].append(run.seconds)
    return first, later


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtts", default="0,50,100,200")
    args = parser.parse_args(argv)
    rtts = [int(x) for x in args.rtts.split(",")]
    with tempfile.TemporaryDirectory() as tmp, StandIn(Path(tmp)) as standin:
        proxy = DelayProxy(standin.port)
        try:
            results = {name: measure(standin, proxy, script, rtts, args.runs)
                       for name, script in (("product", PRODUCT), ("baseline", BASELINE))}
        finally:
            proxy.close()
    rows, out = [], {"machine": machine(), "runs": args.runs, "rtts_ms": rtts}
    for kind, index in (("first boot", 0), ("later boot", 1)):
        med = {name: [median(results[name][index][r]) for r in rtts] for name in results}
        fits = {name: fit_line([r / 1000 for r in rtts], med[name]) for name in med}
        for i, rtt in enumerate(rtts):
            rows.append([kind, rtt, med["product"][i], med["baseline"][i],
                         med["baseline"][i] / med["product"][i]])
        out[kind] = {name: {"median_s": dict(zip(map(str, rtts), med[name])),
                            "round_trips": round(fits[name][0], 2),
                            "intercept_s": round(fits[name][1], 3)} for name in med}
    print(table(["boot", "rtt ms", "product s", "baseline s", "baseline/product"], rows))
    for kind, floor in (("first boot", FLOOR_FIRST_BOOT), ("later boot", FLOOR_LATER_BOOT)):
        p, b = out[kind]["product"]["round_trips"], out[kind]["baseline"]["round_trips"]
        out[kind]["floor_round_trips"] = floor
        print(f"{kind}: dependent round trips, product {p:.1f}, baseline {b:.1f}, floor {floor}")
    print(f"saved {save('round_trips', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
