"""SIGTERM (systemctl stop, a shutdown) and SIGINT (Ctrl-C): boot.py as a real process,
a real signal at a chosen moment, and what the next run finds."""
import os
import signal
import subprocess
import sys
import time

import pytest

from e2e import ROOT, DeviceState, run_script


def event_seen(standin, name):
    return lambda: bool(standin.events(name))


def run_and_signal(standin, trigger, signo=signal.SIGTERM, *args, preexec_fn=None,
                   limit=30.0):
    """Start boot.py, send ``signo`` the moment ``trigger()`` holds; return
    (exit code, stderr, seconds from the signal to the exit)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "boot.py"), "--config",
                             str(standin.config_path), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    end = time.monotonic() + limit
    sent = None
    while proc.poll() is None and time.monotonic() < end:
        if trigger():
            proc.send_signal(signo)
            sent = time.monotonic()
            break
        time.sleep(0.0005)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent is not None, f"never triggered: {err}"
    return proc.returncode, err, time.monotonic() - sent


def delay_register_answer(standin, seconds):
    """Hold back only RegisterThing's answer: the steps before it run at full speed."""
    standin.faults.after_register = lambda: setattr(standin.faults, "delay", seconds)


def errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("ERROR")]


def test_sigterm_while_registerthing_is_answered_waits_records_and_the_next_run_asks_nothing(
        standin):
    state = DeviceState(standin)
    delay_register_answer(standin, 1.0)  # its answer is on its way for a second
    code, err, _ = run_and_signal(standin, event_seen(standin, "register-request"))
    assert code == 75, err
    assert "SIGTERM: RegisterThing is on its way" in err
    assert errors(err) == ["ERROR SIGTERM: stopping after RegisterThing, its answer recorded"]
    assert (standin.workdir / "cert" / "registration.json.staging").exists()
    standin.faults.after_register, standin.faults.delay = None, 0.0
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert "registered by an earlier run" in result.stderr
    assert len(standin.events("register-request")) == 1
    assert state.check([err, result.stderr], completed=True) == {"installed": True,
                                                                 "status": True}


@pytest.mark.heavy
def test_sigterm_waits_for_registerthing_no_longer_than_its_grace(standin):
    delay_register_answer(standin, 10.0)  # past the grace, within the step's 20 s
    code, err, seconds = run_and_signal(standin, event_seen(standin, "register-request"))
    assert code == 75, err
    assert errors(err) == ["ERROR SIGTERM: no answer to RegisterThing in 5 s: stopping; "
                           "the next run takes over from here"]
    # The grace, and not the step's 20 s; far within the unit's TimeoutStopSec.
    assert 4.5 < seconds < 8, err


def test_a_second_sigterm_during_the_wait_for_registerthing_stops_at_once(standin):
    delay_register_answer(standin, 10.0)
    proc = subprocess.Popen([sys.executable, str(ROOT / "boot.py"), "--config",
                             str(standin.config_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        standin.wait_for("register-request")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # now waiting, up to its 5 s grace, for the answer
        proc.send_signal(signal.SIGTERM)
        again = time.monotonic()
        _, err = proc.communicate(timeout=30)
        seconds = time.monotonic() - again
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    assert "SIGTERM: RegisterThing is on its way" in err
    assert errors(err) == ["ERROR SIGTERM again: stopping now; the next run takes over from here"]
    assert seconds < 2, err


def test_sigterm_at_another_moment_stops_at_once_and_the_next_run_completes(standin):
    state = DeviceState(standin)
    standin.faults.delay = 1.0
    code, err, seconds = run_and_signal(standin, event_seen(standin, "create-request"))
    assert code == 75, err
    assert errors(err) == ["ERROR SIGTERM: stopping now; the next run takes over from here"]
    assert seconds < 1.0, err
    state.check([err], completed=False)
    standin.faults.delay = 0.0
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert state.check([err, result.stderr], completed=True) == {"installed": True,
                                                                 "status": True}


def test_sigint_stops_a_run_started_with_sigint_ignored(standin):
    # As `nohup` or `&` in a script start it: SIGINT ignored, inherited through exec.
    standin.faults.delay = 1.0
    code, err, seconds = run_and_signal(
        standin, event_seen(standin, "create-request"), signal.SIGINT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert code == 75, err
    assert errors(err) == ["ERROR SIGINT: stopping now; the next run takes over from here"]
    assert seconds < 1.0, err


def test_sigterm_stops_update_boot_status_at_once(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    standin.stop_broker()
    proc = subprocess.Popen([sys.executable, str(ROOT / "update_boot_status.py"), "--config",
                             str(standin.config_path), "--timeout", "20"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # retrying its connection
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    assert errors(err)[-1] == "ERROR SIGTERM: stopping now; the next run takes over from here"
    assert os.path.exists(standin.config_path)
    assert not [p for p in standin.workdir.iterdir() if p.name.endswith(".tmp")]
