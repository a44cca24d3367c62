#!/usr/bin/env python3
"""`make system-test`: the installed unit under a real systemd, PID 1 of a booted Debian root.

A Debian bookworm root for this machine's architecture is made with
debootstrap and cached outside the work tree (as `make image-test` does).
Each run puts a throw-away overlay on it and runs `make install DESTDIR=/`
in its chroot, as an image builder would. Then `systemd-nspawn -b` boots it
with systemd as PID 1 (pure cgroup v2, like a Debian 12 camera), sharing the
host's network, so the stand-in on the host's loopback is the camera's
AWS IoT. Each scenario of the README's promises is a named check, judged from
the container's journal, the unit's state (`systemctl show`), the files on
the camera and the stand-in's record. Scenarios run in one booted container
where they can (the unit restarted with another config or a test drop-in);
the second boot is a real reboot.

Everything it mounts or starts (the overlay, the chroot's mounts, the
container, the stand-in) is undone on the way out, failure and SIGTERM
included; the run lives in a private mount namespace.

Run as root: make system-test (see README, Tests).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import imagetest as it  # noqa: E402  (the image test's helpers: root, overlay, install)

ROOT = it.ROOT
log = logging.getLogger("system-test")

UNIT = it.UNIT
UNITDIR = it.UNITDIR
DROPINS = f"{UNITDIR}/{UNIT}.d"
CONF_DIR = "/etc/entomologist"
# What the booted root needs beyond minbase: systemd as init and its bus, the
# README's install path (make, venv; pip needs the CA bundle), SoftHSM2 for the
# PKCS#11 scenario.
INCLUDE = ("ca-certificates", "dbus", "make", "python3", "python3-venv", "softhsm2",
           "systemd", "systemd-sysv")
DEFAULT_CACHE = Path("/var/cache/entomologist-system-test")
NSPAWN_ENV = {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
# The test drop-in every scenario after the first two boots runs with:
# retries after 1 s instead of 60.
RESTART_SEC = 1
BOOT_TIMEOUT = 90
RUN_TIMEOUT = 200          # the unit's own TimeoutStartSec is 180 s
SHORT_RUN = "--timeout"    # the option the outage scenario shortens
SOFTHSM_LIBRARY = "/usr/lib/softhsm/libsofthsm2.so"
# The honest way to make boot.py hit a bug under the unit: its own main(),
# bug counting and exit code, with its boot step raising (as the unit tests
# monkeypatch it).
BUG_SCRIPT = "/usr/local/lib/entomologist-system-test/bug.py"
BUG_SOURCE = '''"""boot.py's own main() with its boot step raising: the system test's bug."""
import sys

sys.path.insert(0, "/opt/entomologist")
import boot  # noqa: E402


def bug(*args, **kwargs):
    raise ZeroDivisionError("a bug injected by the system test")


boot.boot = bug
sys.exit(boot.main(sys.argv[1:]))
'''


class Failed(it.Failed):
    """A check failed; the message says what was seen."""


# ------------------------------------------------------------------ pure helpers

def exec_start_with(exec_start: list[str], *, add: list[str] = (), timeout: int | None = None,
                    script: str | None = None) -> str:
    """The installed ExecStart line, changed the way one scenario needs."""
    argv = list(exec_start)
    if timeout is not None:
        if SHORT_RUN in argv:
            argv[argv.index(SHORT_RUN) + 1] = str(timeout)
        else:
            argv += [SHORT_RUN, str(timeout)]
    if script is not None:
        scripts = [i for i, a in enumerate(argv) if a.endswith("/boot.py")]
        if not scripts:
            raise Failed(f"no boot.py in the unit's ExecStart: {shlex.join(exec_start)}")
        argv[scripts[0]] = script
    return shlex.join(argv + list(add))


def dropin(*service_lines: str) -> str:
    return "# Written by make system-test for one scenario.\n[Service]\n" + \
        "".join(line + "\n" for line in service_lines)


def parse_show(text: str) -> dict[str, str]:
    """`systemctl show -p A -p B` output as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def parse_journal(text: str) -> list[dict]:
    """`journalctl -o json` lines; a MESSAGE the journal stored as bytes is decoded."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        message = entry.get("MESSAGE")
        if isinstance(message, list):
            entry["MESSAGE"] = bytes(message).decode("utf-8", "replace")
        entries.append(entry)
    return entries


def product_lines(entries: list[dict]) -> list[dict]:
    """What the product's processes wrote (its stderr on the journal), not systemd's lines."""
    return [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "entomologist-provision"
            and e.get("_PID") != "1"]


def manager_lines(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e.get("_PID") == "1"]


def exits(entries: list[dict]) -> list[tuple[float, str]]:
    """(time, status) of each end of the unit's main process that systemd logged."""
    found = []
    for e in manager_lines(entries):
        m = re.search(r"Main process exited, code=(\w+), status=(\S+)", e.get("MESSAGE", ""))
        if m:
            found.append((int(e["__REALTIME_TIMESTAMP"]) / 1e6, m.group(2)))
    return found


def priority_problems(lines: list[dict], success: bool) -> list[str]:
    """How the product's lines break the README's journal promise: each line its
    syslog priority, no prefix left in the text, no timestamp of its own; a
    success has no error line, a failure ends on one."""
    problems = []
    for e in lines:
        text = e.get("MESSAGE", "")
        if "PRIORITY" not in e:
            problems.append(f"no priority: {text!r}")
        if re.match(r"<\d>", text):
            problems.append(f"priority prefix left in the text: {text!r}")
        if re.search(r"\b\d\d:\d\d:\d\d\b", text):
            problems.append(f"a timestamp of its own: {text!r}")
    priorities = [int(e.get("PRIORITY", 6)) for e in lines]
    if success and any(p <= 3 for p in priorities):
        problems.append("an error line in a successful run: " +
                        "; ".join(e["MESSAGE"] for e in lines if int(e.get("PRIORITY", 6)) <= 3))
    if not success and (not priorities or priorities[-1] > 3):
        problems.append("a failed run that does not end on an error line (priority <= 3)")
    return problems


def data_dropins(systemd_dir: Path) -> list[Path]:
    """The shipped drop-ins that open a /data partition to the unit (README, read-only root)."""
    return sorted(p for p in systemd_dir.glob("*.conf")
                  if re.search(r"^\s*ReadWritePaths=.*/data\b", p.read_text(), re.M))


# ------------------------------------------------------------------ the container

class Container:
    """The root booted by systemd-nspawn, systemd its PID 1, on the host's network."""

    def __init__(self, root: Path, console: Path):
        self.root, self.console = root, console
        self.proc: subprocess.Popen | None = None
        self.leader = 0
        self.ready = False

    def boot(self) -> float:
        t0 = time.monotonic()
        cmd = ["systemd-nspawn", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
               "-q", "--console=read-only"]
        log.debug("$ %s", shlex.join(cmd))
        out = open(self.console, "ab")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **NSPAWN_ENV},
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        end = t0 + BOOT_TIMEOUT
        while not self.leader:
            if self.proc.poll() is not None:
                raise Failed(f"systemd-nspawn exited {self.proc.returncode} before the "
                             "container booted, so systemd cannot run as its PID 1 here:\n"
                             f"{self.console_tail()}")
            if time.monotonic() > end:
                raise Failed(f"no container init after {BOOT_TIMEOUT} s:\n{self.console_tail()}")
            self.leader = self._init_pid()
            if not self.leader:
                time.sleep(0.05)
        while True:
            # Until the container's systemd has made /run/systemd/system and listens on
            # its bus, systemctl answers "offline" or fails at once.
            state = self.sh(["systemctl", "is-system-running", "--wait"], check=False,
                            timeout=max(1.0, end - time.monotonic()))
            if state.stdout.strip() not in ("", "offline") or time.monotonic() > end \
                    or self.proc.poll() is not None:
                break
            time.sleep(0.1)
        if state.stdout.strip() not in ("running", "degraded"):
            raise Failed(f"the container's systemd did not finish booting: "
                         f"{state.stdout.strip()!r}\n{self.console_tail()}")
        if state.stdout.strip() == "degraded":
            failed = self.sh(["systemctl", "--failed", "--no-legend", "--plain"], check=False)
            log.info("booted degraded; failed units: %s", failed.stdout.strip())
        self.ready = True
        return time.monotonic() - t0

    def _init_pid(self) -> int:
        # nspawn's direct child is the container's PID 1.
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return 0
        for pid in children.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                pass
        return 0

    def console_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no console output)"

    def sh(self, cmd: list[str], check: bool = True, timeout: float = 60,
           input: str | None = None) -> subprocess.CompletedProcess:
        """cmd inside the container, in all its namespaces, as its root."""
        if not self.leader:
            raise Failed("the container is not running")
        args = ["nsenter", "-t", str(self.leader), "-a", *cmd]
        log.debug("$ %s", shlex.join(cmd))
        proc = subprocess.run(args, env=it.chroot_env(), capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise Failed(f"in the container, {shlex.join(cmd)} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def poweroff(self, timeout: float = 30) -> None:
        """An orderly shutdown (nspawn turns SIGTERM into one); killed if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the container did not shut down in %.0f s: killed", timeout)
                for pid in (self.leader, self.proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                self.proc.wait(10)
        self.proc, self.leader, self.ready = None, 0, False


# ------------------------------------------------------------------ the camera

@dataclass
class Run:
    """One start of the unit: what systemd says and what went to the journal."""
    state: dict[str, str]
    entries: list[dict]
    returncode: int

    @property
    def lines(self) -> list[dict]:
        return product_lines(self.entries)

    @property
    def status(self) -> str:
        return self.state.get("ExecMainStatus", "?")

    def text(self) -> str:
        return "\n".join(f"    <{e.get('PRIORITY', '?')}> {e.get('MESSAGE', '')}"
                         for e in self.entries)

    def describe(self) -> str:
        keys = ("ActiveState", "SubState", "Result", "ExecMainCode", "ExecMainStatus",
                "NRestarts")
        return ", ".join(f"{k}={self.state.get(k)}" for k in keys) + "\n" + self.text()


@dataclass
class Camera:
    """The booted container seen as a camera: its unit, journal, files and its cloud."""
    container: Container
    root: Path
    standin: object
    exec_start: list[str] = field(default_factory=list)
    provisioned_conf: bytes = b""
    sigsys: list[str] = field(default_factory=list)

    @property
    def conf_dir(self) -> Path:
        return self.root / CONF_DIR.lstrip("/")

    @property
    def config(self) -> Path:
        return self.conf_dir / "ento.conf"

    def sh(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return self.container.sh(list(cmd), **kw)

    # -- systemd

    def show(self) -> dict[str, str]:
        props = ("ActiveState", "SubState", "Result", "ExecMainCode", "ExecMainStatus",
                 "NRestarts", "MemoryMax", "MemoryHigh", "SystemCallErrorNumber")
        return parse_show(self.sh("systemctl", "show", *[f"-p{p}" for p in props], UNIT).stdout)

    def cursor(self) -> str:
        out = self.sh("journalctl", "-n", "0", "--show-cursor", "-q").stdout
        m = re.search(r"-- cursor: (\S+)", out)
        return m.group(1) if m else ""

    def journal(self, cursor: str = "", boot_only: bool = False) -> list[dict]:
        self.sh("journalctl", "--sync", check=False)
        args = ["journalctl", "-u", UNIT, "-o", "json", "--no-pager", "-q"]
        if cursor:
            args.append(f"--after-cursor={cursor}")
        if boot_only:
            args.append("-b")
        entries = parse_journal(self.sh(*args).stdout)
        for e in manager_lines(entries):
            if "status=31/SYS" in e.get("MESSAGE", ""):
                self.sigsys.append(e["MESSAGE"])
        return entries

    def write_dropin(self, name: str, text: str) -> None:
        d = self.root / DROPINS.lstrip("/")
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        (d / f"{name}.conf").write_text(text)
        self.sh("systemctl", "daemon-reload")

    def remove_dropin(self, name: str) -> None:
        (self.root / DROPINS.lstrip("/") / f"{name}.conf").unlink(missing_ok=True)
        self.sh("systemctl", "daemon-reload")

    def start(self, timeout: float = RUN_TIMEOUT) -> Run:
        """The unit started again and waited for (a oneshot's start job ends with its run)."""
        self.sh("systemctl", "reset-failed", UNIT, check=False)
        cursor = self.cursor()
        proc = self.sh("systemctl", "restart", UNIT, check=False, timeout=timeout)
        return Run(self.show(), self.journal(cursor), proc.returncode)

    def settle(self) -> None:
        """No run left behind for the next scenario (a pending restart is cancelled), and
        the unit's RuntimeDirectory emptied: each scenario starts as after a reboot."""
        if not self.container.ready:
            return
        state = self.show()
        if state["SubState"] in ("auto-restart", "start", "start-pre", "condition"):
            self.sh("systemctl", "stop", UNIT, check=False, timeout=RUN_TIMEOUT)
        self.sh("systemctl", "reset-failed", UNIT, check=False)
        self.sh("find", "/run/entomologist", "-mindepth", "1", "-delete", check=False)

    def wait_state(self, done: Callable[[dict], bool], what: str, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while True:
            state = self.show()
            if done(state):
                return state
            if time.monotonic() > end:
                raise Failed(f"not {what} after {timeout:.0f} s: {state}")
            time.sleep(0.1)

    # -- the device's files

    def write_config(self, data: bytes) -> None:
        tmp = self.config.with_name(".ento.conf.system-test")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.config)

    def device(self) -> dict:
        return json.loads(self.config.read_text())["device"]

    def fresh_device(self, cert_dir: str, **overrides) -> None:
        """An unprovisioned camera: a new config whose CERT_DIR does not exist yet."""
        shutil.rmtree(self.conf_dir / cert_dir, ignore_errors=True)
        self.standin.write_device_config(CERT_DIR=cert_dir, **overrides)

    def back_to_provisioned(self) -> None:
        """The camera of the first boot again: provisioned, its status True."""
        self.write_config(self.provisioned_conf)

    def boots(self) -> int:
        return len(self.standin.events("boot"))

    def requests(self) -> tuple[int, int, int]:
        return tuple(len(self.standin.events(n))
                     for n in ("create-request", "csr-request", "register-request"))


def expect(run: Run, status: int, what: str) -> None:
    if run.status != str(status) or run.state.get("ExecMainCode") != "1":
        raise Failed(f"{what}: expected exit {status}, got {run.describe()}")


def expect_success(run: Run, what: str, lines: list[dict] | None = None) -> None:
    expect(run, 0, what)
    if (run.state["ActiveState"], run.state["Result"]) != ("active", "success"):
        raise Failed(f"{what}: the unit is not active after exit 0: {run.describe()}")
    problems = priority_problems(run.lines if lines is None else lines, success=True)
    if problems:
        raise Failed(f"{what}: journal: {'; '.join(problems)}")


# ------------------------------------------------------------------ scenarios

def first_boot(cam: Camera) -> str:
    """Booted with a config and no credentials: provisions and reports during boot."""
    state = cam.show()
    entries = cam.journal(boot_only=True)
    run = Run(state, entries, 0)
    expect_success(run, "the first boot's run")
    if not run.lines:
        raise Failed("the unit logged nothing during the first boot")
    if cam.requests() != (1, 0, 1) or cam.boots() != 1:
        raise Failed(f"stand-in saw create/csr/register {cam.requests()}, {cam.boots()} boot "
                     "messages; expected (1, 0, 1) and 1")
    serial = cam.standin.serial
    (boot,) = cam.standin.events("boot")
    want = (f"cameraDevice/{serial}/booted", json.dumps({"serialID": serial, "bootStatus": True}))
    if (boot["topic"], boot["payload"]) != want:
        raise Failed(f"boot message {boot}")
    listing = it.cert_dir_listing(cam.conf_dir / "cert")
    expected = {".": 0o700, **it.EXPECTED_CERT_DIR}
    # What the image test expects must be there with its mode; files the product
    # adds beside them must be no more open than the certificate.
    extra = {k: v for k, v in listing.items() if k not in expected}
    if {k: listing.get(k) for k in expected} != expected or \
            any(mode & 0o133 for mode in extra.values()):
        raise Failed(f"CERT_DIR {it.fmt_modes(listing)}, expected {it.fmt_modes(expected)}")
    device = cam.device()
    if device.get("PROVISION_STATUS") != "True" or not device.get("THING_NAME"):
        raise Failed(f"config after the first boot: {device}")
    cam.provisioned_conf = cam.config.read_bytes()
    prios = sorted({e['PRIORITY'] for e in run.lines})
    return f"{len(run.lines)} lines, priorities {','.join(prios)}; CERT_DIR {it.fmt_modes(listing)}"


def second_boot(cam: Camera) -> str:
    """A reboot of the provisioned camera: one more boot message, no provisioning request."""
    run = Run(cam.show(), cam.journal(boot_only=True), 0)
    expect_success(run, "the second boot's run")
    if not run.lines:
        raise Failed("the unit did not run during the second boot")
    if cam.requests() != (1, 0, 1):
        raise Failed(f"the second boot asked the service again: create/csr/register "
                     f"{cam.requests()}")
    if cam.boots() != 2:
        raise Failed(f"{cam.boots()} boot messages after two boots")
    cam.provisioned_conf = cam.config.read_bytes()
    return f"{len(run.lines)} lines; still 1 create and 1 register request, 2 boot messages"


def seccomp_kill_mode(cam: Camera) -> str:
    """SystemCallErrorNumber= emptied: a filtered system call kills instead of failing.
    The drop-in stays for every later scenario; the last check counts kills."""
    cam.write_dropin("50-seccomp-kill", dropin("SystemCallErrorNumber="))
    mode = cam.show().get("SystemCallErrorNumber", "")
    # systemd shows kill mode as its SECCOMP_ERROR_NUMBER_KILL, INT_MAX - 1.
    if mode not in ("", "kill", str(2**31 - 2)):
        raise Failed(f"the drop-in did not empty SystemCallErrorNumber: {mode!r}")
    cam.fresh_device("cert-seccomp")
    first = cam.start()
    expect_success(first, "a first boot under seccomp kill mode")
    later = cam.start()
    expect_success(later, "a later boot under seccomp kill mode")
    cam.back_to_provisioned()
    return "first and later boot exit 0 under kill mode (kept on for the scenarios below)"


def verbose_nodelay(cam: Camera) -> str:
    cam.write_dropin("60-verbose", dropin("ExecStart=", "ExecStart=" +
                                          exec_start_with(cam.exec_start, add=["-v"])))
    try:
        run = cam.start()
        expect_success(run, "a -v run")
        found = [e["MESSAGE"] for e in run.lines if "TCP_NODELAY" in e["MESSAGE"]]
        if not found:
            raise Failed(f"no TCP_NODELAY line in the -v run:\n{run.text()}")
        return found[0][:160]
    finally:
        cam.remove_dropin("60-verbose")


def standin_down(cam: Camera) -> str:
    """Exit 75 while the service is unreachable, retried after RestartSec, then done."""
    cam.write_dropin("60-short-run", dropin("ExecStart=", "ExecStart=" +
                                            exec_start_with(cam.exec_start, timeout=3)))
    boots = cam.boots()
    try:
        cam.standin.refuse_connections()
        cam.sh("systemctl", "reset-failed", UNIT, check=False)
        cursor = cam.cursor()
        cam.sh("systemctl", "restart", "--no-block", UNIT)
        cam.wait_state(lambda s: int(s.get("NRestarts", 0)) >= 1, "restarted", 30)
        cam.standin.accept_connections()
        state = cam.wait_state(lambda s: s["ActiveState"] in ("active", "failed")
                               and s["SubState"] != "auto-restart", "settled", 60)
        run = Run(state, cam.journal(cursor), 0)
        ends = exits(run.entries)
        # systemd logs a failed exit only: the lines after the last one are the run that worked.
        last = [e for e in run.lines if not ends or
                int(e["__REALTIME_TIMESTAMP"]) / 1e6 > ends[-1][0]]
        expect_success(run, "the run after the stand-in came back", last)
        if not ends or ends[0][1] != "75/TEMPFAIL":
            raise Failed(f"the first run while the stand-in was down did not exit 75:\n"
                         f"{run.text()}")
        down = [e for e in run.lines if int(e["__REALTIME_TIMESTAMP"]) / 1e6 <= ends[0][0]]
        problems = priority_problems(down, success=False)
        if problems:
            raise Failed(f"the run while the stand-in was down: journal: {'; '.join(problems)}")
        restarts = [int(e["__REALTIME_TIMESTAMP"]) / 1e6 for e in manager_lines(run.entries)
                    if "Scheduled restart job" in e.get("MESSAGE", "")]
        if not restarts or restarts[0] - ends[0][0] < RESTART_SEC - 0.05:
            raise Failed(f"no restart {RESTART_SEC} s after the exit 75:\n{run.text()}")
        if cam.boots() != boots + 1:
            raise Failed(f"{cam.boots() - boots} boot messages once the stand-in was back")
        return (f"exit 75, restarted {restarts[0] - ends[0][0]:.1f} s later, exit 0 after "
                f"{state['NRestarts']} restart(s), one boot message, no manual action")
    finally:
        cam.standin.accept_connections()
        cam.remove_dropin("60-short-run")


def not_restarted(cam: Camera, run: Run, status: int, what: str) -> None:
    expect(run, status, what)
    # A restart systemd means to do shows as SubState auto-restart; failed is final.
    if (run.state["ActiveState"], run.state["SubState"], run.state["NRestarts"]) != \
            ("failed", "failed", "0"):
        raise Failed(f"{what}: exit {status} must stop the retries: {run.describe()}")
    problems = priority_problems(run.lines, success=False)
    if problems:
        raise Failed(f"{what}: journal: {'; '.join(problems)}")


def config_error(cam: Camera) -> str:
    doc = json.loads(cam.provisioned_conf)
    doc["device"]["PORT"] = 0
    cam.write_config((json.dumps(doc, indent=2) + "\n").encode())
    try:
        run = cam.start()
        not_restarted(cam, run, 78, "a PORT of 0")
        return f"exit 78, failed, no restart: {run.lines[-1]['MESSAGE'][:120]}"
    finally:
        cam.back_to_provisioned()


def refusal(cam: Camera) -> str:
    from standin.responder import Rejection
    cam.fresh_device("cert-refused")
    cam.standin.faults.reject_register = Rejection(400, "InvalidRequest", "refused by the test")
    try:
        run = cam.start()
        not_restarted(cam, run, 65, "RegisterThing refused with 400")
        return f"exit 65, failed, no restart: {run.lines[-1]['MESSAGE'][:120]}"
    finally:
        cam.standin.faults.reject_register = None
        cam.back_to_provisioned()


def three_bugs(cam: Camera) -> str:
    bug = cam.root / BUG_SCRIPT.lstrip("/")
    bug.parent.mkdir(parents=True, exist_ok=True)
    bug.write_text(BUG_SOURCE)
    cam.write_dropin("60-bug", dropin("ExecStart=", "ExecStart=" +
                                      exec_start_with(cam.exec_start, script=BUG_SCRIPT)))
    try:
        cam.sh("systemctl", "reset-failed", UNIT, check=False)
        cursor = cam.cursor()
        cam.sh("systemctl", "restart", "--no-block", UNIT)
        state = cam.wait_state(lambda s: s["ActiveState"] in ("inactive", "failed")
                               and s["SubState"] != "auto-restart", "settled", 60)
        run = Run(state, cam.journal(cursor), 0)
        statuses = [s for _, s in exits(run.entries)]
        if statuses != ["70/SOFTWARE"] * 3 or state["Result"] != "exec-condition":
            raise Failed(f"three bugs in a row must end in a skip by the ExecCondition: exits "
                         f"{statuses}, {run.describe()}")
        if not any("Traceback" in e["MESSAGE"] for e in run.lines):
            raise Failed("a bug was logged without its traceback")
        cam.remove_dropin("60-bug")
        again = cam.start()
        if again.state["Result"] != "exec-condition" or exits(again.entries):
            raise Failed(f"a restart by hand ran before /run was cleared: {again.describe()}")
        cam.sh("rm", "-f", "/run/entomologist/consecutive-bugs")
        cleared = cam.start()
        expect_success(cleared, "the run once /run/entomologist/consecutive-bugs was removed")
        return (f"exits 70 x3 (NRestarts {state['NRestarts']}), then skipped (Result "
                "exec-condition), still skipped by hand, runs once /run is cleared")
    finally:
        cam.remove_dropin("60-bug")


def read_only_config(cam: Camera) -> str:
    cam.back_to_provisioned()
    before, boots = cam.config.read_bytes(), cam.boots()
    cam.sh("mount", "--bind", CONF_DIR, CONF_DIR)
    try:
        cam.sh("mount", "-o", "remount,bind,ro", CONF_DIR)
        probe = cam.sh("touch", f"{CONF_DIR}/.probe", check=False)
        if probe.returncode == 0 or "Read-only" not in probe.stderr:
            raise Failed(f"{CONF_DIR} is not read-only in the container: {probe.stderr}")
        run = cam.start()
        expect_success(run, f"a provisioned camera with {CONF_DIR} read-only")
        if cam.boots() != boots + 1:
            raise Failed("no boot message from the read-only camera")
        if cam.config.read_bytes() != before:
            raise Failed("the config changed under a read-only mount")
        return "exit 0, one boot message, config untouched"
    finally:
        cam.sh("umount", CONF_DIR, check=False)


def move_config_to(cam: Camera, data: str) -> None:
    """The README's read-only-root layout: the config and the files it names in
    ``data``, a fresh CERT_DIR there, and a symlink to the config in /etc."""
    cam.sh("install", "-d", "-m", "0700", data, f"{data}/claim", f"{data}/standin")
    for rel in ("claim/claim.pem.crt", "claim/claim.private.pem.key", "standin/ca.pem",
                "provisioning-secret"):
        cam.sh("cp", "-p", f"{CONF_DIR}/{rel}", f"{data}/{rel}")
    cam.fresh_device("cert-data")
    cam.sh("mv", f"{CONF_DIR}/ento.conf", f"{data}/ento.conf")
    cam.sh("ln", "-s", f"{data}/ento.conf", f"{CONF_DIR}/ento.conf")


def data_layout(cam: Camera) -> str:
    """README, read-only root: the config and credentials on /data, a symlink in /etc."""
    shipped = data_dropins(cam.root / "usr/src/entomologist/systemd")
    data = "/data/entomologist"
    saved = cam.config.read_bytes()
    cam.sh("mkdir", "-p", "/data")
    cam.sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "tmpfs", "/data")
    try:
        move_config_to(cam, data)
        for p in shipped:
            cam.write_dropin(f"70-{p.stem}", p.read_text())
        cam.sh("mount", "--bind", CONF_DIR, CONF_DIR)
        cam.sh("mount", "-o", "remount,bind,ro", CONF_DIR)
        try:
            run = cam.start()
        finally:
            cam.sh("umount", CONF_DIR, check=False)
        if not shipped and run.status != "0":
            raise Failed(f"no drop-in in systemd/ opens /data (ReadWritePaths=/data...), and "
                         f"the shipped unit refuses the layout: {run.describe()}")
        expect_success(run, f"{data} with {', '.join(p.name for p in shipped) or 'no drop-in'}")
        # /data is the container's own tmpfs: read there, not through the overlay.
        device = json.loads(cam.sh("cat", f"{data}/ento.conf").stdout)["device"]
        cert = cam.sh("test", "-s", f"{data}/cert-data/certificate.pem.crt", check=False)
        if device.get("PROVISION_STATUS") != "True" or cert.returncode != 0:
            raise Failed(f"{data} after the run: {device}")
        if not (cam.conf_dir / "ento.conf").is_symlink():
            raise Failed("the symlink in /etc/entomologist was replaced")
        return f"provisioned and reported in {data}, drop-in {', '.join(p.name for p in shipped)}"
    finally:
        for p in shipped:
            (cam.root / DROPINS.lstrip("/") / f"70-{p.stem}.conf").unlink(missing_ok=True)
        cam.sh("systemctl", "daemon-reload", check=False)
        cam.sh("umount", "/data", check=False)
        if cam.config.is_symlink():
            cam.config.unlink()
        cam.write_config(saved)


def check_sees_the_sandbox(cam: Camera) -> str:
    """boot.py --check by hand reads the unit's write rules from systemd: the /data
    layout without its drop-in is 73 there, as the unit's first boot would be, and
    passes with it; and it writes nothing, in /data or elsewhere."""
    shipped = data_dropins(cam.root / "usr/src/entomologist/systemd")
    data = "/data/entomologist"
    saved = cam.config.read_bytes()
    check = ["/opt/entomologist/venv/bin/python", "/opt/entomologist/boot.py", "--check",
             "--config", f"{CONF_DIR}/ento.conf"]
    cam.sh("mkdir", "-p", "/data")
    cam.sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "tmpfs", "/data")
    try:
        move_config_to(cam, data)
        listing = cam.sh("ls", "-laR", "--full-time", data).stdout
        without = cam.sh(*check, check=False)
        storage = [line for line in without.stdout.splitlines() if line.startswith("FAIL storage")]
        if without.returncode != 73 or not storage or "ReadWritePaths=" not in storage[0]:
            raise Failed(f"--check without the drop-in: exit {without.returncode}\n"
                         f"{without.stdout}{without.stderr}")
        for p in shipped:
            cam.write_dropin(f"70-{p.stem}", p.read_text())
        with_dropin = cam.sh(*check, check=False)
        if with_dropin.returncode != 0:
            raise Failed(f"--check with {', '.join(p.name for p in shipped) or 'no drop-in'}: "
                         f"exit {with_dropin.returncode}\n{with_dropin.stdout}"
                         f"{with_dropin.stderr}")
        if cam.sh("ls", "-laR", "--full-time", data).stdout != listing:
            raise Failed(f"--check changed {data}")
        return f"without the drop-in: {storage[0]}; with it: exit 0; {data} unchanged"
    finally:
        for p in shipped:
            (cam.root / DROPINS.lstrip("/") / f"70-{p.stem}.conf").unlink(missing_ok=True)
        cam.sh("systemctl", "daemon-reload", check=False)
        cam.sh("umount", "/data", check=False)
        if cam.config.is_symlink():
            cam.config.unlink()
        cam.write_config(saved)


def stop_during(cam: Camera, event: str, cert_dir: str, delay: float) -> tuple[Run, Run, int]:
    """systemctl stop once the stand-in has seen `event` and holds its answer back `delay` s.

    Returns the stopped run (journal after the stop), the next run, and how many
    RegisterThing requests the two made."""
    cam.fresh_device(cert_dir)
    registers = cam.requests()[2]
    seen = len(cam.standin.events(event))
    cam.standin.faults.delay = delay
    try:
        cam.sh("systemctl", "reset-failed", UNIT, check=False)
        cam.sh("systemctl", "restart", "--no-block", UNIT)
        cam.standin.wait_for(event, seen + 1, timeout=60)
        cursor = cam.cursor()
        cam.sh("systemctl", "stop", UNIT, timeout=120)
        stopped = Run(cam.show(), cam.journal(cursor), 0)
        cam.standin.faults.delay = 0.0
        after = cam.start()
        return stopped, after, cam.requests()[2] - registers
    finally:
        cam.standin.faults.delay = 0.0


def names_the_signal(line: dict) -> bool:
    return bool(re.search(r"SIGTERM|signal 15", line["MESSAGE"]))


def sigterm(cam: Camera) -> str:
    """systemctl stop while the run waits for CreateKeysAndCertificate's answer."""
    try:
        # The answer is held long enough that the stop lands before it, even on a busy machine.
        stopped, after, _ = stop_during(cam, "create-request", "cert-sigterm", delay=6.0)
        if len(stopped.lines) != 1 or not names_the_signal(stopped.lines[0]):
            raise Failed(f"a stop must log one line naming SIGTERM, got {len(stopped.lines)} "
                         f"line(s):\n{stopped.describe()}")
        expect_success(after, "the run after the stop")
        return f"one line: {stopped.lines[0]['MESSAGE'][:120]}; the next run completed"
    finally:
        cam.back_to_provisioned()


def sigterm_registering(cam: Camera) -> str:
    """systemctl stop while RegisterThing's answer is on its way: the registration is kept."""
    try:
        # The answer comes within a short grace (the product's own bound, a few seconds).
        stopped, after, registers = stop_during(cam, "register-request", "cert-sigterm-register",
                                                delay=1.5)
        lines = [e for e in stopped.lines if names_the_signal(e)]
        # Its line, or the wait for the answer and its end; between them the flow may log
        # its own progress (the answer recorded), but no other error and no traceback.
        others = [e for e in stopped.lines if not names_the_signal(e)]
        if not 1 <= len(lines) <= 2 or any(int(e.get("PRIORITY", 6)) <= 3 or
                                           "Traceback" in e["MESSAGE"] for e in others):
            raise Failed(f"a stop during RegisterThing must log its line naming SIGTERM (and "
                         f"at most the end of its wait), got:\n{stopped.describe()}")
        expect_success(after, "the run after the stop")
        if registers != 1:
            raise Failed(f"the registration in flight at SIGTERM was wasted: {registers} "
                         "RegisterThing requests for one camera")
        return (f"{len(lines)} line(s): {' / '.join(e['MESSAGE'][:80] for e in lines)}; the "
                "next run installed the registration without asking again")
    finally:
        cam.back_to_provisioned()


def memory_limit(cam: Camera) -> str:
    state = cam.show()
    if state.get("MemoryMax", "infinity") == "infinity":
        raise Failed(f"the unit sets no MemoryMax (MemoryMax={state.get('MemoryMax')}, "
                     f"MemoryHigh={state.get('MemoryHigh')})")
    controllers = cam.sh("cat", "/sys/fs/cgroup/cgroup.controllers", check=False).stdout.split()
    enforced = ("enforced: the memory controller is delegated to this container"
                if "memory" in controllers else
                "configured; not enforced here: this container's cgroup v2 has no memory "
                "controller (the host keeps it on cgroup v1)")
    return f"MemoryMax={state['MemoryMax']} MemoryHigh={state.get('MemoryHigh')}; {enforced}"


def softhsm(cam: Camera) -> str:
    cam.sh("softhsm2-util", "--init-token", "--free", "--label", "entomologist",
           "--so-pin", "system-test-so", "--pin", "system-test-user")
    pin = cam.conf_dir / "token.pin"
    fd = os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("system-test-user\n")
    cam.write_dropin("pkcs11", (cam.root / "usr/src/entomologist/systemd/pkcs11-softhsm.conf")
                     .read_text())
    before = cam.requests()
    try:
        cam.fresh_device("cert-pkcs11", KEY_STORAGE="pkcs11",
                         PROVISIONING_API="CreateCertificateFromCsr",
                         PKCS11_LIBRARY=SOFTHSM_LIBRARY, PKCS11_TOKEN_LABEL="entomologist",
                         PKCS11_PIN_FILE="token.pin")
        first = cam.start()
        expect_success(first, "a first boot with its key in SoftHSM2")
        if cam.requests()[1] != before[1] + 1:
            raise Failed(f"no CreateCertificateFromCsr request: {cam.requests()}")
        files = sorted(p.name for p in (cam.conf_dir / "cert-pkcs11").iterdir())
        if "private.pem.key" in files or "certificate.pem.crt" not in files:
            raise Failed(f"CERT_DIR in pkcs11 mode holds {files}")
        later = cam.start()
        expect_success(later, "a later boot with its key in SoftHSM2")
        return f"CSR signed in the token, CERT_DIR {files}, later boot exit 0"
    finally:
        cam.remove_dropin("pkcs11")
        cam.back_to_provisioned()


def no_seccomp_kill(cam: Camera) -> str:
    cam.journal()
    if cam.sigsys:
        raise Failed("killed by seccomp: " + "; ".join(cam.sigsys))
    return "no run of any scenario was killed by SIGSYS"


# The named checks, in order; the first two are the two boots.
SCENARIOS: list[tuple[str, Callable[[Camera], str]]] = [
    ("first boot provisions and reports", first_boot),
    ("second boot reports only", second_boot),
    ("seccomp kill mode: first and later boot", seccomp_kill_mode),
    ("-v through a drop-in: the TCP_NODELAY line", verbose_nodelay),
    ("stand-in down: 75, restarted after RestartSec, then done", standin_down),
    ("configuration error: 78, not restarted", config_error),
    ("refusal: 65, not restarted", refusal),
    ("three bugs in a row: ExecCondition skips until /run is cleared", three_bugs),
    ("read-only /etc/entomologist on a provisioned camera reports", read_only_config),
    ("/data layout with its documented drop-in", data_layout),
    ("boot.py --check by hand sees the unit's sandbox", check_sees_the_sandbox),
    ("SIGTERM during a run: one line, the next run completes", sigterm),
    ("SIGTERM during RegisterThing: the registration is kept", sigterm_registering),
    ("memory limit in the unit (MemoryMax)", memory_limit),
    ("SoftHSM2 drop-in with KEY_STORAGE pkcs11", softhsm),
    ("seccomp kill mode: no path of the flow killed", no_seccomp_kill),
]


# ------------------------------------------------------------------ the run

@dataclass
class Outcome:
    name: str
    passed: bool
    detail: str
    seconds: float


def check(name: str, body: Callable[[], str], outcomes: list[Outcome]) -> None:
    t0 = time.monotonic()
    try:
        detail, passed = body(), True
    except Failed as exc:
        detail, passed = str(exc), False
    except subprocess.TimeoutExpired as exc:
        detail = f"{shlex.join(map(str, exc.cmd))} still running after {exc.timeout} s"
        passed = False
    except Exception as exc:  # a scenario's own bug must not hide the other scenarios
        detail, passed = "".join(traceback.format_exception(exc)).rstrip(), False
    outcome = Outcome(name, passed, detail, time.monotonic() - t0)
    outcomes.append(outcome)
    print(f"{'PASS' if passed else 'FAIL'} {name} ({outcome.seconds:.1f} s): "
          f"{detail}", flush=True)


def system_test(args: argparse.Namespace) -> tuple[dict, list[Outcome]]:
    from iot_standin import StandIn
    timings: dict[str, float] = {}
    outcomes: list[Outcome] = []
    mirror = args.mirror or it.apt_mirror()
    started = time.monotonic()
    with ExitStack() as stack:
        t0 = time.monotonic()
        base, warm = it.base_root(args.cache, args.arch, mirror, INCLUDE)
        timings["debootstrap"] = time.monotonic() - t0
        log.info("base root %s (%s) in %.0f s", base, "cached" if warm else "made",
                 timings["debootstrap"])

        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        upper, work, root = run_dir / "upper", run_dir / "work", run_dir / "root"
        for d in (upper, work, root):
            d.mkdir()
        it.mount(stack, ["-t", "overlay", "overlay", "-o",
                         f"lowerdir={base},upperdir={upper},workdir={work}"], root)
        with ExitStack() as chroot:
            it.mount(chroot, ["-t", "proc", "proc"], root / "proc")
            it.mount(chroot, ["--bind", "/sys"], root / "sys")
            it.mount(chroot, ["--bind", "/dev"], root / "dev")
            timings["install"] = it.install_in_image(chroot, root,
                                                     args.cache / f"pip-{args.arch}")
        log.info("make install DESTDIR=/ in the root: %.0f s", timings["install"])
        exec_start, _ = it.unit_exec_start(root)

        # The camera's cloud: the stand-in on the host's loopback, its config,
        # claim files and CA written into the camera's /etc/entomologist.
        # "Both" mode: the claim policy allows both APIs (the PKCS#11 scenario uses CSRs).
        # The hook on, as in the field; the scenarios provision this one serial afresh
        # about ten times within its window, over the default daily budget of 5.
        standin = stack.enter_context(StandIn(root / CONF_DIR.lstrip("/"), mode="Both",
                                              parameters={"DailyRegistrationBudget": "50"}))
        container = Container(root, run_dir / "console.log")
        stack.callback(container.poweroff)
        cam = Camera(container, root, standin, exec_start)

        def boot_and(body: Callable[[Camera], str], n: int) -> Callable[[], str]:
            def go() -> str:
                container.poweroff()
                timings[f"boot {n}"] = container.boot()
                try:
                    return body(cam)
                finally:
                    if n == 2:
                        # From here on a retry comes after 1 s, not 60.
                        cam.write_dropin("40-restart-sec", dropin(f"RestartSec={RESTART_SEC}"))
            return go

        def settled(body: Callable[[Camera], str]) -> Callable[[], str]:
            def go() -> str:
                cam.settle()
                return body(cam)
            return go

        for i, (name, body) in enumerate(SCENARIOS):
            if i < 2:
                check(name, boot_and(body, i + 1), outcomes)
            elif container.ready:
                check(name, settled(body), outcomes)
            else:
                outcomes.append(Outcome(name, False, "not run: the container did not boot", 0))
                print(f"FAIL {name}: not run: the container did not boot", flush=True)
        container.poweroff()
    timings["total"] = time.monotonic() - started
    return {"cache": "warm" if warm else "cold", "mirror": mirror, "seconds": timings}, outcomes


def report(result: dict, outcomes: list[Outcome]) -> str:
    s = result["seconds"]
    failed = [o.name for o in outcomes if not o.passed]
    lines = [f"system test, {result['cache']} cache: "
             f"{'passed' if not failed else f'{len(failed)} of {len(outcomes)} checks FAILED'}"]
    for key in ("debootstrap", "install", "boot 1", "boot 2", "total"):
        if key in s:
            lines.append(f"  {key:<12} {s[key]:7.1f} s")
    lines.append(f"  scenarios    {sum(o.seconds for o in outcomes):7.1f} s")
    lines += [f"  FAILED: {name}" for name in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where the debootstrapped root and pip's cache stay between runs "
                             "(default %(default)s)")
    parser.add_argument("--mirror", help="Debian mirror (default: the one apt uses here)")
    parser.add_argument("--json", type=Path, help="also write the outcome and timings here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                               text=True).stdout.strip() or "amd64"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="system-test: %(message)s")
    if os.geteuid() != 0:
        log.error("needs root (debootstrap, mounts, systemd-nspawn): run it with sudo")
        return 77
    if not shutil.which("systemd-nspawn"):
        log.error("FAILED: systemd-nspawn is missing (apt-get install systemd-container)")
        return 1
    it.in_private_mount_namespace(Path(__file__), argv)
    it.exit_on_signals()

    args.cache.mkdir(parents=True, exist_ok=True)
    lock = open(args.cache / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("waiting for another system test on this machine to finish")
        fcntl.flock(lock, fcntl.LOCK_EX)
    mounts_before = it.mount_points()
    code = 0
    try:
        result, outcomes = system_test(args)
        print(report(result, outcomes))
        code = 0 if outcomes and all(o.passed for o in outcomes) else 1
        if args.json:
            args.json.write_text(json.dumps(
                {**result, "checks": [o.__dict__ for o in outcomes]}, indent=2) + "\n")
    except it.Failed as exc:
        log.error("FAILED: %s", exc)
        code = 1
    except subprocess.CalledProcessError as exc:
        log.error("FAILED: %s exited %s", shlex.join(map(str, exc.cmd)), exc.returncode)
        code = 1
    except subprocess.TimeoutExpired as exc:
        log.error("FAILED: %s still running after %s s", shlex.join(map(str, exc.cmd)),
                  exc.timeout)
        code = 1
    finally:
        left = it.mount_points() - mounts_before
        if left:
            log.error("left behind: mounts %s", sorted(left))
            code = code or 1
        lock.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
