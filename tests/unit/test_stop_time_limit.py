"""The backstop for a run's time limit: a call that never returns (a PKCS#11 module
whose token stopped answering) ends the run as SIGTERM would."""
import threading
import time

import pytest

from entomologist import mqtt, stop


class Ended(Exception):
    pass


@pytest.fixture
def ends(monkeypatch):
    """Stop._end records its line instead of ending the process (and, in the main
    thread, leaves the run as the process's end would)."""
    lines, ended = [], threading.Event()

    def end(self, message):
        lines.append(message)
        ended.set()
        if threading.current_thread() is threading.main_thread():
            raise Ended(message)
    monkeypatch.setattr(stop.Stop, "_end", end)
    monkeypatch.setattr(stop, "LIMIT_GRACE_S", 0.01)
    return lines, ended


def test_the_backstop_outlasts_the_runs_own_bounded_work_after_its_limit():
    # A run whose limit passes mid-connection still waits for the broker's
    # DISCONNECT; the backstop must not cut that short and blame the token.
    assert stop.LIMIT_GRACE_S >= mqtt.CLOSE_WAIT + 2


def test_the_backstop_ends_a_run_stuck_past_its_limit_naming_the_limit(ends):
    lines, ended = ends
    with stop.Stop(grace=0.1).installed() as s:
        s.time_limit(0.02)
        assert ended.wait(5)
    assert "time limit (0.02 s)" in lines[0]


def test_the_backstop_waits_for_a_registrations_answer_like_a_signal(ends, caplog):
    lines, ended = ends
    with stop.Stop(grace=30).installed() as s:
        with pytest.raises(Ended):
            with s.answer_awaited("RegisterThing"):
                s.time_limit(0.02)
                # Past the limit inside the window: nothing ends the run until the
                # answer is in and recorded.
                waited = time.monotonic() + 10
                while not any("RegisterThing is on its way" in m for m in caplog.messages):
                    assert time.monotonic() < waited, "the backstop never fired"
                    time.sleep(0.01)
                assert not ended.is_set()
    assert lines == ["the run's time limit (0.02 s) passed in a call that did not return (a "
                     "PKCS#11 module whose token or device stopped answering?): stopping after "
                     "RegisterThing, its answer recorded"]


def test_the_backstop_never_fires_once_the_run_is_over(ends):
    lines, ended = ends
    with stop.Stop().installed() as s:
        s.time_limit(0.2)
    assert not ended.wait(0.5) and lines == []


def test_a_run_ended_by_the_backstop_counts_its_outcome_then_exits_75(monkeypatch):
    counted, exits = [], []

    def exit_(code):
        exits.append(code)
        raise Ended(code)
    monkeypatch.setattr(stop.os, "_exit", exit_)
    with pytest.raises(Ended):
        stop.Stop(on_exit=counted.append)._end("the run's time limit (3 s) passed")
    assert counted == [75] and exits == [75]
