"""How long ``boot.py --check`` takes on a healthy camera, against the stand-in.

Wall time of the whole process (Python start, imports, every check, the
claim connection's CONNECT and SUBSCRIBE or the device's TLS handshake),
and the time the checks themselves report; medians of several runs, for a
camera not provisioned yet and for a provisioned one (with and without
--connect-as-thing).  The target is under 2 s.

    python bench/check_time.py [--runs 7]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PRODUCT, machine, median, save, table

from iot_standin import StandIn

TARGET_S = 2.0


def one_check(config: Path, *args: str) -> tuple[float, int]:
    """(wall seconds, milliseconds the checks report) of one --check run."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, *PRODUCT, "--config", str(config), "--check",
                           "--json", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"--check failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    result = json.loads(proc.stdout.splitlines()[-1])
    return seconds, result["milliseconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    cases = {}
    with tempfile.TemporaryDirectory() as tmp, StandIn(Path(tmp)) as standin:
        cases["not provisioned"] = [one_check(standin.config_path) for _ in range(args.runs)]
        boot = subprocess.run([sys.executable, *PRODUCT, "--config", str(standin.config_path)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if boot.returncode != 0:
            sys.exit(f"boot.py failed:\n{boot.stderr}")
        cases["provisioned"] = [one_check(standin.config_path) for _ in range(args.runs)]
        cases["provisioned, --connect-as-thing"] = [
            one_check(standin.config_path, "--connect-as-thing") for _ in range(args.runs)]
    rows, out = [], {"machine": machine(), "runs": args.runs, "target_s": TARGET_S, "cases": {}}
    for name, samples in cases.items():
        wall = median([s for s, _ in samples])
        checks = median([ms for _, ms in samples]) / 1000
        worst = max(s for s, _ in samples)
        rows.append([name, wall, worst, checks])
        out["cases"][name] = {"wall_median_s": wall, "wall_max_s": worst,
                              "checks_median_s": checks}
    print(f"boot.py --check on a healthy camera, {args.runs} runs each ({machine()})")
    print(table(["camera", "wall median s", "wall max s", "checks median s"], rows))
    print(f"target: under {TARGET_S} s; saved {save('check_time', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
