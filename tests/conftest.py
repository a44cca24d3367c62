import logging
import os
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


@pytest.fixture(autouse=True)
def restore_trust_variables(monkeypatch):
    """The scripts' main() points SSL_CERT_FILE and SSL_CERT_DIR at nothing for its
    process; a test that runs it in this one gets them back."""
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


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


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(items):
    """Deals the tests marked heavy to the front of every worker's share.

    pytest-xdist's worksteal gives each worker a contiguous share of this list
    and an idle worker steals from the end of the longest queue: a long test
    that happens to sit late in a share runs at the end, alone, while the
    others wait. Dealt out first, the long tests start together and the short
    ones fill in around them.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    heavy = [item for item in items if item.get_closest_marker("heavy")]
    if workers < 2 or not heavy:
        return
    rest = [item for item in items if not item.get_closest_marker("heavy")]
    order, left = [], len(items)
    for share in range(workers):
        size = left // (workers - share)  # as worksteal cuts the shares
        mine = heavy[share::workers]
        order += mine + rest[:max(size - len(mine), 0)]
        rest = rest[max(size - len(mine), 0):]
        left -= size
    items[:] = order + rest
