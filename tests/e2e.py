"""Helpers for the integration tests: run the scripts as processes, check the invariants."""
import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fakes import certificate_id, public_keys_equal

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return self.stderr.strip().splitlines()

    @property
    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("ERROR")]


def run_script(script: str, config: Path, *args: str, timeout: float = 60,
               env: dict | None = None, preexec_fn=None) -> Result:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / script), "--config", str(config), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})},
                          preexec_fn=preexec_fn)
    return Result(proc.returncode, proc.stderr, time.monotonic() - started)


def device_doc(standin) -> dict:
    return json.loads(standin.config_path.read_text())


def privilege_drop() -> list[str]:
    """Run a child as the unit does: root without capabilities honours file modes."""
    if os.geteuid() == 0:
        return ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"]
    return []


class DeviceState:
    """What must hold on a stand-in's device after any run, however it ended: a certificate
    with its key, no half-written file, a status that does not lie."""

    def __init__(self, standin):
        self.standin = standin
        self.config_path = standin.config_path
        self.cert_dir = standin.workdir / "cert"
        self.claim = {p: p.read_bytes() for p in (standin.claim_cert, standin.claim_key)}
        self.doc = json.loads(self.config_path.read_text())
        self.config_mode = os.stat(self.config_path).st_mode

    def check(self, outputs: list[str], completed: bool) -> dict:
        cert = self.cert_dir / "certificate.pem.crt"
        key = self.cert_dir / "private.pem.key"
        installed = cert.exists()
        if installed:
            assert key.exists(), "a certificate without its key"
            # Checked with cryptography: independent of the product's own check.
            certificate = x509.load_pem_x509_certificate(cert.read_bytes())
            private_key = load_pem_private_key(key.read_bytes(), None)
            assert public_keys_equal(certificate.public_key(), private_key.public_key())
        if completed:
            leftovers = [p.name for p in self.cert_dir.iterdir()] if self.cert_dir.exists() else []
            assert set(leftovers) <= {"certificate.pem.crt", "private.pem.key",
                                      "AmazonRootCA1.pem", "run.lock", "installed-for.json",
                                      "device-configuration.json",
                                      "provisioning-spend.json"}, leftovers
            spent = self.cert_dir / "provisioning-spend.json"
            if spent.exists():
                # What failed attempts spent, until a pair is installed.
                assert stat.S_IMODE(os.stat(spent).st_mode) == 0o600
                assert json.loads(spent.read_text())["version"] == 1
            assert not [p for p in self.config_path.parent.iterdir() if p.name.endswith(".tmp")]
        doc = json.loads(self.config_path.read_text())
        assert os.stat(self.config_path).st_mode == self.config_mode
        for section, body in self.doc.items():
            assert section in doc
            if section != "device":
                assert doc[section] == body
        assert set(self.doc["device"]) <= set(doc["device"])
        status = str(doc["device"].get("PROVISION_STATUS", "False")).lower() == "true"
        if status:
            assert installed, "PROVISION_STATUS true without credentials"
            cert_id = certificate_id(cert.read_bytes())
            registered = [i for i, e in enumerate(self.standin.events())
                          if e["event"] == "register-accepted" and e["certificateId"] == cert_id]
            assert registered, "installed certificate was never registered"
            deadline = time.monotonic() + 3
            while not [e for e in self.standin.events()[registered[0]:] if e["event"] == "boot"]:
                assert time.monotonic() < deadline, "status true but no boot message seen"
                time.sleep(0.02)
        for path, data in self.claim.items():
            assert path.read_bytes() == data, f"{path} changed"
        for text in outputs:
            assert "PRIVATE KEY" not in text and "-----BEGIN" not in text
            for token in self.standin.issued_tokens():
                assert token not in text
            assert self.standin.secret not in text, "the provisioning secret was printed"
        return {"installed": installed, "status": status}


HELD_BACK = "provisioning held back, nothing sent"


def let_the_spend_wait_pass(cert_dir: Path) -> bool:
    """Age CERT_DIR's spend record by the wait it imposes, as the clock would: a test
    of what comes after the wait without waiting.  False if it imposes none."""
    from entomologist import spend
    path = cert_dir / spend.RECORD_NAME
    if not path.exists():
        return False
    at, _ = spend.SpendRecord.open(path).next_attempt()
    shift = at - time.time()
    if shift <= 0:
        return False
    doc = json.loads(path.read_text())
    for entry in doc["entries"]:
        entry["at"] -= shift + 1
        if "boottime" in entry:  # an entry of this boot is aged by the boot's clock
            entry["boottime"] -= shift + 1
            if entry["boottime"] < 0:  # older than the boot: dated by the wall clock alone
                del entry["boot"], entry["boottime"]
    path.write_text(json.dumps(doc))
    return True


def changed(path: Path):
    """A trigger for run_and_kill: ``path`` no longer holds what it holds now."""
    before = path.read_bytes() if path.exists() else None

    def check():
        # A pair is swapped by renames: the file may vanish between two looks.
        try:
            return path.read_bytes() != before
        except FileNotFoundError:
            return False
    return check


def run_and_kill(standin, trigger, *args: str, limit: float = 30.0, env: dict | None = None):
    """Start boot.py, SIGKILL it the moment ``trigger()`` holds; return (killed, stderr)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "boot.py"), "--config",
                             str(standin.config_path), *args], stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + limit
    killed = False
    while proc.poll() is None and time.monotonic() < end:
        if trigger():
            proc.kill()
            killed = True
            break
        time.sleep(0.0005)
    _, err = proc.communicate(timeout=30)
    return killed, err
