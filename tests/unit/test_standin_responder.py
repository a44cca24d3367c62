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


def test_register_names_the_thing_from_the_serial(responder, events):
    outcome, body = register(responder, created(responder)["certificateOwnershipToken"])
    assert (outcome, body["thingName"]) == ("accepted", "ento-CAM-1")
    assert ("register-accepted", {"thingName": "ento-CAM-1",
                                  "certificateId": events[-1][1]["certificateId"]}) in events


@pytest.mark.parametrize("params,status", [({"SerialNumber": "CAM.1"}, 400), ({}, 400),
                                           ({"SerialNumber": ""}, 400)])
def test_a_serial_the_template_cannot_name_a_thing_after_is_rejected(responder, params, status):
    token = created(responder)["certificateOwnershipToken"]
    body = {"certificateOwnershipToken": token, "parameters": params}
    outcome, answer_body = answer(responder.handle(REGISTER, json.dumps(body).encode()))
    assert outcome == "rejected" and answer_body["statusCode"] == status


def test_an_unknown_token_or_template_is_rejected(responder):
    assert register(responder, "forged")[1]["errorCode"] == "InvalidCertificateOwnershipToken"
    token = created(responder)["certificateOwnershipToken"]
    body = json.dumps({"certificateOwnershipToken": token, "parameters": {}}).encode()
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
