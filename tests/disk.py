"""Real file systems for the tests' failing-disk cases."""
import os
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
