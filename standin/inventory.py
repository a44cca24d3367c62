"""The fleet inventory on loopback, and the pre-provisioning hook called as AWS IoT calls it.

``InventoryServer`` serves DynamoDB with moto's server (ThreadedMotoServer, in
this process: a subprocess would pay Python's and moto's start-up again, about
a second) on 127.0.0.1, makes the stack's tables, and hands out what a client
needs to reach it: the hook and cloud/inventory.py talk boto3 to it exactly as
to AWS, through AWS_ENDPOINT_URL and dummy credentials.

``HookCaller`` loads the handler module the stack names (cloud/hook.py),
unchanged, and calls it with AWS's documented event (PayloadVersion
2020-04-01): {claimCertificateId, certificateId, certificatePem, templateArn,
clientId, parameters}.  As on AWS, anything but {"allowProvisioning": true}
within 5 s (a false, an exception, a malformed answer, a time-out) refuses the
registration.

Known differences from AWS: the handler runs in the stand-in's process (a
thread), not in a Lambda sandbox; its environment is the stack's Environment
plus the endpoint and credentials, handed to it rather than set in os.environ
(several stand-ins may share one process, each in a moto account of its own);
moto is not DynamoDB (its
conditional writes are serialised in one process, AWS's are per item).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import secrets
import threading
import time
from typing import Callable

from . import template as templates

HOOK_LIMIT = 5.0  # AWS IoT's limit for the hook's answer
HOOK_LOGGER = "entomologist.hook"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "standin", "AWS_SECRET_ACCESS_KEY": "standin"}


def _one_request_at_a_time(app, lock: threading.Lock):
    """DynamoDB applies each write to an item atomically (its conditional writes
    rest on that); moto's threaded server checks a condition and writes without a
    lock, so two requests at once could both pass it.  One at a time, as AWS
    behaves for one item."""
    def serve(environ, start_response):
        with lock:
            body = app(environ, start_response)
            try:
                return [b"".join(body)]
            finally:
                if hasattr(body, "close"):
                    body.close()
    return serve


class InventoryServer:
    """moto's DynamoDB on a free loopback port, with the stack's tables."""

    def __init__(self, stack: templates.Stack):
        self.stack = stack
        self._server = None
        self.endpoint: str | None = None
        self.credentials: dict[str, str] = {}
        self._dynamodb = None

    def start(self) -> None:
        from moto.moto_server import threaded_moto_server as moto_server
        lock = threading.Lock()

        class Serialised(moto_server.ThreadedMotoServer):
            # moto's own _server_entry, with the app served one request at a time.
            def _server_entry(self):
                app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)
                self._server = moto_server.make_server(
                    self._ip_address, self._port, _one_request_at_a_time(app, lock), True,
                    request_handler=moto_server.MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        # werkzeug logs every request at INFO on the root handlers: not the stand-in's news.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = Serialised(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        # moto keeps its data per process, by account: an account of its own
        # (through STS AssumeRole, as moto documents) keeps stand-ins that
        # share a process (a test run, the fleet benchmark) apart.
        account = "".join(secrets.choice("0123456789") for _ in range(12))
        sts = self._client("sts", CREDENTIALS)
        granted = sts.assume_role(RoleArn=f"arn:aws:iam::{account}:role/entomologist-standin",
                                  RoleSessionName="entomologist-standin")["Credentials"]
        self.credentials = {"AWS_ACCESS_KEY_ID": granted["AccessKeyId"],
                            "AWS_SECRET_ACCESS_KEY": granted["SecretAccessKey"],
                            "AWS_SESSION_TOKEN": granted["SessionToken"]}
        client = self.client()
        for table in self.stack.tables.values():
            client.create_table(BillingMode="PAY_PER_REQUEST", **table)

    def stop(self) -> None:
        if self._server is not None:
            # werkzeug notices a shutdown at its next 0.5 s poll: nobody need wait for it.
            threading.Thread(target=self._server.stop, daemon=True,
                             name="standin-inventory-stop").start()
            self._server = None

    def environment(self) -> dict[str, str]:
        """The standard AWS environment that reaches this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.stack.region,
                "AWS_DEFAULT_REGION": self.stack.region, **self.credentials}

    def _client(self, service: str, credentials: dict, **options):
        # boto3's default session: botocore's service models are read once per
        # process, not once per stand-in (most of a stand-in's start-up CPU).
        import boto3
        return boto3.client(
            service, aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=credentials.get("AWS_SESSION_TOKEN"),
            region_name=self.stack.region, endpoint_url=self.endpoint, **options)

    def client(self):
        """One DynamoDB client for the stand-in's own calls (thread-safe; making one
        costs about 0.2 s)."""
        if self._dynamodb is None:
            from botocore.config import Config
            self._dynamodb = self._client(
                "dynamodb", self.credentials,
                config=Config(connect_timeout=2, read_timeout=5,
                              retries={"max_attempts": 2, "mode": "standard"}))
        return self._dynamodb

    def inventory(self):
        """cloud/inventory.py's Inventory on the stack's inventory table."""
        from cloud.inventory import Inventory
        return Inventory(self.client(), self.stack.inventory_table)


class _ThreadLines(logging.Handler):
    """The hook's decision lines logged by one thread (several may call at once)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(record.getMessage())


class HookCaller:
    """The stack's pre-provisioning hook, called for each RegisterThing."""

    def __init__(self, hook: templates.Hook, environment: dict[str, str],
                 record: Callable[..., None]):
        spec = importlib.util.spec_from_file_location(
            f"standin_hook_{hook.module_path.stem}", hook.module_path)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        self.function = getattr(self.module, hook.function)
        self.hook = hook
        self.environment = {**hook.environment, **environment}
        self.record = record

    def __call__(self, event: dict) -> bool:
        """True only if the hook answered {"allowProvisioning": true} in time."""
        result: dict = {}

        def call() -> None:
            lines = _ThreadLines()
            log = logging.getLogger(HOOK_LOGGER)
            log.addHandler(lines)
            try:
                result["answer"] = self.function(event, None, environ=self.environment)
            except Exception as exc:
                result["error"] = type(exc).__name__
            finally:
                log.removeHandler(lines)
                result["lines"] = lines.lines

        started = time.monotonic()
        worker = threading.Thread(target=call, daemon=True, name="standin-hook")
        worker.start()
        worker.join(HOOK_LIMIT)
        answer = result.get("answer")
        allowed = isinstance(answer, dict) and answer.get("allowProvisioning") is True
        decisions = []
        for line in result.get("lines", []):
            try:
                decisions.append(json.loads(line))
            except ValueError:
                decisions.append({"unparsed": line[:300]})
        self.record("hook", function=self.hook.function_name, allowProvisioning=allowed,
                    answered=not worker.is_alive(), error=result.get("error"),
                    decisions=decisions, seconds=round(time.monotonic() - started, 3))
        return allowed
