"""`make setup`'s development venv, made where VENV= says (never the suite's own), on
real file systems that fill up as a developer's disk does."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from disk import tmpfs
from e2e import ROOT


def _project(tmp_path) -> Path:
    """The Makefile with a one-package requirements set (a pin of requirements.txt):
    the venv rule is the real one, its inputs small enough for a small disk."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "Makefile", project)
    pin = re.search(r"^cryptography==\S+$", (ROOT / "requirements.txt").read_text(), re.M)
    (project / "requirements.txt").write_text(pin.group(0) + "\n")
    (project / "requirements-dev.txt").write_text("")
    return project


def _make_venv(project, venv):
    return subprocess.run(["make", "-C", str(project), f"{venv}/.installed", f"VENV={venv}"],
                          capture_output=True, text=True, timeout=600)


def _sound(venv):
    """The venv runs its uv and imports every module of its requirement."""
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import subprocess, uv\n"
         "subprocess.run([uv.find_uv_bin(), '--version'], check=True)\n"
         "from cryptography import x509, utils\n"
         "from cryptography.hazmat.primitives.asymmetric import ec\n"],
        capture_output=True, text=True)


@pytest.mark.heavy
def test_setup_run_again_after_a_full_disk_makes_a_sound_venv(tmp_path):
    # A disk that fills while the venv is made leaves a package half copied whose
    # metadata says it is installed (a requirement uv copies in parallel; on a
    # smaller disk, uv's own binary): the run after the space is freed must not take
    # that venv as made. Both are the one rule (made from empty unless finished),
    # so one disk size tests it: each case costs 5 s of CPU.
    size = "48m"
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root")
    project = _project(tmp_path)
    with tmpfs(tmp_path / "disk", size, mode=0o755) as disk:
        venv = disk / "venv"
        first = _make_venv(project, venv)
        assert first.returncode != 0 and not (venv / ".installed").exists(), first.stdout
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        again = _make_venv(project, venv)
        assert again.returncode == 0, again.stdout + again.stderr
        sound = _sound(venv)
        assert sound.returncode == 0, sound.stderr


def _setup(project, venv, *args):
    """The venv rule as `make setup` runs it (UV_VERSION none: a rule that went on
    fails soon after emptying, instead of installing)."""
    return subprocess.run(["make", "-C", str(project), f"VENV={venv}", "UV_VERSION=0.0.0",
                           *args, f"{venv}/.installed"],
                          capture_output=True, text=True, timeout=120)


def test_setup_never_empties_a_folder_that_holds_more_than_a_venv(tmp_path):
    # `python -m venv .` in a checkout is a common habit: that folder has a pyvenv.cfg,
    # and `venv --clear` would delete the checkout with it.
    project = _project(tmp_path)
    mine = tmp_path / "mine"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(mine)], check=True)
    (mine / "notes.txt").write_text("a week of work")
    (mine / ".git").mkdir()
    proc = _setup(project, mine)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is not a venv this Makefile made" in proc.stderr
    assert (mine / "notes.txt").read_text() == "a week of work" and (mine / ".git").is_dir()


def test_setup_refuses_a_venv_path_with_a_blank_and_empties_neither_half(tmp_path):
    # Unquoted, "data x" is two folders to make (the target too: make splits it), and
    # `venv --clear data x` empties ./data.
    project = _project(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "precious").write_text("kept")
    os.utime(data, (0, 0))  # older than the requirements: make would "rebuild" it
    proc = subprocess.run(["make", "-C", str(project), "setup", f"VENV={data} x",
                           "UV_VERSION=0.0.0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "VENV" in proc.stderr
    assert sorted(p.name for p in data.iterdir()) == ["precious"]
    assert not (project / "x").exists()


def test_clean_never_removes_a_venv_path_that_is_not_a_venv(tmp_path):
    # VENV comes from the environment too (`VENV ?= .venv`): one exported for another
    # purpose must not make `make clean` an `rm -rf` of that folder.
    project = _project(tmp_path)
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of work")
    proc = subprocess.run(["make", "-C", str(project), "clean"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "VENV": str(mine)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is not a venv this Makefile made" in proc.stderr
    assert (mine / "notes.txt").read_text() == "a week of work"
