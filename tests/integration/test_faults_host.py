"""The host short of what a run needs besides storage: threads (a fork bomb of another
local user, a runaway application), limited the way the kernel limits them, by a pids
cgroup around the run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e import ROOT, run_script

CGROUP_V1 = Path("/sys/fs/cgroup/pids")
CGROUP_V2 = Path("/sys/fs/cgroup")


def pids_cgroup(name: str, limit: int) -> Path:
    """A pids cgroup allowing ``limit`` tasks; skipped where none can be made."""
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    if (CGROUP_V1 / "cgroup.procs").exists():
        group = CGROUP_V1 / name
    elif "pids" in (CGROUP_V2 / "cgroup.controllers").read_text().split():
        group = CGROUP_V2 / name
    else:
        pytest.skip("no pids cgroup controller here")
    group.mkdir(exist_ok=True)
    (group / "pids.max").write_text(f"{limit}\n")
    return group


def test_a_host_out_of_threads_is_a_transient_75_not_a_config_error(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    group = pids_cgroup(f"entomologist-test-{os.getpid()}", 2)
    try:
        result = run_script("update_boot_status.py", standin.config_path, "--timeout", "5",
                            preexec_fn=lambda: (group / "cgroup.procs").write_text(
                                f"{os.getpid()}\n"))
    finally:
        group.rmdir()
    # 78 would stop the unit's retries until the next boot, as for a wrong config.
    assert result.code == 75, result.stderr
    assert len(result.errors) == 1 and "thread" in result.errors[0], result.stderr
    assert "cannot load the TLS files" not in result.stderr


def test_a_check_on_a_host_out_of_threads_ends_in_75_not_in_a_bug(standin):
    group = pids_cgroup(f"entomologist-test-{os.getpid()}", 2)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "boot.py"), "--config",
                               str(standin.config_path), "--check", "--timeout", "5"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, preexec_fn=lambda: (group / "cgroup.procs").write_text(
                                  f"{os.getpid()}\n"))
    finally:
        group.rmdir()
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "a bug" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
