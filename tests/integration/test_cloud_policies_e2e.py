"""The stand-in applies cloud/stack.yaml: what an operator deploys is what provisions here,
and a template or policy that does not fit the device fails visibly on both sides."""
import json
import os

import pytest

from e2e import DeviceState, device_doc, run_script
from iot_standin import CLAIM_CN, StandIn, stack_with

ARN = "arn:aws:iot:us-east-1:123456789012"


def test_first_boot_goes_through_the_stacks_template_and_policies(standin):
    result = run_script("boot.py", standin.config_path)
    assert result.code == 0, result.stderr
    assert device_doc(standin)["device"]["TEMPLATE_NAME"] == "ento-fleet-template"
    registered, = standin.events("register-accepted")
    assert registered["thingName"] == "ento-CAM-0001"
    assert registered["attributes"] == {"serialNumber": "CAM-0001"}
    applied, = standin.events("policy-applied")
    assert applied["acl"] == ["topic write cameraDevice/CAM-0001/booted"]
    assert applied["username"].startswith("ento-device-")
    config = standin.workdir / "cert" / "device-configuration.json"
    assert json.loads(config.read_text()) == {"BootTopic": "cameraDevice/CAM-0001/booted"}
    assert oct(os.stat(config).st_mode & 0o777) == "0o644"
    acl = standin.acl_path.read_text()
    assert f"user {CLAIM_CN}\n" in acl and "topic read $aws/certificates/create/#" in acl
    assert "topic write $aws/certificates/create/json\n" in acl
    assert "write $aws/certificates/create/#" not in acl
    assert "create-from-csr" not in acl
    assert standin.events("denied") == []


def without_boot_topic(body):
    statement = body["Resources"]["policy"]["Properties"]["PolicyDocument"]["Statement"][1]
    statement["Resource"] = statement["Resource"].replace("/booted", "/status")


def test_a_device_policy_without_the_boot_topic_fails_the_boot_report_visibly(tmp_path):
    with StandIn(tmp_path, stack=stack_with(without_boot_topic)) as standin:
        state = DeviceState(standin)
        result = run_script("boot.py", standin.config_path, "--timeout", "4")
        assert result.code == 75, result.stderr
        assert standin.events("register-accepted")  # provisioning itself went through
        denied = standin.events("denied")
    assert denied and {d["action"] for d in denied} == {"iot:Publish"}
    assert denied[0]["resource"] == f"{ARN}:topic/cameraDevice/CAM-0001/booted"
    assert denied[0]["client_id"] == "ento-CAM-0001"
    assert denied[0]["reason"] == ("no statement allows (device policy of thing ento-CAM-0001 "
                                   "(template ento-fleet-template))")
    assert "the certificate's policy may not allow iot:Publish on " \
           "cameraDevice/CAM-0001/booted" in result.errors[-1]
    assert standin.events("boot") == []
    assert state.check([result.stderr], completed=False) == {"installed": True, "status": False}


def test_the_default_modes_claim_policy_makes_csr_mode_fail_visibly(standin):
    assert standin.mode == "CreateKeysAndCertificate"
    standin.write_device_config(PROVISIONING_API="CreateCertificateFromCsr")
    result = run_script("boot.py", standin.config_path, "--timeout", "3")
    assert result.code == 75, result.stderr
    # As AWS answers: a refused SUBACK (0x80), the connection kept.
    assert "refused the subscription to $aws/certificates/create-from-csr/json/" \
        in result.errors[-1]
    assert "iot:Subscribe on $aws/certificates/create-from-csr/*" in result.errors[-1]
    denied = standin.events("denied")
    assert denied and {d["action"] for d in denied} == {"iot:Subscribe"}
    assert {d["answer"] for d in denied} == {"SUBACK 0x80"}
    assert denied[0]["resource"].startswith(
        f"{ARN}:topicfilter/$aws/certificates/create-from-csr/json/")
    assert denied[0]["policy"] == "claim policy for ProvisioningMode CreateKeysAndCertificate"
    assert standin.events("csr-request") == []


def test_a_denied_subscription_gets_suback_0x80_and_the_connection_stays(standin):
    """AWS's answer, through AWS's own client: SubscribeError for the refused filter,
    then the same connection subscribes and publishes what the claim policy allows."""
    from awscrt import mqtt
    from awsiot import mqtt_connection_builder
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost", port=standin.port, cert_filepath=str(standin.claim_cert),
        pri_key_filepath=str(standin.claim_key), ca_filepath=str(standin.ca_path),
        client_id=standin.serial, clean_session=True, keep_alive_secs=30)
    interrupted = []
    connection.on_connection_interrupted = lambda *a, **k: interrupted.append(k)
    connection.connect().result(10)
    try:
        refused, _ = connection.subscribe("$aws/certificates/create-from-csr/json/accepted",
                                          mqtt.QoS.AT_LEAST_ONCE, lambda **k: None)
        with pytest.raises(Exception) as caught:
            refused.result(10)
        assert type(caught.value).__name__ == "SubscribeError"
        granted, _ = connection.subscribe("$aws/certificates/create/json/accepted",
                                          mqtt.QoS.AT_LEAST_ONCE, lambda **k: None)
        assert granted.result(10)["qos"] == mqtt.QoS.AT_LEAST_ONCE
        published, _ = connection.publish("$aws/certificates/create/json", "{}",
                                          mqtt.QoS.AT_LEAST_ONCE)
        published.result(10)
        assert standin.wait_for("create-request")
    finally:
        connection.disconnect().result(10)
    assert interrupted == []
    denied, = standin.events("denied")
    assert (denied["action"], denied["answer"]) == ("iot:Subscribe", "SUBACK 0x80")


def with_site_parameter(body):
    body["Parameters"]["Site"] = {"Type": "String"}
    body["Resources"]["thing"]["Properties"]["AttributePayload"]["site"] = {"Ref": "Site"}


def test_a_template_parameter_the_device_does_not_send_is_a_rejection_and_exit_65(tmp_path):
    with StandIn(tmp_path, stack=stack_with(with_site_parameter)) as standin:
        state = DeviceState(standin)
        result = run_script("boot.py", standin.config_path)
        assert result.code == 65, result.stderr
        rejected, = standin.events("register-rejected")
        assert state.check([result.stderr], completed=False) == {"installed": False,
                                                                 "status": False}
    assert (rejected["statusCode"], rejected["errorCode"]) == (400, "InvalidParameters")
    assert "RegisterThing rejected: statusCode=400 errorCode=InvalidParameters" in \
        result.errors[-1]
    assert "Site" in result.errors[-1]


def test_a_device_connecting_under_another_client_id_than_its_thing_name_is_refused(standin):
    assert run_script("boot.py", standin.config_path).code == 0
    doc = device_doc(standin)
    doc["device"]["THING_NAME"] = "ento-CAM-9999"
    standin.config_path.write_text(json.dumps(doc))
    result = run_script("update_boot_status.py", standin.config_path, "--timeout", "3")
    assert result.code == 75, result.stderr
    denied = standin.events("denied")
    assert denied and denied[0]["action"] == "iot:Connect"
    assert denied[0]["resource"] == f"{ARN}:client/ento-CAM-9999"
    assert len(standin.events("boot")) == 1  # the first boot's only


@pytest.mark.parametrize("mode,api", [("CreateCertificateFromCsr", "CreateCertificateFromCsr"),
                                      ("Both", None)])
def test_the_mode_picks_the_claim_policy_and_the_devices_provisioning_api(tmp_path, mode, api):
    with StandIn(tmp_path, mode=mode) as standin:
        assert device_doc(standin)["device"].get("PROVISIONING_API") == api
        standin.write_device_config(PROVISIONING_API="CreateCertificateFromCsr")
        result = run_script("boot.py", standin.config_path)
        assert result.code == 0, result.stderr
        assert standin.events("denied") == []
        has_create = "$aws/certificates/create/#" in standin.acl_path.read_text()
    assert has_create == (mode == "Both")
