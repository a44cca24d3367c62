"""A denied publish or subscribe looks like the network on MQTT 3.1.1 (AWS sends no
refusal, it closes the connection): the device names the policy beside the network."""

import pytest

import boot
from entomologist import errors, mqtt
from entomologist.retries import Deadline
from fakes import FakeClock

POLICY = "the certificate's policy may not allow"


def run(device, cloud, seconds=2.5):
    boot.boot(device.config_path, Deadline(seconds, clock=FakeClock(), step_limit=0.2),
              build=cloud)


def test_a_boot_message_puback_that_never_comes_names_the_policy_and_the_topic(device, cloud):
    cloud.on_publish = lambda topic: topic.startswith("cameraDevice/") and \
        cloud.fail_with("publish", *["never"] * 200)
    with pytest.raises(errors.TransientError, match="no PUBACK") as err:
        run(device, cloud)
    serial = device.device["SERIAL_ID"]
    assert f"{POLICY} iot:Publish on cameraDevice/{serial}/booted" in err.value.hint
    assert err.value.hint.startswith("the network link")
    assert "\n" not in err.value.hint


def test_a_request_puback_that_never_comes_names_the_request_topic(device, cloud):
    cloud.fail_with("publish", *["never"] * 200)
    with pytest.raises(errors.TransientError, match="no PUBACK") as err:
        run(device, cloud)
    assert f"{POLICY} iot:Publish on $aws/certificates/create/json" in err.value.hint
    assert "publish to $aws/certificates/create/json" in str(err.value)


def test_a_suback_that_never_comes_names_the_policy_and_the_filter(device, cloud):
    cloud.fail_with("subscribe", *["never"] * 200)
    with pytest.raises(errors.TransientError, match="no SUBACK") as err:
        run(device, cloud)
    assert f"{POLICY} iot:Subscribe on $aws/certificates/create/json/accepted" in err.value.hint


def test_a_connection_closed_right_after_a_request_names_the_policy(device, cloud):
    cloud.create_answers.extend([None] * 200)  # the service never answers...

    def dropped(topic):
        if topic.startswith("$aws/certificates/create"):
            cloud.connections[-1].drop()  # ...it closes the connection instead
    cloud.on_publish = dropped
    with pytest.raises(errors.TransientError, match="the connection failed") as err:
        run(device, cloud)
    assert "AWS_ERROR_MQTT_UNEXPECTED_HANGUP" in str(err.value)
    assert err.value.hint == ("the network link, ENDPOINT_URL, PORT and ROOT_CA (or "
                              f"{POLICY} iot:Publish on $aws/certificates/create/json)")


def test_a_connection_lost_long_after_the_last_send_blames_only_the_network():
    clock = FakeClock()
    link = mqtt.Link(connection=None, events=None, clock=clock)
    assert link.loss_hint() == mqtt.NETWORK_HINT
    link.note_sent("iot:Publish", "a/b")
    assert link.loss_hint().endswith(f"(or {POLICY} iot:Publish on a/b)")
    clock.advance(mqtt.POLICY_SUSPECT_SECS - 0.1)
    assert link.loss_hint().endswith(f"(or {POLICY} iot:Publish on a/b)")
    clock.advance(0.2)
    assert link.loss_hint() == mqtt.NETWORK_HINT
