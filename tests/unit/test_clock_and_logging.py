"""A clock that may be wrong, and log lines fit for the journal."""
import io
import logging
import os
import time

import pytest

import boot
import ento
import update_boot_status as ubs


def test_a_clock_before_the_claim_certificate_fails_fast_as_transient(device, cloud):
    started = time.monotonic()
    with pytest.raises(ento.TransientError, match="system clock is not set") as err:
        boot.boot(device.config_path, ento.Deadline(60), connect=cloud,
                  clock=lambda: 946684800.0)  # 2000-01-01
    assert time.monotonic() - started < 1.0
    assert "2000-01-01T00:00:00Z" in str(err.value)
    assert "will be retried" in str(err.value)
    assert cloud.calls == []


def test_the_exit_code_for_a_wrong_clock_is_75(device, cloud):
    code = ento.run_main(lambda: boot.boot(device.config_path, ento.Deadline(60),
                                           connect=cloud, clock=lambda: 0.0))
    assert code == os.EX_TEMPFAIL


def test_a_clock_before_the_config_file_was_written_is_wrong(tmp_path):
    config = tmp_path / "ento.conf"
    config.write_text("{}")
    os.utime(config, (2_000_000_000, 2_000_000_000))
    with pytest.raises(ento.TransientError, match="last change of"):
        ento.check_clock(config, [], now=lambda: 1_999_999_999.0)
    ento.check_clock(config, [], now=lambda: 2_000_000_001.0)


def test_a_clock_after_every_start_of_validity_passes(device, cloud):
    ento.check_clock(device.config_path, [device.root / "ca.pem",
                                          device.root / "claim" / "claim.pem.crt"])


def test_boot_status_checks_the_clock_against_the_device_certificate(device, cloud):
    boot.boot(device.config_path, ento.Deadline(30), connect=cloud, sleep=lambda s: None)
    cloud.calls.clear()
    with pytest.raises(ento.TransientError, match="system clock is not set"):
        ubs.update_boot_status(device.config(), ento.Deadline(5), connect=cloud,
                               clock=lambda: time.time() - 3600)
    assert cloud.calls == []


def emit(stream, env):
    handler_stream = stream
    logger = logging.getLogger("entomologist.test")
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        ento.setup_logging(verbose=True, stream=handler_stream)
    finally:
        os.environ.clear()
        os.environ.update(old)
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    handler_stream.flush()


def test_on_the_journal_lines_carry_syslog_priorities_and_no_timestamp(tmp_path):
    with open(tmp_path / "stderr", "w+") as stream:
        st = os.fstat(stream.fileno())
        emit(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        stream.seek(0)
        assert stream.read().splitlines() == ["<7>d", "<6>i", "<4>w", "<3>e"]


def test_elsewhere_lines_are_level_and_message(tmp_path):
    with open(tmp_path / "stderr", "w+") as stream:
        emit(stream, {"JOURNAL_STREAM": "1:2"})
        stream.seek(0)
        assert stream.read().splitlines() == ["DEBUG d", "INFO i", "WARNING w", "ERROR e"]


def test_a_stream_without_a_file_descriptor_is_not_the_journal():
    assert not ento.stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_every_line_of_a_traceback_keeps_its_event_priority_on_the_journal():
    formatter = ento._JournalFormatter("%(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = logging.LogRecord("x", logging.ERROR, "f", 1, "bug", None, sys.exc_info())
    text = formatter.format(record)
    lines = text.splitlines()
    assert lines[0] == "<3>bug" and len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)
