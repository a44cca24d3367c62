"""What anyone holding the fleet's claim pair can ask for, with AWS's own client.

The claim certificate and key sit on every camera's SD card.  ``register``
does what AWS's fleet provisioning sample does with them, through
``awsiot.iotidentity.IotIdentityClient`` and nothing of the product:
connect with the claim pair and a client ID of the caller's choice, subscribe
to the four answer topics, CreateKeysAndCertificate, then RegisterThing with
the parameters given.  ``connects`` tries one connection.  The demo shows
with them what the pre-provisioning hook and the claim policy refuse; the
tests attack the stand-in with them.  Every wait is bounded.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Outcome:
    """How far a claim-pair registration got."""

    step: str                      # "connect", "create" or "register"
    accepted: bool
    answer: dict = field(default_factory=dict)

    @property
    def error_code(self) -> str | None:
        return self.answer.get("errorCode")

    @property
    def status_code(self) -> int | None:
        return self.answer.get("statusCode")

    def __str__(self) -> str:
        if self.accepted:
            return f"{self.step} accepted" + (f": thing {self.answer['thingName']}"
                                              if "thingName" in self.answer else "")
        if self.step == "connect":
            return f"connection refused ({self.answer.get('error', '')})"
        return (f"{self.step} rejected: {self.status_code} {self.error_code}")


def _connection(endpoint: str, port: int, ca: Path, cert: Path, key: Path, client_id: str):
    from awsiot import mqtt_connection_builder
    return mqtt_connection_builder.mtls_from_path(
        endpoint=endpoint, port=port, cert_filepath=str(cert), pri_key_filepath=str(key),
        ca_filepath=str(ca), client_id=client_id, clean_session=True, keep_alive_secs=30,
        enable_metrics_collection=False)


def connects(endpoint: str, port: int, ca: Path, cert: Path, key: Path, client_id: str,
             timeout: float = 10.0) -> bool:
    """Whether a connection with this certificate and client ID is accepted (a
    denied iot:Connect is closed before its CONNACK)."""
    connection = _connection(endpoint, port, ca, cert, key, client_id)
    try:
        connection.connect().result(timeout)
    except Exception:
        return False
    try:
        connection.disconnect().result(timeout)
    except Exception:
        pass
    return True


def register(endpoint: str, port: int, ca: Path, cert: Path, key: Path, client_id: str,
             template: str, parameters: dict[str, str], timeout: float = 10.0) -> Outcome:
    """CreateKeysAndCertificate, then RegisterThing with ``parameters``."""
    from awscrt import mqtt
    from awsiot import iotidentity
    connection = _connection(endpoint, port, ca, cert, key, client_id)
    try:
        connection.connect().result(timeout)
    except Exception as exc:
        return Outcome("connect", False, {"error": type(exc).__name__})
    try:
        client = iotidentity.IotIdentityClient(connection)
        answers: dict[str, tuple[bool, dict]] = {}
        arrived = {"create": threading.Event(), "register": threading.Event()}

        def on(step: str, accepted: bool):
            def callback(response) -> None:
                fields = ("certificate_ownership_token", "certificate_id", "thing_name",
                          "device_configuration", "status_code", "error_code", "error_message")
                answers[step] = (accepted, {k: getattr(response, k) for k in fields
                                            if getattr(response, k, None) is not None})
                arrived[step].set()
            return callback

        qos = mqtt.QoS.AT_LEAST_ONCE
        futures = [
            client.subscribe_to_create_keys_and_certificate_accepted(
                iotidentity.CreateKeysAndCertificateSubscriptionRequest(), qos,
                on("create", True))[0],
            client.subscribe_to_create_keys_and_certificate_rejected(
                iotidentity.CreateKeysAndCertificateSubscriptionRequest(), qos,
                on("create", False))[0],
            client.subscribe_to_register_thing_accepted(
                iotidentity.RegisterThingSubscriptionRequest(template_name=template), qos,
                on("register", True))[0],
            client.subscribe_to_register_thing_rejected(
                iotidentity.RegisterThingSubscriptionRequest(template_name=template), qos,
                on("register", False))[0]]
        for future in futures:
            future.result(timeout)
        client.publish_create_keys_and_certificate(
            iotidentity.CreateKeysAndCertificateRequest(), qos).result(timeout)
        if not arrived["create"].wait(timeout):
            return Outcome("create", False, {"error": "no answer"})
        accepted, answer = answers["create"]
        if not accepted:
            return Outcome("create", False, answer)
        client.publish_register_thing(iotidentity.RegisterThingRequest(
            template_name=template,
            certificate_ownership_token=answer["certificate_ownership_token"],
            parameters=parameters), qos).result(timeout)
        if not arrived["register"].wait(timeout):
            return Outcome("register", False, {"error": "no answer"})
        accepted, answer = answers["register"]
        names = {"thing_name": "thingName", "status_code": "statusCode",
                 "error_code": "errorCode", "error_message": "errorMessage",
                 "device_configuration": "deviceConfiguration"}
        return Outcome("register", accepted, {names.get(k, k): v for k, v in answer.items()})
    finally:
        try:
            connection.disconnect().result(timeout)
        except Exception:
            pass
