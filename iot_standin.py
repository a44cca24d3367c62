"""A local stand-in for AWS IoT, to test device images without an AWS account.

It starts Debian's mosquitto with mutual TLS on a free loopback port, with a
test CA it generates, and a responder that answers the fleet provisioning MQTT
API ($aws/certificates/create/json, $aws/certificates/create-from-csr/json,
$aws/provisioning-templates/<name>/provision/json) with real certificates
signed by that CA.  It applies cloud/stack.yaml, the stack an operator deploys
(or --stack FILE): RegisterThing evaluates its fleet provisioning template
(standin/template.py), the claim certificate is held to the claim policy of
the stack's ProvisioningMode (or --mode) and each device certificate to the
template's device policy (standin/policy.py renders them as rules for
mosquitto's dynamic-security plugin, which refuses a denied subscribe with
SUBACK 0x80 as AWS does; standin/enforce.py enforces the rest from mosquitto's
log, and records each denial as a "denied" event).  Every request, answer and
boot message is recorded as a JSON line in <dir>/standin/events.jsonl.  It writes a ready ento.conf and claim
files for one simulated device into <dir> (and refuses to replace a device's
files that are already there, unless told --overwrite, which moves the old
device's CERT_DIR, signed by another CA, to cert.replaced-N).  The stack's fleet
inventory is served by moto's DynamoDB server on loopback (standin/inventory.py;
its endpoint and credentials in <dir>/standin/aws.env, for cloud/inventory.py),
the device is added to it with a secret of its own (<dir>/provisioning-secret,
named in ento.conf), and every RegisterThing is put to the stack's
pre-provisioning hook (cloud/hook.py) unless the stack's PreProvisioningHook
is Disabled (--no-hook).

    python iot_standin.py run --dir DIR [--overwrite] [--serial ID] [--template NAME]
                              [--stack FILE] [--mode CreateKeysAndCertificate|
                                              CreateCertificateFromCsr|Both]
                              [--reject-create STATUS:CODE[:MESSAGE]]
                              [--reject-register STATUS:CODE[:MESSAGE]]
                              [--reject-times K] [--no-answer] [--delay SECONDS]
                              [--malformed-create not-json|missing-cert|bad-pem|wrong-key]
                              [--malformed-register not-json|empty-thing]
                              [--drop-after create|register] [--refuse-connections]
                              [--no-hook]
    python iot_standin.py demo [--no-hook]

`run` serves until interrupted (Ctrl-C or SIGTERM, which also stop its
mosquitto); `demo` provisions a simulated device in a temporary folder with
boot.py, shows what it wrote, then what the claim pair alone is refused.  A
broker delivers $aws/.../accepted to every subscriber (AWS answers only the
requester), so provision one device at a time per stand-in.

Exit codes: 0 done; 2 usage (a malformed option); 78 the stack cannot be
used (an unsupported function, ...); 69 mosquitto is missing or would not
start, or the fleet inventory would not; 73 the device's files exist already;
1 the demo's boot.py run failed.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from cryptography import x509

from cloud.hook import secret_hash
from entomologist import files
from entomologist.errors import ConfigError
from standin import claimpair, policy
from standin import template as templates
from standin.broker import Broker, find_mosquitto, reserved_port
from cloud.inventory import new_secret
from standin.ca import StandInCA, certificate_id, write_new
from standin.enforce import Enforcer, Identity, Relay
from standin.inventory import HOOK_LIMIT, HookCaller, InventoryServer
from standin.responder import (BOOT_PREFIX, CREATE, CREATE_CSR, MALFORMED_CREATE,
                               MALFORMED_REGISTER, REGISTER_PREFIX, REGISTER_SUFFIX, Answer,
                               Drop, Faults, Rejection, Responder)

__all__ = ["StandIn", "Faults", "Rejection", "find_mosquitto", "stack_with", "faults_from",
           "parser", "main"]

log = logging.getLogger("iot_standin")

HERE = Path(__file__).resolve().parent
DEFAULT_SERIAL = "CAM-0001"
CLAIM_CN = "ento-fleet-claim"
RESPONDER_CN = "standin-responder"
MODES = ("CreateKeysAndCertificate", "CreateCertificateFromCsr", "Both")
# The stand-in's own clients answer every request, hear every boot message and
# change the broker's rules ($CONTROL, the dynamic-security plugin's API).
RESPONDER_ACL = "topic readwrite #\ntopic readwrite $aws/#\ntopic readwrite $CONTROL/#\n"
RESPONDER_DYNSEC = [{"acltype": kind, "topic": topic, "priority": 0, "allow": True}
                    for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")
                    for topic in ("#", "$aws/#", "$CONTROL/#")]
DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"


def _stack_parameters(mode: str | None, hook: bool | None,
                      given: dict[str, str] | None = None) -> dict | None:
    """The stack parameters a StandIn's options set: ProvisioningMode, the
    PreProvisioningHook switch (None: the stack's defaults), and any others given."""
    parameters = dict(given or {})
    if mode:
        parameters["ProvisioningMode"] = mode
    if hook is not None:
        parameters["PreProvisioningHook"] = "Enabled" if hook else "Disabled"
    return parameters or None


def stack_with(edit: Callable[[dict], None], mode: str | None = None,
               hook: bool | None = None) -> templates.Stack:
    """cloud/stack.yaml with its template body changed by ``edit`` (a test's variant:
    another device policy, another parameter); change ``claim_policies`` directly."""
    stack = templates.load_stack(parameters=_stack_parameters(mode, hook))
    body = copy.deepcopy(stack.template.body)
    edit(body)
    stack.template = templates.ProvisioningTemplate.from_body(body, stack.template_name)
    return stack


def _subscribe_again(connection, return_code, session_present, **_) -> None:
    """awscrt reconnects a connection the broker dropped (a broker stalled past the
    keep-alive, a second client under its ID) with a clean session, which holds no
    subscription: without this the stand-in would serve on and never answer again."""
    if not session_present:
        connection.resubscribe_existing_topics()


class StandIn:
    """mosquitto plus the fleet provisioning responder, in ``workdir``.

    ``stack``: a stack file, or a templates.Stack a test has changed (default
    cloud/stack.yaml); ``mode``: its ProvisioningMode (default the stack's);
    ``template``: the template's name (default the stack's); ``policies``
    False: no claim or device policy (any certificate the CA signed may do
    anything), for tests of something else that bring certificates of their own.
    ``parameters``: other stack parameters (e.g. {"ReregistrationWindowHours": "0"}).
    """

    def __init__(self, workdir: Path, serial: str = DEFAULT_SERIAL,
                 template: str | None = None, faults: Faults | None = None,
                 key_factory: Callable | None = None, host: str = "127.0.0.1",
                 overwrite: bool = True, tcp_nodelay: bool = True,
                 stack: "templates.Stack | Path | str | None" = None,
                 mode: str | None = None, policies: bool = True, hook: bool | None = None,
                 parameters: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.dir = self.workdir / "standin"
        self.serial = serial
        if isinstance(stack, templates.Stack):
            if mode is not None and mode != stack.parameters.get("ProvisioningMode"):
                raise ValueError("give a Stack loaded with the mode wanted")
            if hook is not None and hook != (stack.hook is not None):
                raise ValueError("give a Stack loaded with PreProvisioningHook as wanted")
            if parameters:
                raise ValueError("give a Stack loaded with the parameters wanted")
            self.stack = stack
        else:
            self.stack = templates.load_stack(stack or templates.STACK,
                                              _stack_parameters(mode, hook, parameters))
        self.mode = self.stack.parameters.get("ProvisioningMode", MODES[0])
        self.template = template or self.stack.template_name
        self.policies = policies
        self.faults = faults or Faults()
        self.key_factory = key_factory
        self.host = host
        self.overwrite = overwrite
        self.tcp_nodelay = tcp_nodelay
        self.port = 0
        self.events_path = self.dir / "events.jsonl"
        self.config_path = self.workdir / "ento.conf"
        self.claim_cert = self.workdir / "claim" / "claim.pem.crt"
        self.claim_key = self.workdir / "claim" / "claim.private.pem.key"
        # The camera's provisioning secret, as the factory puts it in the image.
        self.secret_path = self.workdir / "provisioning-secret"
        self._trust_folders()
        self.inventory_server: InventoryServer | None = None
        self._inventory_thread: threading.Thread | None = None
        self._inventory_error: Exception | None = None
        self._hook_caller: HookCaller | None = None
        self._broker: Broker | None = None
        self._relay: Relay | None = None
        self.enforcer: Enforcer | None = None
        self.acl_path = self.dir / "acl"        # the rules in acl_file's words, to read
        self.dynsec_path = self.dir / "dynsec.json"  # what mosquitto enforces
        self._admin = None
        self._admin_answers: dict[str, dict] = {}
        self._admin_answered = threading.Condition()
        self._connection = None
        self._tls = None
        self._port_socket = None
        self.responder: Responder | None = None
        self._lock = threading.Lock()
        # A stand-in started again in the same folder goes on from its record.
        self._events: list[dict] = [
            json.loads(line) for line in (self.events_path.read_text().splitlines()
                                          if self.events_path.exists() else []) if line]

    # -- life cycle

    def __enter__(self) -> "StandIn":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def device_files(self) -> list[Path]:
        return [p for p in (self.config_path, self.claim_cert, self.claim_key, self.secret_path)
                if p.exists()]

    def _trust_folders(self) -> None:
        """ConfigError unless nobody but root and this user can change the folders the
        stand-in writes in (checked as the product checks its own): every write
        would follow a link another user planted there, whoever it runs as."""
        for folder in (self.workdir, self.dir, self.workdir / "claim"):
            if os.path.lexists(folder):
                files.trusted_dir(folder, "the stand-in's folder")

    def _set_old_pair_aside(self) -> None:
        """The device's CERT_DIR from before: the new CA signs nothing in it, and a pair
        there would be taken as installed and never connect.  Moved aside, not deleted."""
        cert_dir = self.workdir / "cert"
        if not os.path.lexists(cert_dir):
            return
        n = 1
        while os.path.lexists(aside := self.workdir / f"cert.replaced-{n}"):
            n += 1
        os.rename(cert_dir, aside)
        log.info("the device's credentials from before (another CA's) moved to %s", aside)

    def prepare(self) -> None:
        """The CA, the certificates and the device's files, without a broker: enough
        for a run that must fail before it connects."""
        self._trust_folders()
        if not self.overwrite and self.device_files():
            raise FileExistsError(", ".join(map(str, self.device_files())))
        if self.device_files():
            self._set_old_pair_aside()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "claim").mkdir(exist_ok=True)
        self._trust_folders()
        self.ca = StandInCA()
        self.ca_path = self.dir / "ca.pem"
        write_new(self.ca_path, self.ca.pem, 0o644)
        hosts = tuple(dict.fromkeys(("localhost", "127.0.0.1", self.host)))
        self._server_files = self.ca.write_pair(self.dir, "server", "localhost", server=True,
                                                hosts=hosts)
        claim_cert, _ = self.ca.write_pair(self.workdir / "claim", "claim", CLAIM_CN)
        self.claim_certificate_id = certificate_id(
            x509.load_pem_x509_certificate(Path(claim_cert).read_bytes()))
        # The factory's step: a secret of the camera's own, 0600 from birth.
        self._secret = new_secret()
        self.secret_path.unlink(missing_ok=True)
        write_new(self.secret_path, (self._secret + "\n").encode(), 0o600)
        self._responder_files = self.ca.write_pair(self.dir, "responder", RESPONDER_CN)
        self.responder = Responder(self.ca, self.template, self.serial, self.faults,
                                   self.record, self.key_factory,
                                   provisioning=self.stack.template,
                                   on_registered=self._registered if self.policies else None,
                                   hook_context=self._hook_context,
                                   hook=self._call_hook if self.stack.hook else None)
        if self.policies:
            # mosquitto on a loopback port of its own; devices reach it through
            # the relay, which holds back what a denial must never let through.
            self._broker = Broker(self.dir, self.ca_path, *self._server_files,
                                  host="127.0.0.1", tcp_nodelay=self.tcp_nodelay,
                                  dynsec_file=self.dynsec_path)
            self._port_socket = reserved_port(self.host)
            self.port = self._port_socket.getsockname()[1]
            self.enforcer = Enforcer(self._broker.log_path, self.record)
            self.enforcer.add(Identity(RESPONDER_CN, "service", acl=RESPONDER_ACL,
                                       dynsec=RESPONDER_DYNSEC))
            self.enforcer.add(self._claim_identity())
            self._write_acl()
            self._write_dynsec()
        else:
            self._broker = Broker(self.dir, self.ca_path, *self._server_files, host=self.host,
                                  tcp_nodelay=self.tcp_nodelay)
            self.port = self._broker.port
        self.write_device_config()

    # -- policies

    def _claim_identity(self) -> Identity:
        context = self.stack.context()
        register = f"{REGISTER_PREFIX}{self.template}{REGISTER_SUFFIX}"
        requests = [CREATE, CREATE_CSR, register]
        rendering = policy.render_acl(CLAIM_CN, self.stack.claim_policies, context,
                                      topics=requests + [f"{t}/{outcome}" for t in requests
                                                         for outcome in ("accepted",
                                                                         "rejected")])
        return Identity(CLAIM_CN, "claim", list(self.stack.claim_policies),
                        f"claim policy for ProvisioningMode {self.mode}", context,
                        acl="\n".join(rendering.lines) + "\n", notes=rendering.notes,
                        dynsec=rendering.dynsec_acls())

    def _registered(self, registration: templates.Registration, common_name: str) -> None:
        """The device certificate's policies, in force before RegisterThing answers."""
        documents = [p.document for p in registration.policies if p.document is not None]
        named = [p.name for p in registration.policies if p.document is None]
        context = self.stack.context(thing_name=registration.thing_name,
                                     thing_type=registration.thing_type,
                                     attributes=dict(registration.attributes), is_attached=True)
        serial = registration.parameters.get("SerialNumber", self.serial)
        rendering = policy.render_acl(common_name, documents, context,
                                      topics=[f"{BOOT_PREFIX}{serial}/booted"])
        notes = rendering.notes + [f"policy {n} is named, not defined in the template; the "
                                   "stand-in has no registry and grants nothing for it"
                                   for n in named]
        label = f"device policy of thing {registration.thing_name} (template {self.template})"
        identity = Identity(common_name, "device", documents, label, context,
                            active=registration.certificate_status == "ACTIVE",
                            acl="\n".join(rendering.lines) + "\n", notes=notes,
                            dynsec=rendering.dynsec_acls())
        self.enforcer.add(identity)
        self.record("policy-applied", username=common_name, thingName=registration.thing_name,
                    acl=rendering.lines, notes=notes)
        self._write_acl()
        self._grant(identity)

    def _hook_context(self, template: str) -> dict:
        """The event fields AWS IoT gives the hook besides the request's."""
        claims = self.enforcer.connected("claim") if self.enforcer else []
        return {"claimCertificateId": self.claim_certificate_id,
                "templateArn": self.stack.context().arn("provisioningtemplate", template),
                # Which connection published the request is not in mosquitto's
                # log: named only when one claim connection is open.
                "clientId": claims[0] if len(claims) == 1 else ""}

    def _write_acl(self) -> None:
        text = "".join(f"user {i.username}\n{i.acl}\n"
                       for i in self.enforcer.identities.values())
        tmp = self.acl_path.with_suffix(".tmp")
        write_new(tmp, text.encode(), 0o644)
        os.replace(tmp, self.acl_path)

    def _write_dynsec(self) -> None:
        """The dynamic-security plugin's starting configuration: one role and one
        client (the certificate's CN) per identity; anything not allowed is denied."""
        identities = list(self.enforcer.identities.values())
        doc = {"defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                                    "subscribe": False, "unsubscribe": True},
               "clients": [{"username": i.username, "roles": [{"rolename": i.username}]}
                           for i in identities],
               "roles": [{"rolename": i.username, "acls": i.dynsec} for i in identities],
               "groups": []}
        write_new(self.dynsec_path, json.dumps(doc, indent=1).encode(), 0o600)

    def _grant(self, identity: Identity, limit: float = 3.0) -> None:
        """A new certificate's rules, in force before RegisterThing answers: sent to
        the plugin over its $CONTROL API, and its answer awaited."""
        if self._admin is None:
            return
        from awscrt import mqtt
        correlation = secrets.token_hex(8)
        commands = {"commands": [
            {"command": "createRole", "rolename": identity.username, "acls": identity.dynsec},
            {"command": "createClient", "username": identity.username,
             "roles": [{"rolename": identity.username}], "correlationData": correlation}]}
        self._admin.publish(DYNSEC_TOPIC, json.dumps(commands), mqtt.QoS.AT_LEAST_ONCE)
        end = time.monotonic() + limit
        with self._admin_answered:
            while correlation not in self._admin_answers:
                left = end - time.monotonic()
                if left <= 0:
                    log.warning("mosquitto did not confirm the rules of %s in %.0f s",
                                identity.username, limit)
                    return
                self._admin_answered.wait(left)
            answer = self._admin_answers.pop(correlation)
        if answer.get("error"):
            log.warning("mosquitto refused the rules of %s: %s", identity.username,
                        answer["error"])

    def _on_admin_answer(self, topic: str, payload: bytes, **_) -> None:
        try:
            responses = json.loads(payload).get("responses", [])
        except (ValueError, AttributeError):
            return
        with self._admin_answered:
            errors = [r["error"] for r in responses if r.get("error")]
            for r in responses:
                if "correlationData" in r:
                    self._admin_answers[r["correlationData"]] = {
                        "error": "; ".join(errors)}
            self._admin_answered.notify_all()

    def _connect_admin(self) -> None:
        """The plugin's administrator: a connection on an event loop of its own, so
        that a responder callback can wait for its answers."""
        from awscrt import io, mqtt
        group = io.EventLoopGroup(1)
        bootstrap = io.ClientBootstrap(group, io.DefaultHostResolver(group))
        self._admin = self._client(f"standin-admin-{secrets.token_hex(3)}", bootstrap)
        self._connect(self._admin)
        future, _ = self._admin.subscribe(f"{DYNSEC_TOPIC}/response", mqtt.QoS.AT_LEAST_ONCE,
                                          callback=self._on_admin_answer)
        future.result(10)

    def start(self) -> None:
        if not find_mosquitto():
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.prepare()
        # The fleet inventory comes up in the background (moto's import alone
        # takes about 0.5 s): whatever needs it waits for it (the hook, below;
        # ``inventory``), so nothing passes the hook while it starts.
        self._inventory_thread = threading.Thread(target=self._start_inventory,
                                                  name="standin-inventory", daemon=True)
        self._inventory_thread.start()
        try:
            self._broker.start()
            if self.policies:
                self._relay = Relay(self.host, self.port, ("127.0.0.1", self._broker.port),
                                    self.enforcer, self.tcp_nodelay, bound=self._port_socket)
                self._port_socket = None
                self._relay.start()
                self._connect_admin()
            elif self._broker.port != self.port:  # its port was taken: the device follows
                self.port = self._broker.port
                self.write_device_config()
            self._connect_responder()
        except BaseException:
            self.stop()
            raise
        self.record("ready", port=self.port)

    def _start_inventory(self) -> None:
        """The fleet inventory (moto's DynamoDB) with this device in it, and the hook on it."""
        try:
            server = InventoryServer(self.stack)
            self.inventory_server = server
            server.start()
            environment = server.environment()
            write_new(self.dir / "aws.env", "".join(
                f"{k}={v}\n" for k, v in environment.items()).encode(), 0o600)
            if self.stack.inventory_table:
                server.inventory().put(self.serial, secret_hash(self._secret))
            if self.stack.hook is not None:
                self._hook_caller = HookCaller(self.stack.hook, environment, self.record)
        except Exception as exc:
            self._inventory_error = exc
            log.error("the fleet inventory did not start: %s", exc)

    def inventory_ready(self, timeout: float = 30.0) -> None:
        """Wait until the fleet inventory serves; RuntimeError if it did not start."""
        if self._inventory_thread is not None:
            self._inventory_thread.join(timeout)
            if self._inventory_thread.is_alive():
                raise RuntimeError(f"the fleet inventory did not start in {timeout:.0f} s")
        if self._inventory_error is not None:
            raise RuntimeError(f"the fleet inventory did not start: {self._inventory_error}")

    def _call_hook(self, event: dict) -> bool:
        """The stack's hook, once the inventory serves; a hook that cannot run denies,
        as a failing hook does on AWS."""
        try:
            self.inventory_ready(HOOK_LIMIT)
        except RuntimeError:
            self.record("hook", allowProvisioning=False, answered=False,
                        error="the fleet inventory is not serving")
            return False
        return self._hook_caller(event)

    @property
    def inventory(self):
        """cloud/inventory.py's Inventory on this stand-in's table (allow-reprovision,
        revoke, show, ... as an operator would)."""
        self.inventory_ready()
        return self.inventory_server.inventory()

    @property
    def secret(self) -> str:
        """This device's provisioning secret (the content of ``secret_path``)."""
        return self._secret

    def claim_pair_register(self, serial: str, secret: str | None = None,
                            client_id: str | None = None, timeout: float = 10.0):
        """RegisterThing for ``serial`` with the claim pair alone, through AWS's own
        client (standin.claimpair), as anyone holding the SD card's claim files can."""
        parameters = {"SerialNumber": serial}
        if secret is not None:
            parameters["ProvisioningSecret"] = secret
        return claimpair.register("localhost", self.port, self.ca_path, self.claim_cert,
                                  self.claim_key, client_id or serial, self.template,
                                  parameters, timeout)

    def claim_pair_connects(self, client_id: str, timeout: float = 10.0) -> bool:
        return claimpair.connects("localhost", self.port, self.ca_path, self.claim_cert,
                                  self.claim_key, client_id, timeout)

    def _client(self, client_id: str, bootstrap=None):
        from awscrt import io, mqtt
        if self._tls is None:
            # One TLS context for the stand-in's own connections (the same pair):
            # making one is most of a stand-in's start-up CPU.
            cert, key = self._responder_files
            options = io.TlsContextOptions.create_client_with_mtls_from_path(str(cert),
                                                                             str(key))
            options.override_default_trust_store_from_path(None, str(self.ca_path))
            self._tls = io.ClientTlsContext(options)
        client = mqtt.Client(bootstrap or io.ClientBootstrap.get_or_create_static_default(),
                             self._tls)
        return mqtt.Connection(client=client, client_id=client_id,
                               host_name=self._broker_host,
                               port=self._broker.port, clean_session=True,
                               keep_alive_secs=30, on_connection_resumed=_subscribe_again)

    @property
    def _broker_host(self) -> str:
        # Straight to mosquitto: the stand-in's own connections pass no policy.
        return "127.0.0.1" if self.policies else self.host

    def _connect(self, connection) -> None:
        from entomologist import nodelay
        # As the device does: without TCP_NODELAY the TLS handshake's second flight
        # waits for a delayed ACK, 40 ms of every stand-in's start.
        with nodelay.after_connect(self._broker_host, self._broker.port, 10):
            connecting = connection.connect()
        connecting.result(10)

    def _connect_responder(self) -> None:
        from awscrt import mqtt
        self._connection = self._client(f"standin-responder-{secrets.token_hex(3)}")
        self._connect(self._connection)
        filters = [CREATE, CREATE_CSR, f"{REGISTER_PREFIX}+{REGISTER_SUFFIX}",
                   f"{BOOT_PREFIX}+/booted"]
        futures = [self._connection.subscribe(t, mqtt.QoS.AT_LEAST_ONCE,
                                              callback=self._on_message)[0] for t in filters]
        for future in futures:
            future.result(10)

    def stop(self) -> None:
        if self._port_socket is not None:
            self._port_socket.close()
            self._port_socket = None
        self.stop_broker()
        if self._inventory_thread is not None:
            self._inventory_thread.join(30)
        if self.inventory_server is not None:
            self.inventory_server.stop()
            self.inventory_server = None

    def stop_broker(self) -> None:
        """Take the broker away, as a dead link would (the port then refuses)."""
        for name in ("_connection", "_admin"):
            connection = getattr(self, name)
            if connection is not None:
                try:
                    connection.disconnect().result(3)
                except Exception:
                    pass
                setattr(self, name, None)
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def refuse_connections(self) -> None:
        """An outage the service comes back from: the device's port refuses until
        accept_connections(), while the CA, the broker, the registrations made and
        the device's files stay (stop_broker() ends them for good)."""
        if self._relay is None:
            raise RuntimeError("refuse_connections needs the stand-in running with its policies")
        self._relay.stop()
        self.record("refusing", port=self.port)

    def accept_connections(self) -> None:
        """The service is back on the same port."""
        if self._relay is not None and self._relay._listener is not None:
            return
        self._relay = Relay(self.host, self.port, ("127.0.0.1", self._broker.port),
                            self.enforcer, self.tcp_nodelay)
        self._relay.start()
        self.record("accepting", port=self.port)

    def issued_tokens(self) -> list[str]:
        """Every ownership token handed out, so tests can look for leaks."""
        return list(self.responder.tokens) if self.responder else []

    # -- the device's files

    def write_device_config(self, **overrides) -> Path:
        device = {
            "SERIAL_ID": self.serial,
            "ENDPOINT_URL": "localhost" if self.host == "127.0.0.1" else self.host,
            "PORT": self.port,
            "PROVISION_STATUS": "False",
            "TEMPLATE_NAME": self.template,
            **({"PROVISIONING_API": self.mode} if self.mode != MODES[0] and
               self.mode in MODES[:2] else {}),
            "CLAIM_CERT": "claim/claim.pem.crt",
            "CLAIM_KEY": "claim/claim.private.pem.key",
            "ROOT_CA": "standin/ca.pem",
            "CERT_DIR": "cert",
            "PROVISIONING_SECRET_FILE": self.secret_path.name,
        }
        device.update(overrides)
        doc = {"device": device, "camera": {"CAPTURE_INTERVAL_S": 60, "NOTE": "kept as is"}}
        write_new(self.config_path, (json.dumps(doc, indent=2) + "\n").encode(), 0o640)
        return self.config_path

    # -- the record

    def record(self, event: str, **fields) -> None:
        line = json.dumps({"t": time.time(), "event": event, **fields})
        with self._lock, open(self.events_path, "a") as f:
            f.write(line + "\n")
            # Kept as read back from its line, for events(): tests poll it every
            # half millisecond, and parsing the whole file each time was most of
            # their CPU.
            self._events.append(json.loads(line))

    def events(self, name: str | None = None) -> list[dict]:
        """What this stand-in recorded, as events.jsonl holds it, oldest first."""
        with self._lock:
            return [dict(e) for e in self._events if name is None or e["event"] == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise TimeoutError(f"no {count} {name!r} event(s) in {timeout} s")

    # -- carrying out the responder's answers

    def _on_message(self, topic: str, payload: bytes, **_) -> None:
        try:
            for action in self.responder.handle(topic, bytes(payload)):
                if isinstance(action, Answer):
                    self._send(action)
                elif isinstance(action, Drop):
                    self._kick(self._device_client_id(action.client_id))
        except Exception:
            log.exception("stand-in responder failed on %s", topic)

    def _send(self, answer: Answer) -> None:
        def send() -> None:
            from awscrt import mqtt
            if self._connection is None:
                return
            self._connection.publish(answer.topic, answer.payload, mqtt.QoS.AT_LEAST_ONCE)
            try:
                fields = sorted(json.loads(answer.payload))
            except (ValueError, TypeError):
                fields = None
            self.record("answer", topic=answer.topic, fields=fields,
                        holds_private_key=b"PRIVATE KEY" in answer.payload)

        if answer.delay > 0:
            threading.Timer(answer.delay, send).start()
        else:
            send()

    def _device_client_id(self, serial: str) -> str:
        """The client ID the camera's claim connection uses: ``<serial>-<random hex>``, new
        for every attempt, so it is looked up in what mosquitto logged (the last one)."""
        if self.enforcer is not None:
            seen = self.enforcer.connected("claim")
        else:
            log_text = self._broker.log_path.read_text(errors="replace")
            seen = re.findall(r"New client connected from \S+ as (\S+) ", log_text)
        ours = [c for c in seen if c == serial or c.startswith(serial + "-")]
        return ours[-1] if ours else serial

    def _kick(self, client_id: str) -> None:
        """Drop a device's connection: MQTT lets a new client take over its client ID."""
        def takeover() -> None:
            try:
                conn = self._client(client_id)
                conn.connect().result(5)
                self.record("dropped", client_id=client_id)
                conn.disconnect().result(5)
            except Exception:
                log.exception("could not drop %s", client_id)

        threading.Thread(target=takeover, daemon=True).start()


# ------------------------------------------------------------ command line

def _rejection(text: str) -> Rejection:
    try:
        return Rejection.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0: {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0: {text!r}")
    return int(text)


def faults_from(args: argparse.Namespace) -> Faults:
    """The faults ``run``'s options ask for."""
    return Faults(
        reject_create=args.reject_create, reject_register=args.reject_register,
        reject_times=args.reject_times, no_answer=args.no_answer, delay=args.delay,
        malformed_create=args.malformed_create, malformed_register=args.malformed_register,
        drop_after=args.drop_after, drop_register_answers=args.drop_register_answers)


def _serve(args) -> int:
    faults = faults_from(args)
    try:
        standin = StandIn(Path(args.dir), serial=args.serial, template=args.template,
                          faults=faults, overwrite=args.overwrite, stack=args.stack,
                          mode=args.mode, hook=False if args.no_hook else None)
    except (templates.TemplateError, OSError) as exc:
        log.error("cannot use the stack: %s", exc)
        return os.EX_CONFIG
    except ConfigError as exc:
        log.error("%s; give --dir a folder of your own", exc)
        return os.EX_CANTCREAT
    stop = threading.Event()
    # SIGTERM (systemd, kill, a test harness) and SIGINT must stop mosquitto too; a
    # process started with SIGINT ignored (nohup, `&` in a script) gets no
    # KeyboardInterrupt from Python, so Ctrl-C needs its own handler.
    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, lambda *_: stop.set())
    try:
        standin.start()
    except FileExistsError as exc:
        log.error("a device's files are already in %s (%s); use --overwrite to replace them",
                  args.dir, exc)
        return os.EX_CANTCREAT
    except RuntimeError as exc:
        log.error("%s", exc)
        return os.EX_UNAVAILABLE
    try:
        standin.inventory_ready()
    except RuntimeError as exc:
        standin.stop()
        log.error("%s", exc)
        return os.EX_UNAVAILABLE
    if stop.is_set():
        # Stopped while it started: no "ready" line for a harness to act on.
        standin.stop()
        log.info("stopped while starting: never ready")
        return 0
    try:
        if args.refuse_connections:
            standin.stop_broker()
            log.info("broker stopped: connections to localhost:%s are refused", standin.port)
        log.info("stand-in ready on localhost:%s; device config %s; events %s",
                 standin.port, standin.config_path, standin.events_path)
        log.info("fleet inventory: table %s at %s; e.g. env $(cat %s) %s %s --table %s "
                 "show %s", standin.stack.inventory_table,
                 standin.inventory_server.endpoint, standin.dir / "aws.env",
                 Path(sys.executable).name, HERE / "cloud" / "inventory.py",
                 standin.stack.inventory_table, standin.serial)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


def _listing(root: Path) -> str:
    rows = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and "standin" not in path.parts:
            st = path.stat()
            rows.append(f"  {oct(st.st_mode & 0o777)[2:]:>4}  {st.st_size:6d}  "
                        f"{path.relative_to(root)}")
    return "\n".join(rows)


def _attacks(standin: StandIn, out) -> None:
    """The claim pair alone, as a thief with the SD card would use it."""
    hook = "on" if standin.stack.hook else "OFF (--no-hook)"
    out.write(f"The claim pair alone, through AWS's fleet provisioning client "
              f"(pre-provisioning hook {hook}):\n")
    if standin.stack.hook and \
            standin.stack.hook.environment.get("REREGISTRATION_WINDOW_HOURS") == "0":
        out.write("  (ReregistrationWindowHours is 0 here, so the camera stands as it would "
                  "24 h after its registration: within the default 24 h window, its own "
                  "secret file would register it again, the retry of a lost answer)\n")
    thing = f"{standin.template.removesuffix('-fleet-template')}-{standin.serial}"
    trials = (("an unknown serial CAM-9999", "CAM-9999", None),
              (f"{standin.serial} again, without its secret", standin.serial, None),
              (f"{standin.serial} again, with the camera's own secret file",
               standin.serial, standin.secret))
    for label, serial, secret in trials:
        before = len(standin.events("hook"))
        outcome = standin.claim_pair_register(serial, secret, client_id=f"thief-{serial}")
        hooks = standin.events("hook")[before:]
        reasons = [d.get("reason") for h in hooks for d in h.get("decisions", [])]
        out.write(f"  RegisterThing for {label}: {outcome}"
                  + (f" (hook: {', '.join(map(str, reasons))})" if reasons else "") + "\n")
    connected = standin.claim_pair_connects(thing)
    out.write(f"  Connect as {thing} with the claim certificate: "
              f"{'ACCEPTED' if connected else 'refused (claim policy Deny)'}\n")
    out.write(f"Inventory: {json.dumps(standin.inventory.show(standin.serial))}\n")


# A thief's registration with the camera's own secret file, shown after the
# re-registration window (the default one would still be open a second after the
# camera's registration, and let it pass).
DEMO_PARAMETERS = {"ReregistrationWindowHours": "0"}


def _demo(args) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ento-demo-") as tmp, \
            StandIn(Path(tmp), hook=False if args.no_hook else None,
                    parameters=DEMO_PARAMETERS) as standin:
        root = Path(tmp)
        out = sys.stdout
        out.write(f"Stand-in for AWS IoT on localhost:{standin.port} (mosquitto, mutual TLS)\n")
        out.write(f"Simulated device {standin.serial} in {root}\n")
        out.write(f"Applying {templates.STACK.relative_to(HERE)}: template {standin.template}, "
                  f"claim policy for ProvisioningMode {standin.mode}\n\n")
        for label in ("First boot (provisions)", "Second boot (reports only)"):
            out.write(f"== {label}: boot.py --config {standin.config_path}\n")
            out.flush()
            t0 = time.monotonic()
            rc = subprocess.run([sys.executable, str(HERE / "boot.py"), "--config",
                                 str(standin.config_path)], stdin=subprocess.DEVNULL).returncode
            out.write(f"-> exit code {rc} in {time.monotonic() - t0:.2f} s\n\n")
            out.flush()
            if rc != 0:
                return 1
        standin.wait_for("boot", 2)
        out.write("Files the device holds (mode, bytes, path):\n" + _listing(root) + "\n\n")
        device = json.loads(standin.config_path.read_text())["device"]
        out.write("ento.conf \"device\" now:\n" + json.dumps(device, indent=2) + "\n\n")
        out.write("Boot messages the stand-in received:\n")
        for event in standin.events("boot"):
            out.write(f"  {event['topic']}  {event['payload']}\n")
        requests = [e["event"] for e in standin.events() if e["event"].endswith("-request")]
        out.write(f"\nProvisioning requests the service saw: {', '.join(requests)}\n")
        registered, = standin.events("register-accepted")
        out.write(f"RegisterThing through template {standin.template}: thing "
                  f"{registered['thingName']}, attributes {json.dumps(registered['attributes'])}, "
                  f"deviceConfiguration {json.dumps(registered['deviceConfiguration'])}\n")
        applied, = standin.events("policy-applied")
        out.write(f"Device policy as mosquitto rules for certificate {applied['username']}: "
                  f"{'; '.join(applied['acl'])}\n")
        denied = standin.events("denied")
        out.write(f"Policy denials: {len(denied)}\n\n")
        _attacks(standin, out)
        out.write(f"Demo finished in {time.monotonic() - started:.2f} s\n")
        out.flush()
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve until interrupted")
    run.add_argument("--dir", required=True)
    run.add_argument("--overwrite", action="store_true",
                     help="replace a device's config and claim files already in --dir "
                          "(its CERT_DIR, from another CA, is moved to cert.replaced-N)")
    run.add_argument("--serial", default=DEFAULT_SERIAL)
    run.add_argument("--template", help="the template's name (default: the stack's)")
    run.add_argument("--stack", type=Path, default=templates.STACK,
                     help="the CloudFormation stack to apply (default %(default)s)")
    run.add_argument("--mode", choices=MODES,
                     help="the stack's ProvisioningMode: which claim policy applies "
                          "(default: the stack's default)")
    run.add_argument("--reject-create", type=_rejection, metavar="STATUS:CODE[:MESSAGE]")
    run.add_argument("--reject-register", type=_rejection, metavar="STATUS:CODE[:MESSAGE]")
    run.add_argument("--reject-times", type=_count, metavar="K",
                     help="reject only the first K requests of each kind")
    run.add_argument("--no-answer", action="store_true", help="record requests, answer none")
    run.add_argument("--delay", type=_seconds, default=0.0,
                     help="delay every answer (seconds)")
    run.add_argument("--malformed-create", choices=MALFORMED_CREATE)
    run.add_argument("--malformed-register", choices=MALFORMED_REGISTER)
    run.add_argument("--drop-after", choices=["create", "register"],
                     help="drop the device's connection after this request, once")
    run.add_argument("--drop-register-answers", action="store_true",
                     help="carry out every RegisterThing but never answer it (a claim policy "
                          "without iot:Receive)")
    run.add_argument("--refuse-connections", action="store_true",
                     help="write the device's files, then close the broker's port")
    run.add_argument("--no-hook", action="store_true",
                     help="the stack's PreProvisioningHook Disabled: RegisterThing asks "
                          "no fleet inventory")
    demo = sub.add_parser("demo", help="provision a simulated device and show the result")
    demo.add_argument("--no-hook", action="store_true",
                      help="the stack's PreProvisioningHook Disabled: shows what is lost")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "run":
        return _serve(args)
    try:
        return _demo(args)
    except RuntimeError as exc:
        log.error("%s", exc)
        return os.EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
