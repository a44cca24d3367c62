"""One locked run: the prologue boot.py and update_boot_status.py share.

The config is read once to find CERT_DIR (which holds the lock), and once
more under the lock, as the run before us may have left it; temporary files a
killed run left in the config's folder and in CERT_DIR are swept once, under
the lock.  After that, only a step that rewrote the config reloads it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import files
from .config import Config, load_config
from .credentials import CertDir
from .errors import ConfigError
from .lock import RunLock
from .retries import Deadline


@dataclass
class Run:
    config_path: Path
    config: Config
    cert_dir: CertDir

    def reload(self) -> Config:
        """The config as a step of this run has just rewritten it."""
        self.config = load_config(self.config_path)
        return self.config


@contextmanager
def locked_run(config_path: Path, deadline: Deadline, create: bool = False) -> Iterator[Run]:
    """The run, under the lock in CERT_DIR.  ``create``: make CERT_DIR (0700) if it
    does not exist (provisioning); without it, a missing CERT_DIR is a ConfigError."""
    config = load_config(config_path)
    if create:
        cert_dir = CertDir.open(config.cert_dir, create=True, token=config.token)
    else:
        cert_dir = CertDir.existing(config.cert_dir, config.token)
        if cert_dir is None:
            raise ConfigError(f"no device credentials: no folder {config.cert_dir}",
                              hint="that boot.py has provisioned this device")
    with RunLock(cert_dir.path) as lock:
        lock.acquire(deadline)
        run = Run(config_path, load_config(config_path), cert_dir)
        files.remove_stray_temp_files(run.config.real_path.parent)
        cert_dir.remove_stray_files()
        yield run
