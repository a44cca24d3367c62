"""Decisions from mosquitto 2.0.11's log lines (as observed), without a broker."""
import pytest

from standin.enforce import Enforcer, Identity
from standin.template import load_stack

stack = load_stack()
DEVICE = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect",
     "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"},
    {"Effect": "Allow", "Action": "iot:Publish",
     "Resource": "arn:aws:iot:us-east-1:123456789012:topic/cameraDevice/CAM-1/booted"}]}


@pytest.fixture
def setup(tmp_path):
    events = []
    log = tmp_path / "mosquitto.log"
    log.write_text("1795779930: mosquitto version 2.0.11 running\n")
    enforcer = Enforcer(log, lambda event, **f: events.append((event, f)))
    enforcer.add(Identity("standin-responder", "service"))
    enforcer.add(Identity("claim", "claim", stack.claim_policies, "claim policy", stack.context()))
    enforcer.add(Identity("dev-1", "device", [DEVICE], "device policy",
                          stack.context(thing_name="ento-CAM-1", is_attached=True)))

    def write(*lines):
        with open(log, "a") as f:
            f.write("".join(f"1795779931: {line}\n" for line in lines))
    return enforcer, events, write


def connected(port, client_id, user):
    return (f"New client connected from 127.0.0.1:{port} as {client_id} "
            f"(p2, c1, k44, u'{user}').")


def test_a_connect_under_the_thing_name_is_allowed_and_another_client_id_is_denied(setup):
    enforcer, events, write = setup
    enforcer.relayed(5001)
    enforcer.relayed(5002)
    write(connected(5001, "ento-CAM-1", "dev-1"), connected(5002, "CAM-1", "dev-1"))
    assert enforcer.verdict(5001) is None
    assert enforcer.verdict(5002) == "no statement allows (device policy)"
    (event, fields), = events
    assert event == "denied" and fields["action"] == "iot:Connect"
    assert fields["resource"] == "arn:aws:iot:us-east-1:123456789012:client/CAM-1"


def test_an_unknown_or_inactive_certificate_is_refused_at_connect(setup):
    enforcer, events, write = setup
    enforcer.identities["dev-1"].active = False
    enforcer.relayed(5001)
    enforcer.relayed(5002)
    write(connected(5001, "x", "stranger"), connected(5002, "ento-CAM-1", "dev-1"))
    assert "not registered" in enforcer.verdict(5001)
    assert enforcer.verdict(5002) == "the certificate is not ACTIVE"


def test_a_denied_publish_condemns_that_clients_connection_only(setup):
    enforcer, events, write = setup
    enforcer.relayed(5001)
    write(connected(5001, "ento-CAM-1", "dev-1"),
          "Denied PUBLISH from ento-CAM-1 (d0, q1, r0, m1, 'cameraDevice/CAM-1/other', "
          "... (44 bytes))")
    assert enforcer.verdict(5001) == "no statement allows (device policy)"
    assert events[-1][1]["resource"].endswith(":topic/cameraDevice/CAM-1/other")


def test_a_subscribe_outside_the_claim_policy_is_denied_and_inside_it_is_not(setup):
    enforcer, events, write = setup
    enforcer.relayed(5001)
    write(connected(5001, "CAM-1", "claim"), "CAM-1 1 $aws/certificates/create/json/accepted")
    assert enforcer.verdict(5001) is None
    write("CAM-1 1 $aws/certificates/create-from-csr/json/accepted")
    assert enforcer.verdict(5001).startswith("no statement allows")
    assert events[-1][1]["action"] == "iot:Subscribe"


def test_the_stand_ins_own_and_direct_connections_are_not_judged(setup):
    enforcer, events, write = setup
    enforcer.relayed(5001)
    write(connected(5001, "CAM-1", "standin-responder"), connected(6000, "CAM-9", "stranger"),
          "CAM-9 1 anything/at/all", "standin-responder-1 1 #")
    assert enforcer.verdict(5001) is None and events == []


def test_a_line_half_written_waits_for_its_end_and_reloads_are_counted(setup):
    enforcer, events, write = setup
    enforcer.relayed(5001)
    with open(enforcer.log_path, "a") as f:
        f.write("1795779931: " + connected(5001, "CAM-1", "dev-1")[:20])
    assert enforcer.verdict(5001) is None
    with open(enforcer.log_path, "a") as f:
        f.write(connected(5001, "CAM-1", "dev-1")[20:] + "\n1795779932: Reloading config.\n")
    assert enforcer.verdict(5001) is not None and enforcer.reloads == 1


def test_a_finished_port_forgets_its_verdict_for_the_next_connection(setup):
    enforcer, events, write = setup
    enforcer.relayed(5001)
    write(connected(5001, "CAM-1", "dev-1"))
    assert enforcer.verdict(5001)
    enforcer.finished(5001)
    enforcer.relayed(5001)
    write(connected(5001, "ento-CAM-1", "dev-1"))
    assert enforcer.verdict(5001) is None


def test_a_subscribe_the_plugin_refuses_is_recorded_and_the_connection_kept(setup):
    enforcer, events, write = setup
    enforcer.relayed(5001)
    write(connected(5001, "CAM-1", "claim"), "Received SUBSCRIBE from CAM-1",
          "\t$aws/certificates/create-from-csr/json/accepted (QoS 1)",
          "\t$aws/certificates/create/json/accepted (QoS 1)",
          "CAM-1 1 $aws/certificates/create/json/accepted", "Sending SUBACK to CAM-1")
    assert enforcer.verdict(5001) is None
    (event, fields), = events
    assert (event, fields["action"], fields["answer"]) == ("denied", "iot:Subscribe",
                                                          "SUBACK 0x80")
    assert fields["resource"].endswith(
        ":topicfilter/$aws/certificates/create-from-csr/json/accepted")


def test_a_refused_subscribe_logged_after_the_client_has_gone_is_still_recorded(setup):
    # A client that sends two SUBSCRIBEs and hangs up on the first SUBACK 0x80 is gone
    # by the time the stand-in reads the second's log lines: AWS refused both.
    enforcer, events, write = setup
    enforcer.relayed(5001)
    write(connected(5001, "CAM-1", "claim"), "Received SUBSCRIBE from CAM-1",
          "\t$aws/certificates/create-from-csr/json/accepted (QoS 1)")
    assert enforcer.verdict(5001) is None
    enforcer.finished(5001)
    write("Received SUBSCRIBE from CAM-1",
          "\t$aws/certificates/create-from-csr/json/rejected (QoS 1)")
    enforcer.catch_up()
    assert [f["resource"].rsplit("/", 1)[1] for _, f in events] == ["accepted", "rejected"]
    assert {f["client_id"] for _, f in events} == {"CAM-1"}
    # Nothing of that connection's reaches the next one on the same port.
    enforcer.relayed(5001)
    write(connected(5001, "CAM-2", "claim"))
    assert enforcer.verdict(5001) is None


def test_a_port_reused_by_a_direct_connection_is_not_judged_as_the_gone_client(setup):
    enforcer, events, write = setup
    enforcer.relayed(5001)
    write(connected(5001, "CAM-1", "claim"))
    assert enforcer.verdict(5001) is None
    enforcer.finished(5001)
    write(connected(5001, "CAM-9", "stranger"), "CAM-9 1 anything/at/all",
          "Received SUBSCRIBE from CAM-1",
          "\t$aws/certificates/create-from-csr/json/rejected (QoS 1)")
    enforcer.catch_up()
    assert events == []


def test_only_the_latest_gone_connections_are_remembered(setup):
    enforcer, events, write = setup
    from standin.enforce import GONE_KEPT
    for i in range(GONE_KEPT + 1):
        enforcer.relayed(5000 + i)
        write(connected(5000 + i, f"CAM-{i}", "claim"))
        enforcer.catch_up()
        enforcer.finished(5000 + i)
    write("Received SUBSCRIBE from CAM-0", "\tnot/allowed (QoS 1)",
          "Received SUBSCRIBE from CAM-1", "\tnot/allowed (QoS 1)")
    enforcer.catch_up()
    assert [f["client_id"] for _, f in events] == ["CAM-1"]
