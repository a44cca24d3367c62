"""A SoftHSM2 token of the test's own, in a temporary SOFTHSM2_CONF.

SoftHSM reads SOFTHSM2_CONF at every C_Initialize, and pkcs11_key finalises
the module when a Token closes, so one pytest process can go from one test's
token to the next.  (awscrt never finalises the module it loads: connections
with a token key run in a child process.)
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from entomologist.pkcs11_key import TokenSettings

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SPY_MODULE = next((p for p in Path("/usr/lib").glob("*/pkcs11-spy.so")), Path("/nonexistent"))
USER_PIN = "4711-test-pin"
SO_PIN = "0815-so-pin"


@dataclass
class SoftToken:
    root: Path
    label: str
    conf: Path
    pin_file: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def settings(self, **overrides) -> TokenSettings:
        values = {"library": SOFTHSM_MODULE, "token_label": self.label,
                  "pin_file": self.pin_file, **overrides}
        return TokenSettings(**values)

    def token_file(self) -> Path:
        (path,) = (self.root / "softhsm-tokens").glob("*/token.object")
        return path

    def mend_torn_token_file(self, saved: bytes) -> bool:
        """Put back SoftHSM's own token.object if a kill tore it; True if it did.

        SoftHSM's file store rewrites token.object in place (truncate, then write)
        at every C_Login, to store the token's flags: a SIGKILL in that instant leaves
        it empty and the token unreadable, whatever order the program kept.  That is
        SoftHSM's, not the program's; a TPM's store (tpm2-pkcs11, SQLite) has no such
        instant.  ``saved`` is the file from before the kill: its content is the
        same, the flags that login rewrites being unchanged."""
        path = self.token_file()
        current = path.read_bytes()
        if current == saved or len(current) >= len(saved):
            return False
        path.write_bytes(saved)
        return True

    def torn_objects(self) -> int:
        """How many object files SoftHSM can no longer read.  Its file store rewrites
        an object's file in place (truncate, then write) when an attribute changes,
        as it does token.object: a kill in that instant loses the object.  A store
        that changes an attribute atomically (tpm2-pkcs11's SQLite) has no such instant."""
        files = [path for path in (self.root / "softhsm-tokens").glob("*/*.object")
                 if path.name != "token.object"]
        return len(files) - len(self.objects())

    def objects(self) -> list[tuple[str, str, bytes]]:
        """(class, label, CKA_ID) of every object in the token, seen through a fresh login."""
        import pkcs11
        lib = pkcs11.lib(str(SOFTHSM_MODULE))
        try:
            with lib.get_token(token_label=self.label).open(user_pin=USER_PIN) as session:
                return sorted((o.object_class.name, o[pkcs11.Attribute.LABEL],
                               bytes(o[pkcs11.Attribute.ID])) for o in session.get_objects())
        finally:
            lib.finalize()

    def private_key_attributes(self, label: str) -> dict[str, object]:
        import pkcs11
        from pkcs11 import Attribute, ObjectClass
        lib = pkcs11.lib(str(SOFTHSM_MODULE))
        try:
            with lib.get_token(token_label=self.label).open(user_pin=USER_PIN) as session:
                (key,) = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                              Attribute.LABEL: label})
                return {name: key[getattr(Attribute, name)] for name in (
                    "SENSITIVE", "EXTRACTABLE", "TOKEN", "PRIVATE", "ALWAYS_SENSITIVE",
                    "NEVER_EXTRACTABLE", "LOCAL", "SIGN", "DECRYPT", "UNWRAP", "DERIVE")}
        finally:
            lib.finalize()


def make_token(root: Path, label: str = "entomologist-test", monkeypatch=None) -> SoftToken:
    """Initialise a fresh token under ``root``; with ``monkeypatch``, point this process at it."""
    tokens = root / "softhsm-tokens"
    tokens.mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                    "--pin", USER_PIN, "--so-pin", SO_PIN],
                   env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True,
                   capture_output=True)
    pin_file = root / "token.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(USER_PIN + "\n")
    if monkeypatch is not None:
        monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    return SoftToken(root, label, conf, pin_file)
