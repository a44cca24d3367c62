"""A read-only root with the config and CERT_DIR on a data partition: the drop-in that
opens that folder in the unit's sandbox, and what a run says when it is missing."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from e2e import ROOT, privilege_drop
from systemd_units import exposure

UNIT = ROOT / "systemd" / "entomologist-provision.service"
DROP_IN = ROOT / "systemd" / "data-dir.conf"
SANDBOX_KEYS = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges",
                "CapabilityBoundingSet", "AmbientCapabilities", "RestrictAddressFamilies",
                "SystemCallFilter", "DevicePolicy", "MemoryDenyWriteExecute", "ProtectProc",
                "ProcSubset", "RestrictNamespaces", "PrivateIPC", "PrivateMounts", "User"}


def directives(text):
    found = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def installed(tmp_path, data_dir="/data/entomologist"):
    """The unit (pointed at this checkout) and the drop-in, as
    `make install DATA_DIR=...` lays them out, from the Makefile's own recipe."""
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    (unit_dir / f"{UNIT.name}.d").mkdir(parents=True)
    text = UNIT.read_text().replace("/opt/entomologist/venv/bin/python", sys.executable)
    (unit_dir / UNIT.name).write_text(text.replace("/opt/entomologist/boot.py",
                                                   str(ROOT / "boot.py")))
    recipe = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), "install",
                             f"DESTDIR={tmp_path}", f"DATA_DIR={data_dir}"],
                            capture_output=True, text=True, check=True).stdout
    (line,) = [line for line in recipe.splitlines() if "data-dir.conf >" in line]
    subprocess.run(["/bin/sh", "-c", line], cwd=ROOT, check=True)
    return unit_dir / UNIT.name


def test_make_install_with_data_dir_lays_the_drop_in_with_that_path(tmp_path):
    unit = installed(tmp_path, "/srv/camera")
    drop_in = unit.parent / f"{UNIT.name}.d" / "data-dir.conf"
    d = directives(drop_in.read_text())
    assert d["ReadWritePaths"] == ["/srv/camera"] and d["RequiresMountsFor"] == ["/srv/camera"]


def test_the_data_dir_drop_in_only_adds_its_folder_and_never_loosens_the_sandbox():
    d = directives(DROP_IN.read_text())
    assert set(d) == {"RequiresMountsFor", "ReadWritePaths"}
    assert not SANDBOX_KEYS & set(d)


def test_unit_with_the_data_dir_drop_in_verifies_without_a_word(tmp_path):
    unit = installed(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_security_exposure_with_the_data_dir_drop_in_stays_that_of_the_unit(tmp_path):
    unit = installed(tmp_path)
    assert exposure([f"--root={tmp_path}", UNIT.name])[1] == exposure([str(unit)])[1] <= 2.5


def under_write_rules(root, writable, command, env):
    """``command`` as ProtectSystem=strict runs it, for the files under ``root``: in a
    mount namespace of its own, ``root`` (standing for /) read-only but for the
    ``writable`` paths (ReadWritePaths=, taken as under ``root``), with the unit's
    INVOCATION_ID."""
    script = " && ".join(
        [f"mount --bind {shlex.quote(str(root))} {shlex.quote(str(root))}"]
        + [f"mount --bind {shlex.quote(str(root) + path)} {shlex.quote(str(root) + path)}"
           for path in writable]
        + [f"mount -o remount,bind,ro {shlex.quote(str(root))}",
           "exec " + " ".join(shlex.quote(part) for part in command)])
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          env={**os.environ, **env, "INVOCATION_ID": "0" * 32},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and bind mounts need root")
def test_the_readme_layout_boots_under_the_units_write_rules_only_with_the_drop_in(standin):
    """/etc/entomologist/ento.conf linked to /data/entomologist, CERT_DIR there: the
    unit alone makes the first boot fail (73) before anything is asked, and says
    the sandbox may be why; with the drop-in it provisions and reports."""
    root = standin.workdir / "root"
    data, etc = root / "data" / "entomologist", root / "etc" / "entomologist"
    data.mkdir(parents=True, mode=0o755)
    etc.mkdir(parents=True, mode=0o755)
    doc = json.loads(standin.config_path.read_text())
    for key in ("CLAIM_CERT", "CLAIM_KEY", "PROVISIONING_SECRET_FILE", "ROOT_CA"):
        doc["device"][key] = str(standin.workdir / doc["device"][key])
    doc["device"]["CERT_DIR"] = str(data / "cert")
    (data / "ento.conf").write_text(json.dumps(doc))
    os.chmod(data / "ento.conf", 0o640)
    (etc / "ento.conf").symlink_to(data / "ento.conf")
    command = [*privilege_drop(), sys.executable, str(ROOT / "boot.py"), "--config",
               str(etc / "ento.conf"), "--timeout", "20"]
    unit_paths = directives(UNIT.read_text())["ReadWritePaths"]
    assert unit_paths == ["/etc/entomologist"]

    proc = under_write_rules(root, unit_paths, command, {})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert proc.returncode == 73 and len(errors) == 1, proc.stderr
    assert "ProtectSystem=strict" in errors[0] and "ReadWritePaths=" in errors[0]
    assert standin.events("create-request") == []

    drop_in_paths = directives(DROP_IN.read_text())["ReadWritePaths"]
    proc = under_write_rules(root, unit_paths + drop_in_paths, command, {})
    assert proc.returncode == 0, proc.stderr
    assert len(standin.wait_for("boot")) == 1
    assert json.loads((data / "ento.conf").read_text())["device"]["PROVISION_STATUS"] == "True"
