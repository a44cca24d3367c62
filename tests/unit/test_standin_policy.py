"""standin/policy.py: AWS IoT policy evaluation and its mosquitto acl_file rendering.

Policies marked "AWS example" are those of the AWS IoT developer guide
(provision-wo-cert.html's claim policy, basic-policy-variables.html,
pub-sub-policy.html), with its account 123456789012 and region us-east-1.
"""
import pytest

from standin.policy import (Context, Policy, PolicyError, allowed, connect_allowed, decide,
                            render_acl)

ARN = "arn:aws:iot:us-east-1:123456789012:"
CTX = Context(client_id="dev1")


def doc(*statements) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(action, resource, **extra) -> dict:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def deny(action, resource, **extra) -> dict:
    return {"Effect": "Deny", "Action": action, "Resource": resource, **extra}


def thing_ctx(**fields) -> Context:
    base = dict(client_id="thing1", thing_name="thing1", is_attached=True,
                attributes={"serialNumber": "S1"})
    return Context(**{**base, **fields})


# ------------------------------------------------------------ AWS examples

AWS_CLAIM_POLICY = doc(
    allow(["iot:Connect"], "*"),
    allow(["iot:Publish", "iot:Receive"], [
        ARN + "topic/$aws/certificates/create/*",
        ARN + "topic/$aws/provisioning-templates/templateName/provision/*"]),
    allow("iot:Subscribe", [
        ARN + "topicfilter/$aws/certificates/create/*",
        ARN + "topicfilter/$aws/provisioning-templates/templateName/provision/*"]))


def test_aws_claim_policy_allows_create_keys_and_register_thing():
    for action, name in [("iot:Publish", "$aws/certificates/create/json"),
                         ("iot:Subscribe", "$aws/certificates/create/json/accepted"),
                         ("iot:Receive", "$aws/certificates/create/json/rejected"),
                         ("iot:Publish", "$aws/provisioning-templates/templateName/provision/json")]:
        assert allowed(AWS_CLAIM_POLICY, action, name, CTX), (action, name)
    assert connect_allowed(AWS_CLAIM_POLICY, "anything")


def test_aws_claim_policy_does_not_cover_create_from_csr():
    assert not allowed(AWS_CLAIM_POLICY, "iot:Publish", "$aws/certificates/create-from-csr/json",
                       CTX)
    assert not allowed(AWS_CLAIM_POLICY, "iot:Subscribe",
                       "$aws/certificates/create-from-csr/json/accepted", CTX)


def test_aws_client_id_variable_example_scopes_connect_and_publish():
    policy = doc(allow(["iot:Connect"], [ARN + "client/${iot:ClientId}"]),
                 allow(["iot:Publish"], [ARN + "topic/my/topic/${iot:ClientId}"]))
    ctx = Context(client_id="clientid1")
    assert allowed(policy, "iot:Publish", "my/topic/clientid1", ctx)
    assert not allowed(policy, "iot:Publish", "my/topic/clientid2", ctx)
    assert connect_allowed(policy, "clientid1", ctx)


def test_aws_example_plus_in_a_topicfilter_resource_is_a_literal_character():
    policy = doc(allow(["iot:Connect"], [ARN + "client/${iot:Connection.Thing.ThingName}"]),
                 allow(["iot:Subscribe"], [ARN + "topicfilter/some/+/topic"]))
    ctx = thing_ctx()
    assert allowed(policy, "iot:Subscribe", "some/+/topic", ctx)
    assert not allowed(policy, "iot:Subscribe", "some/sensor/topic", ctx)


def test_aws_example_star_in_a_topicfilter_resource_spans_characters_and_levels():
    policy = doc(allow(["iot:Subscribe"], [ARN + "topicfilter/some/*/topic"]))
    assert allowed(policy, "iot:Subscribe", "some/string1/topic", CTX)
    assert allowed(policy, "iot:Subscribe", "some/+/topic", CTX)
    assert allowed(policy, "iot:Subscribe", "some/a/b/topic", CTX)  # unlike MQTT's +
    assert not allowed(policy, "iot:Subscribe", "some/topic", CTX)


def test_aws_example_receive_denied_on_a_subscribed_topic():
    policy = doc(allow("iot:Subscribe", ARN + "topicfilter/device/update"),
                 deny("iot:Receive", ARN + "topic/device/update"))
    assert allowed(policy, "iot:Subscribe", "device/update", CTX)
    assert decide(policy, "iot:Receive", "device/update", CTX).reason == "explicit deny"


def test_aws_example_not_resource_allows_receive_outside_a_restricted_branch():
    policy = doc({"Effect": "Allow", "Action": "iot:Receive",
                  "NotResource": ARN + "topic/a/restricted/*"})
    assert allowed(policy, "iot:Receive", "a/open/x", CTX)
    assert not allowed(policy, "iot:Receive", "a/restricted/x", CTX)


def test_aws_example_deny_publish_with_an_undefined_variable_does_not_apply():
    # The guide's "Registered devices (10)" example denies topic/${iot:Thing.ThingName}/bar;
    # iot:Thing.ThingName is no variable AWS defines, so the Deny matches nothing.
    policy = doc(allow("iot:Publish", ARN + "topic/*"),
                 deny("iot:Publish", ARN + "topic/${iot:Thing.ThingName}/bar"))
    assert allowed(policy, "iot:Publish", "thing1/bar", thing_ctx())


# ------------------------------------------------------------ evaluation rules

def test_default_is_deny():
    assert decide(doc(allow("iot:Publish", ARN + "topic/a")), "iot:Publish", "b",
                  CTX).reason == "no statement allows"


def test_explicit_deny_wins_over_allow_in_any_document():
    a = doc(allow("iot:*", "*"))
    b = doc(deny("iot:Publish", ARN + "topic/secret/*"))
    d = decide([a, b], "iot:Publish", "secret/x", CTX)
    assert (d.allowed, d.reason, d.statement) == (False, "explicit deny", 0)
    assert allowed([a, b], "iot:Publish", "open/x", CTX)


@pytest.mark.parametrize("action,granted", [
    ("iot:*", {"iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"}),
    ("iot:Pub*", {"iot:Publish"}),
    ("IOT:publish", {"iot:Publish"}),
    ("iot:?eceive", {"iot:Receive"}),
    ("*", {"iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"}),
])
def test_action_wildcards_and_case(action, granted):
    policy = doc(allow(action, "*"))
    for a in ("iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"):
        assert allowed(policy, a, "x", CTX) is (a in granted)


def test_not_action_allows_everything_else():
    policy = doc({"Effect": "Allow", "NotAction": "iot:Publish", "Resource": "*"})
    assert not allowed(policy, "iot:Publish", "t", CTX)
    assert allowed(policy, "iot:Subscribe", "t", CTX)


def test_question_mark_matches_exactly_one_character():
    policy = doc(allow("iot:Publish", ARN + "topic/room??/temp"))
    assert allowed(policy, "iot:Publish", "room12/temp", CTX)
    assert not allowed(policy, "iot:Publish", "room1/temp", CTX)


def test_hash_in_a_topic_resource_is_literal():
    policy = doc(allow("iot:Subscribe", ARN + "topicfilter/a/#"))
    assert allowed(policy, "iot:Subscribe", "a/#", CTX)
    assert not allowed(policy, "iot:Subscribe", "a/b", CTX)


def test_resource_type_must_match_the_action():
    policy = doc(allow(["iot:Publish", "iot:Subscribe"], ARN + "topic/a"))
    assert allowed(policy, "iot:Publish", "a", CTX)
    assert not allowed(policy, "iot:Subscribe", "a", CTX)  # needs topicfilter/a


def test_other_region_or_account_does_not_match():
    policy = doc(allow("iot:Publish", "arn:aws:iot:eu-west-1:123456789012:topic/a"))
    assert not allowed(policy, "iot:Publish", "a", CTX)
    assert allowed(policy, "iot:Publish", "a", Context(region="eu-west-1"))


def test_thing_name_variable_needs_an_attached_thing():
    policy = doc(allow("iot:Connect", ARN + "client/${iot:Connection.Thing.ThingName}"))
    assert connect_allowed(policy, "thing1", thing_ctx())
    assert not connect_allowed(policy, "other", thing_ctx())
    assert not connect_allowed(policy, "thing1", thing_ctx(is_attached=None))


def test_thing_attribute_variable_resolves_from_the_registry():
    policy = doc(allow("iot:Publish",
                       ARN + "topic/cameraDevice/${iot:Connection.Thing.Attributes[serialNumber]}/*"))
    assert allowed(policy, "iot:Publish", "cameraDevice/S1/booted", thing_ctx())
    assert not allowed(policy, "iot:Publish", "cameraDevice/S2/booted", thing_ctx())


def test_substituted_values_are_literal_not_wildcards():
    policy = doc(allow("iot:Publish", ARN + "topic/c/${iot:ClientId}"))
    assert not allowed(policy, "iot:Publish", "c/anything", Context(client_id="*"))
    assert allowed(policy, "iot:Publish", "c/*", Context(client_id="*"))


def test_escape_variables_stand_for_literal_characters():
    policy = doc(allow("iot:Publish", ARN + "topic/odd/${*}"))
    assert allowed(policy, "iot:Publish", "odd/*", CTX)
    assert not allowed(policy, "iot:Publish", "odd/x", CTX)


def test_is_attached_condition_admits_only_registered_things():
    policy = doc(allow("iot:Connect", "*", Condition={
        "Bool": {"iot:Connection.Thing.IsAttached": "true"}}))
    assert connect_allowed(policy, "thing1", thing_ctx())
    assert not connect_allowed(policy, "thing1", thing_ctx(is_attached=False))
    assert not connect_allowed(policy, "thing1", Context())


def test_string_conditions_with_variables_and_like():
    policy = doc(allow("iot:Connect", "*", Condition={
        "StringEquals": {"iot:ClientId": "${iot:Connection.Thing.ThingName}"}}),
        allow("iot:Publish", "*", Condition={"StringLike": {"iot:ClientId": "cam-*"}}))
    assert connect_allowed(policy, "thing1", thing_ctx())
    assert not connect_allowed(policy, "thing2", thing_ctx())
    assert allowed(policy, "iot:Publish", "t", Context(client_id="cam-7"))
    assert not allowed(policy, "iot:Publish", "t", Context(client_id="dog-7"))


def test_for_all_values_connect_attributes_as_in_aws_examples():
    policy = doc(allow("iot:Connect", "*", Condition={
        "ForAllValues:StringEquals": {"iot:ConnectAttributes": ["PersistentConnect"]}}))
    assert connect_allowed(policy, "c", Context(connect_attributes=["PersistentConnect"]))
    assert not connect_allowed(policy, "c", Context(connect_attributes=["LastWill"]))


@pytest.mark.parametrize("bad,fragment", [
    ({"Statement": [allow("iot:Publish", "*", Condition={"DateLessThan": {"k": "v"}})]},
     "DateLessThan"),
    ({"Statement": [{"Effect": "Allow", "Action": "iot:Publish"}]}, "Resource"),
    ({"Version": "2099-01-01", "Statement": [allow("iot:Publish", "*")]}, "Version"),
    ({"Statement": []}, "non-empty"),
    ({"Statement": [allow("iot:Publish", "*", Principal="*")]}, "Principal"),
    ("{not json", "not JSON"),
])
def test_documents_the_evaluator_cannot_honour_are_refused(bad, fragment):
    with pytest.raises(PolicyError, match=fragment):
        Policy.parse(bad)


def test_a_document_may_be_json_text_with_one_statement_object():
    text = '{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Publish",' \
           '"Resource":"*"}}'
    assert allowed(text, "iot:Publish", "t", CTX)


# ------------------------------------------------------------ mosquitto acl_file

def test_acl_renders_the_claim_policy_for_dollar_aws_topics():
    requests = ["$aws/certificates/create/json",
                "$aws/provisioning-templates/templateName/provision/json"]
    r = render_acl("fleet-claim", AWS_CLAIM_POLICY, CTX,
                   topics=requests + [f"{t}/accepted" for t in requests])
    assert r.text() == (
        "user fleet-claim\n"
        "topic write $aws/certificates/create/json\n"
        "topic write $aws/provisioning-templates/templateName/provision/json\n"
        "topic read $aws/certificates/create/#\n"
        "topic read $aws/provisioning-templates/templateName/provision/#\n")


def test_a_claim_policy_never_lets_a_client_publish_the_services_answers():
    # AWS IoT refuses a client's publish to a reserved answer topic whatever the
    # policy's pattern allows; without this, any holder of the claim certificate
    # could answer another device's CreateKeysAndCertificate with its own key.
    answer = "$aws/certificates/create/json/accepted"
    r = render_acl("fleet-claim", AWS_CLAIM_POLICY, CTX, topics=[answer])
    assert not [line for line in r.lines if line.startswith(("topic write", "topic readwrite"))
                and ("#" in line or line.endswith(answer))]


def test_acl_resolves_thing_variables_for_the_identity():
    policy = doc(allow("iot:Publish",
                       ARN + "topic/cameraDevice/${iot:Connection.Thing.Attributes[serialNumber]}"
                       "/booted"))
    assert render_acl("cert1", policy, thing_ctx()).lines == ["topic write cameraDevice/S1/booted"]


def test_acl_star_alone_also_grants_reading_dollar_aws():
    # mosquitto's # at the first level never matches $ topics; AWS's * does.
    # Publishing under $aws/ is rendered only for named request topics.
    assert render_acl("u", doc(allow("iot:*", "*")), CTX).lines == [
        "topic readwrite #", "topic read $aws/#"]


def test_acl_read_needs_both_subscribe_and_receive():
    policy = doc(allow("iot:Subscribe", ARN + "topicfilter/a/*"),
                 allow("iot:Receive", ARN + "topic/a/b"),
                 allow("iot:Subscribe", ARN + "topicfilter/only/subscribe"))
    assert render_acl("u", policy, CTX).lines == ["topic read a/b"]


def test_acl_leaves_out_what_it_cannot_express_and_says_so():
    policy = doc(allow("iot:Publish", ARN + "topic/room*/temp"),
                 allow("iot:Publish", ARN + "topic/c/${iot:ClientId}"),
                 allow("iot:Subscribe", ARN + "topicfilter/a/+/b"),
                 allow("iot:Publish", ARN + "topic/x/*"),
                 deny("iot:Publish", ARN + "topic/x/secret"))
    r = render_acl("u", policy, Context())
    assert r.lines == []
    assert any("room*/temp" in n and "no exact MQTT filter" in n for n in r.notes)
    assert any("iot:ClientId" in n for n in r.notes)
    assert any("a/+/b" in n for n in r.notes)
    assert any("x/*" in n and "Deny" in n for n in r.notes)


def test_acl_decides_given_topics_exactly_when_patterns_cannot():
    policy = doc(allow("iot:Publish", ARN + "topic/room*/temp"),
                 allow("iot:Publish", ARN + "topic/x/*"),
                 deny("iot:Publish", ARN + "topic/x/secret"))
    r = render_acl("u", policy, CTX, topics=["room1/temp", "x/open", "x/secret", "other"])
    assert r.lines == ["topic write room1/temp", "topic write x/open"]


def test_acl_of_a_policy_without_the_boot_topic_grants_nothing_for_it():
    policy = doc(allow("iot:Connect", ARN + "client/${iot:Connection.Thing.ThingName}"))
    r = render_acl("cert1", policy, thing_ctx(), topics=["cameraDevice/S1/booted"])
    assert r.text() == "user cert1\n"


def test_plugin_rules_keep_subscribe_receive_and_publish_apart():
    """acl_file's "read" needs Subscribe and Receive; the plugin's rules take each alone."""
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": "arn:aws:iot:us-east-1:123456789012:topicfilter/only/subscribe/*"},
        {"Effect": "Allow", "Action": "iot:Receive",
         "Resource": "arn:aws:iot:us-east-1:123456789012:topic/only/receive/*"},
        {"Effect": "Allow", "Action": "iot:Publish",
         "Resource": "arn:aws:iot:us-east-1:123456789012:topic/out"}]}
    rendering = render_acl("dev", [doc], Context(region="us-east-1", account="123456789012"))
    assert rendering.lines == ["topic write out"]
    assert [(a["acltype"], a["topic"], a["allow"]) for a in rendering.dynsec_acls()] == [
        ("publishClientSend", "out", True), ("subscribePattern", "only/subscribe/#", True),
        ("publishClientReceive", "only/receive/#", True)]
