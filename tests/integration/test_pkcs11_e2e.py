"""A key born in a SoftHSM2 token gets its certificate from the stand-in through a CSR the
token signed, then connects to the stand-in's mosquitto with awscrt.

The token-key connection runs in a child process (bench/connect_once.py): awscrt
never finalises a PKCS#11 module, and each test has its own SOFTHSM2_CONF.
"""
import json
import os
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from entomologist import mqtt
from bench.tls_sniff import SniffProxy, server_hello_version
from e2e import ROOT
from entomologist.pkcs11_csr import make_csr
from entomologist.pkcs11_key import certificate_public_key_der, open_token
from iot_standin import CREATE_CSR, StandIn
from softhsm import SOFTHSM_MODULE, make_token

FINAL = "entomologist-device"


@pytest.fixture
def standin(tmp_path):
    """Without the stack's policies: these tests connect with certificates they
    have the stand-in's CA sign directly, which no RegisterThing attached to a
    thing (AWS would refuse them too)."""
    with StandIn(tmp_path, policies=False) as s:
        yield s


@pytest.fixture
def token(tmp_path, monkeypatch):
    return make_token(tmp_path / "hsm", monkeypatch=monkeypatch)


def certificate_from_csr(standin, csr_pem: bytes) -> bytes:
    """CreateCertificateFromCsr over the claim connection (a key file, as in the product)."""
    from awscrt.mqtt import QoS
    endpoint = mqtt.Endpoint("localhost", standin.port, standin.ca_path)
    link = mqtt.connect(endpoint, standin.claim_cert, standin.claim_key, standin.serial, 20)
    try:
        topics = [CREATE_CSR + "/accepted", CREATE_CSR + "/rejected"]
        pending = [(t, link.connection.subscribe(
            t, QoS.AT_LEAST_ONCE,
            callback=lambda topic, payload, **_: link.events.put((topic, bytes(payload))))[0])
            for t in topics]
        link.wait_subscribed(pending, 20, refused_hint="the stand-in")
        link.publish(CREATE_CSR, json.dumps({"certificateSigningRequest":
                                             csr_pem.decode()}).encode(), 20)
        topic, payload = link.next_event(20)
    finally:
        link.close()
    assert topic.endswith("/accepted"), payload
    return json.loads(payload)["certificatePem"].encode()


def connect_once(port: int, ca, cert, token=None, key=None, pin_file=None, env=None):
    args = [sys.executable, str(ROOT / "bench" / "connect_once.py"), "--port", str(port),
            "--ca", str(ca), "--cert", str(cert), "--timeout", "10"]
    if key is not None:
        args += ["--key", str(key)]
    else:
        args += ["--pkcs11-library", str(SOFTHSM_MODULE), "--token-label", token.label,
                 "--pin-file", str(pin_file or token.pin_file)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("algorithm", ["EC-P256", "RSA-2048"])
def test_token_key_gets_a_certificate_through_a_token_signed_csr_and_publishes_over_tls_1_2(
        standin, token, tmp_path, algorithm):
    with open_token(token.settings()) as t:
        pair = t.staged_or_new(algorithm)
        csr_pem = make_csr(pair, standin.serial)
        token_key = pair.public_key_der()
    cert_pem = certificate_from_csr(standin, csr_pem)
    cert_dir = tmp_path / "cert"
    cert_dir.mkdir(mode=0o700)
    cert_path = cert_dir / "certificate.pem.crt"
    cert_path.write_bytes(cert_pem)
    os.chmod(cert_path, 0o644)
    with open_token(token.settings()) as t:
        # The certificate carries the token key: the staged pair becomes the final one.
        assert t.reconcile(certificate_public_key_der(cert_pem)).id == pair.id
    cert_key = x509.load_pem_x509_certificate(cert_pem).public_key()
    assert cert_key.public_bytes(serialization.Encoding.DER,
                                 serialization.PublicFormat.SubjectPublicKeyInfo) == token_key

    with SniffProxy(standin.port) as proxy:
        proc = connect_once(proxy.port, standin.ca_path, cert_path, token=token)
    assert proc.returncode == 0, proc.stderr
    (boot,) = standin.wait_for("boot")
    assert json.loads(boot["payload"]) == {"serialID": "CAM-0001", "bootStatus": True}
    # awscrt 0.36.1: "TLS 1.3 with PKCS#11 is not supported yet".
    assert proxy.versions == ["TLSv1.2"]

    assert token.private_key_attributes(FINAL)["EXTRACTABLE"] is False
    assert [(c, label) for c, label, _ in token.objects()] == [("PRIVATE_KEY", FINAL),
                                                               ("PUBLIC_KEY", FINAL)]
    assert sorted(p.name for p in cert_dir.iterdir()) == ["certificate.pem.crt"]
    assert oct(os.stat(cert_path).st_mode & 0o777) == "0o644"
    assert "PIN" not in proc.stderr and token.settings().pin_file.read_text().strip() \
        not in proc.stderr + proc.stdout


def test_a_key_file_connection_to_the_same_broker_negotiates_tls_1_3(standin, tmp_path):
    cert, key = standin.ca.write_pair(tmp_path, "device", "CAM-0001")
    with SniffProxy(standin.port) as proxy:
        proc = connect_once(proxy.port, standin.ca_path, cert, key=key)
    assert proc.returncode == 0, proc.stderr
    assert proxy.versions == ["TLSv1.3"]
    standin.wait_for("boot")


def issued_for_token(standin, token, tmp_path):
    with open_token(token.settings()) as t:
        pair = t.generate("EC-P256", label=FINAL)
        der = pair.public_key_der()
    cert = standin.ca.issue(serialization.load_der_public_key(der), "CAM-0001")
    path = tmp_path / "certificate.pem.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_wrong_pin_exits_78_before_any_connection(standin, token, tmp_path):
    cert = issued_for_token(standin, token, tmp_path)
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000\n")
    os.chmod(wrong, 0o600)
    with SniffProxy(standin.port) as proxy:
        proc = connect_once(proxy.port, standin.ca_path, cert, token=token, pin_file=wrong)
    assert proc.returncode == 78, proc.stderr
    assert "refused the PIN" in proc.stderr and "0000" not in proc.stderr
    assert proxy.versions == [] and standin.events("boot") == []


def test_a_missing_module_or_absent_token_exits_75(standin, token, tmp_path):
    cert = issued_for_token(standin, token, tmp_path)
    elsewhere = tmp_path / "empty-tokens"
    elsewhere.mkdir()
    empty_conf = tmp_path / "empty.conf"
    empty_conf.write_text(f"directories.tokendir = {elsewhere}\nobjectstore.backend = file\n")
    proc = connect_once(standin.port, standin.ca_path, cert, token=token,
                        env={"SOFTHSM2_CONF": str(empty_conf)})
    assert proc.returncode == 75 and "no token labelled" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "connect_once.py"),
                           "--port", str(standin.port), "--ca", str(standin.ca_path),
                           "--cert", str(cert), "--pkcs11-library", str(tmp_path / "gone.so"),
                           "--token-label", token.label, "--pin-file", str(token.pin_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and "is not there" in proc.stderr, proc.stderr
    assert standin.events("boot") == []


def test_server_hello_parser_reads_supported_versions_and_waits_for_a_whole_message():
    def hello(extensions: bytes, legacy=b"\x03\x03") -> bytes:
        body = legacy + bytes(32) + b"\x00" + b"\x13\x01" + b"\x00" + \
            len(extensions).to_bytes(2, "big") + extensions
        handshake = b"\x02" + len(body).to_bytes(3, "big") + body
        return b"\x16\x03\x03" + len(handshake).to_bytes(2, "big") + handshake
    tls13 = hello(b"\x00\x2b\x00\x02\x03\x04")
    assert server_hello_version(tls13) == "TLSv1.3"
    assert server_hello_version(hello(b"\xff\x01\x00\x01\x00")) == "TLSv1.2"
    assert server_hello_version(tls13[:-3]) is None
