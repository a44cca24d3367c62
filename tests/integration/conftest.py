"""Integration tests: the scripts run as real processes against the stand-in."""
import pytest

from iot_standin import StandIn, find_mosquitto


@pytest.fixture(scope="session", autouse=True)
def mosquitto_installed():
    if not find_mosquitto():
        pytest.fail("mosquitto is not installed: run `make test`, which installs it")


@pytest.fixture
def standin(tmp_path):
    with StandIn(tmp_path) as s:
        yield s


@pytest.fixture
def device_files(tmp_path):
    """A simulated device's files and nothing listening: for runs that must fail
    before they connect (a connection attempt would end in 75, not 78)."""
    s = StandIn(tmp_path)
    s.prepare()
    return s
