"""The camera's provisioning secret (PROVISIONING_SECRET_FILE).

Made per serial in the factory and registered (as a hash) in the fleet
inventory, it goes out with RegisterThing as the template parameter
``ProvisioningSecret`` for the template's pre-provisioning hook to check: the
claim pair alone, shared by every camera, then registers nothing.  It is
registered for redaction as soon as it is read, and nothing here puts it in a
message: not even a refused file's content is quoted.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from . import files, logs
from .config import SECRET_MAX_CHARS as MAX_CHARS, SECRET_PARAMETER as PARAMETER
from .errors import ConfigError

MIN_CHARS = 16
MAX_FILE_BYTES = MAX_CHARS + 2
HINT = "PROVISIONING_SECRET_FILE and the file's owner and mode (0600)"


def read_secret(path: Path) -> str:
    """The secret: a file only root or we own and can change (checked up the whole
    path), that nobody else may read or write, holding one line of 16 to 256
    printable ASCII characters (one trailing line end allowed)."""
    real = files.trusted_path(path, "provisioning secret file", hint=HINT)
    where = f"provisioning secret file {path}"
    mode = stat.S_IMODE(os.stat(real).st_mode)
    if mode & 0o077:
        raise ConfigError(f"{where} has mode {mode:04o}: group or others may use it "
                          f"(use 0600 or stricter)", hint=HINT)
    raw = files.read_bounded(real, "provisioning secret file", MAX_FILE_BYTES, hint=HINT)
    for ending in (b"\r\n", b"\n"):
        if raw.endswith(ending):
            raw = raw[:-len(ending)]
            break
    if not MIN_CHARS <= len(raw) <= MAX_CHARS or any(b < 0x21 or b > 0x7e for b in raw):
        raise ConfigError(f"{where} must hold one line of {MIN_CHARS} to {MAX_CHARS} "
                          f"printable ASCII characters without spaces", hint=HINT)
    secret = raw.decode("ascii")
    logs.redact(secret)
    return secret


def template_parameters(parameters: dict[str, str], secret_file: Path | None) -> dict[str, str]:
    """TEMPLATE_PARAMETERS, with the secret when the config names its file."""
    if secret_file is None:
        return dict(parameters)
    return {**parameters, PARAMETER: read_secret(secret_file)}
