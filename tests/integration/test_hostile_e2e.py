"""What a failing card, a hostile service or a hostile local user does to a camera,
as processes against the stand-in: each case a way the field breaks a promise."""
import re
import time

import pytest

from e2e import run_script
from standin import claimpair


@pytest.mark.parametrize("garbled", [b"", b"\0" * 558, b"\x8b\x1f garbage \xff" * 40],
                         ids=["empty", "nuls", "garbage"])
def test_a_garbled_ca_copy_in_cert_dir_is_one_warning_and_the_boot_is_still_reported(
        standin, garbled):
    # The copy is the product's own file; a failing card, not the site's
    # configuration, garbles it: ROOT_CA is intact, and the camera must not stop
    # (78, never retried) or retry for ever (75, "check the network link").
    assert run_script("boot.py", standin.config_path).code == 0
    ca_copy = standin.workdir / "cert" / "AmazonRootCA1.pem"
    ca_copy.write_bytes(garbled)
    check = run_script("boot.py", standin.config_path, "--check", "--timeout", "20")
    result = run_script("boot.py", standin.config_path, "--timeout", "20")
    assert result.code == 0, result.stderr
    warnings = [line for line in result.lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and str(ca_copy) in warnings[0], result.stderr
    assert check.code == result.code, check.stderr
    assert len(standin.wait_for("boot")) == 2


@pytest.mark.heavy
def test_the_standin_answers_again_after_the_broker_dropped_its_own_connections(standin):
    # A broker stalled past the keep-alive (a loaded host, a stopped process), or a
    # second connection under the responder's client ID, drops the stand-in's own
    # connections; awscrt reconnects them with a clean session, which holds no
    # subscription: the stand-in must subscribe again, not go silent for good.
    log = standin.dir / "mosquitto.log"
    responder = re.search(r" as (standin-responder-[0-9a-f]+) ", log.read_text()).group(1)
    assert claimpair.connects("127.0.0.1", standin._broker.port, standin.ca_path,
                              standin.dir / "responder.pem.crt",
                              standin.dir / "responder.private.pem.key", responder)
    deadline = time.monotonic() + 20
    while log.read_text().count(f" as {responder} ") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # its own first connection, the intruder's, its reconnection
    time.sleep(0.5)
    result = run_script("boot.py", standin.config_path, "--timeout", "15")
    assert result.code == 0, result.stderr
    assert len(standin.events("register-accepted")) == 1



# A stand-in for a slow camera: argparse (boot.py's first import) that takes its time.
SLOW_ARGPARSE = """
import os, sys, sysconfig, time
open(os.environ["ENTO_TEST_LOADING"], "w").close()
time.sleep(3)
_path = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
exec(compile(open(_path).read(), _path, "exec"), globals())
"""


def _signal_while_loading(standin, tmp_path, signo):
    """boot.py signalled while Python still loads the product: on a camera's slow
    CPU and card the imports take a second or more, a window that systemctl stop,
    a shutdown or Ctrl-C can hit.  Here its first import is made slow."""
    import os
    import signal
    import subprocess
    import sys
    from e2e import ROOT
    slow = tmp_path / "slow-imports"
    slow.mkdir()
    (slow / "argparse.py").write_text(SLOW_ARGPARSE)
    mark = tmp_path / "loading"
    proc = subprocess.Popen([sys.executable, str(ROOT / "boot.py"), "--config",
                             str(standin.config_path), "--timeout", "20"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(slow),
                                 "ENTO_TEST_LOADING": str(mark)})
    deadline = time.monotonic() + 20
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signo)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err, signal.Signals(signo).name


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_product_loads_is_one_line_and_exit_75(standin, tmp_path, signame):
    import signal
    code, err, name = _signal_while_loading(standin, tmp_path, getattr(signal, signame))
    assert code == 75, err
    assert err.splitlines() == [f"ERROR {name}: stopping now; the next run takes over from here"]
    assert standin.events("create-request") == []
