"""The PKCS#11 drop-ins: the token's store reachable inside the unit's sandbox, the
sandbox otherwise unchanged."""
import re
import shutil
import subprocess
import sys

import pytest

from e2e import ROOT
from systemd_units import exposure

UNIT = ROOT / "systemd" / "entomologist-provision.service"
DROP_INS = {"softhsm": ROOT / "systemd" / "pkcs11-softhsm.conf",
            "tpm2": ROOT / "systemd" / "pkcs11-tpm2.conf"}
# What the base unit's sandbox is made of: a drop-in may add paths and one device,
# never switch any of these.
SANDBOX_KEYS = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges",
                "CapabilityBoundingSet", "AmbientCapabilities", "RestrictAddressFamilies",
                "SystemCallFilter", "DevicePolicy", "MemoryDenyWriteExecute", "ProtectProc",
                "ProcSubset", "RestrictNamespaces", "PrivateIPC", "PrivateMounts", "User"}


def directives(path):
    found = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def local_unit_with(tmp_path, drop_in):
    """A root with the unit (pointed at this checkout) and the drop-in where
    `make install PKCS11=...` puts it."""
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    (unit_dir / f"{UNIT.name}.d").mkdir(parents=True)
    text = UNIT.read_text().replace("/opt/entomologist/venv/bin/python", sys.executable)
    (unit_dir / UNIT.name).write_text(text.replace("/opt/entomologist/boot.py",
                                                   str(ROOT / "boot.py")))
    shutil.copy(drop_in, unit_dir / f"{UNIT.name}.d" / "pkcs11.conf")
    return unit_dir / UNIT.name


@pytest.mark.parametrize("name", sorted(DROP_INS))
def test_unit_with_the_drop_in_verifies_without_a_word(tmp_path, name):
    unit = local_unit_with(tmp_path, DROP_INS[name])
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.parametrize("name", sorted(DROP_INS))
def test_security_exposure_with_the_drop_in_stays_that_of_the_unit_and_at_most_2_5(
        tmp_path, name):
    unit = local_unit_with(tmp_path, DROP_INS[name])
    # --root reads the unit and its .d folder, as systemd does on the device.
    report, with_drop_in = exposure([f"--root={tmp_path}", UNIT.name])
    _, without = exposure([str(unit)])
    assert with_drop_in <= 2.5 and with_drop_in == without
    if name == "tpm2":
        # Proof that the drop-in was read: its device rule is in the report.
        assert "/dev/tpmrm0:rw" in report


@pytest.mark.parametrize("name", sorted(DROP_INS))
def test_drop_in_adds_paths_and_never_loosens_the_sandbox(name):
    d = directives(DROP_INS[name])
    assert not SANDBOX_KEYS & set(d), SANDBOX_KEYS & set(d)
    assert all(path.startswith("/var/lib/") for path in d["ReadWritePaths"])


def test_softhsm_drop_in_opens_debians_token_folder():
    conf = "/etc/softhsm/softhsm2.conf"
    tokendir = re.search(r"^directories\.tokendir\s*=\s*(\S+)", open(conf).read(), re.M)
    assert directives(DROP_INS["softhsm"])["ReadWritePaths"] == [tokendir.group(1).rstrip("/")]


def test_tpm2_drop_in_binds_only_the_resource_manager_and_names_the_store():
    d = directives(DROP_INS["tpm2"])
    assert d["BindPaths"] == ["-/dev/tpmrm0"]
    assert d["DeviceAllow"] == ["/dev/tpmrm0 rw"]
    assert sorted(d["Environment"]) == ["TPM2_PKCS11_STORE=/var/lib/tpm2-pkcs11",
                                        "TPM2_PKCS11_TCTI=device:/dev/tpmrm0"]
    assert d["ReadWritePaths"] == ["/var/lib/tpm2-pkcs11"]
    assert directives(UNIT)["PrivateDevices"] == ["yes"]
