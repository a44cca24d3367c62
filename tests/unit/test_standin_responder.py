"""The stand-in's answering logic, without a broker."""
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fakes import public_keys_equal
from standin.ca import StandInCA
from standin.responder import (CREATE, CREATE_CSR, Answer, Drop, Faults, Rejection,
                               Responder)
from standin.template import ProvisioningTemplate, load_stack

REGISTER = "$aws/provisioning-templates/T/provision/json"
ca = StandInCA()


@pytest.fixture
def events():
    return []


@pytest.fixture
def faults():
    return Faults()


@pytest.fixture
def responder(events, faults):
    return Responder(ca, "T", "CAM-1", faults, lambda event, **f: events.append((event, f)),
                     key_factory=lambda: ec.generate_private_key(ec.SECP256R1()))


def answer(actions):
    (action,) = actions
    assert isinstance(action, Answer)
    return action.topic.rsplit("/", 1)[1], json.loads(action.payload)


def created(responder):
    return answer(responder.handle(CREATE, b"{}"))[1]


def register(responder, token, **params):
    body = {"certificateOwnershipToken": token, "parameters": params or {"SerialNumber": "CAM-1"}}
    return answer(responder.handle(REGISTER, json.dumps(body).encode()))


def test_create_keys_answers_a_certificate_for_the_key_it_sends(responder):
    body = created(responder)
    cert = x509.load_pem_x509_certificate(body["certificatePem"].encode())
    key = serialization.load_pem_private_key(body["privateKey"].encode(), None)
    assert public_keys_equal(cert.public_key(), key.public_key())
    assert body["certificateId"] == cert.fingerprint(hashes.SHA256()).hex()
    assert body["certificateOwnershipToken"] in responder.tokens


def test_create_from_csr_certifies_the_csr_key_and_sends_no_key(responder, events):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CAM-1")]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    outcome, body = answer(responder.handle(
        CREATE_CSR, json.dumps({"certificateSigningRequest": csr}).encode()))
    assert outcome == "accepted" and "privateKey" not in body
    cert = x509.load_pem_x509_certificate(body["certificatePem"].encode())
    assert public_keys_equal(cert.public_key(), key.public_key())
    assert "csr-parsed" in [e for e, _ in events]


@pytest.mark.parametrize("payload", [b"nope", b"{}", b'{"certificateSigningRequest": 5}',
                                     b'{"certificateSigningRequest": "-----BEGIN"}'])
def test_an_invalid_csr_is_rejected_400(responder, payload):
    assert answer(responder.handle(CREATE_CSR, payload)) == (
        "rejected", Rejection(400, "InvalidCsr", "the certificate signing request is invalid")
        .body())


def test_register_evaluates_the_stacks_template_by_default(responder, events):
    outcome, body = register(responder, created(responder)["certificateOwnershipToken"])
    assert outcome == "accepted"
    assert body == {"thingName": "ento-CAM-1",
                    "deviceConfiguration": {"BootTopic": "cameraDevice/CAM-1/booted"}}
    name, fields = events[-1]
    assert name == "register-accepted"
    assert fields == {"thingName": "ento-CAM-1", "certificateId": fields["certificateId"],
                      "attributes": {"serialNumber": "CAM-1"},
                      "deviceConfiguration": {"BootTopic": "cameraDevice/CAM-1/booted"}}


@pytest.mark.parametrize("params,code", [({"SerialNumber": "CAM.1"}, "InvalidRequest"),
                                         ({}, "InvalidParameters"),
                                         ({"Serial": "CAM-1"}, "InvalidParameters")])
def test_a_serial_the_template_cannot_name_a_thing_after_is_rejected(responder, events,
                                                                     params, code):
    token = created(responder)["certificateOwnershipToken"]
    body = {"certificateOwnershipToken": token, "parameters": params}
    outcome, answer_body = answer(responder.handle(REGISTER, json.dumps(body).encode()))
    assert (outcome, answer_body["statusCode"], answer_body["errorCode"]) == (
        "rejected", 400, code)
    assert events[-1][0] == "register-rejected"
    assert "register-accepted" not in [e for e, _ in events]


def site_template(default=None):
    body = load_stack().template.body
    body["Parameters"]["Site"] = {"Type": "String", **({"Default": default} if default else {})}
    body["Resources"]["thing"]["Properties"]["AttributePayload"]["site"] = {"Ref": "Site"}
    return ProvisioningTemplate.from_body(body, "T")


def test_a_declared_parameter_the_device_does_not_send_is_a_400_naming_it(events):
    responder = Responder(ca, "T", "CAM-1", Faults(), lambda e, **f: events.append((e, f)),
                          provisioning=site_template())
    outcome, body = register(responder, created(responder)["certificateOwnershipToken"])
    assert (outcome, body["statusCode"], body["errorCode"]) == (
        "rejected", 400, "InvalidParameters")
    assert "Site" in body["errorMessage"] and "without a Default" in body["errorMessage"]


def test_a_parameter_with_a_default_need_not_be_sent(events):
    responder = Responder(ca, "T", "CAM-1", Faults(), lambda e, **f: events.append((e, f)),
                          provisioning=site_template(default="north"))
    assert register(responder, created(responder)["certificateOwnershipToken"])[0] == "accepted"
    assert events[-1][1]["attributes"] == {"serialNumber": "CAM-1", "site": "north"}


def test_each_certificate_has_a_common_name_of_its_own_and_is_announced_before_the_answer(
        events):
    seen = []
    responder = Responder(ca, "T", "CAM-1", Faults(), lambda e, **f: events.append((e, f)),
                          on_registered=lambda reg, cn: seen.append((reg, cn, len(events))))
    first, second = created(responder), created(responder)
    names = {x509.load_pem_x509_certificate(b["certificatePem"].encode()).subject
             .get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for b in (first, second)}
    assert len(names) == 2 and all(n.startswith("ento-device-") for n in names)
    register(responder, second["certificateOwnershipToken"])
    (registration, cn, when), = seen
    assert cn == responder.common_names[second["certificateId"]] and cn in names
    assert registration.thing_name == "ento-CAM-1"
    assert registration.policies and registration.policies[0].document["Statement"]
    assert events[when - 1][0] == "register-accepted"


def test_an_unknown_token_or_template_is_rejected(responder):
    assert register(responder, "forged")[1]["errorCode"] == "InvalidCertificateOwnershipToken"
    token = created(responder)["certificateOwnershipToken"]
    body = json.dumps({"certificateOwnershipToken": token,
                       "parameters": {"SerialNumber": "CAM-1"}}).encode()
    outcome, err = answer(responder.handle("$aws/provisioning-templates/X/provision/json", body))
    assert err["statusCode"] == 404


def test_rejections_only_the_first_k_times(responder, faults):
    faults.reject_create, faults.reject_times = Rejection(429, "Throttling"), 2
    outcomes = [answer(responder.handle(CREATE, b"{}"))[0] for _ in range(3)]
    assert outcomes == ["rejected", "rejected", "accepted"]


def test_a_limiter_throttles_as_aws_does(responder, faults):
    faults.limiter = lambda kind: False
    assert answer(responder.handle(CREATE, b"{}"))[1]["statusCode"] == 429


def test_silence_a_delay_and_a_drop(responder, faults):
    faults.no_answer = True
    assert responder.handle(CREATE, b"{}") == []
    faults.no_answer, faults.delay = False, 0.5
    assert responder.handle(CREATE, b"{}")[0].delay == 0.5
    faults.drop_after = "create"
    assert responder.handle(CREATE, b"{}") == [Drop("CAM-1")]
    assert isinstance(responder.handle(CREATE, b"{}")[0], Answer)  # once only


@pytest.mark.parametrize("how,check", [
    ("not-json", lambda a: a.payload == b"<html>Bad gateway</html>"),
    ("missing-cert", lambda a: "certificatePem" not in json.loads(a.payload)),
    ("bad-pem", lambda a: "not a certificate" in json.loads(a.payload)["certificatePem"]),
])
def test_malformed_create_answers(responder, faults, how, check):
    faults.malformed_create = how
    (action,) = responder.handle(CREATE, b"{}")
    assert check(action)


def test_boot_messages_are_recorded(responder, events):
    assert responder.handle("cameraDevice/CAM-1/booted", b'{"bootStatus": true}') == []
    assert events[-1] == ("boot", {"topic": "cameraDevice/CAM-1/booted",
                                   "payload": '{"bootStatus": true}'})


@pytest.mark.parametrize("text", ["", "abc", "200:OK", "429", "600:X", "429:"])
def test_a_malformed_rejection_option_is_refused(text):
    with pytest.raises(ValueError):
        Rejection.parse(text)


def test_dropped_register_answers_still_register_the_thing_as_aws_without_receive(
        responder, faults, events):
    faults.drop_register_answers = True
    token = created(responder)["certificateOwnershipToken"]
    body = {"certificateOwnershipToken": token, "parameters": {"SerialNumber": "CAM-1"}}
    assert responder.handle(REGISTER, json.dumps(body).encode()) == []
    names = [name for name, _ in events]
    assert names[-2:] == ["register-accepted", "register-answer-dropped"]


def test_a_hook_refusal_is_403_access_denied_and_registers_nothing(events, faults):
    asked = []

    def hook(event):
        asked.append(event)
        return False

    responder = Responder(ca, "T", "CAM-1", faults, lambda e, **f: events.append((e, f)),
                          key_factory=lambda: ec.generate_private_key(ec.SECP256R1()),
                          hook=hook, hook_context=lambda template: {
                              "claimCertificateId": "c" * 64, "clientId": "CAM-1",
                              "templateArn": f"arn:aws:iot:r:1:provisioningtemplate/{template}"})
    body = created(responder)
    outcome, rejected = register(responder, body["certificateOwnershipToken"],
                                 SerialNumber="CAM-1", ProvisioningSecret="s3cret")
    assert (outcome, rejected["statusCode"], rejected["errorCode"]) == \
        ("rejected", 403, "ACCESS_DENIED")
    event, = asked
    assert set(event) == {"claimCertificateId", "certificateId", "certificatePem",
                          "templateArn", "clientId", "parameters"}
    assert event["certificateId"] == body["certificateId"]
    assert event["certificatePem"] == body["certificatePem"]
    assert event["parameters"] == {"SerialNumber": "CAM-1", "ProvisioningSecret": "s3cret"}
    assert event["templateArn"].endswith(":provisioningtemplate/T")
    assert not [e for e, _ in events if e == "register-accepted"]
    assert "s3cret" not in json.dumps(events)


def test_a_hook_that_allows_lets_the_template_register(events, faults):
    responder = Responder(ca, "T", "CAM-1", faults, lambda e, **f: events.append((e, f)),
                          key_factory=lambda: ec.generate_private_key(ec.SECP256R1()),
                          hook=lambda event: True)
    body = created(responder)
    outcome, accepted = register(responder, body["certificateOwnershipToken"],
                                 SerialNumber="CAM-1", ProvisioningSecret="s3cret")
    assert outcome == "accepted" and accepted["thingName"] == "ento-CAM-1"
    assert "s3cret" not in json.dumps(events) + json.dumps(accepted)


def test_a_stand_in_never_hands_out_one_rsa_key_twice_and_later_stand_ins_reuse_the_made_ones():
    from standin.responder import RsaKeys
    first, second = RsaKeys(), RsaKeys()
    keys = [first.next() for _ in range(3)]
    numbers = [k.private_numbers().p for k in keys]
    assert len(set(numbers)) == 3
    assert all(k.key_size == 2048 for k in keys)
    assert [second.next().private_numbers().p for _ in range(3)] == numbers

