"""Crash at any instant: SIGKILL boot.py at each step, check the invariants, run again."""
import random
import time

import pytest

from e2e import DeviceState, run_and_kill, run_script


def event_seen(standin, name, **fields):
    def check():
        return any(all(e.get(k) == v for k, v in fields.items())
                   for e in standin.events(name))
    return check


def mosquitto_saw_claim_client(standin):
    log = standin.dir / "mosquitto.log"
    return lambda: f"as {standin.serial} " in log.read_text()


def cert_dir(standin):
    return standin.workdir / "cert"


STEPS = {
    # name: (trigger factory, answer delay that holds the device at that step)
    "after the claim connection": (mosquitto_saw_claim_client, 0.3),
    "after the create request": (lambda s: event_seen(s, "create-request"), 0.3),
    "after the create answer": (
        lambda s: event_seen(s, "answer", topic="$aws/certificates/create/json/accepted"), 0.0),
    "after the register request": (lambda s: event_seen(s, "register-request"), 0.3),
    "after the register answer": (lambda s: event_seen(s, "register-accepted"), 0.0),
    "while installing files": (
        lambda s: lambda: (cert_dir(s) / "private.pem.key").exists(), 0.0),
    "after installing": (lambda s: lambda: (cert_dir(s) / "certificate.pem.crt").exists(), 0.0),
    "after the boot message": (lambda s: event_seen(s, "boot"), 0.0),
    "while rewriting the config": (
        lambda s: lambda: any(p.name.startswith(".ento.conf.")
                              for p in s.workdir.iterdir()) or
        '"True"' in s.config_path.read_text(), 0.0),
}


def recover_and_check(standin, state, first_output):
    state.check([first_output], completed=False)
    standin.faults.delay = 0.0
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    final = state.check([first_output, result.stderr], completed=True)
    assert final == {"installed": True, "status": True}
    assert len(standin.events("register-accepted")) <= 2
    return result


@pytest.mark.parametrize("step", list(STEPS))
def test_killed_at_each_step_the_next_run_completes(standin, step):
    make_trigger, delay = STEPS[step]
    standin.faults.delay = delay
    state = DeviceState(standin)
    killed, output = run_and_kill(standin, make_trigger(standin))
    assert killed, f"the run finished before reaching {step!r}"
    recover_and_check(standin, state, output)


@pytest.mark.parametrize("seed", range(12))
def test_killed_at_a_random_instant_the_next_run_completes(standin, seed):
    state = DeviceState(standin)
    # A first boot here takes about 0.4 s after interpreter start-up.
    instant = random.Random(seed).uniform(0.05, 0.9)
    started = time.monotonic()
    _, output = run_and_kill(standin, lambda: time.monotonic() - started >= instant)
    recover_and_check(standin, state, output)


def test_killed_twice_in_a_row_the_third_run_completes(standin):
    state = DeviceState(standin)
    standin.faults.delay = 0.3
    killed, out1 = run_and_kill(standin, event_seen(standin, "register-request"))
    assert killed
    killed, out2 = run_and_kill(standin, lambda: len(standin.events("register-request")) >= 2)
    assert killed
    state.check([out1, out2], completed=False)
    standin.faults.delay = 0.0
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    state.check([out1, out2, result.stderr], completed=True)
