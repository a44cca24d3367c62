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
