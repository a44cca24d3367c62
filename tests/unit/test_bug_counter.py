"""The count of runs in a row that ended in a bug, and the unit's ExecCondition that
reads it: a full /run, an empty or garbled count never skips the unit."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

from entomologist import bugs
from disk import fill, tmpfs

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "entomologist-provision.service"


def exec_condition(runtime_dir: Path) -> int:
    """The unit's ExecCondition line, run as systemd runs it: "$$" is a literal "$"
    (systemd expands $NAME and ${NAME} itself), then /bin/sh -c with the quoted script."""
    (line,) = [l for l in UNIT.read_text().splitlines() if l.startswith("ExecCondition=")]
    command = line[len("ExecCondition="):].replace("/run/entomologist", str(runtime_dir))
    assert command.startswith("/bin/sh -c '") and command.endswith("'")
    script = command[len("/bin/sh -c '"):-1]
    assert "$" not in script.replace("$$", "").replace("$(", ""), "systemd would expand it"
    return subprocess.run(["/bin/sh", "-c", script.replace("$$", "$")]).returncode


@pytest.fixture
def tiny_run(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    with tmpfs(tmp_path / "run", "64k") as run:
        yield run


@pytest.mark.parametrize("content", ["", "\n", "garbage\n", "-1\n", "2x\n", " \n",
                                     "99999999999999999999999\n"])
def test_an_empty_or_garbled_count_lets_the_unit_run_and_counts_as_zero(tmp_path, content):
    (tmp_path / bugs.BUG_COUNT_FILE).write_text(content)
    assert exec_condition(tmp_path) == 0
    bugs.note_outcome(os.EX_SOFTWARE, str(tmp_path))
    assert (tmp_path / bugs.BUG_COUNT_FILE).read_text() == "1\n"


def test_the_count_is_born_readable_and_writable_by_root_only(tmp_path):
    bugs.note_outcome(os.EX_SOFTWARE, str(tmp_path))
    assert stat.S_IMODE((tmp_path / bugs.BUG_COUNT_FILE).stat().st_mode) == 0o600


def test_the_unit_runs_without_a_count_and_stops_at_three(tmp_path):
    assert exec_condition(tmp_path) == 0
    for _ in range(2):
        bugs.note_outcome(os.EX_SOFTWARE, str(tmp_path))
        assert exec_condition(tmp_path) == 0
    bugs.note_outcome(os.EX_SOFTWARE, str(tmp_path))
    assert exec_condition(tmp_path) != 0


def test_a_full_run_folder_leaves_no_empty_count_and_the_unit_still_runs(
        tiny_run, monkeypatch, device):
    import boot

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(boot, "boot", bug)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tiny_run))
    fill(tiny_run)
    assert boot.main(["--config", str(device.config_path)]) == os.EX_SOFTWARE
    count = tiny_run / bugs.BUG_COUNT_FILE
    assert not count.exists() or count.read_text().strip().isdigit()
    assert [p.name for p in tiny_run.iterdir() if p.name.endswith(".tmp")] == []
    assert exec_condition(tiny_run) == 0


def test_a_full_run_folder_keeps_the_last_count_whole(tiny_run):
    bugs.note_outcome(os.EX_SOFTWARE, str(tiny_run))
    fill(tiny_run)
    bugs.note_outcome(os.EX_SOFTWARE, str(tiny_run))
    assert (tiny_run / bugs.BUG_COUNT_FILE).read_text() in ("1\n", "2\n")
    assert exec_condition(tiny_run) == 0
