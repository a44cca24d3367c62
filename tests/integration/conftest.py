"""Integration tests: the scripts run as real processes against the stand-in."""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from iot_standin import StandIn, find_mosquitto

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return self.stderr.strip().splitlines()

    @property
    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("ERROR")]


def run_script(script: str, config: Path, *args: str, timeout: float = 60,
               env: dict | None = None, preexec_fn=None) -> Result:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / script), "--config", str(config), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})},
                          preexec_fn=preexec_fn)
    return Result(proc.returncode, proc.stderr, time.monotonic() - started)


@pytest.fixture(scope="session", autouse=True)
def mosquitto_installed():
    if not find_mosquitto():
        pytest.fail("mosquitto is not installed: run `make test`, which installs it")


@pytest.fixture
def standin(tmp_path):
    with StandIn(tmp_path) as s:
        yield s


def device_doc(standin) -> dict:
    return json.loads(standin.config_path.read_text())
