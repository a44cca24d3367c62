"""boot.py sets TCP_NODELAY on each of its real connections to the broker."""
import re

from e2e import run_script


def test_each_connection_of_a_first_boot_gets_tcp_nodelay_on_the_brokers_address(standin):
    result = run_script("boot.py", standin.config_path, "-v")
    assert result.code == 0, result.stderr
    applied = re.findall(r"TCP_NODELAY set on fd \d+, 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:(\d+)",
                         result.stderr)
    # Provisioning with the claim, then the boot message with the new certificate.
    assert len(applied) == 2, result.stderr
    assert {int(remote) for _, remote in applied} == {standin.port}
    assert applied[0][0] != applied[1][0]
