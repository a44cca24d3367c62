"""Crash at any instant: SIGKILL boot.py at each step of a first boot and of a --force
run, and at random instants; check the invariants, run again."""
import random
import re
import shutil
import time

import pytest

import e2e
from e2e import HELD_BACK, DeviceState, let_the_spend_wait_pass, run_and_kill, run_script
from fakes import certificate_id
from iot_standin import StandIn


@pytest.fixture
def standin(tmp_path):
    # The hook on, with a budget for sweeps that re-provision one serial tens of times by design.
    with StandIn(tmp_path, parameters={"DailyRegistrationBudget": "1000"}) as s:
        yield s


def event_seen(standin, name, **fields):
    """Holds once the stand-in records ``name`` (with ``fields``) after this call."""
    since = len(standin.events(name))

    def check():
        return any(all(e.get(k) == v for k, v in fields.items())
                   for e in standin.events(name)[since:])
    return check


def mosquitto_saw_claim_client(standin):
    log = standin.dir / "mosquitto.log"
    start = len(log.read_text())
    # The claim connection's client ID: the serial and a random part per attempt.
    seen = re.compile(rf"as {re.escape(standin.serial)}-[0-9a-f]{{16}} ")
    return lambda: seen.search(log.read_text()[start:]) is not None


def cert_dir(standin):
    return standin.workdir / "cert"


def exists(standin, name):
    return lambda: (cert_dir(standin) / name).exists()


def changed(standin, name):
    return e2e.changed(cert_dir(standin) / name)


CREATE_ANSWER = "$aws/certificates/create/json/accepted"
STEPS = {
    # name: (trigger factory, answer delay that holds the device at that step)
    "after the claim connection": (mosquitto_saw_claim_client, 0.3),
    "after the create request": (lambda s: event_seen(s, "create-request"), 0.3),
    "after the create answer": (lambda s: event_seen(s, "answer", topic=CREATE_ANSWER), 0.0),
    "after staging the certificate": (
        lambda s: exists(s, "certificate.pem.crt.staging"), 0.3),
    "after the register request": (lambda s: event_seen(s, "register-request"), 0.3),
    "after the register answer": (lambda s: event_seen(s, "register-accepted"), 0.0),
    "after the registration record": (lambda s: exists(s, "registration.json.staging"), 0.0),
    "while installing files": (lambda s: changed(s, "private.pem.key"), 0.0),
    "after installing": (lambda s: changed(s, "certificate.pem.crt"), 0.0),
    "after the boot message": (lambda s: event_seen(s, "boot"), 0.0),
    "while rewriting the config": (
        lambda s: lambda: any(p.name.startswith(".ento.conf.")
                              for p in s.workdir.iterdir()) or
        '"True"' in s.config_path.read_text(), 0.0),
}
# Past these, a registration is recorded: the next run installs it and asks nothing.
RECORDED = ("after the registration record", "while installing files", "after installing",
            "after the boot message", "while rewriting the config")


def recover_and_check(standin, state, first_output, registers_before=0):
    state.check([first_output], completed=False)
    standin.faults.delay = 0.0
    result = run_script("boot.py", standin.config_path)
    if result.code == 75 and HELD_BACK in result.stderr:
        # Killed after a RegisterThing was sent and before its answer was
        # recorded: the next certificate waits, and the run inside the wait sends
        # nothing.  Then the wait passes.
        assert "register-sent" in (cert_dir(standin) / "provisioning-spend.json").read_text()
        assert let_the_spend_wait_pass(cert_dir(standin))
        result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    final = state.check([first_output, result.stderr], completed=True)
    assert final == {"installed": True, "status": True}
    return result


def registered_ids(standin, since=0):
    return [e["certificateId"] for e in standin.events("register-accepted")[since:]]


def installed_id(standin):
    return certificate_id((cert_dir(standin) / "certificate.pem.crt").read_bytes())


# The random-instant sweep below reaches every other step of a first boot, with the
# same checks; the state machine's unit tests take each transition on its own.
SWEPT = list(STEPS)[:-2]


@pytest.mark.parametrize("step", [s for s in STEPS if s not in SWEPT])
def test_killed_at_each_step_of_a_first_boot_the_next_run_completes(standin, step):
    make_trigger, delay = STEPS[step]
    standin.faults.delay = delay
    state = DeviceState(standin)
    killed, output = run_and_kill(standin, make_trigger(standin))
    assert killed, f"the run finished before reaching {step!r}"
    recover_and_check(standin, state, output)
    registered = registered_ids(standin)
    if step in RECORDED:
        assert len(registered) == 1, "a recorded registration was asked for again"
    assert installed_id(standin) == registered[-1]


@pytest.mark.parametrize("step", [s for s in STEPS if s != "while rewriting the config"])
def test_killed_at_each_step_of_a_force_run_the_device_keeps_a_working_identity(standin, step):
    assert run_script("boot.py", standin.config_path).code == 0
    old_id = installed_id(standin)
    before = len(standin.events("register-accepted"))
    make_trigger, delay = STEPS[step]
    standin.faults.delay = delay
    state = DeviceState(standin)
    killed, output = run_and_kill(standin, make_trigger(standin), "--force")
    assert killed, f"the --force run finished before reaching {step!r}"
    # Killed anywhere, the device holds a sound pair, the old one or the new one,
    # or (for the instant the pair is swapped) a registered pair staged to install.
    assert state.check([output], completed=False)["installed"] or (
        cert_dir(standin) / "registration.json.staging").exists()
    recover_and_check(standin, state, output)
    new = registered_ids(standin, before)
    if step in RECORDED:
        assert new and installed_id(standin) == new[-1], "a registration was wasted"
        assert len(new) == 1
    else:
        assert installed_id(standin) in (old_id, *new)


def classify(standin, since_events, since_log):
    """How far a killed run got, from what the service saw and what the device holds."""
    events = [e["event"] for e in standin.events()[since_events:]]
    log = (standin.dir / "mosquitto.log").read_text()[since_log:]
    if "register-accepted" in events:
        if '"True"' in standin.config_path.read_text():
            return "done"
        if "boot" in events:
            return "boot reported"
        if (cert_dir(standin) / "certificate.pem.crt").exists():
            return "installing or reporting"
        return "registered"
    if "register-request" in events:
        return "awaiting the register answer"
    if "create-accepted" in events:
        return "create answered"
    if "create-request" in events:
        return "awaiting the create answer"
    if re.search(rf"as {re.escape(standin.serial)}-[0-9a-f]{{16}} ", log):
        return "connected"
    return "starting"


def reset(standin):
    shutil.rmtree(cert_dir(standin), ignore_errors=True)
    standin.write_device_config()


def after(trigger, extra):
    """Holds ``extra`` seconds after ``trigger`` first held."""
    fired = []

    def check():
        if not fired and trigger():
            fired.append(time.monotonic())
        return bool(fired) and time.monotonic() - fired[0] >= extra
    return check


@pytest.mark.heavy
def test_killed_at_random_instants_within_every_step_the_next_run_always_completes(standin):
    # Each named step in turn, then a random instant after it: every step is
    # covered whatever the machine's speed, and within it no instant is favoured.
    state = DeviceState(standin)
    rng = random.Random(20261127)
    reached = []
    for step in SWEPT:  # the last two end the run in milliseconds
        reset(standin)
        standin.faults.delay = 0.15  # widen the waits for answers, as a real link does
        since_events = len(standin.events())
        since_registered = len(registered_ids(standin))
        since_log = len((standin.dir / "mosquitto.log").read_text())
        make_trigger, _ = STEPS[step]
        killed, output = run_and_kill(standin, after(make_trigger(standin),
                                                     rng.uniform(0.0, 0.15)))
        recorded = (cert_dir(standin) / "registration.json.staging").exists() or \
            (cert_dir(standin) / "certificate.pem.crt").exists()
        reached.append((step, classify(standin, since_events, since_log) if killed
                        else "finished"))
        recover_and_check(standin, state, output)
        registered = registered_ids(standin, since_registered)
        if recorded:
            assert len(registered) == 1, f"{step}: a recorded registration was asked again"
        assert installed_id(standin) == registered[-1], step
    # Once installed, a run can end within the random extra instant.
    early = [where for step, where in reached if step not in RECORDED]
    assert "finished" not in early, reached
    # The kills landed on both sides of the registration.  (The stand-in records
    # its answer before the delay that holds it back, so the exact spread of the
    # labels depends on the machine's speed; the sides do not.)
    assert {"connected", "awaiting the create answer", "create answered",
            "awaiting the register answer"} & {where for _, where in reached}, reached
    assert {"registered", "installing or reporting", "boot reported"} & {
        where for _, where in reached}, reached


def test_killed_twice_in_a_row_the_third_run_completes(standin):
    state = DeviceState(standin)
    standin.faults.delay = 0.3
    killed, out1 = run_and_kill(standin, event_seen(standin, "register-request"))
    assert killed
    assert let_the_spend_wait_pass(cert_dir(standin))
    killed, out2 = run_and_kill(standin, lambda: len(standin.events("register-request")) >= 2)
    assert killed
    # Two RegisterThings without an answer: the third certificate waits 10 min.
    assert "the next attempt waits 10 min" in run_script("boot.py", standin.config_path).stderr
    assert let_the_spend_wait_pass(cert_dir(standin))
    state.check([out1, out2], completed=False)
    standin.faults.delay = 0.0
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    state.check([out1, out2, result.stderr], completed=True)
