"""A clock that may be wrong, and log lines fit for the journal."""
import datetime as dt
import io
import logging
import os
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import boot
from entomologist import clock, errors, logs, retries
import update_boot_status as ubs
from fakes import FakeClock, MiniCA


def test_a_clock_before_the_claim_certificate_fails_fast_as_transient(device, cloud):
    behind = FakeClock(start=946684800.0)  # 2000-01-01
    started = behind.monotonic()
    with pytest.raises(errors.TransientError, match="system clock is not set") as err:
        boot.boot(device.config_path, retries.Deadline(60, clock=behind), build=cloud)
    assert behind.monotonic() == started and behind.sleeps == behind.waits == []
    assert "2000-01-01T00:00:00Z" in str(err.value)
    assert "will be retried" in str(err.value)
    assert cloud.calls == []


def test_the_exit_code_for_a_wrong_clock_is_75(device, cloud):
    code = errors.run_main(lambda: boot.boot(device.config_path,
                                             retries.Deadline(60, clock=FakeClock(start=0.0)),
                                             build=cloud))
    assert code == os.EX_TEMPFAIL


def test_each_certificate_alone_sets_the_floor(tmp_path):
    ca = MiniCA()
    later = dt.datetime(2031, 5, 1, tzinfo=dt.timezone.utc)
    old = tmp_path / "old.pem"
    old.write_text(ca.pem)
    new = tmp_path / "new.pem"
    new.write_text(ca.sign(ec.generate_private_key(ec.SECP256R1()).public_key(), later))
    floor = later.timestamp()
    with pytest.raises(errors.TransientError, match=f"start of validity of {new}"):
        clock.check_clock([old, new], now=lambda: floor - 1)
    clock.check_clock([old, new], now=lambda: floor + 1)
    clock.check_clock([old], now=lambda: floor - 1)


def test_a_config_modified_in_the_future_does_not_block_a_boot(device, cloud):
    # A clock that ran ahead stamped the config; it was corrected since.
    future = time.time() + 10 * 365 * 86400
    os.utime(device.config_path, (future, future))
    boot.boot(device.config_path, retries.Deadline(30, clock=FakeClock()), build=cloud)
    assert device.device["PROVISION_STATUS"] == "True"


def test_a_clock_after_every_start_of_validity_passes(device):
    clock.check_clock([device.root / "ca.pem", device.root / "claim" / "claim.pem.crt"])


def test_boot_status_checks_the_clock_against_the_device_certificate(device, cloud):
    boot.boot(device.config_path, retries.Deadline(30, clock=FakeClock()), build=cloud)
    cloud.calls.clear()
    with pytest.raises(errors.TransientError, match="start of validity of .*certificate.pem.crt"):
        behind = FakeClock(start=time.time() - 3600)
        ubs.update_boot_status(device.config(), retries.Deadline(5, clock=behind), build=cloud)
    assert cloud.calls == []


def emit(stream, env):
    handler_stream = stream
    logger = logging.getLogger("entomologist.test")
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        logs.setup_logging(verbose=True, stream=handler_stream)
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
    assert not logs.stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_every_line_of_a_traceback_keeps_its_event_priority_on_the_journal(tmp_path):
    with open(tmp_path / "stderr", "w+") as stream:
        st = os.fstat(stream.fileno())
        emit(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})

        def bug():
            raise ValueError("boom")

        assert errors.run_main(bug) == os.EX_SOFTWARE
        stream.seek(0)
        lines = stream.read().splitlines()[4:]
    assert lines[0].startswith("<3>unexpected error") and len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)


def test_strings_from_outside_are_escaped_cut_and_redacted():
    forged = "ok\nERROR forged line\x1b[31m"
    assert "\n" not in logs.shown(forged) and "\x1b" not in logs.shown(forged)
    assert len(logs.shown("x" * 10_000)) < 250
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----"
    assert "MIIB" not in logs.shown(f"echo {pem} back")


def test_a_registered_secret_never_reaches_a_log_line(tmp_path):
    with open(tmp_path / "stderr", "w+") as stream:
        logs.setup_logging(stream=stream)
        logs.redact("token-1234-secret")
        logging.getLogger("entomologist.test").error("service said %s", "bad token-1234-secret!")
        stream.seek(0)
        text = stream.read()
    assert "token-1234-secret" not in text and "[redacted]" in text


def test_every_log_line_is_one_bounded_line_whatever_a_path_holds(tmp_path, device):
    forged = "claim/none\nINFO provisioned as thing ento-CAM-1\x1b[2J" + "x" * 3000
    device.update(CLAIM_CERT=forged)
    with open(tmp_path / "stderr", "w+") as stream:
        logs.setup_logging(stream=stream)
        assert errors.run_main(lambda: boot.boot(device.config_path, retries.Deadline(5))) == 78
        stream.seek(0)
        lines = stream.read().splitlines()
    assert [line.split()[0] for line in lines] == ["INFO", "ERROR"]
    for line in lines:
        assert "\x1b" not in line and len(line) < 1100
    assert "\\n" in lines[-1]


PROVISIONING_SECRET = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcde"  # as token_urlsafe(32)


@pytest.mark.parametrize("start", range(0, len(PROVISIONING_SECRET) - 15))
def test_every_16_character_run_of_a_secret_is_redacted_wherever_it_starts(start):
    logs.redact(PROVISIONING_SECRET)
    run = PROVISIONING_SECRET[start:start + 16]
    assert logs.holds_secret(run)
    assert run not in logs.shown(f"echo {run} back")


def test_a_secret_of_16_to_31_characters_is_redacted_by_its_runs_too():
    secret = "0123456789abcdefXYZW"
    logs.redact(secret)
    assert logs.holds_secret(secret[:16]) and logs.holds_secret(secret[4:])
    assert logs.shown(f"<{secret[2:18]}>") == "<[redacted]>"


def test_overlapping_runs_are_cut_out_whole_leaving_no_tail_of_the_secret():
    logs.redact(PROVISIONING_SECRET)
    leaked = PROVISIONING_SECRET[5:40]
    shown = logs.shown(f"a {leaked} z")
    assert shown == "a [redacted] z"
