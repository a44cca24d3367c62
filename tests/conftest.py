import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def restore_logging():
    """The scripts' main() replaces the root handlers; put them back (as cloud-init's
    conftest does), so no test's output or outcome depends on another's."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def read_only():
    """``read_only(folder)`` makes ``folder`` a read-only bind mount of itself, as a
    read-only root or the unit's ProtectSystem=strict does (unlink of a missing file
    then fails with EROFS, which no chmod reproduces); unmounted at teardown."""
    import os
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root (CAP_SYS_ADMIN)")
    mounted = []

    def mount(folder: Path) -> Path:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        mounted.append(folder)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["mountpoint", "-q", str(folder)]).returncode == 0:  # a test may undo it
            subprocess.run(["umount", str(folder)], check=True)
