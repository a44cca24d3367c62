"""Unit tests never touch the network: any real connection fails loudly."""
import ipaddress
import json
import os
from pathlib import Path

import pytest
import socket
from awscrt import mqtt as crt_mqtt

from entomologist import config as configuration, mqtt
from fakes import FakeClock, FakeCloud, MiniCA


class NetworkUsedInUnitTest(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkUsedInUnitTest("a unit test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    real_getaddrinfo = socket.getaddrinfo

    def numeric_only(host, *args, **kwargs):
        # A numeric address resolves without asking anyone; a name would ask DNS.
        try:
            ipaddress.ip_address(host)
        except ValueError:
            refuse()
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)
    # The seam: a flow that was not handed the fake builds a real connection.
    monkeypatch.setattr(mqtt, "build_connection", refuse)
    monkeypatch.setattr(crt_mqtt.Connection, "connect", refuse)


@pytest.fixture
def cloud():
    return FakeCloud()


class Device:
    """A simulated device's files in tmp_path."""

    def __init__(self, root: Path, ca: MiniCA):
        self.root = root
        self.config_path = root / "etc" / "ento.conf"
        self.config_path.parent.mkdir()
        claim = root / "claim"
        claim.mkdir()
        cert, key = ca.pair()
        (claim / "claim.pem.crt").write_text(cert)
        (claim / "claim.key").write_text(key)
        os.chmod(claim / "claim.key", 0o600)
        (root / "ca.pem").write_text(ca.pem)
        self.cert_dir = root / "etc" / "cert"
        self.write({
            "SERIAL_ID": "CAM-42",
            "ENDPOINT_URL": "example-ats.iot.eu-west-1.amazonaws.com",
            "PROVISION_STATUS": "False",
            "TEMPLATE_NAME": "Fleet",
            "CLAIM_CERT": str(claim / "claim.pem.crt"),
            "CLAIM_KEY": str(claim / "claim.key"),
            "ROOT_CA": str(root / "ca.pem"),
            "CERT_DIR": str(self.cert_dir),
        })

    def write(self, device: dict, mode: int = 0o640, extra: dict | None = None) -> None:
        doc = {"device": device, "camera": {"INTERVAL": 60}, **(extra or {})}
        self.config_path.write_text(json.dumps(doc, indent=2))
        os.chmod(self.config_path, mode)

    def doc(self) -> dict:
        return json.loads(self.config_path.read_text())

    @property
    def device(self) -> dict:
        return self.doc()["device"]

    def config(self) -> configuration.Config:
        return configuration.load_config(self.config_path)

    def update(self, **changes) -> None:
        doc = self.doc()
        doc["device"].update(changes)
        self.config_path.write_text(json.dumps(doc))


@pytest.fixture
def device(tmp_path, cloud):
    return Device(tmp_path, cloud.ca)


@pytest.fixture
def clock():
    """The run's clock: time moves only when the flow sleeps or waits (tests/fakes.py)."""
    return FakeClock()
