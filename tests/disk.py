"""Real file systems for the tests' failing-disk cases."""
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path


def fill(folder: Path) -> None:
    """Take every free block of the file system under ``folder``."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def tmpfs(path: Path, size: str, mode: int = 0o700):
    """A real tmpfs of ``size`` on ``path`` (made if missing): a disk that fills up as
    a card does.  Needs root."""
    path.mkdir(mode=mode, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:o}", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
