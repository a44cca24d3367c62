#!/usr/bin/env python3
"""`make image-test`: install and boot the camera software the way an image builder would.

A Debian bookworm root for the camera's architecture (arm64 by default) is
made with debootstrap and cached outside the work tree. Each run puts a
throw-away overlay on that root, copies the project into it and, inside the
chroot under qemu-user emulation, runs `make install DESTDIR=/` (so the venv
is built by the image's own /usr/bin/python3 with the image's wheels). Then
the installed unit's ExecStart runs there twice against the stand-in on the
host's loopback (a chroot shares the host's network): a first boot that
provisions and a second boot, whose files, modes and boot messages must match
a reference run of the same boot.py on this machine. Last, the image's own
systemd-analyze verifies the installed unit.

Everything it mounts or registers (binfmt_misc, qemu's handler, proc, sys,
dev, the overlay) is undone on the way out, failure and SIGTERM included; the
run also lives in a private mount namespace, so even a SIGKILL leaves no
mount behind (a binfmt registration would stay: the kernel keeps those).

Run as root: make image-test (see README, Tests).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("image-test")

SUITE = "bookworm"
# What the image must hold besides a minimal base: the install needs make and
# venv, pip needs the CA bundle, the unit check needs systemd-analyze.
INCLUDE = ("ca-certificates", "make", "python3-venv", "systemd")
# Debian architecture -> (uname -m of a native machine, binfmt handler name,
# ELF e_machine of its shared objects).
ARCHES = {
    "arm64": ("aarch64", "qemu-aarch64", 183),
    "armhf": ("armv7l", "qemu-arm", 40),
}
DEFAULT_CACHE = Path("/var/cache/entomologist-image-test")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
SRC_IN_IMAGE = "/usr/src/entomologist"
UNIT = "entomologist-provision.service"
UNITDIR = "/etc/systemd/system"
# As on x86_64: the pair, the CA copy, the template's deviceConfiguration (the
# stand-in applies cloud/stack.yaml, which returns one) and the run lock.
EXPECTED_CERT_DIR = {"AmazonRootCA1.pem": 0o644, "certificate.pem.crt": 0o644,
                     "private.pem.key": 0o600, "device-configuration.json": 0o644,
                     "run.lock": 0o600}
# The chroot gets a clean environment: only what reaches the network passes.
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "NO_PROXY", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST",
              "PIP_DEFAULT_TIMEOUT")
UNSHARED_MARK = "ENTO_IMAGE_TEST_UNSHARED"
# Where pip in the image finds the build host's CA bundle (see host_ca).
HOST_CA_IN_IMAGE = "/etc/ssl/build-host-ca.crt"


class Failed(Exception):
    """A check of the image failed; the message says which."""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log.debug("$ %s", shlex.join(cmd))
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def du(path: Path) -> int:
    """Bytes on disk under path (one file system)."""
    out = run(["du", "-sx", "--block-size=1", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------ the host

def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for SUITE (main), else Debian's CDN."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list")),
             *sorted((sources / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.split()
                if ("deb" in fields.get("types", []) and SUITE in fields.get("suites", [])
                        and "main" in fields.get("components", []) and fields.get("uris")):
                    return fields["uris"][0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if words[:1] != ["deb"]:
                    continue
                words = words[1:]
                if len(words) >= 3 and words[1] == SUITE and "main" in words[2:]:
                    return words[0]
    return DEFAULT_MIRROR


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def binfmt_entries() -> set[str]:
    if not (BINFMT / "register").exists():
        return set()
    return {p.name for p in BINFMT.iterdir() if p.name not in ("register", "status")}


def mount(stack: ExitStack, args: list[str], target: Path) -> None:
    run(["mount", *args, str(target)])
    stack.callback(umount, target)


def umount(target: Path) -> None:
    for _ in range(20):
        if run(["umount", str(target)], check=False, stderr=subprocess.DEVNULL).returncode == 0:
            return
        time.sleep(0.25)
    # Something still holds it (a process we could not stop): detach it rather
    # than leave it mounted.
    log.warning("%s is busy; detaching it (umount -l)", target)
    run(["umount", "-l", str(target)])


def emulation(stack: ExitStack, arch: str) -> None:
    """qemu-user for arch's binaries through binfmt_misc, undone on exit if it was not there."""
    machine, handler, _ = ARCHES[arch]
    if platform.machine() == machine or (arch == "armhf" and platform.machine() == "aarch64"):
        return
    if not (BINFMT / "register").exists():
        mount(stack, ["-t", "binfmt_misc", "binfmt_misc"], BINFMT)
        log.info("binfmt_misc: mounted for this run")
    entry = BINFMT / handler
    if entry.exists():
        lines = entry.read_text().splitlines()
        flags = next((l.split()[1] for l in lines if l.startswith("flags:")), "")
        if lines[0] != "enabled" or "F" not in flags:
            raise Failed(f"{entry} is registered but {lines[0]}, flags {flags!r}: the chroot "
                         "needs an enabled handler with the F flag (qemu-user-static's)")
        log.info("binfmt_misc: %s already registered; left as found", handler)
        return
    conf = Path(f"/usr/lib/binfmt.d/{handler}.conf")
    if not conf.exists():
        raise Failed(f"{conf} is missing: apt-get install qemu-user-static")
    # One write() per rule: the kernel parses each write as a whole registration.
    (BINFMT / "register").write_text(conf.read_text().strip())
    stack.callback(unregister, entry)
    log.info("binfmt_misc: registered %s for this run", handler)


def unregister(entry: Path) -> None:
    if entry.exists():
        entry.write_text("-1")


# ------------------------------------------------------------------ the image

def base_root(cache: Path, arch: str, mirror: str,
              include: tuple[str, ...] = INCLUDE) -> tuple[Path, bool]:
    """The debootstrapped root, made once per (suite, arch, mirror, packages)."""
    base = cache / f"{SUITE}-{arch}"
    base.mkdir(parents=True, exist_ok=True)
    want = {"suite": SUITE, "arch": arch, "mirror": mirror, "include": list(include)}
    try:
        if (base / "root").is_dir() and json.loads((base / "stamp.json").read_text()) == want:
            return base / "root", True
    except (OSError, ValueError):
        pass
    make_base_root(base, arch, mirror, want)
    return base / "root", False


def make_base_root(base: Path, arch: str, mirror: str, want: dict) -> None:
    root, stamp = base / "root", base / "stamp.json"
    # A half-made root is never used: it is built aside and renamed when complete.
    partial = base / "root.partial"
    for old in (partial, root):
        if old.exists():
            shutil.rmtree(old)
    stamp.unlink(missing_ok=True)
    log.info("debootstrap %s %s from %s (a few minutes, more under emulation)", SUITE, arch,
             mirror)
    try:
        run(["debootstrap", f"--arch={arch}", "--variant=minbase",
             f"--include={','.join(want['include'])}", SUITE, str(partial), mirror],
            stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        log.error("debootstrap failed; its log: %s", partial / "debootstrap/debootstrap.log")
        raise
    partial.rename(root)
    stamp.write_text(json.dumps(want) + "\n")


def project_files(src: Path) -> list[str]:
    """What a fresh clone holds plus uncommitted work; never the venv or caches."""
    try:
        out = run(["git", "-C", str(src), "ls-files", "-z", "--cached", "--others",
                   "--exclude-standard"], capture_output=True)
        return [p for p in out.stdout.decode().split("\0") if p and (src / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}
        return [str(p.relative_to(src)) for p in src.rglob("*")
                if p.is_file() and not skip.intersection(p.relative_to(src).parts)]


def copy_project(src: Path, dest: Path) -> int:
    files = project_files(src)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
    return len(files)


def host_ca(root: Path) -> dict[str, str]:
    """pip in the image trusts what this host trusts.

    A build host behind a TLS-inspecting proxy has the proxy's CA in its own
    bundle only; the image's stock bundle would refuse PyPI. The copy lives in
    the run's overlay and is gone with it.
    """
    bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        return {}
    shutil.copy(bundle, root / HOST_CA_IN_IMAGE.lstrip("/"))
    return {"PIP_CERT": HOST_CA_IN_IMAGE}


def chroot_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8"}
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    env.update(extra or {})
    return env


def gone(pgid: int, limit: float = 10.0) -> None:
    """Wait, bounded, until no process of the group is left holding the root."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def in_chroot(root: Path, cmd: list[str], extra_env: dict[str, str] | None = None,
              check: bool = True, capture_output: bool = False, umask: int = -1,
              timeout: float | None = None) -> subprocess.CompletedProcess:
    """cmd in the image; on any way out, its whole process group goes with it.

    make starts pip, pip starts compilers: killing only the first would leave
    the others running in the root and its mounts busy.
    """
    args = ["chroot", str(root), *cmd]
    log.debug("$ %s", shlex.join(args))
    pipe = subprocess.PIPE if capture_output else None
    with subprocess.Popen(args, env=chroot_env(extra_env), stdout=pipe, stderr=pipe,
                          text=True, umask=umask, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            gone(proc.pid)
            raise
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def install_in_image(stack: ExitStack, root: Path, pip_cache: Path) -> float:
    """`make install DESTDIR=/` in the image's chroot, as an image builder runs it.

    proc, sys and dev must already be mounted in root; pip's cache stays in
    pip_cache between runs. Returns the install's seconds.
    """
    pip_cache.mkdir(parents=True, exist_ok=True)
    (root / "root/.cache/pip").mkdir(parents=True, exist_ok=True)
    mount(stack, ["--bind", str(pip_cache)], root / "root/.cache/pip")
    shutil.copy(Path("/etc/resolv.conf").resolve(), root / "etc/resolv.conf")
    hosts = root / "etc/hosts"
    if not hosts.exists():
        # debootstrap writes none; every image builder does (pi-gen's stage 0),
        # and the device config names the stand-in "localhost".
        hosts.write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    # `make install DESTDIR=` must not call systemctl: in an image it would
    # act on the build host, or fail. This stand-in makes a call loud.
    guard = root / "usr/local/sbin/systemctl"
    guard.write_text("#!/bin/sh\necho \"systemctl $* called during an image install\" >&2\n"
                     "exit 1\n")
    guard.chmod(0o755)
    n = copy_project(ROOT, root / SRC_IN_IMAGE.lstrip("/"))
    log.info("copied %d project files to %s in the image; make install DESTDIR=/ "
             "in the chroot", n, SRC_IN_IMAGE)
    t0 = time.monotonic()
    in_chroot(root, ["make", "-C", SRC_IN_IMAGE, "install", "DESTDIR=/"],
              extra_env=host_ca(root))
    guard.unlink()
    return time.monotonic() - t0


def elf_machine(path: Path) -> int:
    with open(path, "rb") as f:
        header = f.read(20)
    return int.from_bytes(header[18:20], "little")


def unit_exec_start(root: Path) -> tuple[list[str], int]:
    """The installed unit's ExecStart and UMask: the boot runs exactly what systemd would."""
    exec_start, umask = None, 0o022
    for line in (root / UNITDIR.lstrip("/") / UNIT).read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ExecStart":
            exec_start = shlex.split(value.strip())
        elif key.strip() == "UMask":
            umask = int(value.strip(), 8)
    if not exec_start:
        raise Failed(f"no ExecStart in the installed {UNIT}")
    return exec_start, umask


def cert_dir_listing(cert_dir: Path) -> dict[str, int]:
    listing = {".": stat.S_IMODE(cert_dir.stat().st_mode)}
    listing.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in cert_dir.iterdir()})
    return listing


# ------------------------------------------------------------------ checks

def check_install(root: Path, arch: str) -> str:
    prefix = root / "opt/entomologist"
    cfg = (prefix / "venv/pyvenv.cfg").read_text()
    if "home = /usr/bin" not in cfg:
        raise Failed(f"the venv was not made by the image's /usr/bin/python3:\n{cfg}")
    link = root / UNITDIR.lstrip("/") / "multi-user.target.wants" / UNIT
    if os.readlink(link) != f"{UNITDIR}/{UNIT}":
        raise Failed(f"{link} points to {os.readlink(link)}")
    _, _, e_machine = ARCHES[arch]
    exts = list(prefix.glob("venv/lib/python3*/site-packages/_awscrt*.so"))
    if len(exts) != 1 or elf_machine(exts[0]) != e_machine:
        raise Failed(f"awscrt's extension is not an {arch} binary: {exts}")
    wheel = next(prefix.glob("venv/lib/python3*/site-packages/awscrt-*.dist-info/WHEEL"))
    tags = [l.split(":", 1)[1].strip() for l in wheel.read_text().splitlines()
            if l.startswith("Tag:")]
    out = in_chroot(root, ["/opt/entomologist/venv/bin/python", "-c",
                           "import platform, awscrt, awsiot, cryptography; "
                           "print(platform.machine())"], capture_output=True)
    if out.stdout.strip() != ARCHES[arch][0]:
        raise Failed(f"the venv's python runs as {out.stdout.strip()!r}")
    return ", ".join(tags)


def boot(root: Path, exec_start: list[str], umask: int) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    proc = in_chroot(root, exec_start, check=False, capture_output=True, umask=umask,
                     timeout=300)
    return time.monotonic() - t0, proc


def check_boots(root: Path, standin, reference: dict[str, int], exec_start: list[str],
                umask: int, timings: dict) -> None:
    for n in (1, 2):
        seconds, proc = boot(root, exec_start, umask)
        timings[f"boot {n}"] = seconds
        log.info("boot %d under emulation: exit %d in %.1f s", n, proc.returncode, seconds)
        if proc.returncode != 0:
            raise Failed(f"boot {n} exited {proc.returncode}:\n{proc.stderr}")
    listing = cert_dir_listing(root / "etc/entomologist/cert")
    want = {".": 0o700, **EXPECTED_CERT_DIR}
    if listing != want or listing != reference:
        raise Failed(f"CERT_DIR in the image {fmt_modes(listing)}; expected {fmt_modes(want)}, "
                     f"x86_64 reference {fmt_modes(reference)}")
    boots = standin.wait_for("boot", 2)
    serial = standin.serial
    payload = json.dumps({"serialID": serial, "bootStatus": True})
    if [(b["topic"], b["payload"]) for b in boots] != [(f"cameraDevice/{serial}/booted", payload)] * 2:
        raise Failed(f"boot messages: {boots}")
    if (len(standin.events("create-request")), len(standin.events("register-request"))) != (1, 1):
        raise Failed("the second boot asked for another certificate")
    device = json.loads(standin.config_path.read_text())["device"]
    if device.get("PROVISION_STATUS") != "True" or not device.get("THING_NAME"):
        raise Failed(f"config after two boots: {device}")


def fmt_modes(listing: dict[str, int]) -> str:
    return "{" + ", ".join(f"{k} {v:04o}" for k, v in sorted(listing.items())) + "}"


def reference_run(tmp: Path, umask: int) -> dict[str, int]:
    """The same first boot with this machine's Python and the source tree's boot.py."""
    from iot_standin import StandIn
    with StandIn(tmp) as standin:
        proc = run([sys.executable, str(ROOT / "boot.py"), "--config", str(standin.config_path)],
                   check=False, capture_output=True, text=True, umask=umask, timeout=120)
        if proc.returncode != 0:
            raise Failed(f"the x86_64 reference boot exited {proc.returncode}:\n{proc.stderr}")
    return cert_dir_listing(tmp / "cert")


def verify_unit(root: Path) -> str:
    proc = in_chroot(root, ["systemd-analyze", "verify", f"{UNITDIR}/{UNIT}"], check=False,
                     capture_output=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or output:
        raise Failed(f"systemd-analyze verify in the image: exit {proc.returncode}\n{output}")
    return "exit 0, no output"


# ------------------------------------------------------------------ the run

def image_test(args: argparse.Namespace) -> dict:
    from iot_standin import StandIn
    timings: dict[str, float] = {}
    disk: dict[str, int] = {}
    mirror = args.mirror or apt_mirror()
    cache = args.cache
    started = time.monotonic()
    with ExitStack() as stack:
        emulation(stack, args.arch)

        t0 = time.monotonic()
        base, warm = base_root(cache, args.arch, mirror)
        timings["debootstrap"] = time.monotonic() - t0
        disk["debootstrap"] = du(base)
        log.info("base root %s (%s): %.0f s, %s", base, "cached" if warm else "made",
                 timings["debootstrap"], mib(disk["debootstrap"]))

        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        upper, work, root = run_dir / "upper", run_dir / "work", run_dir / "root"
        for d in (upper, work, root):
            d.mkdir()
        # An overlay keeps the cached root pristine: each run installs into a fresh image.
        mount(stack, ["-t", "overlay", "overlay", "-o",
                      f"lowerdir={base},upperdir={upper},workdir={work}"], root)
        mount(stack, ["-t", "proc", "proc"], root / "proc")
        mount(stack, ["--bind", "/sys"], root / "sys")
        mount(stack, ["--bind", "/dev"], root / "dev")
        pip_cache = cache / f"pip-{args.arch}"
        timings["install"] = install_in_image(stack, root, pip_cache)
        disk["install"] = du(root / "opt/entomologist")
        disk["pip cache"] = du(pip_cache)
        tags = check_install(root, args.arch)
        log.info("installed in %.0f s, %s in /opt/entomologist; awscrt wheel %s",
                 timings["install"], mib(disk["install"]), tags)

        exec_start, umask = unit_exec_start(root)
        with tempfile.TemporaryDirectory(prefix="ento-image-ref-") as ref:
            reference = reference_run(Path(ref), umask)
        conf_dir = root / "etc/entomologist"
        with StandIn(conf_dir) as standin:
            check_boots(root, standin, reference, exec_start, umask, timings)
        log.info("two boots in the image: CERT_DIR %s as on %s; two boot messages",
                 fmt_modes(reference), platform.machine())
        verify = verify_unit(root)
        log.info("systemd-analyze verify %s in the image: %s", UNIT, verify)
        disk["run overlay"] = du(upper)
    timings["total"] = time.monotonic() - started
    return {"arch": args.arch, "cache": "warm" if warm else "cold", "mirror": mirror,
            "seconds": timings, "bytes": disk, "awscrt_wheel": tags}


def report(result: dict) -> str:
    s, b = result["seconds"], result["bytes"]
    rows = [("debootstrap", s["debootstrap"], f"root {mib(b['debootstrap'])}"),
            ("install", s["install"], f"/opt/entomologist {mib(b['install'])}, "
                                      f"pip cache {mib(b['pip cache'])}"),
            ("first boot", s["boot 1"], ""), ("second boot", s["boot 2"], ""),
            ("total", s["total"], f"this run's overlay {mib(b['run overlay'])} (removed)")]
    lines = [f"image test {result['arch']}, {result['cache']} cache: passed"]
    lines += [f"  {name:<12} {'' if sec is None else f'{sec:7.1f} s'}  {note}"
              for name, sec, note in rows]
    return "\n".join(lines)


def in_private_mount_namespace(script: Path, argv: list[str] | None) -> None:
    """Runs script again in a private mount namespace, unless this is that run.

    Whatever happens to the process, its mounts die with it and the host
    never sees them.
    """
    if os.environ.get(UNSHARED_MARK) == "1":
        return
    os.environ[UNSHARED_MARK] = "1"
    os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", "--",
                          sys.executable, str(script.resolve()),
                          *(sys.argv[1:] if argv is None else argv)])


def exit_on_signals() -> None:
    """SIGTERM, SIGHUP and SIGINT unwind the run like an error: every cleanup step runs
    (SIGINT too when the run was started with it ignored, as by nohup)."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), default="arm64")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where the debootstrapped root and pip's cache stay between runs "
                             "(default %(default)s)")
    parser.add_argument("--mirror", help="Debian mirror (default: the one apt uses here)")
    parser.add_argument("--json", type=Path, help="also write the timings here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="image-test: %(message)s")
    if os.geteuid() != 0:
        log.error("needs root (debootstrap, chroot, mounts): run it with sudo")
        return 77
    in_private_mount_namespace(Path(__file__), argv)
    exit_on_signals()

    args.cache.mkdir(parents=True, exist_ok=True)
    lock = open(args.cache / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # One run at a time on this machine: a second run would find the first
        # one's qemu handler registered, and lose it when the first unregisters it.
        log.info("waiting for another image test on this machine to finish")
        fcntl.flock(lock, fcntl.LOCK_EX)
    mounts_before, binfmt_before = mount_points(), binfmt_entries()
    code = 0
    try:
        result = image_test(args)
        print(report(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    except Failed as exc:
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
        left = mount_points() - mounts_before
        extra = binfmt_entries() - binfmt_before
        if left or extra:
            log.error("left behind: mounts %s, binfmt handlers %s", sorted(left), sorted(extra))
            code = code or 1
        lock.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
