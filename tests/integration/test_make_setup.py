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
