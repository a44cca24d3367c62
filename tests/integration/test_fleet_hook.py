"""cloud/hook.py, the pre-provisioning hook, against a real local DynamoDB (moto's server).

Each test gets the stack's inventory table in a moto account of its own
(standin.inventory.InventoryServer), fills it with cloud/inventory.py as an
operator would, and calls the handler with AWS's documented event.
"""
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from cloud import hook
from cloud.inventory import Inventory
from e2e import ROOT
from standin import template as templates
from standin.inventory import InventoryServer


@pytest.fixture(scope="module")
def server():
    s = InventoryServer(templates.load_stack())
    s.start()
    yield s
    s.stop()


class Fleet:
    """One fresh table: the operator's Inventory, the hook's environment, its log lines."""

    def __init__(self, server, tmp_path, table: str):
        self.client = server.client()
        self.inventory = Inventory(self.client, table)
        self.inventory.create_table()
        self.environ = {**server.environment(), "INVENTORY_TABLE": table, "DAILY_BUDGET": "5",
                        "REREGISTRATION_WINDOW_HOURS": "24"}
        self.dir = tmp_path
        self.lines: list[dict] = []

    def add(self, serial: str) -> str:
        return self.inventory.add(serial, self.dir).read_text().rstrip("\n")

    def event(self, serial, secret, certificate_id="c" * 64):
        parameters = {"SerialNumber": serial}
        if secret is not None:
            parameters["ProvisioningSecret"] = secret
        return {"claimCertificateId": "a" * 64, "certificateId": certificate_id,
                "certificatePem": "-----BEGIN CERTIFICATE-----\n...",
                "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/"
                               "ento-fleet-template",
                "clientId": serial, "parameters": parameters}

    def register(self, serial, secret, certificate_id="c" * 64, **environ) -> tuple[bool, dict]:
        answer = hook.handler(self.event(serial, secret, certificate_id), None,
                              environ={**self.environ, **environ})
        assert set(answer) == {"allowProvisioning"}
        return answer["allowProvisioning"], self.lines[-1]


class Lines(logging.Handler):
    def __init__(self, into):
        super().__init__()
        self.into = into

    def emit(self, record):
        self.into.append(json.loads(record.getMessage()))


@pytest.fixture
def fleet(server, tmp_path, request):
    f = Fleet(server, tmp_path, f"inventory-{request.node.name[:40]}-{time.monotonic_ns()}")
    handler = Lines(f.lines)
    log = logging.getLogger(hook.LOGGER)
    log.addHandler(handler)
    yield f
    log.removeHandler(handler)


def test_a_manufactured_camera_with_its_secret_is_allowed_and_recorded_provisioned(fleet):
    secret = fleet.add("CAM-0001")
    allowed, line = fleet.register("CAM-0001", secret)
    assert allowed and line["decision"] == "allow" and line["serial"] == "CAM-0001"
    item = fleet.inventory.show("CAM-0001")
    assert item["state"] == "provisioned" and item["registrations"] == 1
    assert item["lastCertificateId"] == "c" * 64 and item["registrationsToday"] == 1
    assert item["certificateIds"] == ["c" * 64]


@pytest.mark.parametrize("serial, secret, reason", [
    ("CAM-9999", "anything", "unknown-serial"),
    ("CAM-9999", None, "unknown-serial"),
    ("CAM-0001", "not-its-secret", "wrong-secret"),
    ("CAM-0001", None, "wrong-secret"),
    ("CAM-0001", "", "wrong-secret"),
    ("CAM-0001", "x" * 10_000, "wrong-secret"),
    ("CAM/../0001", "anything", "malformed-serial"),
])
def test_an_unknown_serial_or_a_wrong_secret_is_denied(fleet, serial, secret, reason):
    fleet.add("CAM-0001")
    allowed, line = fleet.register(serial, secret)
    assert not allowed and line["decision"] == "deny" and line["reason"] == reason
    assert fleet.inventory.show("CAM-0001")["state"] == "manufactured"


def test_a_revoked_camera_is_denied_even_with_its_secret(fleet):
    secret = fleet.add("CAM-0001")
    fleet.inventory.revoke("CAM-0001")
    allowed, line = fleet.register("CAM-0001", secret)
    assert not allowed and line["reason"] == "revoked"


def test_with_the_window_off_a_provisioned_camera_registers_again_only_once_after_allow_reprovision(
        fleet):
    secret = fleet.add("CAM-0001")
    off = {"REREGISTRATION_WINDOW_HOURS": "0"}
    assert fleet.register("CAM-0001", secret, **off)[0]
    allowed, line = fleet.register("CAM-0001", secret, **off)
    assert not allowed and line["reason"] == "already-provisioned"
    fleet.inventory.allow_reprovision("CAM-0001")
    assert fleet.register("CAM-0001", secret, **off)[0]
    allowed, line = fleet.register("CAM-0001", secret, **off)
    assert not allowed and line["reason"] == "already-provisioned"
    assert fleet.inventory.show("CAM-0001")["registrations"] == 2


def provisioned_hours_ago(fleet, serial, hours):
    """The item as it is ``hours`` after its registration (the hook's clock is the table's)."""
    opened = (datetime.datetime.now(datetime.timezone.utc)
              - datetime.timedelta(hours=hours)).isoformat(timespec="seconds")
    fleet.client.update_item(
        TableName=fleet.inventory.table, Key={"serial": {"S": serial}},
        UpdateExpression="SET provisionedAt = :t", ExpressionAttributeValues={":t": {"S": opened}})


def test_within_the_window_a_provisioned_camera_registers_again_with_its_secret(fleet):
    """A RegisterThing whose answer was lost: the camera's retry is not locked out."""
    secret = fleet.add("CAM-0001")
    assert fleet.register("CAM-0001", secret, certificate_id="1" * 64)[0]
    provisioned_hours_ago(fleet, "CAM-0001", 23)
    allowed, line = fleet.register("CAM-0001", secret, certificate_id="2" * 64)
    assert allowed and line["decision"] == "allow"
    assert line["reason"] == "reregistration-within-window"
    assert line["replacesCertificateId"] == "1" * 64
    item = fleet.inventory.show("CAM-0001")
    assert item["state"] == "provisioned" and item["registrations"] == 2
    assert item["certificateIds"] == ["1" * 64, "2" * 64]
    assert item["lastCertificateId"] == "2" * 64
    # The window is the first registration's: a re-registration does not reopen it.
    assert item["provisionedAt"] == line["provisionedAt"]
    assert datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(
        item["provisionedAt"]) > datetime.timedelta(hours=22)


@pytest.mark.parametrize("secret", ["not-its-secret", None])
def test_within_the_window_a_wrong_or_no_secret_is_still_denied(fleet, secret):
    right = fleet.add("CAM-0001")
    assert fleet.register("CAM-0001", right)[0]
    allowed, line = fleet.register("CAM-0001", secret)
    assert not allowed and line["reason"] == "wrong-secret"
    assert fleet.inventory.show("CAM-0001")["registrations"] == 1


def test_after_the_window_the_camera_needs_allow_reprovision(fleet):
    secret = fleet.add("CAM-0001")
    assert fleet.register("CAM-0001", secret)[0]
    provisioned_hours_ago(fleet, "CAM-0001", 24)
    allowed, line = fleet.register("CAM-0001", secret)
    assert not allowed and line["reason"] == "already-provisioned"
    assert fleet.register("CAM-0001", secret, REREGISTRATION_WINDOW_HOURS="25")[0]
    fleet.inventory.allow_reprovision("CAM-0001")
    allowed, line = fleet.register("CAM-0001", secret)
    assert allowed and line["reason"] == "registrable"
    # The operator's registration opens a new window.
    allowed, line = fleet.register("CAM-0001", secret)
    assert allowed and line["reason"] == "reregistration-within-window"


def test_within_the_window_the_daily_budget_still_applies(fleet):
    secret = fleet.add("CAM-0001")
    for _ in range(3):
        assert fleet.register("CAM-0001", secret, DAILY_BUDGET="3")[0]
    allowed, line = fleet.register("CAM-0001", secret, DAILY_BUDGET="3")
    assert not allowed and line["reason"] == "daily-budget"
    assert fleet.inventory.show("CAM-0001")["registrations"] == 3


def test_the_item_keeps_the_last_10_allowed_certificate_ids(fleet):
    secret = fleet.add("CAM-0001")
    for i in range(12):
        assert fleet.register("CAM-0001", secret, certificate_id=f"{i:064x}",
                              DAILY_BUDGET="20")[0]
    item = fleet.inventory.show("CAM-0001")
    assert item["certificateIds"] == [f"{i:064x}" for i in range(2, 12)]
    assert item["registrations"] == 12


def test_registrations_over_the_daily_budget_are_denied_whatever_the_operator_allowed(fleet):
    secret = fleet.add("CAM-0001")
    for _ in range(3):
        assert fleet.register("CAM-0001", secret, DAILY_BUDGET="3")[0]
        fleet.inventory.allow_reprovision("CAM-0001")
    allowed, line = fleet.register("CAM-0001", secret, DAILY_BUDGET="3")
    assert not allowed and line["reason"] == "daily-budget"
    assert line["registrationsToday"] == 3 and line["budget"] == 3
    assert fleet.inventory.show("CAM-0001")["state"] == "reprovision-allowed"


def test_the_budget_counts_today_only(fleet):
    secret = fleet.add("CAM-0001")
    yesterday = (datetime.datetime.now(datetime.timezone.utc)
                 - datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    fleet.client.update_item(
        TableName=fleet.inventory.table, Key={"serial": {"S": "CAM-0001"}},
        UpdateExpression="SET #day = :d, registrationsToday = :n",
        ExpressionAttributeNames={"#day": "day"},
        ExpressionAttributeValues={":d": {"S": yesterday}, ":n": {"N": "5"}})
    allowed, line = fleet.register("CAM-0001", secret)
    assert allowed and line["registrationsToday"] == 1


def two_registrations_at_once(fleet, secret) -> list[bool]:
    """Two registrations of CAM-0001 that both read the item before either writes:
    each waits at its UpdateItem (botocore's own event) until the other has got
    there too.  DynamoDB applies each conditional write atomically; moto's server
    checks the condition and writes without a lock, so the writes go one at a time."""
    client = hook.inventory_client(fleet.environ)
    both_read = threading.Barrier(2, timeout=5)
    one_write = threading.Lock()

    def wait_for_the_other(**kwargs):
        both_read.wait()
        one_write.acquire()  # and answer None: botocore would take a value as the response

    def written(**kwargs):
        one_write.release()

    client.meta.events.register("before-call.dynamodb.UpdateItem", wait_for_the_other)
    client.meta.events.register("after-call.dynamodb.UpdateItem", written)
    answers = []

    def register(certificate_id):
        answers.append(hook.handler(fleet.event("CAM-0001", secret, certificate_id), None,
                                    environ=fleet.environ)["allowProvisioning"])

    try:
        threads = [threading.Thread(target=register, args=(c * 64,)) for c in "de"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        client.meta.events.unregister("before-call.dynamodb.UpdateItem", wait_for_the_other)
        client.meta.events.unregister("after-call.dynamodb.UpdateItem", written)
    return answers


def test_of_two_concurrent_registrations_of_one_serial_exactly_one_passes(fleet):
    secret = fleet.add("CAM-0001")
    answers = two_registrations_at_once(fleet, secret)
    assert sorted(answers) == [False, True]
    assert sorted(line["reason"] for line in fleet.lines) == ["concurrent-registration",
                                                              "registrable"]
    assert fleet.inventory.show("CAM-0001")["registrations"] == 1


def test_of_two_concurrent_reregistrations_within_the_window_exactly_one_passes(fleet):
    secret = fleet.add("CAM-0001")
    assert fleet.register("CAM-0001", secret, certificate_id="1" * 64)[0]
    answers = two_registrations_at_once(fleet, secret)
    assert sorted(answers) == [False, True]
    assert sorted(line["reason"] for line in fleet.lines[1:]) == [
        "concurrent-registration", "reregistration-within-window"]
    item = fleet.inventory.show("CAM-0001")
    assert item["registrations"] == 2 and len(item["certificateIds"]) == 2


def test_any_error_denies(fleet):
    secret = fleet.add("CAM-0001")
    allowed, line = fleet.register("CAM-0001", secret, INVENTORY_TABLE="no-such-table")
    assert not allowed and line["reason"] == "error"
    assert line["errorCode"] == "ResourceNotFoundException"
    allowed, line = fleet.register("CAM-0001", secret, DAILY_BUDGET="five")
    assert not allowed and line["reason"] == "error" and line["error"] == "ValueError"
    assert fleet.register("CAM-0001", secret)[0]
    allowed, line = fleet.register("CAM-0001", secret, REREGISTRATION_WINDOW_HOURS="-1")
    assert not allowed and line["reason"] == "error" and line["error"] == "ValueError"
    environ = {k: v for k, v in fleet.environ.items() if k != "INVENTORY_TABLE"}
    assert hook.handler(fleet.event("CAM-0001", secret), None,
                        environ=environ) == {"allowProvisioning": False}
    for event in (None, [], {"parameters": "SerialNumber=CAM-0001"}, {}):
        assert hook.handler(event, None, environ=fleet.environ) == \
            {"allowProvisioning": False}
    assert fleet.inventory.show("CAM-0001")["registrations"] == 1


def test_an_unreachable_table_denies_well_within_aws_5_s(fleet):
    secret = fleet.add("CAM-0001")
    # A port that accepts and never answers: the read time-out, not a refusal.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        started = time.monotonic()
        allowed, line = fleet.register("CAM-0001", secret,
                                       AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert not allowed and line["reason"] == "error" and line["error"] == "ReadTimeoutError"
    assert elapsed < 3.5


class SlowWrites:
    """An HTTP relay in front of the table that carries out every request and holds
    back the answer to each UpdateItem past the hook's read time-out: a write that
    lands while its answer is lost, as on a slow day of DynamoDB."""

    def __init__(self, endpoint: str, hold: float):
        import http.client
        import http.server
        import urllib.parse
        target = urllib.parse.urlsplit(endpoint)
        self.updates = 0
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                upstream.request("POST", self.path, body, dict(self.headers))
                answer = upstream.getresponse()
                data = answer.read()
                if self.headers.get("X-Amz-Target", "").endswith(".UpdateItem"):
                    relay.updates += 1
                    time.sleep(hold)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.getheaders():
                        if name.lower() not in ("transfer-encoding", "connection"):
                            self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up waiting

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_write_whose_answer_is_late_is_sent_once_and_the_cameras_next_attempt_passes(fleet):
    # Sent again, a write that landed fails its own condition: the hook would
    # deny as a concurrent registration, and a camera told "refused" stops.
    secret = fleet.add("CAM-0001")
    relay = SlowWrites(fleet.environ["AWS_ENDPOINT_URL"], hold=1.5)
    try:
        allowed, line = fleet.register("CAM-0001", secret, AWS_ENDPOINT_URL=relay.endpoint)
    finally:
        relay.close()
    assert relay.updates == 1
    assert not allowed and line["reason"] == "error" and line["error"] == "ReadTimeoutError"
    # The write landed: within the window, the camera's next attempt registers.
    allowed, line = fleet.register("CAM-0001", secret, certificate_id="d" * 64)
    assert allowed and line["reason"] == "reregistration-within-window"


def test_as_a_lambda_it_prints_one_json_line_per_decision_and_never_the_secret(server, tmp_path):
    """The way Lambda runs it: a process of its own, its environment in os.environ,
    the decision on stdout (one CloudWatch event, read by the metric filter)."""
    fleet = Fleet(server, tmp_path, "inventory-lambda")
    secret = fleet.add("CAM-0001")
    script = ("import json, sys; import hook; "
              "print(json.dumps(hook.handler(json.load(sys.stdin), None)), file=sys.stderr)")
    outputs = []
    fleet.environ["REREGISTRATION_WINDOW_HOURS"] = "0"
    for given in (secret, "a-guess-of-the-secret", secret):
        proc = subprocess.run(
            [sys.executable, "-c", script], input=json.dumps(fleet.event("CAM-0001", given)),
            capture_output=True, text=True, timeout=60, cwd=ROOT / "cloud",
            env={"PATH": os.environ.get("PATH", ""), **fleet.environ})
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, proc.stdout + proc.stderr
        outputs.append((json.loads(lines[0]), json.loads(proc.stderr.splitlines()[-1])))
        assert given not in proc.stdout + proc.stderr
    assert [(o["decision"], o.get("reason"), a["allowProvisioning"]) for o, a in outputs] == [
        ("allow", "registrable", True), ("deny", "wrong-secret", False),
        ("deny", "already-provisioned", False)]
    assert outputs[0][0]["claimCertificateId"] == "a" * 64
    assert outputs[0][0]["templateArn"].endswith(":provisioningtemplate/ento-fleet-template")
