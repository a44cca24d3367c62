"""A pair installed for another camera, set aside: an image copied after that
camera's first boot carries its identity, which is not this camera's to use nor
to delete.  It moves into CERT_DIR/foreign-<serial>/ (0700), never followed,
never replacing anything."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from . import files
from .errors import StorageError

if TYPE_CHECKING:
    from .credentials import CertDir

MAX_FOLDERS = 20  # pairs of other cameras set aside for one serial


def set_aside(cert_dir: CertDir, serial_id: str) -> Path:
    """Move the pair installed for ``serial_id`` (or registered for it and waiting to be
    installed) into a folder of its own: the certificate first (without it nothing
    counts as installed), the records last (while one is there, a killed run's next
    run moves the rest).  What that camera's attempts spent goes with them: this
    camera has spent nothing yet."""
    moving = [path for path in (cert_dir.cert, cert_dir.key, cert_dir.ca,
                                cert_dir.device_configuration, cert_dir.staged_cert,
                                cert_dir.staged_key, cert_dir.device_key,
                                cert_dir.spend_record, cert_dir.installed_for_file,
                                cert_dir.registration_marker)
              if os.path.lexists(path)]
    folder = _folder(cert_dir.path, serial_id, [path.name for path in moving])
    for path in moving:
        files.rename_durably(path, folder / path.name)
    return folder


def _folder(parent: Path, serial_id: str, names: list[str]) -> Path:
    """A folder that replaces nothing: a new one, or one a killed move began (a
    real folder of ours that holds none of ``names``).  A second pair set aside
    for the same serial, or a symlink or file planted under the name, gets the
    next name instead."""
    for n in range(1, MAX_FOLDERS + 1):
        folder = parent / (f"foreign-{serial_id}" + (f"-{n}" if n > 1 else ""))
        try:
            os.mkdir(folder, 0o700)
            files.fsync_dir(parent)
            return folder
        except FileExistsError:
            st = os.lstat(folder)
            if (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
                    and not any(os.path.lexists(folder / name) for name in names)):
                return folder
        except OSError as exc:
            raise files.write_failure(f"cannot create {folder}", folder, exc,
                                      hint=f"that {parent} is writable") from None
    raise StorageError(f"{MAX_FOLDERS} folders foreign-{serial_id}* in {parent} already: "
                       "nowhere to set this pair aside", hint=f"what is in {parent}")
