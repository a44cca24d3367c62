"""The run's deadline and clock, and backoff with full jitter."""
import math
import queue
import random
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from entomologist import clock, errors, retries
from fakes import FakeClock


class Highest:
    def uniform(self, low, high):
        return high


def test_backoff_ceiling_grows_exponentially_to_its_cap():
    backoff = retries.Backoff(base=1.0, cap=8.0)
    assert [backoff.delay(n, Highest()) for n in range(1, 6)] == [2.0, 4.0, 8.0, 8.0, 8.0]


def test_full_jitter_spreads_delays_over_the_whole_interval():
    # A fleet that lost its link together must not come back together: the
    # delays of one attempt cover [0, ceiling] evenly, not a narrow band.
    backoff = retries.Backoff(base=1.0, cap=8.0)
    rng = random.Random(7)
    delays = [backoff.delay(3, rng) for _ in range(2000)]
    assert min(delays) >= 0 and max(delays) <= 8.0
    assert min(delays) < 0.2 and max(delays) > 7.8
    deciles = [sum(1 for d in delays if k <= d / 0.8 < k + 1) for k in range(10)]
    assert all(150 <= n <= 250 for n in deciles), deciles


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "0", "-5", "abc", ""])
def test_a_timeout_must_be_a_finite_positive_number(text):
    with pytest.raises(ValueError):
        retries.positive_seconds(text)
    assert retries.positive_seconds("0.5") == 0.5


@pytest.mark.parametrize("seconds", [math.nan, math.inf, 0, -1])
def test_a_deadline_without_a_finite_bound_is_refused(seconds):
    with pytest.raises(ValueError):
        retries.Deadline(seconds)


def test_a_step_is_the_step_limit_or_what_is_left():
    fake = FakeClock()
    deadline = retries.Deadline(30, clock=fake, step_limit=20)
    assert deadline.step("x") == 20
    fake.advance(25)
    assert deadline.step("x") == 5
    fake.advance(6)
    with pytest.raises(errors.TransientError, match="time limit"):
        deadline.step("x")


def test_no_step_is_given_at_the_very_end_of_the_run_not_even_one_of_no_time():
    fake = FakeClock()
    deadline = retries.Deadline(30, clock=fake, step_limit=20)
    fake.advance(30)
    assert deadline.remaining() == 0
    with pytest.raises(errors.TransientError, match="x: the run's time limit was reached"):
        deadline.step("x")


@pytest.mark.parametrize("script", ["boot.py", "update_boot_status.py"])
def test_the_scripts_refuse_an_unbounded_timeout_at_once(script, capsys):
    import importlib
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--timeout", "nan"])
    assert exit_.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_a_plain_ento_error_is_one_line_and_75_not_a_traceback(caplog):
    def body():
        raise errors.EntoError("something expected", hint="this")

    assert errors.run_main(body) == 75
    assert caplog.records[-1].exc_info is None
    assert caplog.messages[-1] == "something expected; check this"


def test_a_hold_longer_than_the_backoff_is_slept_and_one_past_the_deadline_ends_the_run():
    Transient = errors.TransientError
    fake = FakeClock()

    def failing():
        raise Transient("no answer", hint="the claim policy")

    holds = iter([(30.0, "allowed at A"), (500.0, "allowed at B")])
    with pytest.raises(Transient, match=r"gave up after 2 attempt\(s\): allowed at B") as err:
        retries.with_retries(failing, retries.Deadline(100.0, clock=fake),
                             "provisioning", hold=lambda: next(holds))
    assert fake.sleeps == [30.0] and err.value.hint == "the claim policy"


def test_each_retry_is_announced_with_the_number_of_the_attempt_to_come(caplog):
    fake = FakeClock()
    outcomes = iter([errors.TransientError("no answer"), errors.TransientError("no answer")])

    def flaky():
        failure = next(outcomes, None)
        if failure:
            raise failure
    holds = iter([(5.0, ""), (5.0, "")])
    retries.with_retries(flaky, retries.Deadline(100.0, clock=fake), "provisioning",
                         hold=lambda: next(holds))
    assert [m for m in caplog.messages if "retrying" in m] == [
        "provisioning: no answer; retrying in 5.0 s (attempt 2)",
        "provisioning: no answer; retrying in 5.0 s (attempt 3)"]


def test_the_real_clock_bounds_a_wait_on_a_future_or_a_queue_that_never_answers():
    real = clock.Clock()
    with pytest.raises(FutureTimeout):
        real.result(Future(), 0.01)
    with pytest.raises(queue.Empty):
        real.get(queue.Queue(), -5)  # what is left of a step already spent: no wait
    done: Future = Future()
    done.set_result("suback")
    assert real.result(done, 0) == "suback"


def test_a_fake_clock_answers_a_wait_at_once_and_moves_on_by_its_timeout():
    fake = FakeClock()
    started = fake.monotonic()
    with pytest.raises(FutureTimeout):
        fake.result(Future(), 20)
    items: queue.Queue = queue.Queue()
    with pytest.raises(queue.Empty):
        fake.get(items, 5)
    assert fake.waits == [20, 5] and fake.monotonic() - started == 25
    items.put("answer")
    assert fake.get(items, 5) == "answer" and fake.monotonic() - started == 25
