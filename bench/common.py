"""What the benchmarks share: run a device process and measure it."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

PRODUCT = [str(ROOT / "boot.py")]
BASELINE = [str(ROOT / "bench" / "baseline_v2.py")]


@dataclass
class Run:
    code: int
    seconds: float
    max_rss_kib: int
    started: float
    stderr: str


def run_device(script: list[str], config: Path, *args: str, env=None,
               prefix: list[str] | tuple = ()) -> Run:
    """Run a device script to the end: wall time, and peak memory from /usr/bin/time.

    (The child's own rusage would count the pages of this large benchmark
    process it was forked from; /usr/bin/time forks from a small one.)
    ``prefix`` runs it through another command first (``ip netns exec NS``).
    """
    with tempfile.NamedTemporaryFile("r") as rss:
        started = time.monotonic()
        proc = subprocess.run([*prefix, "/usr/bin/time", "-q", "-f", "%M", "-o", rss.name,
                               sys.executable, *script, "--config", str(config), *args],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env)
        seconds = time.monotonic() - started
        max_rss = int(rss.read().strip().splitlines()[-1])
    return Run(proc.returncode, seconds, max_rss, started, proc.stderr.decode(errors="replace"))


def reset_device(standin, **config) -> None:
    """Back to a factory-fresh device: no credentials, status False."""
    shutil.rmtree(standin.workdir / "cert", ignore_errors=True)
    standin.write_device_config(**config)


def median(values):
    return statistics.median(values)


def fit_line(xs, ys) -> tuple[float, float]:
    """Least squares: (slope, intercept)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def machine() -> str:
    import platform
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r]
                         for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
