"""The fleet's pre-provisioning hook: which RegisterThing may register a camera.

AWS IoT calls ``handler`` (an AWS Lambda function, PayloadVersion 2020-04-01)
for every RegisterThing on the fleet template, with
{claimCertificateId, certificateId, certificatePem, templateArn, clientId,
parameters}, and registers the camera only if the answer is
{"allowProvisioning": true}.  The decision is taken from the fleet inventory,
a DynamoDB table of one item per manufactured serial (cloud/inventory.py
writes it):

  unknown serial                                   deny  unknown-serial
  ProvisioningSecret's SHA-256 is not the stored   deny  wrong-secret
  state revoked                                    deny  revoked
  state provisioned, its registration younger
    than the re-registration window                allow reregistration-within-window
  state provisioned otherwise                      deny  already-provisioned
  this serial's registrations today >= budget      deny  daily-budget
  state manufactured or reprovision-allowed        allow registrable, recorded as provisioned
  anything else (a malformed event, a timeout,
  a lost race, any error)                          deny

The re-registration window (REREGISTRATION_WINDOW_HOURS, default 24; 0 turns
it off) lets a camera whose RegisterThing answer was lost (a weak link, the
power cut while it travelled) register again with its own secret without the
operator.  It opens at the registration that made the item provisioned and a
re-registration does not move it, so whoever holds the secret cannot keep it
open.  Every allowed certificateId is kept in the item (the last
CERTIFICATE_IDS of them), and a re-registration's log line names the
certificate it may have orphaned (replacesCertificateId): that certificate
stays active until the operator deactivates it.

The allow is recorded with a conditional write on the item's version: of two
registrations of one serial at once, one writes and the other is denied
(concurrent-registration).  Every decision is one JSON line on stdout (the
function's CloudWatch log), which a metric filter counts; the secret is never
in it.

Answers must come within AWS's 5 s: every DynamoDB call has a 0.5 s connect
and a 1 s read time-out and no retry, so two calls take at most 3 s; a slow
table is a denial and the camera asks again later.

The secret is a random 256-bit token (secrets.token_urlsafe(32)), so a fast
hash is enough: nobody can guess it from its SHA-256.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import threading
import time

LOGGER = "entomologist.hook"
SERIAL = re.compile(r"[A-Za-z0-9:_-]{1,128}")
MAX_SECRET = 256
DEFAULT_BUDGET = 8  # as the stack's DailyRegistrationBudget
DEFAULT_WINDOW_HOURS = 24
CERTIFICATE_IDS = 10
STATES = ("manufactured", "provisioned", "reprovision-allowed", "revoked")
REGISTRABLE = ("manufactured", "reprovision-allowed")


class Denied(Exception):
    def __init__(self, reason: str, **fields):
        super().__init__(reason)
        self.reason = reason
        self.fields = fields


_MAKING_CLIENT = threading.Lock()  # a boto3 session makes one client at a time


@functools.lru_cache(maxsize=8)
def _client(region: str | None, endpoint: str | None, key: str | None, secret: str | None,
            token: str | None):
    # One client per configuration, reused across invocations of a warm Lambda;
    # boto3's default session reads botocore's service model once per process,
    # the costly part of making a client.  boto3 is imported here: the module
    # loads without it, and only a call needs it.
    import boto3
    from botocore.config import Config
    config = Config(connect_timeout=0.5, read_timeout=1.0,
                    retries={"total_max_attempts": 1, "mode": "standard"})
    with _MAKING_CLIENT:
        return boto3.client("dynamodb", region_name=region, endpoint_url=endpoint or None,
                            aws_access_key_id=key, aws_secret_access_key=secret,
                            aws_session_token=token, config=config)


def inventory_client(environ):
    """The DynamoDB client the hook uses with this environment (Lambda's own)."""
    return _client(environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"),
                   environ.get("AWS_ENDPOINT_URL_DYNAMODB") or environ.get("AWS_ENDPOINT_URL"),
                   environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY"),
                   environ.get("AWS_SESSION_TOKEN"))


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _today(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d")


def _budget(environ) -> int:
    text = environ.get("DAILY_BUDGET", str(DEFAULT_BUDGET))
    if not text.isdigit():
        raise ValueError("DAILY_BUDGET is not a whole number")
    return int(text)


def _window_seconds(environ) -> int:
    text = environ.get("REREGISTRATION_WINDOW_HOURS", str(DEFAULT_WINDOW_HOURS))
    if not text.isdigit():
        raise ValueError("REREGISTRATION_WINDOW_HOURS is not a whole number")
    return int(text) * 3600


def _within_window(item, window: int, now: float) -> bool:
    opened = item.get("provisionedAt", {}).get("S")
    if not window or not opened:
        return False
    age = now - datetime.datetime.fromisoformat(opened).timestamp()
    return 0 <= age < window


def _request(event) -> tuple[str, str | None]:
    if not isinstance(event, dict) or not isinstance(event.get("parameters"), dict):
        raise Denied("malformed-event")
    serial = event["parameters"].get("SerialNumber")
    secret = event["parameters"].get("ProvisioningSecret")
    if not isinstance(serial, str) or not SERIAL.fullmatch(serial):
        raise Denied("malformed-serial")
    # No secret, or one no camera has, is a wrong secret; checked after the serial.
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET:
        secret = None
    return serial, secret


def _decide(event, environ, now: float) -> dict:
    serial, secret = _request(event)
    table = environ["INVENTORY_TABLE"]
    budget = _budget(environ)
    client = inventory_client(environ)
    item = client.get_item(TableName=table, Key={"serial": {"S": serial}},
                           ConsistentRead=True).get("Item")
    if item is None:
        raise Denied("unknown-serial", serial=serial)
    stored = item.get("secretSha256", {}).get("S", "")
    if secret is None or not hmac.compare_digest(secret_hash(secret), stored):
        raise Denied("wrong-secret", serial=serial)
    state = item.get("state", {}).get("S")
    if state == "revoked":
        raise Denied("revoked", serial=serial, state=state)
    reason = "registrable"
    if state == "provisioned":
        if not _within_window(item, _window_seconds(environ), now):
            raise Denied("already-provisioned", serial=serial, state=state)
        reason = "reregistration-within-window"
    elif state not in REGISTRABLE:
        raise Denied("unknown-state", serial=serial)
    today = _today(now)
    count = int(item["registrationsToday"]["N"]) \
        if item.get("day", {}).get("S") == today and "registrationsToday" in item else 0
    if count >= budget:
        raise Denied("daily-budget", serial=serial, state=state, registrationsToday=count,
                     budget=budget)
    version = item["version"]["N"]
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(
        timespec="seconds")
    certificate = str(event.get("certificateId", ""))[:64]
    earlier = [c.get("S", "") for c in item.get("certificateIds", {}).get("L", [])]
    kept = (earlier + [certificate])[-CERTIFICATE_IDS:]
    # The window opens at the registration the operator's state allowed, never later.
    opened = item["provisionedAt"]["S"] if reason != "registrable" else stamp
    try:
        client.update_item(
            TableName=table, Key={"serial": {"S": serial}},
            UpdateExpression=(
                "SET #state = :provisioned, #version = :next, #day = :today, "
                "registrationsToday = :count, "
                "registrations = if_not_exists(registrations, :zero) + :one, "
                "lastCertificateId = :cert, certificateIds = :certs, "
                "provisionedAt = :opened, updatedAt = :now"),
            ConditionExpression="#version = :version AND #state = :seen",
            ExpressionAttributeNames={"#state": "state", "#version": "version", "#day": "day"},
            ExpressionAttributeValues={
                ":provisioned": {"S": "provisioned"}, ":seen": {"S": state},
                ":version": {"N": version}, ":next": {"N": str(int(version) + 1)},
                ":today": {"S": today}, ":count": {"N": str(count + 1)},
                ":zero": {"N": "0"}, ":one": {"N": "1"}, ":cert": {"S": certificate},
                ":certs": {"L": [{"S": c} for c in kept]},
                ":opened": {"S": opened}, ":now": {"S": stamp}})
    except client.exceptions.ConditionalCheckFailedException:
        raise Denied("concurrent-registration", serial=serial, state=state) from None
    fields = {"serial": serial, "state": state, "registrationsToday": count + 1,
              "budget": budget}
    if reason != "registrable":
        fields["replacesCertificateId"] = item.get("lastCertificateId", {}).get("S", "")[:64]
        fields["provisionedAt"] = opened
    return reason, fields


def _text(value, limit: int = 160):
    return value[:limit] if isinstance(value, str) else None


def _decision_log() -> logging.Logger:
    """Decisions go out as lines that are exactly JSON, on stdout: Lambda makes
    each one CloudWatch log event, which the stack's JSON metric filter
    ({ $.decision = "deny" }) reads; the runtime's own handler would prefix
    them.  Whoever added a handler first (the local stand-in) gets them instead."""
    log = logging.getLogger(LOGGER)
    if not log.handlers:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(out)
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def handler(event, context=None, environ=None):
    """The Lambda entry point.  ``environ``: the function's environment (default
    os.environ); the local stand-in passes its own, as Lambda would set it."""
    environ = os.environ if environ is None else environ
    started = time.monotonic()
    try:
        reason, fields = _decide(event, environ, time.time())
        decision = "allow"
    except Denied as exc:
        decision, reason, fields = "deny", exc.reason, exc.fields
    except Exception as exc:  # any failure is a denial, never a registration
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") \
            if isinstance(getattr(exc, "response", None), dict) else None
        decision, reason = "deny", "error"
        fields = {"error": type(exc).__name__, **({"errorCode": code} if code else {})}
    event = event if isinstance(event, dict) else {}
    line = {"hook": "ento-pre-provisioning", "decision": decision, "reason": reason,
            **fields,
            "certificateId": _text(event.get("certificateId"), 64),
            "claimCertificateId": _text(event.get("claimCertificateId"), 64),
            "clientId": _text(event.get("clientId"), 128),
            "templateArn": _text(event.get("templateArn"), 256),
            "ms": round((time.monotonic() - started) * 1000)}
    _decision_log().info("%s", json.dumps(line, sort_keys=True))
    return {"allowProvisioning": decision == "allow"}
