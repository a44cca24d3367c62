"""Fleet provisioning by claim over AWS's own client, ``awsiot.iotidentity.IotIdentityClient``.

The V1 client, not IotIdentityClientV2: V2 subscribes and unsubscribes around
every request, about two more round trips per first boot.  All four response
topics are subscribed before any SUBACK is awaited (one round trip).

What the client hands back is checked before use: it passes ``None`` for a
payload that is not a JSON object, its models do not check field types, and
their ``repr`` shows the private key and the ownership token, so no model
object is ever logged.
"""
from __future__ import annotations

import json
import logging
import queue
from dataclasses import dataclass, field
from typing import Callable

from . import logs, mqtt
from .config import CERTIFICATE_ID_RE, MAX_OWNERSHIP_TOKEN_CHARS, THING_NAME_RE
from .errors import (EntoError, InventoryRefused, Rejected, ServiceBusy, ServiceError,
                     TransientError)
from .mqtt import Link
from .retries import BUSY_BACKOFF, Deadline, with_retries

log = logging.getLogger("entomologist")

CREATE_KEYS = "CreateKeysAndCertificate"
CREATE_FROM_CSR = "CreateCertificateFromCsr"
REGISTER = "RegisterThing"

# Rejections worth another try; any other 4xx is final.
RETRYABLE_ERROR_CODES = {"Throttling", "ThrottlingException", "TooManyRequests",
                         "ServiceUnavailable", "InternalError", "InternalFailure"}
# Far above anything AWS sends (an RSA-2048 key is 1.7 KB, a token about 1 KB).
MAX_PEM_CHARS = 16 * 1024
MAX_TOKEN_CHARS = MAX_OWNERSHIP_TOKEN_CHARS
MAX_DEVICE_CONFIGURATION_CHARS = 64 * 1024


@dataclass(frozen=True)
class Created:
    certificate_id: str
    certificate_pem: bytes
    private_key_pem: bytes | None = field(repr=False)
    token: str = field(repr=False)


@dataclass(frozen=True)
class Registered:
    thing_name: str
    device_configuration: dict


def policy_resource(topic: str) -> str:
    """The claim policy's topic pattern that covers a response topic of the client:
    .../json/accepted -> .../*."""
    return topic.split("/json/")[0] + "/*"


def claim_policy_hint(resources: list[str]) -> str:
    return (f"the claim certificate, that it is active, and that its policy allows "
            f"iot:Publish, iot:Receive and iot:Subscribe on {' and '.join(resources)}")


def register_hint(template_name: str, resource: str) -> str:
    return (f"TEMPLATE_NAME ({template_name}), TEMPLATE_PARAMETERS, the template's "
            f"pre-provisioning hook, and that the claim policy allows {resource}")


def silence_hint(resource: str) -> str:
    """No answer: the claim policy before the network.  AWS accepts the request and
    drops the answer when the claim policy lacks iot:Receive, and a RegisterThing
    may then have registered a certificate that no device holds."""
    return (f"that the claim policy allows iot:Receive on {resource} (without it every "
            f"answer is dropped), then the network link")


# How AWS IoT answers RegisterThing when the template's pre-provisioning hook
# denies it, fails or times out: "the provisioning request fails with
# ACCESS_DENIED" (AWS IoT developer guide, Pre-provisioning hooks), as a 403.
HOOK_DENIED_CODES = {"accessdenied", "accessdeniedexception"}


def hook_refused(status: object, code: object) -> bool:
    return (status == 403 and not isinstance(status, bool)) or (
        isinstance(code, str) and code.replace("_", "").lower() in HOOK_DENIED_CODES)


def inventory_hint(serial: str) -> str:
    return (f"with the operator: `python cloud/inventory.py show {serial}` tells whether this "
            f"serial is unknown, revoked, already provisioned (then `allow-reprovision "
            f"{serial}`) or over its daily registrations, or whether PROVISIONING_SECRET_FILE "
            f"holds another camera's secret")


def connect_with_claim(config, settings, client_id: str, deadline: Deadline,
                       build: mqtt.Builder | None = None) -> Link:
    """The claim certificate's connection to the endpoint, as ``client_id``, for one
    attempt (``config``: a Config; ``settings``: its ProvisioningSettings)."""
    return mqtt.connect(mqtt.Endpoint(config.host, config.port, config.root_ca),
                        settings.claim_cert, settings.claim_key, client_id,
                        deadline.step("connect with the claim certificate"), build,
                        proxy=config.proxy, clock=deadline.clock)


class FleetProvisioning:
    """CreateKeysAndCertificate or CreateCertificateFromCsr, then RegisterThing,
    on one claim connection."""

    def __init__(self, link: Link, template_name: str, csr_mode: bool, deadline: Deadline,
                 serial: str = ""):
        from awsiot import iotidentity
        self._iotidentity = iotidentity
        self.client = iotidentity.IotIdentityClient(link.connection)
        self.link = link
        self.template_name = template_name
        self.create_operation = CREATE_FROM_CSR if csr_mode else CREATE_KEYS
        self.deadline = deadline
        self.serial = serial
        # Each operation's claim-policy resource, from the topics the client
        # subscribed to (the client, not this module, knows the topics).
        self.resources: dict[str, str] = {}
        # Each operation's request topic: its response topics less /accepted.
        self.request_topics: dict[str, str] = {}

    # -- subscriptions

    def subscribe(self) -> None:
        from awscrt import mqtt
        iot, client = self._iotidentity, self.client
        qos = mqtt.QoS.AT_LEAST_ONCE
        if self.create_operation == CREATE_FROM_CSR:
            create_request = iot.CreateCertificateFromCsrSubscriptionRequest()
            create_subscriptions = (client.subscribe_to_create_certificate_from_csr_accepted,
                                    client.subscribe_to_create_certificate_from_csr_rejected)
        else:
            create_request = iot.CreateKeysAndCertificateSubscriptionRequest()
            create_subscriptions = (client.subscribe_to_create_keys_and_certificate_accepted,
                                    client.subscribe_to_create_keys_and_certificate_rejected)
        register_request = iot.RegisterThingSubscriptionRequest(template_name=self.template_name)
        pending = []
        for operation, request, (accepted, rejected) in (
                (self.create_operation, create_request, create_subscriptions),
                (REGISTER, register_request, (client.subscribe_to_register_thing_accepted,
                                              client.subscribe_to_register_thing_rejected))):
            for outcome, subscribe in (("accepted", accepted), ("rejected", rejected)):
                future, topic = subscribe(request, qos, self._deliver(operation, outcome))
                pending.append((topic, future))
                self.resources[operation] = policy_resource(topic)
                self.request_topics[operation] = topic.rsplit("/", 1)[0]
        resources = " and ".join((self.resources[self.create_operation], self.resources[REGISTER]))
        self.link.wait_subscribed(
            pending, self.deadline.step("subscribe"),
            refused_hint=f"the claim policy, the claim certificate's: a refused SUBACK means it "
                         f"does not allow iot:Subscribe on that topic; it needs iot:Publish, "
                         f"iot:Receive and iot:Subscribe on {resources}")

    def _deliver(self, operation: str, outcome: str):
        def deliver(answer) -> None:
            self.link.events.put((operation, outcome, answer))
        return deliver

    # -- requests

    def create(self, csr_pem: bytes | None = None) -> Created:
        iot = self._iotidentity
        operation = self.create_operation
        if operation == CREATE_FROM_CSR:
            if csr_pem is None:
                raise ValueError("CSR mode needs a CSR")
            request = iot.CreateCertificateFromCsrRequest(
                certificate_signing_request=csr_pem.decode("ascii"))
            publish = self.client.publish_create_certificate_from_csr
        else:
            request = iot.CreateKeysAndCertificateRequest()
            publish = self.client.publish_create_keys_and_certificate
        answer = self._ask(operation, lambda qos: publish(request, qos))
        certificate_id = _string(answer, "certificate_id", "certificateId", operation, 64)
        if not CERTIFICATE_ID_RE.fullmatch(certificate_id):
            raise ServiceError(f"{operation} answered an invalid certificateId "
                               f"{logs.shown(certificate_id)}", hint="the provisioning service")
        token = _string(answer, "certificate_ownership_token", "certificateOwnershipToken",
                        operation, MAX_TOKEN_CHARS)
        logs.redact(token)
        certificate_pem = _string(answer, "certificate_pem", "certificatePem", operation,
                                  MAX_PEM_CHARS)
        private_key = None
        if operation == CREATE_KEYS:
            private_key = _string(answer, "private_key", "privateKey", operation,
                                  MAX_PEM_CHARS).encode()
        log.info("%s accepted: certificate %s", operation, certificate_id)
        return Created(certificate_id, certificate_pem.encode(), private_key, token)

    def register(self, token: str, parameters: dict[str, str]) -> Registered:
        request = self._iotidentity.RegisterThingRequest(
            template_name=self.template_name, certificate_ownership_token=token,
            parameters=parameters)
        answer = self._ask(REGISTER, lambda qos: self.client.publish_register_thing(request, qos))
        thing_name = _string(answer, "thing_name", "thingName", REGISTER, 128)
        if logs.holds_secret(thing_name):
            raise ServiceError(f"{REGISTER} answered a thingName made of the provisioning "
                               f"secret", hint="the provisioning template: ProvisioningSecret "
                                               "is for the hook only")
        if not THING_NAME_RE.fullmatch(thing_name):
            raise ServiceError(f"{REGISTER} answered an invalid thingName "
                               f"{logs.shown(thing_name)}", hint="the provisioning template")
        log.info("%s accepted: thing %s", REGISTER, thing_name)
        return Registered(thing_name, without_secret(device_configuration(answer)))

    def _ask(self, operation: str, publish: Callable[[object], object]):
        """Send a request and await its answer.

        A busy service (throttling, 5xx) is asked again on the same
        connection: reconnecting would cost round trips and TLS handshakes,
        and a throttled RegisterThing keeps its ownership token instead of
        orphaning a certificate.
        """
        from awscrt import mqtt

        topic = self.request_topics.get(operation, operation)

        def once():
            self._discard_unasked(operation)
            self.link.note_sent("iot:Publish", topic)
            future = publish(mqtt.QoS.AT_LEAST_ONCE)
            self.link.wait_published(topic, future, self.deadline.step(operation))
            return self._await(operation)

        try:
            return with_retries(once, self.deadline, operation, BUSY_BACKOFF,
                                retry_on=ServiceBusy)
        except TransientError as exc:
            if isinstance(exc.__cause__, ServiceBusy):
                # Busy until the deadline: every request was answered, with a
                # rejection, so nothing was created or registered.
                raise ServiceBusy(str(exc), hint=exc.hint) from None
            raise

    def _discard_unasked(self, operation: str) -> None:
        """Answers to ``operation`` that came before it was asked are not ours (a
        misbehaving broker, another device's, or a late one to an earlier try):
        acting on them could install someone else's thing or give up on an
        accepted registration.  A lost connection stays queued."""
        kept = []
        while True:
            try:
                item = self.link.events.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple) and item[0] == operation:
                log.warning("ignoring a %s answer that came before the request", operation)
            else:
                kept.append(item)
        for item in kept:
            self.link.events.put(item)

    def _await(self, operation: str):
        clock = self.deadline.clock
        end = clock.monotonic() + self.deadline.step(operation)
        while True:
            try:
                answered, outcome, answer = self.link.next_event(
                    end - clock.monotonic(), silence_hint(self.resources.get(operation, operation)))
            except TransientError as exc:
                raise TransientError(f"{operation}: {exc}", hint=exc.hint) from None
            if answered != operation:
                # Another device's answer on a shared broker, or a late one.
                log.debug("ignoring a %s answer while awaiting %s", answered, operation)
                continue
            if answer is None:
                raise ServiceError(f"the {outcome} answer to {operation} is not a JSON object",
                                   hint="that ENDPOINT_URL is an AWS IoT endpoint")
            if outcome == "rejected":
                raise self._rejection(operation, answer)
            return answer

    def _rejection(self, operation: str, answer) -> EntoError:
        status = getattr(answer, "status_code", None)
        code = getattr(answer, "error_code", None)
        message = getattr(answer, "error_message", None)
        text = (f"{operation} rejected: statusCode={logs.shown(status, 8)} "
                f"errorCode={logs.shown(code, 64)} errorMessage='{logs.shown(message)}'")
        busy_status = (isinstance(status, int) and not isinstance(status, bool)
                       and (status == 429 or status >= 500))
        if busy_status or (isinstance(code, str) and code in RETRYABLE_ERROR_CODES):
            return ServiceBusy(text, hint="nothing: the service is busy; retrying")
        if operation == REGISTER and hook_refused(status, code):
            return InventoryRefused(f"the fleet inventory refused this camera (serial "
                                    f"{self.serial}): {text}", hint=inventory_hint(self.serial))
        hint = (register_hint(self.template_name, self.resources[REGISTER])
                if operation == REGISTER else claim_policy_hint([self.resources[operation]]))
        return Rejected(text, hint=hint)


def device_configuration(answer) -> dict:
    """The template's DeviceConfiguration, kept as it came when it is a JSON object
    within the size cap.  It is the camera application's data, not ours: what is
    not as AWS documents it (string to string) is one warning, and what cannot be
    kept is dropped with one; neither costs the accepted registration."""
    configuration = getattr(answer, "device_configuration", None)
    if configuration is None:
        return {}
    if not isinstance(configuration, dict):
        log.warning("%s answered a deviceConfiguration that is not a JSON object (%s): not "
                    "stored; check the provisioning template", REGISTER,
                    type(configuration).__name__)
        return {}
    try:
        size = len(json.dumps(configuration))
    except (TypeError, ValueError, RecursionError):
        log.warning("%s answered a deviceConfiguration that cannot be stored as JSON: not "
                    "stored; check the provisioning template", REGISTER)
        return {}
    if size > MAX_DEVICE_CONFIGURATION_CHARS:
        log.warning("%s answered a deviceConfiguration of %d characters, over %d: not "
                    "stored; check the provisioning template", REGISTER, size,
                    MAX_DEVICE_CONFIGURATION_CHARS)
        return {}
    if not all(isinstance(value, str) for value in configuration.values()):
        log.warning("%s answered a deviceConfiguration that is not all strings, as AWS "
                    "documents it: kept as it came for the camera application", REGISTER)
    return configuration


def without_secret(configuration: dict) -> dict:
    """deviceConfiguration is written to CERT_DIR: an entry holding a secret of this
    camera anywhere in it (a template that echoes ProvisioningSecret) is left out."""
    kept = {}
    for key, value in configuration.items():
        if any(logs.holds_secret(text) for text in _texts(key, value)):
            log.warning("left out a deviceConfiguration entry that holds the provisioning "
                        "secret (%s): the template must keep ProvisioningSecret for its hook",
                        logs.shown(key, 64))
            continue
        kept[key] = value
    return kept


def _texts(*values):
    """Every string in JSON values, keys included."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _string(answer, attribute: str, name: str, operation: str, limit: int) -> str:
    value = getattr(answer, attribute, None)
    if not isinstance(value, str) or not value:
        raise ServiceError(f"{operation} answer lacks {name}", hint="the provisioning service")
    if len(value) > limit:
        raise ServiceError(f"{operation} answer's {name} is over {limit} characters",
                           hint="the provisioning service")
    return value
