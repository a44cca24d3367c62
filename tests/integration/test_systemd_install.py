"""The systemd unit, installation into a staging tree, and the scripts as a service runs them."""
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from disk import fill, tmpfs
from e2e import ROOT, device_doc, run_script

UNIT = ROOT / "systemd" / "entomologist-provision.service"


def unit_lines():
    return UNIT.read_text().splitlines()


def directives():
    found = {}
    for line in unit_lines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def local_unit(tmp_path):
    """The unit with ExecStart pointed at this machine's interpreter and checkout."""
    text = UNIT.read_text().replace("/opt/entomologist/venv/bin/python", sys.executable)
    text = text.replace("/opt/entomologist/boot.py", str(ROOT / "boot.py"))
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_systemd_analyze_verify_prints_nothing(tmp_path):
    proc = subprocess.run(["systemd-analyze", "verify", str(local_unit(tmp_path))],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_security_exposure_is_at_most_2_5(tmp_path):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=25",
                           "--no-pager", str(local_unit(tmp_path))],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert score and float(score.group(1)) <= 2.5


def test_unit_runs_once_per_boot_retries_transient_failures_and_stops_on_config_errors():
    d = directives()
    assert d["Type"] == ["oneshot"] and d["RemainAfterExit"] == ["yes"]
    assert d["Wants"] == ["network-online.target"]
    assert set(d["After"][0].split()) == {"network-online.target", "time-sync.target"}
    assert d["ConditionPathExists"] == ["/etc/entomologist/ento.conf"]
    assert d["Restart"] == ["on-failure"] and int(d["RestartSec"][0]) > 0
    assert "78" in d["RestartPreventExitStatus"][0].split()
    assert "75" not in d["RestartPreventExitStatus"][0].split()
    timeout = int(d["TimeoutStartSec"][0])
    run_limit = int(re.search(r"--timeout (\d+)", d["ExecStart"][0]).group(1))
    assert run_limit < timeout < 600
    assert d["UMask"] == ["0077"] and d["SyslogIdentifier"]


def size(value: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


def test_unit_bounds_memory_with_headroom_over_the_measured_peak():
    d = directives()
    # The highest measured peak: a first boot in CSR mode, 44 MiB (README, Performance).
    peak = 44 << 20
    high, limit = size(d["MemoryHigh"][0]), size(d["MemoryMax"][0])
    assert 2 * peak <= high < limit <= 4 * peak
    assert d["MemorySwapMax"] == ["0"]


def test_unit_gives_a_stopped_run_more_than_its_registration_grace():
    from entomologist.stop import GRACE_S
    assert int(directives()["TimeoutStopSec"][0]) >= 3 * GRACE_S


def test_unit_sandbox_leaves_only_the_config_folder_writable():
    d = directives()
    assert d["ProtectSystem"] == ["strict"]
    assert d["ReadWritePaths"] == ["/etc/entomologist"]
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges"):
        assert d[key] == ["yes"], key
    assert d["CapabilityBoundingSet"] == [""]
    assert d["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in d["SystemCallFilter"]


def test_unit_has_no_trailing_comments():
    for line in unit_lines():
        if line and not line.startswith(("#", ";")):
            assert "#" not in line.split("=", 1)[-1] or line.startswith("ExecStart"), line


@pytest.fixture(scope="session")
def staged(tmp_path_factory):
    """`make install` into a staging tree once per run: pytest-xdist's workers share
    it, built by the first that needs it while the others wait on a lock.  Read only:
    a test that changes the tree changes a copy of it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's own folder, above each worker's
    root, done = shared / "staged-rootfs", shared / "staged-rootfs.done"
    with open(shared / "staged-rootfs.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a worker's failed attempt
            root.mkdir()
            proc = subprocess.run(["make", "-C", str(ROOT), "install", f"DESTDIR={root}",
                                   f"INSTALL_PYTHON={sys.executable}"],
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            done.touch()
    return root


@pytest.mark.heavy
def test_install_into_a_staging_tree_lays_out_scripts_venv_unit_and_enablement(staged):
    app = staged / "opt" / "entomologist"
    for name in ("boot.py", "update_boot_status.py", "AmazonRootCA1.pem"):
        assert (app / name).is_file(), name
    package = sorted(p.name for p in (ROOT / "entomologist").glob("*.py"))
    assert sorted(p.name for p in (app / "entomologist").glob("*.py")) == package
    assert not (app / "iot_standin.py").exists() and not (app / "standin").exists()
    assert (app / "venv" / "bin" / "python").exists()
    # Compiled ahead: under ProtectSystem=strict nothing can be cached at boot.
    cached = {p.name.split(".")[0] for p in (app / "__pycache__").glob("*.pyc")}
    assert cached == {"boot", "update_boot_status"}
    cached = {p.name.split(".")[0] for p in (app / "entomologist" / "__pycache__").glob("*.pyc")}
    assert cached == {name[:-3] for name in package}
    unit = staged / "etc" / "systemd" / "system" / UNIT.name
    assert unit.read_text() == UNIT.read_text()
    link = staged / "etc" / "systemd" / "system" / "multi-user.target.wants" / UNIT.name
    assert os.readlink(link) == f"/etc/systemd/system/{UNIT.name}"
    assert (staged / "etc" / "entomologist").is_dir()


def test_boot_runs_from_the_installed_venv_against_the_stand_in(staged, standin):
    app = staged / "opt" / "entomologist"
    before = sorted(p.name for p in (app / "__pycache__").iterdir())
    proc = subprocess.run([str(app / "venv" / "bin" / "python"), str(app / "boot.py"),
                           "--config", str(standin.config_path)],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert sorted(p.name for p in (app / "__pycache__").iterdir()) == before
    assert proc.returncode == 0, proc.stderr
    assert device_doc(standin)["device"]["PROVISION_STATUS"] == "True"
    assert len(standin.wait_for("boot")) == 1


def test_uninstall_removes_what_install_added_and_keeps_the_device_config(staged, tmp_path):
    copy = tmp_path / "rootfs"
    shutil.copytree(staged, copy, symlinks=True)
    (copy / "etc" / "entomologist" / "ento.conf").write_text("{}")
    proc = subprocess.run(["make", "-C", str(ROOT), "uninstall", f"DESTDIR={copy}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (copy / "opt" / "entomologist").exists()
    assert not (copy / "etc" / "systemd" / "system" / UNIT.name).exists()
    assert not (copy / "etc" / "systemd" / "system" / "multi-user.target.wants" /
                UNIT.name).is_symlink()
    assert (copy / "etc" / "entomologist" / "ento.conf").read_text() == "{}"


def test_uninstall_from_a_shared_prefix_removes_only_what_install_put_there(staged, tmp_path):
    # PREFIX=/usr/local (as autotools' prefix) puts the scripts, the package and the venv
    # beside other software: uninstall must take those away, not the whole folder.
    copy = tmp_path / "rootfs"
    shutil.copytree(staged, copy, symlinks=True)
    prefix = copy / "usr" / "local"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "other-tool").write_text("#!/bin/sh\n")
    (prefix / "share" / "other").mkdir(parents=True)
    for entry in (copy / "opt" / "entomologist").iterdir():
        entry.rename(prefix / entry.name)
    (copy / "opt" / "entomologist").rmdir()
    proc = subprocess.run(["make", "-C", str(ROOT), "uninstall", f"DESTDIR={copy}",
                           "PREFIX=/usr/local"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.relative_to(prefix).as_posix() for p in prefix.rglob("*")) == [
        "bin", "bin/other-tool", "share", "share/other"]
    assert not (copy / "etc" / "systemd" / "system" / UNIT.name).exists()


def make(*args, cwd_root=ROOT):
    return subprocess.run(["make", "-C", str(cwd_root), *args, f"INSTALL_PYTHON={sys.executable}"],
                          capture_output=True, text=True, timeout=600)


def test_install_never_loosens_an_existing_config_folder(staged, tmp_path):
    copy = tmp_path / "rootfs"
    shutil.copytree(staged, copy, symlinks=True)
    config_dir = copy / "etc" / "entomologist"
    config_dir.chmod(0o700)
    proc = make("install", f"DESTDIR={copy}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert oct(config_dir.stat().st_mode & 0o7777) == oct(0o700)
    # Installing again with the same Python keeps its venv, which still runs.
    assert f"keeping {copy}/opt/entomologist/venv (Python " in proc.stdout
    venv_python = copy / "opt" / "entomologist" / "venv" / "bin" / "python"
    assert subprocess.run([str(venv_python), "-c", "import awsiot, awscrt"]).returncode == 0


def test_install_in_a_chroot_without_a_running_systemd_enables_the_unit_by_its_symlink(
        staged, tmp_path):
    # As in an image's chroot: no DESTDIR, and systemd not running there (no
    # /run/systemd/system); systemctl would fail at daemon-reload.
    copy = tmp_path / "rootfs"
    shutil.copytree(staged, copy, symlinks=True)
    unitdir = copy / "etc" / "systemd" / "system"
    (unitdir / "multi-user.target.wants" / UNIT.name).unlink()
    config_dir_existed = os.path.isdir("/etc/entomologist")
    try:
        proc = make("install", f"PREFIX={copy}/opt/entomologist", f"UNITDIR={unitdir}",
                    f"SYSTEMD_RUNDIR={copy}/run/systemd/system")
    finally:
        if not config_dir_existed and os.path.isdir("/etc/entomologist"):
            os.rmdir("/etc/entomologist")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "systemd is not running" in proc.stdout
    assert "systemctl" not in proc.stderr
    link = unitdir / "multi-user.target.wants" / UNIT.name
    assert os.readlink(link) == str(unitdir / UNIT.name)


def test_a_second_uninstall_prints_no_error(staged, tmp_path):
    copy = tmp_path / "rootfs"
    shutil.copytree(staged, copy, symlinks=True)
    first = make("uninstall", f"DESTDIR={copy}")
    second = make("uninstall", f"DESTDIR={copy}")
    for proc in (first, second):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        output = proc.stdout + proc.stderr
        assert "Error" not in output and "ignored" not in output


def test_on_the_journal_every_line_carries_its_priority(standin, tmp_path):
    err = tmp_path / "stderr"
    with open(err, "w") as stream:
        st = os.fstat(stream.fileno())
        proc = subprocess.run([sys.executable, str(ROOT / "boot.py"), "--config",
                               str(standin.config_path)], stderr=stream,
                              env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                              timeout=60)
    assert proc.returncode == 0
    lines = err.read_text().splitlines()
    assert lines and all(re.match(r"<[3-7]>\S", line) for line in lines), lines
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)


def test_the_flow_runs_with_write_execute_memory_denied(standin):
    """MemoryDenyWriteExecute=yes in the unit: the kernel's PR_SET_MDWE is the same rule."""
    wrapper = (
        "import ctypes, runpy, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
        "    sys.exit(99)\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, str(ROOT / "boot.py"), "--config",
                           str(standin.config_path)], capture_output=True, text=True, timeout=60)
    if proc.returncode == 99:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 and later)")
    assert proc.returncode == 0, proc.stderr
    assert len(standin.wait_for("boot")) == 1


def test_port_443_offers_the_aws_iot_alpn(standin, alpn_listener):
    standin.write_device_config(PORT=443)
    result = run_script("boot.py", standin.config_path, "--timeout", "3")
    assert result.code == 75, result.stderr
    assert alpn_listener == ["x-amzn-mqtt-ca"], result.stderr


def test_after_three_bugs_in_a_row_the_unit_skips_its_runs_until_the_next_boot(
        tmp_path, monkeypatch, device_files):
    import boot
    (condition,) = directives()["ExecCondition"]
    command = condition.replace("/run/entomologist", str(tmp_path))
    assert command.startswith("/bin/sh -c '") and command.endswith("'")

    def may_run() -> bool:
        # systemd turns "$$" into "$" before it runs the line.
        script = command[len("/bin/sh -c '"):-1].replace("$$", "$")
        return subprocess.run(["/bin/sh", "-c", script]).returncode == 0

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    argv = ["--config", str(device_files.config_path), "--timeout", "1"]
    real_boot = boot.boot
    monkeypatch.setattr(boot, "boot", bug)
    assert may_run() and boot.main(argv) == 70
    assert may_run() and boot.main(argv) == 70
    monkeypatch.setattr(boot, "boot", real_boot)
    assert boot.main(argv) == 75  # nothing listens: transient, and the count starts again
    monkeypatch.setattr(boot, "boot", bug)
    for _ in range(3):
        assert may_run() and boot.main(argv) == 70
    assert not may_run()


def test_the_unit_retries_storage_failures_and_keeps_its_count_across_restarts_only():
    d = directives()
    assert d["RestartPreventExitStatus"][0].split() == ["78", "65"]
    assert d["RuntimeDirectory"] == ["entomologist"]
    assert d["RuntimeDirectoryPreserve"] == ["yes"]


def _reinstall_over(tmp_path, spoil):
    """A tree whose venv ``spoil(venv)`` made, given the venv step of `make install`
    again (the pip install that follows it is the one a fresh install runs, tested
    by the staged tree)."""
    root = tmp_path / "rootfs"
    venv = root / "opt" / "entomologist" / "venv"
    spoil(venv)
    return make("install-venv", f"DESTDIR={root}"), venv


def _venv_with_pip(python, venv):
    """A venv whose pip imports, made in a fraction of ensurepip's time: the
    keep-or-rebuild rule only imports pip, and a rebuilt venv gets the real one."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "pip").mkdir(parents=True)
    (Path(site) / "pip" / "__init__.py").write_text("")


def _a_sound_venv(venv):
    """A venv of its own (not the base interpreter), whose pip and ssl load: what the
    pip install after it needs."""
    return subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sys, pip, ssl; assert sys.prefix != sys.base_prefix; "
                           "print(sys.version)"], capture_output=True, text=True)


@pytest.mark.heavy
def test_install_again_rebuilds_a_venv_an_interrupted_install_left_without_pip(tmp_path):
    # `python -m venv` makes bin/python before ensurepip runs: a power cut or a
    # Ctrl-C in between leaves an interpreter of the right version and no pip.
    def interrupted(venv):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    proc, venv = _reinstall_over(tmp_path, interrupted)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "keeping" not in proc.stdout
    assert _a_sound_venv(venv).returncode == 0


@pytest.mark.heavy
def test_install_again_rebuilds_a_venv_whose_pyvenv_cfg_is_gone(tmp_path):
    # Without pyvenv.cfg its python is the base interpreter itself: pip would
    # install into the system's Python, and the unit would run without the venv.
    def without_its_cfg(venv):
        _venv_with_pip(sys.executable, venv)
        (venv / "pyvenv.cfg").unlink()
    proc, venv = _reinstall_over(tmp_path, without_its_cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "keeping" not in proc.stdout
    assert (venv / "pyvenv.cfg").is_file()
    assert _a_sound_venv(venv).returncode == 0


@pytest.mark.heavy
def test_install_again_rebuilds_a_venv_of_another_python_whole(tmp_path):
    other = shutil.which("python3", path="/usr/bin")
    mine = subprocess.run([sys.executable, "-c", "import sys; print(sys.version)"],
                          capture_output=True, text=True).stdout
    if not other or subprocess.run([other, "-c", "import sys; print(sys.version)"],
                                   capture_output=True, text=True).stdout == mine:
        pytest.skip("needs a /usr/bin/python3 other than this interpreter")

    proc, venv = _reinstall_over(tmp_path, lambda venv: _venv_with_pip(other, venv))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    product = _a_sound_venv(venv)
    assert (product.returncode, product.stdout) == (0, mine), product.stderr


@pytest.mark.heavy
def test_install_again_never_runs_a_venv_python_that_links_to_a_file_others_can_write(tmp_path):
    # The keep-or-rebuild probe runs bin/python as root: a link to a writable file
    # would run its writer's code now, and at every boot if the venv were kept.
    marker = tmp_path / "ran"
    planted = tmp_path / "planted-python"
    planted.write_text(f"#!/bin/sh\ntouch {marker}\nexec {sys.executable} \"$@\"\n")
    planted.chmod(0o777)

    def linked_to_a_writable_file(venv):
        _venv_with_pip(sys.executable, venv)
        (venv / "bin" / "python").unlink()
        (venv / "bin" / "python").symlink_to(planted)
    proc, venv = _reinstall_over(tmp_path, linked_to_a_writable_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists()
    assert "keeping" not in proc.stdout
    assert os.path.realpath(venv / "bin" / "python") == os.path.realpath(sys.executable)


def test_install_refuses_a_venv_folder_that_is_a_symlink_and_empties_nothing(tmp_path):
    # `venv --clear` through the link would empty the folder it points to.
    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    (elsewhere / "theirs").write_text("kept")
    proc, venv = _reinstall_over(tmp_path, lambda venv: (
        venv.parent.mkdir(parents=True), venv.symlink_to(elsewhere)))
    assert proc.returncode != 0
    assert "is a symlink" in proc.stderr
    assert (elsewhere / "theirs").read_text() == "kept"


@pytest.mark.parametrize("target", ["install", "install-venv", "uninstall"])
def test_a_prefix_with_a_blank_is_refused_before_anything_is_made_or_removed(tmp_path, target):
    # Unquoted, "/data x" is two paths: `rm -rf /data x`, `venv --clear /data x/venv`.
    root = tmp_path / "rootfs"
    (root / "data").mkdir(parents=True)
    (root / "data" / "precious").write_text("kept")
    proc = make(target, f"DESTDIR={root}", "PREFIX=/data x", cwd_root=ROOT)
    assert proc.returncode != 0
    assert "must not contain blanks" in proc.stderr
    assert (root / "data" / "precious").read_text() == "kept"
    assert sorted(p.name for p in (root / "data").iterdir()) == ["precious"]
    assert not (ROOT / "x").exists()


@pytest.mark.heavy
def test_install_again_rebuilds_a_venv_whose_pip_was_cut_short_while_unpacking(staged, tmp_path):
    # ensurepip unpacks pip file by file: killed (or out of space) part way, pip's
    # __init__ imports but pip cannot run, and a kept venv fails every install after.
    def cut_short(venv):
        # The staged tree's venv is one `make install` keeps (same Python, whole pip).
        shutil.copytree(staged / "opt" / "entomologist" / "venv", venv, symlinks=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        shutil.rmtree(site / "pip" / "_internal" / "operations")
    proc, venv = _reinstall_over(tmp_path, cut_short)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "keeping" not in proc.stdout
    assert _a_sound_venv(venv).returncode == 0
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run",
                          "--no-index", "--no-deps", str(ROOT)], capture_output=True, text=True)
    assert "No module named" not in pip.stderr, pip.stderr


def an_upgrade(tmp_path) -> Path:
    """A copy of what `make install` installs from (Makefile, scripts, package, unit),
    for a test to change as a new version would."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Makefile", "requirements.txt", "AmazonRootCA1.pem", "README.md",
                 "boot.py", "update_boot_status.py"):
        shutil.copy(ROOT / name, project)
    for folder in ("entomologist", "systemd"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def test_install_again_on_a_disk_that_fills_leaves_every_installed_file_whole(staged, tmp_path):
    # An upgrade that runs out of space part way (or is cut short) must leave each
    # installed file as it was or as the new one, never cut: a cut module fails or
    # silently skips every boot, and a cut unit file loses the unit.
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root")
    project = an_upgrade(tmp_path)  # this tree, with a boot.py that grew
    grown = "".join(f"# line {i} of a longer header\n" for i in range(8000))
    (project / "boot.py").write_text(grown + (ROOT / "boot.py").read_text())
    with tmpfs(tmp_path / "rootfs", "4m", mode=0o755) as root:
        # The installed tree (its venv aside: the upgrade fails before it).
        shutil.copytree(staged, root, symlinks=True, dirs_exist_ok=True,
                        ignore=lambda folder, names: ["venv"] if "venv" in names else [])
        app = root / "opt" / "entomologist"
        installed = [app / name for name in ("boot.py", "update_boot_status.py", "README.md")]
        installed += sorted((app / "entomologist").glob("*.py"))
        installed.append(root / "etc" / "systemd" / "system" / UNIT.name)
        before = {path: path.read_bytes() for path in installed}
        fill(app)
        proc = make("install", f"DESTDIR={root}", cwd_root=project)
        assert proc.returncode != 0, proc.stdout
        for path, old in before.items():
            assert path.read_bytes() == old, f"{path} changed by an install that failed"
            assert oct(os.stat(path).st_mode & 0o777) == "0o644", path
        assert not [p for p in app.rglob(".*.new")], "temporary files left behind"


def test_an_upgrade_that_fills_the_disk_part_way_leaves_scripts_and_package_of_one_version(
        tmp_path):
    # boot.py imports the package: a new boot.py beside the old package (or the other
    # way round) can fail every boot as surely as a cut file would.
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root")
    project = an_upgrade(tmp_path)  # this tree upgraded: a new boot.py, a module that grew
    (project / "boot.py").write_text("# the new version\n" + (ROOT / "boot.py").read_text())
    with open(project / "entomologist" / "errors.py", "a") as grown:
        grown.write("".join(f"# line {i} of a longer module\n" for i in range(40000)))
    with tmpfs(tmp_path / "rootfs", "4m", mode=0o755) as root:
        app = root / "opt" / "entomologist"
        (app / "entomologist").mkdir(parents=True)
        (root / "etc" / "entomologist").mkdir(parents=True)
        installed = [app / name for name in ("boot.py", "update_boot_status.py", "README.md")]
        installed += [app / "entomologist" / p.name for p in (ROOT / "entomologist").glob("*.py")]
        for path in installed:
            shutil.copy(ROOT / path.relative_to(app), path)
            os.chmod(path, 0o644)
        before = {path: path.read_bytes() for path in installed}
        fill(app)  # then room for the scripts, not for the grown module
        filler = app / "filler"
        os.truncate(filler, os.stat(filler).st_size - 512 * 1024)
        proc = make("install", f"DESTDIR={root}", cwd_root=project)
        assert proc.returncode != 0, proc.stdout
        changed = [str(path) for path, old in before.items() if path.read_bytes() != old]
        assert changed == [], proc.stdout + proc.stderr
        assert not [p for p in app.rglob(".*.new")], "temporary files left behind"


@pytest.mark.heavy
def test_an_upgrade_whose_libraries_cannot_be_fetched_leaves_the_old_scripts(staged, tmp_path):
    # New scripts may need the new requirements: with the package index out of reach
    # (no network during an upgrade), they must not be put beside the old libraries.
    project = an_upgrade(tmp_path)
    (project / "boot.py").write_text("# the new version\n" + (ROOT / "boot.py").read_text())
    (project / "requirements.txt").write_text((ROOT / "requirements.txt").read_text()
                                              + "entomologist-not-yet-installed==1.0\n")
    root = tmp_path / "rootfs"
    shutil.copytree(staged, root, symlinks=True)
    app = root / "opt" / "entomologist"
    before = (app / "boot.py").read_bytes()
    # An index that refuses connections (pip says "Retrying": no build tools are installed).
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "1",
           "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}
    proc = subprocess.run(["make", "-C", str(project), "install", f"DESTDIR={root}",
                           f"INSTALL_PYTHON={sys.executable}"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0, proc.stdout
    assert (app / "boot.py").read_bytes() == before, proc.stdout + proc.stderr


@pytest.mark.heavy
def test_install_never_writes_through_a_link_another_user_planted_beside_the_unit(
        staged, tmp_path):
    # A staging tree whose unit folder another user can write (a shared build folder,
    # sticky as /tmp is): a link they planted at the unit's temporary name must not
    # make root write the unit over the file it points to, nor leave them the unit.
    if os.geteuid() != 0:
        pytest.skip("another user needs root")
    copy = tmp_path / "rootfs"
    shutil.copytree(staged, copy, symlinks=True)
    unitdir = copy / "etc" / "systemd" / "system"
    unitdir.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    folder = os.open(unitdir, os.O_RDONLY | os.O_DIRECTORY)  # tmp_path is root's alone
    pid = os.fork()
    if pid == 0:  # the other user
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.symlink(victim, f".{UNIT.name}.new", dir_fd=folder)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(folder)
    assert (unitdir / f".{UNIT.name}.new").is_symlink()
    proc = make("install", f"DESTDIR={copy}")
    assert victim.read_text() == "root's own file\n", proc.stdout + proc.stderr
    installed = unitdir / UNIT.name
    assert not installed.is_symlink() and installed.stat().st_uid == 0
    assert installed.read_text() == UNIT.read_text()


@pytest.mark.parametrize("setting", ["PREFIX=/opt/ento&cam", "DATA_DIR=/data/50%h",
                                     "DATA_DIR=data/entomologist"])
def test_a_path_the_unit_would_read_otherwise_is_refused_before_anything_is_installed(
        tmp_path, setting):
    # The unit is edited by sed (an & in the path inserts the old one) and read by
    # systemd (a % starts a specifier): the unit would name another folder, silently.
    root = tmp_path / "rootfs"
    root.mkdir()
    proc = make("install", f"DESTDIR={root}", setting, cwd_root=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert setting.split("=")[0] in proc.stderr
    assert list(root.iterdir()) == []


@pytest.mark.heavy
def test_an_upgrade_stopped_by_ctrl_c_leaves_the_old_files_and_no_temporary_ones(
        staged, tmp_path):
    import signal
    import time
    copy = tmp_path / "rootfs"
    shutil.copytree(staged, copy, symlinks=True)
    app = copy / "opt" / "entomologist"
    (app / "boot.py").write_text("# the old version\n")
    proc = subprocess.Popen(["make", "-C", str(ROOT), "install", f"DESTDIR={copy}",
                             f"INSTALL_PYTHON={sys.executable}"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (app / ".boot.py.new").exists():  # written beside, the libraries next
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C reaches the terminal's foreground group
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0, output
    assert (app / "boot.py").read_text() == "# the old version\n"
    assert [str(p) for p in copy.rglob(".*.new")] == [], output


def test_a_dry_run_of_install_over_an_installed_tree_changes_nothing(tmp_path):
    # `make -n install` prints what it would do; a recipe line make takes as a
    # recursive make is run even then, and must not be the one that writes the files.
    root = tmp_path / "rootfs"
    app = root / "opt" / "entomologist"
    (app / "entomologist").mkdir(parents=True)
    (app / "boot.py").write_text("# the installed version\n")
    proc = make("-n", "install", f"DESTDIR={root}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "opt", "opt/entomologist", "opt/entomologist/boot.py", "opt/entomologist/entomologist"]
    assert (app / "boot.py").read_text() == "# the installed version\n"
