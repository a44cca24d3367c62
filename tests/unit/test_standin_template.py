"""standin/template.py: provisioning templates evaluated as RegisterThing does.

The aws_*.json files are the examples of the AWS IoT developer guide
(provision-template.html "Template example for fleet provisioning" and "for
bulk registration"; provision-wo-cert.html, the pre-provisioning hook's
template), kept as published so the evaluator is held to them.
"""
import json
from pathlib import Path

import pytest

from standin import policy as P
from standin.template import (STACK, ProvisioningTemplate, Rejection, TemplateError,
                              load_stack, load_yaml)

DATA = Path(__file__).resolve().parent / "data"


def aws_example(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def template(body: dict) -> ProvisioningTemplate:
    base = {"Parameters": {"SerialNumber": {"Type": "String"}},
            "Resources": {"certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}}}}
    for key, value in body.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return ProvisioningTemplate.from_body(base, "T")


def thing(name_expr) -> dict:
    return {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": name_expr}}}


# ------------------------------------------------------------ AWS's examples

def test_aws_fleet_example_registers_with_its_mapping_and_device_configuration():
    t = ProvisioningTemplate.from_body(aws_example("aws_fleet_template.json"), "example")
    reg = t.register({"ThingName": "bulb-1", "SerialNumber": "123", "DeviceLocation": "Seattle"},
                     "c" * 64)
    assert reg.thing_name == "bulb-1"
    assert reg.thing_type == "ThingPrefix_123"
    assert reg.attributes == {"version": "v1", "serialNumber": "serialNumber"}
    assert reg.thing_groups == ["v1-lightbulbs", "WA"]
    assert reg.billing_group == "LightBulbBillingGroup"
    assert reg.certificate_status == "ACTIVE"  # the example writes "Active"
    assert reg.device_configuration == {"FallbackUrl": "https://www.example.com/test-site",
                                        "LocationUrl": "https://example.aws"}
    assert reg.policies[0].document["Statement"][0]["Action"] == ["iot:Publish"]
    assert reg.accepted() == {"deviceConfiguration": reg.device_configuration,
                              "thingName": "bulb-1"}


def test_aws_fleet_example_rejects_a_location_missing_from_its_mapping():
    t = ProvisioningTemplate.from_body(aws_example("aws_fleet_template.json"))
    with pytest.raises(Rejection) as info:
        t.register({"ThingName": "b", "SerialNumber": "1", "DeviceLocation": "Paris"}, "c")
    assert info.value.status == 400
    assert "LocationTable/Paris/LocationUrl" in info.value.message


def test_aws_fleet_example_rejects_a_request_without_a_declared_parameter():
    t = ProvisioningTemplate.from_body(aws_example("aws_fleet_template.json"), "example")
    with pytest.raises(Rejection) as info:
        t.register({"ThingName": "b", "SerialNumber": "1"}, "c")
    assert (info.value.status, info.value.code) == (400, "InvalidParameters")
    assert "DeviceLocation" in info.value.message and "example" in info.value.message


def test_aws_hook_example_refs_an_undeclared_parameter_with_a_warning_at_load():
    t = ProvisioningTemplate.from_body(aws_example("aws_hook_template.json"))
    assert any("SerialNumber" in w for w in t.warnings)
    reg = t.register({"SerialNumber": "42", "DeviceLocation": "Seattle"}, "c")
    assert reg.thing_name == "ThingPrefix_42"
    with pytest.raises(Rejection, match="SerialNumber"):
        t.register({"DeviceLocation": "Seattle"}, "c")


def test_aws_bulk_registration_example_is_refused_for_fleet_provisioning():
    # Its certificate comes from a CSR parameter; a fleet template's may only
    # be the one the device just created (AWS::IoT::Certificate::Id).
    with pytest.raises(TemplateError, match="CertificateId only"):
        ProvisioningTemplate.from_body(aws_example("aws_bulk_template.json"))


# ------------------------------------------------------------ our stack

@pytest.mark.parametrize("mode", ["CreateKeysAndCertificate", "CreateCertificateFromCsr", "Both"])
def test_stack_template_names_the_thing_after_the_serial_in_every_mode(mode):
    stack = load_stack(parameters={"ProvisioningMode": mode})
    reg = stack.template.register({"SerialNumber": "CAM-0001"}, "f" * 64)
    assert stack.template_name == "ento-fleet-template"
    assert reg.thing_name == "ento-CAM-0001"
    assert reg.attributes == {"serialNumber": "CAM-0001"}
    assert reg.device_configuration == {"BootTopic": "cameraDevice/CAM-0001/booted"}
    assert stack.template.warnings == []


def test_stack_name_prefix_reaches_template_thing_and_claim_policy():
    stack = load_stack(parameters={"NamePrefix": "bugs"})
    reg = stack.template.register({"SerialNumber": "7"}, "c")
    assert (stack.template_name, reg.thing_name) == ("bugs-fleet-template", "bugs-7")
    ctx = stack.context(client_id="7")
    assert P.allowed(stack.claim_policies, "iot:Publish",
                     "$aws/provisioning-templates/bugs-fleet-template/provision/json", ctx)
    assert not P.allowed(stack.claim_policies, "iot:Publish",
                         "$aws/provisioning-templates/ento-fleet-template/provision/json", ctx)


def test_stack_device_policy_allows_only_its_own_client_id_and_boot_topic():
    stack = load_stack()
    reg = stack.template.register({"SerialNumber": "CAM-0001"}, "c")
    docs = [p.document for p in reg.policies]
    ctx = stack.context(client_id="ento-CAM-0001", thing_name=reg.thing_name,
                        attributes=reg.attributes, is_attached=True)
    assert P.connect_allowed(docs, "ento-CAM-0001", ctx)
    assert not P.connect_allowed(docs, "CAM-0001", ctx)
    assert P.allowed(docs, "iot:Publish", "cameraDevice/CAM-0001/booted", ctx)
    assert not P.allowed(docs, "iot:Publish", "cameraDevice/CAM-0002/booted", ctx)
    assert not P.allowed(docs, "iot:Subscribe", "cameraDevice/CAM-0001/booted", ctx)


@pytest.mark.parametrize("mode,create,csr", [
    ("CreateKeysAndCertificate", True, False),
    ("CreateCertificateFromCsr", False, True),
    ("Both", True, True),
])
def test_stack_claim_policy_allows_exactly_the_topics_of_its_mode(mode, create, csr):
    stack = load_stack(parameters={"ProvisioningMode": mode})
    docs, ctx = stack.claim_policies, stack.context(client_id="CAM-0001")
    for api, expected in (("create", create), ("create-from-csr", csr)):
        assert P.allowed(docs, "iot:Publish", f"$aws/certificates/{api}/json", ctx) is expected
        assert P.allowed(docs, "iot:Subscribe", f"$aws/certificates/{api}/json/accepted",
                         ctx) is expected
        assert P.allowed(docs, "iot:Receive", f"$aws/certificates/{api}/json/rejected",
                         ctx) is expected
    register = "$aws/provisioning-templates/ento-fleet-template/provision/json"
    assert P.allowed(docs, "iot:Publish", register, ctx)
    assert P.allowed(docs, "iot:Subscribe", register + "/accepted", ctx)
    assert not P.allowed(docs, "iot:Publish", "cameraDevice/CAM-0001/booted", ctx)


def test_stack_refuses_a_mode_it_does_not_declare():
    with pytest.raises(TemplateError, match="ProvisioningMode"):
        load_stack(parameters={"ProvisioningMode": "JustInTime"})


def test_stack_uses_the_region_and_account_it_is_given():
    stack = load_stack(region="eu-west-1", account="111122223333")
    reg = stack.template.register({"SerialNumber": "S"}, "c")
    resource = reg.policies[0].document["Statement"][1]["Resource"]
    assert resource.startswith("arn:aws:iot:eu-west-1:111122223333:topic/")


def test_yaml_loader_reads_short_tags_as_long_forms():
    doc = load_yaml("a: !Sub x-${P}\nb: !GetAtt R.Arn\nc: !If [C, !Ref P, !Ref AWS::NoValue]\n"
                    "d: !Not [!Equals [!Ref P, x]]\n")
    assert doc == {"a": {"Fn::Sub": "x-${P}"}, "b": {"Fn::GetAtt": ["R", "Arn"]},
                   "c": {"Fn::If": ["C", {"Ref": "P"}, {"Ref": "AWS::NoValue"}]},
                   "d": {"Fn::Not": [{"Fn::Equals": [{"Ref": "P"}, "x"]}]}}


def test_stack_file_is_read_from_the_cloud_folder():
    assert STACK.parent.name == "cloud" and STACK.is_file()


# ------------------------------------------------------------ each function

def test_parameter_default_is_used_when_the_device_does_not_send_it():
    t = template({"Parameters": {"Site": {"Type": "String", "Default": "lab"}},
                  "Resources": thing({"Fn::Join": ["-", [{"Ref": "Site"},
                                                         {"Ref": "SerialNumber"}]]})})
    assert t.register({"SerialNumber": "1"}, "c").thing_name == "lab-1"
    assert t.register({"SerialNumber": "1", "Site": "field"}, "c").thing_name == "field-1"


def test_missing_parameter_without_default_is_a_400_naming_it():
    t = template({"Resources": thing({"Ref": "SerialNumber"})})
    with pytest.raises(Rejection) as info:
        t.register({"Serial": "1"}, "c")
    assert info.value.payload() == {
        "statusCode": 400, "errorCode": "InvalidParameters",
        "errorMessage": "parameter SerialNumber is declared in template T without a "
                        "Default and was not sent"}


def test_parameter_values_must_be_strings():
    t = template({"Resources": thing({"Ref": "SerialNumber"})})
    with pytest.raises(Rejection, match="not a string"):
        t.register({"SerialNumber": 7}, "c")


def test_sub_substitutes_parameters_and_its_own_map_and_keeps_escapes():
    t = template({"Resources": thing({"Fn::Sub": ["${Kind}-${SerialNumber}", {"Kind": "cam"}]}),
                  "DeviceConfiguration": {"Literal": {"Fn::Sub": "${!NotMe}/${SerialNumber}"}}})
    reg = t.register({"SerialNumber": "9"}, "c")
    assert reg.thing_name == "cam-9"
    assert reg.device_configuration == {"Literal": "${NotMe}/9"}


def test_split_and_select_pick_a_part_of_a_parameter():
    t = template({"Resources": thing({"Fn::Select": ["1", {"Fn::Split": [":", {
        "Ref": "SerialNumber"}]}]})})
    assert t.register({"SerialNumber": "batch7:CAM-3"}, "c").thing_name == "CAM-3"


def test_select_out_of_range_is_a_400():
    t = template({"Resources": thing({"Fn::Select": [2, {"Fn::Split": [":", {
        "Ref": "SerialNumber"}]}]})})
    with pytest.raises(Rejection) as info:
        t.register({"SerialNumber": "a:b"}, "c")
    assert info.value.status == 400 and "out of range" in info.value.message


@pytest.mark.parametrize("site,expected", [("lab", "lab-1"), ("field", "cam-1")])
def test_if_follows_conditions_built_from_equals_not_and_or(site, expected):
    t = template({
        "Parameters": {"Site": {"Type": "String"}},
        "Conditions": {
            "IsLab": {"Fn::Equals": [{"Ref": "Site"}, "lab"]},
            "NotLab": {"Fn::Not": [{"Condition": "IsLab"}]},
            "Both": {"Fn::And": [{"Condition": "IsLab"},
                                 {"Fn::Or": [{"Fn::Equals": ["a", "a"]},
                                             {"Condition": "NotLab"}]}]}},
        "Resources": thing({"Fn::If": ["Both", {"Fn::Join": ["-", ["lab", {
            "Ref": "SerialNumber"}]]}, {"Fn::Sub": "cam-${SerialNumber}"}]})})
    assert t.register({"SerialNumber": "1", "Site": site}, "c").thing_name == expected


def test_find_in_map_takes_keys_from_parameters():
    t = template({"Parameters": {"Region": {"Type": "String"}},
                  "Mappings": {"Prefix": {"eu": {"Name": "E"}, "us": {"Name": "U"}}},
                  "Resources": thing({"Fn::Join": ["", [
                      {"Fn::FindInMap": ["Prefix", {"Ref": "Region"}, "Name"]},
                      {"Ref": "SerialNumber"}]]})})
    assert t.register({"SerialNumber": "5", "Region": "us"}, "c").thing_name == "U5"


def test_certificate_id_pseudo_parameter_is_the_new_certificate():
    t = template({"Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
        "ThingName": {"Ref": "SerialNumber"},
        "AttributePayload": {"cert": {"Ref": "AWS::IoT::Certificate::Id"}}}}}})
    assert t.register({"SerialNumber": "1"}, "abc").attributes == {"cert": "abc"}


def test_policy_document_text_keeps_iot_policy_variables():
    doc = ('{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect",'
           '"Resource":"arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.'
           'ThingName}"}]}')
    t = template({"Resources": {"policy": {"Type": "AWS::IoT::Policy",
                                           "Properties": {"PolicyDocument": doc}}}})
    reg = t.register({"SerialNumber": "1"}, "c")
    assert "${iot:Connection.Thing.ThingName}" in reg.policies[0].document["Statement"][0][
        "Resource"]


def test_policy_by_name_is_returned_by_name():
    t = template({"Resources": {"policy": {"Type": "AWS::IoT::Policy",
                                           "Properties": {"PolicyName": "existing"}}}})
    assert t.register({"SerialNumber": "1"}, "c").policies[0].name == "existing"


def test_thing_name_outside_aws_characters_is_a_400():
    t = template({"Resources": thing({"Ref": "SerialNumber"})})
    with pytest.raises(Rejection, match="thing name"):
        t.register({"SerialNumber": "CAM.0001"}, "c")


# ------------------------------------------------------------ refused at load

@pytest.mark.parametrize("expr,fragment", [
    ({"Fn::GetAtt": ["thing", "Arn"]}, "Fn::GetAtt is not supported"),
    ({"Fn::Base64": "x"}, "Fn::Base64 is not supported"),
    ({"Fn::Join": ["-"]}, "Fn::Join takes a list of 2"),
    ({"Fn::If": ["Nowhere", "a", "b"]}, "condition Nowhere"),
    ({"Fn::FindInMap": ["NoMap", "a", "b"]}, "mapping NoMap"),
    ({"Fn::Equals": ["a", "a"]}, "Fn::Equals is not supported"),
    ({"Ref": "thing"}, "references to resources"),
])
def test_unsupported_or_malformed_functions_are_refused_when_loaded(expr, fragment):
    with pytest.raises(TemplateError, match=fragment):
        template({"Resources": thing(expr)})


@pytest.mark.parametrize("body,fragment", [
    ({"Parameters": {"N": {"Type": "Number"}}}, "only Type String"),
    ({"Resources": {"role": {"Type": "AWS::IAM::Role"}}}, "Type must be one of"),
    ({"Mappings": {"M": {"a": {"b": {"Ref": "SerialNumber"}}}}}, "literal values"),
    ({"DeviceConfiguration": {"Nested": {"a": "b"}}}, "nested objects"),
    ({"Resources": {"policy": {"Type": "AWS::IoT::Policy", "Properties": {
        "PolicyDocument": {"Statement": [{"Effect": "Maybe", "Action": "iot:*",
                                          "Resource": "*"}]}}}}}, "Effect"),
    ({"Resources": {"thing": {"Type": "AWS::IoT::Thing", "Condition": "C"}}},
     "unsupported keys"),
])
def test_templates_aws_would_not_run_here_are_refused_when_loaded(body, fragment):
    with pytest.raises(TemplateError, match=fragment):
        template(body)


def test_a_stack_whose_template_body_uses_getatt_is_refused(tmp_path):
    text = STACK.read_text().replace('{"Fn::Sub": "cameraDevice/${!SerialNumber}/booted"}',
                                     '{"Fn::GetAtt": ["thing", "Arn"]}')
    path = tmp_path / "stack.yaml"
    path.write_text(text)
    with pytest.raises(TemplateError, match="Fn::GetAtt is not supported"):
        load_stack(path)


def test_stack_hook_is_the_lambda_handler_module_beside_the_stack_with_its_environment():
    stack = load_stack()
    assert stack.hook.module_path == STACK.parent / "hook.py"
    assert (stack.hook.function, stack.hook.payload_version) == ("handler", "2020-04-01")
    assert stack.hook.environment == {"INVENTORY_TABLE": "ento-fleet-inventory",
                                      "DAILY_BUDGET": "8", "REREGISTRATION_WINDOW_HOURS": "24"}
    assert stack.inventory_table == "ento-fleet-inventory"
    assert stack.tables["ento-fleet-inventory"]["KeySchema"] == [
        {"AttributeName": "serial", "KeyType": "HASH"}]


def test_stack_hook_parameter_disabled_leaves_the_template_without_hook_but_the_inventory():
    stack = load_stack(parameters={"PreProvisioningHook": "Disabled",
                                   "DailyRegistrationBudget": "2"})
    assert stack.hook is None and stack.inventory_table == "ento-fleet-inventory"
    assert load_stack(parameters={"DailyRegistrationBudget": "2", "NamePrefix": "bugs",
                                  "ReregistrationWindowHours": "0"}
                      ).hook.environment == {"INVENTORY_TABLE": "bugs-fleet-inventory",
                                             "DAILY_BUDGET": "2",
                                             "REREGISTRATION_WINDOW_HOURS": "0"}


def test_stack_provisioning_secret_is_declared_but_never_an_attribute_or_configuration():
    stack = load_stack()
    assert stack.template.parameters["ProvisioningSecret"] == {"Type": "String", "Default": ""}
    secret = "s3cr3t-token-value"
    reg = stack.template.register({"SerialNumber": "CAM-0001", "ProvisioningSecret": secret},
                                  "c")
    assert secret not in json.dumps([reg.attributes, reg.device_configuration, reg.thing_name,
                                     [p.document for p in reg.policies]])
    # Without it (a camera from before the hook, the hook off) the template still registers.
    assert stack.template.register({"SerialNumber": "CAM-0001"}, "c").thing_name == \
        "ento-CAM-0001"


@pytest.mark.parametrize("prefix", ["ento", "bugs"])
def test_stack_claim_policy_denies_connecting_with_any_thing_name_of_its_prefix(prefix):
    stack = load_stack(parameters={"NamePrefix": prefix})
    docs = stack.claim_policies
    assert P.connect_allowed(docs, "CAM-0001", stack.context(client_id="CAM-0001"))
    for client_id in (f"{prefix}-CAM-0001", f"{prefix}-anything"):
        decision = P.connect_allowed(docs, client_id, stack.context(client_id=client_id))
        assert not decision and "explicit deny" in decision.reason


def test_the_hooks_default_budget_lets_through_all_a_camera_asks_in_a_day_on_its_own():
    """A camera leaves at most MAX_ORPHANING_PER_DAY RegisterThings unanswered in 24 h,
    then one is answered: a budget below that would refuse (65, not retried) a camera
    whose answers a bad link kept losing."""
    from cloud import hook
    from entomologist import spend
    budget = int(load_stack().hook.environment["DAILY_BUDGET"])
    assert budget == hook.DEFAULT_BUDGET
    assert budget > spend.MAX_ORPHANING_PER_DAY + 1
