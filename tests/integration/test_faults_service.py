"""A misbehaving service, broker and network: documented exit codes, invariants intact."""
import pytest

from e2e import DeviceState, run_script
from iot_standin import Rejection, StandInCA


def run_boot(standin, *args):
    state = DeviceState(standin)
    result = run_script("boot.py", standin.config_path, *args)
    return state, result


def assert_failed_cleanly(state, result, code):
    assert result.code == code, result.stderr
    assert len(result.errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    after = state.check([result.stderr], completed=True)
    assert after == {"installed": False, "status": False}


@pytest.mark.parametrize("kind,how", [
    ("create", "not-json"), ("create", "missing-cert"), ("create", "bad-pem"),
    ("create", "wrong-key"), ("register", "not-json"), ("register", "empty-thing"),
])
def test_a_malformed_answer_exits_65_with_nothing_installed(standin, kind, how):
    setattr(standin.faults, f"malformed_{kind}", how)
    state, result = run_boot(standin)
    assert_failed_cleanly(state, result, 65)
    assert standin.events("boot") == []


@pytest.mark.parametrize("kind,status,code", [
    ("create", 429, "Throttling"), ("register", 429, "ThrottlingException"),
    ("create", 500, "InternalFailure"), ("register", 503, "ServiceUnavailable"),
])
def test_throttling_and_5xx_are_retried_until_the_service_relents(standin, kind, status, code):
    setattr(standin.faults, f"reject_{kind}", Rejection(status, code, "busy"))
    standin.faults.reject_times = 2
    state, result = run_boot(standin, "--timeout", "30")
    assert result.code == 0, result.stderr
    assert state.check([result.stderr], completed=True) == {"installed": True, "status": True}
    assert len(standin.events(f"{kind}-request")) == 3
    assert result.stderr.count("retrying in") == 2


@pytest.mark.parametrize("kind,status,code", [
    ("create", 403, "AccessDeniedException"), ("create", 400, "InvalidRequest"),
    ("register", 400, "InvalidParameters"), ("register", 404, "ResourceNotFoundException"),
])
def test_other_4xx_exit_65_at_once_naming_the_service_code(standin, kind, status, code):
    setattr(standin.faults, f"reject_{kind}", Rejection(status, code, "no"))
    state, result = run_boot(standin, "--timeout", "30")
    assert_failed_cleanly(state, result, 65)
    assert f"statusCode={status} errorCode={code}" in result.errors[0]
    assert len(standin.events(f"{kind}-request")) == 1
    assert result.seconds < 5


def test_no_answer_exits_75_within_the_deadline(standin):
    standin.faults.no_answer = True
    state, result = run_boot(standin, "--timeout", "3")
    assert_failed_cleanly(state, result, 75)
    assert result.seconds < 3 + 2.5


def test_slow_answers_within_the_step_limit_succeed(standin):
    standin.faults.delay = 1.0
    state, result = run_boot(standin, "--timeout", "30")
    assert result.code == 0, result.stderr
    state.check([result.stderr], completed=True)


def test_a_connection_dropped_after_create_is_retried_from_scratch_and_succeeds(standin):
    standin.faults.drop_after = "create"
    state, result = run_boot(standin, "--timeout", "40")
    assert result.code == 0, result.stderr
    assert standin.events("dropped"), "the stand-in never dropped the device"
    assert state.check([result.stderr], completed=True) == {"installed": True, "status": True}
    assert "retrying in" in result.stderr


def test_a_connection_dropped_after_register_waits_a_minute_before_the_next_certificate(
        standin):
    """The device cannot tell whether that RegisterThing registered its certificate."""
    standin.faults.drop_after = "register"
    state, result = run_boot(standin, "--timeout", "40")
    assert_failed_cleanly(state, result, 75)
    assert standin.events("dropped"), "the stand-in never dropped the device"
    assert "the next attempt waits 1 min" in result.errors[0]
    assert result.seconds < 10
    assert len(standin.events("create-request")) == 1


def test_broker_down_exits_75_within_the_deadline(standin):
    standin.stop_broker()
    state, result = run_boot(standin, "--timeout", "4")
    assert_failed_cleanly(state, result, 75)
    assert "AWS_IO_SOCKET_CONNECTION_REFUSED" in result.errors[0]
    assert result.seconds < 4 + 2.5


def test_an_outage_the_service_comes_back_from_is_75_then_a_boot_with_nothing_redone(standin):
    first = run_script("boot.py", standin.config_path)
    assert first.code == 0, first.stderr
    standin.refuse_connections()
    state, result = run_boot(standin, "--timeout", "3")
    assert result.code == 75, result.stderr
    assert "AWS_IO_SOCKET_CONNECTION_REFUSED" in result.errors[0]
    standin.accept_connections()
    again = run_script("boot.py", standin.config_path)
    assert again.code == 0, again.stderr
    assert len(standin.events("boot")) == 2
    assert len(standin.events("register-request")) == 1


def test_broker_gone_mid_flow_exits_75_within_the_deadline(standin):
    standin.faults.delay = 0.5
    standin.faults.drop_after = None
    import threading

    def stop_when_asked():
        standin.wait_for("create-request", timeout=10)
        standin.stop_broker()

    threading.Thread(target=stop_when_asked, daemon=True).start()
    state, result = run_boot(standin, "--timeout", "3")
    assert_failed_cleanly(state, result, 75)
    assert result.seconds < 3 + 2.5


@pytest.mark.slow
def test_a_server_certificate_from_an_unknown_ca_exits_75(standin):
    """The TLS library fails such a handshake only after a deliberate delay (10 to 30 s)."""
    other = standin.workdir / "other-ca.pem"
    other.write_bytes(StandInCA("someone else").pem)
    standin.write_device_config(ROOT_CA="other-ca.pem")
    state, result = run_boot(standin, "--timeout", "25")
    assert_failed_cleanly(state, result, 75)
    assert result.seconds < 25 + 2.5
    assert standin.events("create-request") == []
