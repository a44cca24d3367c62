"""The spend record against a wall clock that is wrong, set back, corrected or
swung: within a boot it ages by the boot's clock; across boots by the wall
clock, trusting a future date only as far as it can."""
import json
import logging
import os
import stat
import time
import uuid

import pytest

from entomologist import errors, spend
from entomologist.clock import REAL

SPEND = "provisioning-spend.json"
HOUR, DAY = spend.HOUR, spend.DAY


def unanswered(record, n):
    cert = f"{n:064x}"
    record.create_sent()
    record.created(cert)
    record.register_sent(cert)
    record.unanswered(cert)


def six_unanswered_a_minute_apart(path, clock):
    """Six RegisterThings unanswered: the daily cap then holds until a day after the first."""
    record = spend.SpendRecord.open(path, clock)
    first = clock.now()
    for n in range(6):
        unanswered(record, n)
        clock.advance(60)
    assert record.next_attempt()[0] == first + DAY
    return first


def held_until(path, clock, settle=True):
    return spend.SpendRecord.open(path, clock, settle=settle).next_attempt()[0]


def test_the_daily_cap_survives_a_run_with_the_clock_30_h_behind_then_corrected(
        tmp_path, clock):
    path = tmp_path / SPEND
    first = six_unanswered_a_minute_apart(path, clock)
    true_now = clock.now()
    # The same boot, the clock set 30 h back (an RTC-less board's NTP not yet
    # synchronised, or a hostile time server): a run reads and settles the record.
    clock.set_wall(true_now - 30 * HOUR)
    record = spend.SpendRecord.open(path, clock)
    seconds, why = record.hold()
    assert seconds == first + DAY - true_now and "most allowed per day" in why
    with pytest.raises(errors.TransientError, match="held back, nothing sent"):
        record.check()
    clock.advance(10 * 60)
    # NTP corrects the clock: the cap still holds, to the second.
    clock.set_wall(true_now + 10 * 60)
    assert held_until(path, clock) == first + DAY
    # And every entry still carries its true date for a later boot.
    assert all(first <= e["at"] < true_now for e in json.loads(path.read_text())["entries"])
    clock.reboot(wall=true_now + HOUR)
    assert held_until(path, clock) == first + DAY


def test_a_clock_that_swings_back_and_forth_within_a_boot_never_wipes_the_cap(tmp_path, clock):
    path = tmp_path / SPEND
    first = six_unanswered_a_minute_apart(path, clock)
    for swing in (-30 * HOUR, +50 * HOUR, -3 * DAY, +2 * DAY, 0):
        clock.advance(HOUR)
        true_now = first + (clock.since_boot - 500.0)
        clock.set_wall(true_now + swing)
        at = held_until(path, clock)
        assert at - clock.now() == first + DAY - true_now
    assert len(json.loads(path.read_text())["entries"]) == 6


def test_ages_within_a_boot_follow_the_boot_clock_whatever_the_wall_clock_does(tmp_path, clock):
    path = tmp_path / SPEND
    record = spend.SpendRecord.open(path, clock)
    unanswered(record, 0)
    written = path.read_bytes()
    clock.advance(20)
    clock.set_wall(clock.now() + 2 * DAY)
    assert spend.SpendRecord.open(path, clock).hold()[0] == 40
    clock.set_wall(clock.now() - 365 * DAY)
    assert spend.SpendRecord.open(path, clock).hold()[0] == 40
    assert path.read_bytes() == written  # nothing to settle: no date is past its clock
    clock.advance(41)
    assert spend.SpendRecord.open(path, clock).hold() == (0.0, "")


def test_an_earlier_boots_entries_up_to_a_day_ahead_count_as_now_and_keep_their_true_date(
        tmp_path, clock, caplog):
    path = tmp_path / SPEND
    first = six_unanswered_a_minute_apart(path, clock)
    true_now = clock.now()
    written = path.read_bytes()
    # The camera reboots; its RTC-less clock starts 20 h behind.
    clock.reboot(wall=true_now - 20 * HOUR)
    with caplog.at_level(logging.WARNING):
        assert held_until(path, clock) == clock.now() + DAY
    assert "6 entries of an earlier boot dated after the clock" in caplog.text
    assert "rewritten" not in caplog.text
    assert path.read_bytes() == written
    # NTP corrects it: the entries are seen at their true dates again.
    clock.advance(60)
    clock.set_wall(true_now + 60)
    assert held_until(path, clock) == first + DAY


def test_an_earlier_boots_entries_more_than_a_day_ahead_are_rewritten_as_now_in_this_boot(
        tmp_path, clock, caplog):
    path = tmp_path / SPEND
    six_unanswered_a_minute_apart(path, clock)
    true_now = clock.now()
    clock.reboot(wall=true_now - 30 * HOUR)
    with caplog.at_level(logging.WARNING):
        assert held_until(path, clock) == clock.now() + DAY
    assert "6 more than 24 h ahead rewritten so" in caplog.text
    rewritten = json.loads(path.read_text())["entries"]
    assert {(e["at"], e["boot"], e["boottime"]) for e in rewritten} == {
        (clock.now(), clock.boot, clock.since_boot)}
    # Corrected later in this boot, they age from when they were seen: the cap holds.
    clock.advance(HOUR)
    clock.set_wall(true_now + HOUR)
    assert held_until(path, clock) == clock.now() + DAY - HOUR


def test_a_record_written_with_the_clock_far_ahead_holds_a_later_boot_back_a_day_at_most(
        tmp_path, clock):
    path = tmp_path / SPEND
    true_now = clock.now()
    clock.set_wall(true_now + 10 * 365 * DAY)
    six_unanswered_a_minute_apart(path, clock)
    clock.reboot(wall=true_now)
    assert held_until(path, clock) == true_now + DAY
    clock.advance(DAY)
    assert held_until(path, clock) <= clock.now()
    # Nor does a record with a single such entry hold more than one ordinary wait.
    clock.set_wall(clock.now() + 10 * 365 * DAY)
    unanswered(spend.SpendRecord.open(path, clock), 7)
    clock.reboot(wall=true_now + 2 * DAY)
    assert held_until(path, clock) == clock.now() + 60


def test_a_check_reads_entries_it_would_rewrite_and_writes_nothing(tmp_path, clock):
    path = tmp_path / SPEND
    path.write_text(json.dumps({"version": 1, "entries": [
        {"kind": "register-sent", "at": clock.now() + 10 * DAY, "certificateId": "ab" * 32},
        {"kind": "register-sent", "at": 5.0, "certificateId": "cd" * 32,
         "boot": clock.boot, "boottime": clock.since_boot + 3600}]}))
    os.chmod(path, 0o600)
    written, stamp = path.read_bytes(), os.stat(path).st_mtime_ns
    assert held_until(path, clock, settle=False) == clock.now() + 600
    assert path.read_bytes() == written and os.stat(path).st_mtime_ns == stamp


def test_a_record_without_boot_fields_still_counts_by_the_wall_clock(tmp_path, clock):
    path = tmp_path / SPEND
    first = clock.now() - 5 * HOUR
    path.write_text(json.dumps({"version": 1, "entries": [
        {"kind": "register-sent", "at": first + n * 60, "certificateId": f"{n:064x}"}
        for n in range(6)]}))
    os.chmod(path, 0o600)
    record = spend.SpendRecord.open(path, clock)
    assert record.next_attempt()[0] == first + DAY
    record.subscription_refused()
    saved = json.loads(path.read_text())["entries"]
    assert ["boot" in e for e in saved] == [False] * 6 + [True]
    assert saved[-1]["boot"] == clock.boot and saved[-1]["boottime"] == clock.since_boot
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("extra", [{"boot": "00000000-0000-4000-8000-000000000001"},
                                   {"boottime": 5.0},
                                   {"boot": "not a boot id", "boottime": 5.0},
                                   {"boot": "00000000-0000-4000-8000-000000000001",
                                    "boottime": -1},
                                   {"boot": "00000000-0000-4000-8000-000000000001",
                                    "boottime": True}])
def test_a_record_with_half_or_malformed_boot_fields_is_taken_as_the_worst(
        tmp_path, clock, extra):
    path = tmp_path / SPEND
    path.write_text(json.dumps({"version": 1, "entries": [
        {"kind": "created", "at": clock.now(), "certificateId": None, **extra}]}))
    record = spend.SpendRecord.open(path, clock)
    assert [e.kind for e in record.entries] == ["unreadable-record"]


def test_the_real_clock_names_this_boot_and_counts_its_time():
    boot = REAL.boot_id()
    assert str(uuid.UUID(boot)) == boot
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert f.read().strip() == boot
    before = REAL.boottime()
    assert before >= time.monotonic() - 1  # boot time counts at least what monotonic does
    assert REAL.boottime() >= before
