"""A cloned image: CERT_DIR copied from another camera after its first boot."""
import json
import logging
import stat

import pytest

import boot
import update_boot_status as ubs
from entomologist import errors, retries
from fakes import ClaimClientId, FakeClock

PAIR = ("certificate.pem.crt", "private.pem.key", "AmazonRootCA1.pem")


def run(device, cloud):
    boot.boot(device.config_path, retries.Deadline(30, clock=FakeClock()), build=cloud)


def cloned(device, cloud, serial="CAM-99"):
    """This device's files as another camera's image left them, then given its own serial."""
    run(device, cloud)
    first = {name: (device.cert_dir / name).read_bytes() for name in PAIR}
    cloud.calls.clear()
    cloud.connections.clear()
    device.update(SERIAL_ID=serial)
    return first


def test_install_records_the_serial_the_pair_was_registered_for(device, cloud):
    run(device, cloud)
    record = device.cert_dir / "installed-for.json"
    assert json.loads(record.read_text()) == {
        "serialId": "CAM-42", "thingName": device.device["THING_NAME"],
        "certificateId": device.device["CERTIFICATE_ID"]}
    assert stat.S_IMODE(record.stat().st_mode) == 0o644


def test_a_pair_installed_for_another_serial_is_set_aside_and_this_camera_provisioned(
        device, cloud, caplog):
    first = cloned(device, cloud)
    caplog.set_level(logging.INFO)
    run(device, cloud)
    aside = device.cert_dir / "foreign-CAM-42"
    assert {name: (aside / name).read_bytes() for name in PAIR} == first
    assert json.loads((aside / "installed-for.json").read_text())["serialId"] == "CAM-42"
    assert stat.S_IMODE(aside.stat().st_mode) == 0o700
    assert (device.cert_dir / "certificate.pem.crt").read_bytes() != first[PAIR[0]]
    assert json.loads((device.cert_dir / "installed-for.json").read_text())["serialId"] == "CAM-99"
    assert [c.client_id for c in cloud.connections][0] == ClaimClientId("CAM-99")
    assert cloud.published()[-1][0] == "cameraDevice/CAM-99/booted"
    assert device.device["PROVISION_STATUS"] == "True"
    said = [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "CAM-42" in r.getMessage()]
    assert len(said) == 1 and "CAM-99" in said[0] and "foreign-CAM-42" in said[0]


def test_the_boot_report_alone_refuses_another_cameras_pair_and_says_to_run_boot(
        device, cloud):
    cloned(device, cloud)
    with pytest.raises(errors.ConfigError, match="installed for CAM-42.*CAM-99") as caught:
        ubs.update_boot_status(device.config(), retries.Deadline(5), build=cloud)
    assert "boot.py" in str(caught.value) + caught.value.hint
    assert cloud.calls == []


def test_a_pair_installed_before_the_record_existed_is_kept_and_recorded(device, cloud):
    run(device, cloud)
    (device.cert_dir / "installed-for.json").unlink()
    first = (device.cert_dir / "certificate.pem.crt").read_bytes()
    cloud.calls.clear()
    run(device, cloud)
    assert (device.cert_dir / "certificate.pem.crt").read_bytes() == first
    assert cloud.registers() == [] and len(cloud.published()) == 1
    assert json.loads((device.cert_dir / "installed-for.json").read_text()) == {
        "serialId": "CAM-42", "thingName": device.device["THING_NAME"],
        "certificateId": device.device["CERTIFICATE_ID"]}


def test_a_garbled_record_is_ignored_and_the_pair_kept(device, cloud):
    run(device, cloud)
    (device.cert_dir / "installed-for.json").write_text('{"serialId": "../x"}')
    cloud.calls.clear()
    run(device, cloud)
    assert cloud.registers() == [] and len(cloud.published()) == 1
    assert not any(p.name.startswith("foreign-") for p in device.cert_dir.iterdir())


def test_a_second_pair_set_aside_for_the_same_serial_replaces_nothing(device, cloud):
    first = cloned(device, cloud)
    run(device, cloud)  # CAM-42's pair set aside, CAM-99 provisioned
    # The card is flashed again from a CAM-42 image: another pair for the same serial.
    for name, data in first.items():
        (device.cert_dir / name).write_bytes(data)
    (device.cert_dir / "installed-for.json").write_text(json.dumps(
        {"serialId": "CAM-42", "thingName": "thing-CAM-42", "certificateId": "b" * 64}))
    run(device, cloud)
    assert {name: (device.cert_dir / "foreign-CAM-42" / name).read_bytes()
            for name in PAIR} == first
    assert {name: (device.cert_dir / "foreign-CAM-42-2" / name).read_bytes()
            for name in PAIR} == first
    assert device.device["PROVISION_STATUS"] == "True"


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_symlink_or_file_planted_as_the_set_aside_folder_is_never_followed_or_fatal(
        device, cloud, tmp_path, planted):
    cloned(device, cloud)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    target = device.cert_dir / "foreign-CAM-42"
    if planted == "symlink":
        target.symlink_to(elsewhere)
    else:
        target.write_text("in the way")
    run(device, cloud)
    assert list(elsewhere.iterdir()) == []
    aside = device.cert_dir / "foreign-CAM-42-2"
    assert stat.S_IMODE(aside.lstat().st_mode) == 0o700
    assert (aside / "private.pem.key").exists()
    assert device.device["PROVISION_STATUS"] == "True"


def test_twenty_names_are_tried_for_the_set_aside_folder_then_it_is_a_storage_error(
        device, cloud):
    cloned(device, cloud)
    for n in range(1, 20):  # foreign-CAM-42, -2 ... -19 taken by files in the way
        (device.cert_dir / ("foreign-CAM-42" + (f"-{n}" if n > 1 else ""))).write_text("x")
    run(device, cloud)
    assert (device.cert_dir / "foreign-CAM-42-20" / "private.pem.key").exists()
    assert device.device["PROVISION_STATUS"] == "True"
    cloned(device, cloud, serial="CAM-7")  # now CAM-99's pair, and no twenty-first name
    for n in range(1, 21):
        (device.cert_dir / ("foreign-CAM-99" + (f"-{n}" if n > 1 else ""))).write_text("x")
    with pytest.raises(errors.StorageError, match="20 folders foreign-CAM-99"):
        run(device, cloud)
