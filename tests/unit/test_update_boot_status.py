"""update_boot_status(): publish with the device certificate, then flip the status."""
import json
import os

import pytest

import boot
from entomologist import errors, retries
import update_boot_status as ubs
from fakes import FakeClock


def provisioned(device, cloud):
    boot.boot(device.config_path, retries.Deadline(30, clock=FakeClock()), build=cloud)
    cloud.calls.clear()
    cloud.connections.clear()


def test_boot_message_is_exactly_serial_and_json_true():
    assert json.loads(ubs.boot_message("CAM-1")) == {"serialID": "CAM-1", "bootStatus": True}
    assert ubs.boot_message("CAM-1") == b'{"serialID": "CAM-1", "bootStatus": true}'
    assert ubs.boot_topic("CAM-1") == "cameraDevice/CAM-1/booted"


def test_without_credentials_it_is_a_config_error_and_connects_nowhere(device, cloud):
    with pytest.raises(errors.ConfigError, match="no device credentials"):
        ubs.update_boot_status(device.config(), retries.Deadline(5), build=cloud)
    assert cloud.calls == []


def test_installed_credentials_with_false_status_publish_then_set_status(device, cloud):
    provisioned(device, cloud)
    device.update(PROVISION_STATUS="False")
    ubs.update_boot_status(device.config(), retries.Deadline(5), build=cloud)
    assert cloud.published() == [("cameraDevice/CAM-42/booted",
                                  b'{"serialID": "CAM-42", "bootStatus": true}')]
    assert device.device["PROVISION_STATUS"] == "True"


def test_status_stays_false_when_the_publish_is_never_acknowledged(device, cloud):
    provisioned(device, cloud)
    device.update(PROVISION_STATUS="False")
    cloud.fail_with("publish", *["never"] * 50)
    clock = FakeClock()

    with pytest.raises(errors.TransientError):
        ubs.update_boot_status(device.config(), retries.Deadline(20, clock=clock, step_limit=0.01),
                               build=cloud)
    assert device.device["PROVISION_STATUS"] == "False"


def test_client_id_falls_back_to_serial_without_thing_name(device, cloud):
    provisioned(device, cloud)
    doc = device.doc()
    del doc["device"]["THING_NAME"]
    device.config_path.write_text(json.dumps(doc))
    ubs.update_boot_status(device.config(), retries.Deadline(5), build=cloud)
    assert cloud.connections[0].client_id == "CAM-42"


def test_it_trusts_the_installed_ca_copy(device, cloud):
    provisioned(device, cloud)
    ubs.update_boot_status(device.config(), retries.Deadline(5), build=cloud)
    assert cloud.connections[0].endpoint.ca == device.cert_dir / "AmazonRootCA1.pem"


def test_main_without_credentials_exits_78(device, capsys):
    assert ubs.main(["--config", str(device.config_path)]) == os.EX_CONFIG
    err = capsys.readouterr().err
    assert "no device credentials" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
