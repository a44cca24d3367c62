"""The system test's pure helpers: the drop-ins it writes and how it reads systemd's answers."""
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("systemtest", ROOT / "image" / "systemtest.py")
systemtest = importlib.util.module_from_spec(spec)
# Its dataclasses look their module up by name while the module loads.
sys.modules.setdefault("systemtest", systemtest)
spec.loader.exec_module(systemtest)

EXEC_START = ["/opt/entomologist/venv/bin/python", "/opt/entomologist/boot.py",
              "--config", "/etc/entomologist/ento.conf", "--timeout", "120"]


def entry(message, pid="1234", identifier="entomologist-provision", priority="6", t=1.0):
    return {"MESSAGE": message, "_PID": pid, "SYSLOG_IDENTIFIER": identifier,
            "PRIORITY": priority, "__REALTIME_TIMESTAMP": str(int(t * 1e6))}


def test_a_shorter_run_changes_only_the_timeout_of_the_installed_line():
    line = systemtest.exec_start_with(EXEC_START, timeout=3)
    assert shlex.split(line) == EXEC_START[:-1] + ["3"]


def test_verbose_is_added_after_the_installed_arguments():
    assert shlex.split(systemtest.exec_start_with(EXEC_START, add=["-v"])) == EXEC_START + ["-v"]


def test_the_bug_script_replaces_boot_py_and_keeps_its_arguments():
    line = systemtest.exec_start_with(EXEC_START, script="/usr/local/lib/x/bug.py")
    assert shlex.split(line) == [EXEC_START[0], "/usr/local/lib/x/bug.py", *EXEC_START[2:]]


def test_an_exec_start_without_boot_py_is_a_failed_check_not_a_silent_pass():
    with pytest.raises(systemtest.Failed, match="no boot.py"):
        systemtest.exec_start_with(["/bin/true"], script="/x.py")


def test_a_dropin_is_a_service_section_with_one_directive_a_line():
    assert systemtest.dropin("ExecStart=", "ExecStart=/bin/true").splitlines()[1:] == [
        "[Service]", "ExecStart=", "ExecStart=/bin/true"]


def test_show_output_splits_at_the_first_equals_sign():
    assert systemtest.parse_show("Result=success\nExecStart={ path=/a ; argv[]=/a -x=1 }\n") == {
        "Result": "success", "ExecStart": "{ path=/a ; argv[]=/a -x=1 }"}


def test_journal_messages_stored_as_bytes_are_decoded():
    lines = [json.dumps({"MESSAGE": list(b"caf\xc3\xa9 \x1b[0m")}), "",
             json.dumps({"MESSAGE": "plain"})]
    assert [e["MESSAGE"] for e in systemtest.parse_journal("\n".join(lines))] == [
        "caf\u00e9 \x1b[0m", "plain"]


def test_the_products_lines_are_its_own_not_systemds_about_the_unit():
    ours = entry("provisioned")
    manager = entry("Starting entomologist-provision.service", pid="1", identifier="systemd")
    assert systemtest.product_lines([ours, manager]) == [ours]
    assert systemtest.manager_lines([ours, manager]) == [manager]


def test_exits_are_read_from_systemds_lines_with_their_time():
    entries = [entry("entomologist-provision.service: Main process exited, code=exited, "
                     "status=75/TEMPFAIL", pid="1", t=10.5),
               entry("Main process exited, code=exited, status=70/SOFTWARE"),  # not systemd's
               entry("entomologist-provision.service: Main process exited, code=killed, "
                     "status=31/SYS", pid="1", t=12.0)]
    assert systemtest.exits(entries) == [(10.5, "75/TEMPFAIL"), (12.0, "31/SYS")]


def test_a_successful_run_with_info_lines_keeps_the_journal_promise():
    assert systemtest.priority_problems([entry("a"), entry("b", priority="7")], True) == []


@pytest.mark.parametrize("line, problem", [
    (entry("<6>provisioned"), "prefix left"),
    (entry("12:00:01 provisioned"), "timestamp"),
    (entry("cannot write", priority="3"), "error line in a successful run"),
])
def test_a_successful_run_breaks_the_promise(line, problem):
    assert problem in " ".join(systemtest.priority_problems([line], True))


def test_a_failed_run_must_end_on_an_error_line():
    assert systemtest.priority_problems([entry("x"), entry("failed", priority="3")], False) == []
    assert "does not end on an error line" in systemtest.priority_problems(
        [entry("failed", priority="3"), entry("bye")], False)[0]
    assert systemtest.priority_problems([], False)


def test_data_dropins_are_the_shipped_ones_that_open_a_data_folder(tmp_path):
    (tmp_path / "pkcs11-softhsm.conf").write_text("[Service]\nReadWritePaths=/var/lib/softhsm\n")
    (tmp_path / "data-partition.conf").write_text("[Service]\nReadWritePaths=/data/entomologist\n")
    (tmp_path / "commented.conf").write_text("# ReadWritePaths=/data/entomologist\n")
    assert [p.name for p in systemtest.data_dropins(tmp_path)] == ["data-partition.conf"]


def test_every_scenario_of_the_issue_is_a_named_check():
    names = [name for name, _ in systemtest.SCENARIOS]
    assert len(names) == len(set(names))
    for words in ("first boot", "second boot", "stand-in down", "78", "65", "three bugs",
                  "read-only", "/data", "SoftHSM2", "TCP_NODELAY", "seccomp kill mode",
                  "SIGTERM", "MemoryMax"):
        assert any(words in name for name in names), words
