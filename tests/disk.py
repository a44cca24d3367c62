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


def take_inodes(folder: Path) -> None:
    """Take every free inode of the file system under ``folder`` (empty files)."""
    n = 0
    while True:
        try:
            os.close(os.open(folder / f"inode-{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o600))
        except OSError:
            return
        n += 1


@contextmanager
def tmpfs(path: Path, size: str, mode: int = 0o700, inodes: int | None = None):
    """A real tmpfs of ``size`` on ``path`` (made if missing): a disk that fills up as
    a card does; ``inodes``: at most that many files and folders.  Needs root."""
    path.mkdir(mode=mode, exist_ok=True)
    options = f"size={size},mode={mode:o}" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
