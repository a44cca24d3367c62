"""AWS IoT policy documents, evaluated as AWS IoT does, and rendered for mosquitto.

Supported (what the stand-in enforces like AWS):
  * Documents as JSON text or dicts; Version 2012-10-17 (or 2008-10-17);
    Statement as one object or a list; Effect Allow / Deny; Action / NotAction;
    Resource / NotResource; strings or lists everywhere AWS allows either.
  * Evaluation: an explicit Deny in any document wins, then any Allow, else
    the default deny.  Actions match case-insensitively (``iot:*``,
    ``iot:Pub*``); resources case-sensitively.
  * Resources: ``arn:PARTITION:iot:REGION:ACCOUNT:client/…`` (iot:Connect),
    ``topic/…`` (iot:Publish, iot:Receive), ``topicfilter/…`` (iot:Subscribe),
    and ``*``.  ``*`` is any run of characters (``/`` included) and ``?`` one
    character, as in IAM; MQTT's ``+`` and ``#`` are plain characters.
  * Policy variables: ``${iot:ClientId}``, ``${iot:Connection.Thing.ThingName}``,
    ``${iot:Connection.Thing.ThingTypeName}``,
    ``${iot:Connection.Thing.Attributes[NAME]}``,
    ``${iot:Connection.Thing.IsAttached}``, and any key given in
    ``Context.extra``; the IAM escapes ``${*}``, ``${?}``, ``${$}``.  A
    substituted value is literal: a client ID of ``*`` is not a wildcard.
  * Condition: StringEquals, StringNotEquals, StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase, StringLike, StringNotLike, Bool, Null, with the
    ForAnyValue: / ForAllValues: prefixes and the IfExists suffix; values may
    hold policy variables.  Anything else is a PolicyError when the document
    is parsed, never a silent allow.

Known differences from AWS:
  * A resource or condition value whose variable cannot be resolved matches
    nothing (IAM's rule); AWS's exact treatment of unresolvable thing
    variables (certificate not attached to a thing) is not documented beyond
    that.  ``${iot:Thing.ThingName}`` (a spelling in one AWS example) is
    not a variable AWS defines and is left unresolved here too.
  * A negated operator (StringNot*) on a missing key is true, as in IAM.
  * No policy versions, no size limits (AWS: 2048 characters without
    white space per document), no iot:RetainPublish / shadow / jobs actions
    beyond matching their names, no aws:SourceIp and no Cognito variables.
  * Connect is decided here, but mosquitto cannot enforce client IDs: see
    render_acl() and connect_allowed().

Rendering for mosquitto 2.0.11 (render_acl): the rules of each identity
(the certificate's CN, with ``use_identity_as_username true``) in acl_file's
words (``AclRendering.lines``: what the stand-in records and a test reads)
and per action for mosquitto's dynamic-security plugin, which enforces them
(``AclRendering.dynsec_acls()``: publishClientSend for iot:Publish,
publishClientReceive for iot:Receive, subscribePattern for iot:Subscribe; its
default denies everything else).  The plugin, not acl_file, because only it
refuses a SUBSCRIBE in the SUBACK (0x80) and keeps the connection, as AWS
does: mosquitto 2.0.11 grants every SUBSCRIBE under acl_file, deny rules
included (tried on loopback with a raw MQTT 3.1.1 client), and with both
configured one's allow overrides the other's refusal (tried too), so the two
cannot be mixed.  The plugin reads its file only
at start; a new certificate's role and client go over its $CONTROL API.
In the acl_file words:
  * ``write`` is iot:Publish.  ``read`` stands for both iot:Subscribe (the
    filter) and iot:Receive (each delivered topic): a read line is written
    only where both are allowed (the plugin's rules keep them apart).
  * An AWS Deny is rendered only by leaving the allow out, never as a deny rule.
  * IAM globs become MQTT filters only when exact: literal levels, a trailing
    ``/*`` becomes ``/#``, a lone ``*`` becomes ``#`` plus ``$aws/#`` (``#``
    and ``+`` at the first level never match ``$`` topics).  ``?``, a ``*``
    inside a level or between levels, a literal ``+`` or ``#``, or an Allow
    that a Deny may overlap cannot be written as an acl_file rule: such a
    pattern is left out (so mosquitto denies more than AWS, never less) and
    named in ``AclRendering.notes``.  The caller can pass the concrete
    ``topics`` its protocol uses; each is decided exactly with ``allowed()``
    and written literally.
  * A denied PUBLISH still gets its PUBACK from mosquitto and the connection
    stays open; AWS disconnects such a client (standin/enforce.py does).
  * The plugin's client is the certificate's CN (use_identity_as_username), so
    one identity per certificate needs one CN per certificate: the stand-in
    issues device certificates with CN=ento-device-<16 hex> (the certificate
    ID cannot be the CN: it is the hash of the certificate; AWS's own say
    CN=AWS IoT Certificate) and gives the shared claim certificate
    CN=ento-fleet-claim.
  * What mosquitto does not enforce, the stand-in can observe in the broker's
    log and act on: "New client connected from … as <client id> (…,
    u'<username>')" (log_type notice) for iot:Connect, "Received SUBSCRIBE
    from <client id>" and a tab-indented "<filter> (QoS n)" (log_type debug)
    for iot:Subscribe (recorded only: the plugin refuses it), and "Denied PUBLISH
    from <client id> (… '<topic>', …)" (log_type debug only) for iot:Publish.
    For each, decide with connect_allowed() / decide(), record the denial as
    an event, and disconnect the client.  Done in standin/enforce.py, with
    one change found on the way: mosquitto sends the PUBACK of a denied
    publish (and the SUBACK, and the CONNACK) right after its log line, so a
    client-ID takeover comes too late; device connections pass through a
    relay that reads the log before it forwards anything mosquitto sends,
    and closes a denied client's connection instead.  See enforce.py for
    the differences left.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

ACTIONS = ("iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive")
RESOURCE_TYPE = {"iot:connect": "client", "iot:publish": "topic",
                 "iot:receive": "topic", "iot:subscribe": "topicfilter"}
VERSIONS = ("2012-10-17", "2008-10-17")

_OPERATORS = {"StringEquals", "StringNotEquals", "StringEqualsIgnoreCase",
              "StringNotEqualsIgnoreCase", "StringLike", "StringNotLike", "Bool", "Null"}
_NEGATED = {"StringNotEquals", "StringNotEqualsIgnoreCase", "StringNotLike"}
_VARIABLE = re.compile(r"\$\{([^}]*)\}")


class PolicyError(ValueError):
    """A policy document the stand-in cannot evaluate exactly as AWS would."""


class _Unresolved(Exception):
    pass


@dataclass(frozen=True)
class Context:
    """What AWS IoT knows about a connection when it evaluates a policy."""

    client_id: str | None = None
    thing_name: str | None = None
    thing_type: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    # None: no thing attached to the certificate (the claim certificate).
    is_attached: bool | None = None
    region: str = "us-east-1"
    account: str = "123456789012"
    partition: str = "aws"
    connect_attributes: Sequence[str] = ()
    extra: Mapping[str, str | Sequence[str]] = field(default_factory=dict)

    def lookup(self, key: str):
        """The value of a policy variable or condition key, or None."""
        if key in self.extra:
            return self.extra[key]
        if key == "iot:ClientId":
            return self.client_id
        if key == "iot:Connection.Thing.ThingName":
            return self.thing_name if self.is_attached else None
        if key == "iot:Connection.Thing.ThingTypeName":
            return self.thing_type if self.is_attached else None
        if key == "iot:Connection.Thing.IsAttached":
            return None if self.is_attached is None else str(bool(self.is_attached)).lower()
        if key == "iot:ConnectAttributes":
            return list(self.connect_attributes)
        m = re.fullmatch(r"iot:Connection\.Thing\.Attributes\[([^\]]+)\]", key)
        if m and self.is_attached:
            return self.attributes.get(m.group(1))
        return None

    def arn(self, resource_type: str, name: str) -> str:
        return f"arn:{self.partition}:iot:{self.region}:{self.account}:{resource_type}/{name}"


@dataclass(frozen=True)
class Statement:
    effect: str
    actions: tuple[str, ...]
    not_actions: bool
    resources: tuple[str, ...]
    not_resources: bool
    conditions: tuple[tuple[str, str, tuple[str, ...]], ...]
    index: int
    sid: str | None = None


@dataclass(frozen=True)
class Policy:
    statements: tuple[Statement, ...]
    name: str | None = None

    @classmethod
    def parse(cls, document, name: str | None = None) -> "Policy":
        if isinstance(document, Policy):
            return document
        if isinstance(document, (str, bytes)):
            try:
                document = json.loads(document)
            except ValueError as exc:
                raise PolicyError(f"policy {name or ''} is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise PolicyError("a policy document is a JSON object")
        unknown = set(document) - {"Version", "Statement", "Id"}
        if unknown:
            raise PolicyError(f"unsupported policy elements: {sorted(unknown)}")
        if document.get("Version", "2012-10-17") not in VERSIONS:
            raise PolicyError(f"policy Version must be one of {VERSIONS}")
        raw = document.get("Statement")
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise PolicyError("policy Statement must be an object or a non-empty list")
        return cls(tuple(_statement(s, i) for i, s in enumerate(raw)), name)


def _strings(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PolicyError(f"{what} must be a string or a non-empty list of strings")


def _statement(raw, index: int) -> Statement:
    if not isinstance(raw, dict):
        raise PolicyError(f"statement {index} is not an object")
    unknown = set(raw) - {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource",
                          "Condition"}
    if unknown:
        raise PolicyError(f"statement {index}: unsupported elements {sorted(unknown)}")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError(f"statement {index}: Effect must be Allow or Deny")
    if ("Action" in raw) == ("NotAction" in raw):
        raise PolicyError(f"statement {index}: exactly one of Action and NotAction")
    if ("Resource" in raw) == ("NotResource" in raw):
        raise PolicyError(f"statement {index}: exactly one of Resource and NotResource")
    actions = _strings(raw.get("Action", raw.get("NotAction")), f"statement {index} Action")
    for action in actions:
        if action != "*" and not re.fullmatch(r"[A-Za-z0-9-]+:[A-Za-z0-9*?]+", action):
            raise PolicyError(f"statement {index}: {action!r} is not an action")
    resources = _strings(raw.get("Resource", raw.get("NotResource")),
                         f"statement {index} Resource")
    conditions = []
    for operator, block in (raw.get("Condition") or {}).items():
        base = operator.split(":", 1)[-1]
        prefix = operator.split(":", 1)[0] if ":" in operator else ""
        if base.endswith("IfExists"):
            base = base[:-len("IfExists")]
        if prefix not in ("", "ForAnyValue", "ForAllValues") or base not in _OPERATORS:
            raise PolicyError(f"statement {index}: condition operator {operator!r} "
                              f"is not supported (supported: {sorted(_OPERATORS)})")
        if not isinstance(block, dict) or not block:
            raise PolicyError(f"statement {index}: condition {operator} needs keys")
        for key, values in block.items():
            if isinstance(values, (bool, int)):
                values = str(values).lower()
            if isinstance(values, list):
                values = [str(v).lower() if isinstance(v, bool) else v for v in values]
                if not values:
                    conditions.append((operator, key, ()))
                    continue
            conditions.append((operator, key, _strings(values, f"condition {key}")))
    return Statement(effect, actions, "NotAction" in raw, resources, "NotResource" in raw,
                     tuple(conditions), index, raw.get("Sid"))


# ------------------------------------------------------------------ matching

def _substitute(text: str, context: Context, *, glob: bool) -> str:
    """Resolve policy variables; with glob, return a regex source."""
    out = []
    pos = 0
    for m in _VARIABLE.finditer(text):
        out.append(_glob(text[pos:m.start()]) if glob else text[pos:m.start()])
        key = m.group(1)
        if key in ("*", "?", "$"):
            value = key
        else:
            value = context.lookup(key)
            if value is None or not isinstance(value, str):
                raise _Unresolved(key)
        out.append(re.escape(value) if glob else value)
        pos = m.end()
    out.append(_glob(text[pos:]) if glob else text[pos:])
    return "".join(out)


def _glob(text: str) -> str:
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text)


def _matches(pattern: str, value: str, context: Context, *, ignore_case=False) -> bool:
    try:
        regex = _substitute(pattern, context, glob=True)
    except _Unresolved:
        return False
    return re.fullmatch(regex, value, re.DOTALL | (re.IGNORECASE if ignore_case else 0)) is not None


def _action_applies(statement: Statement, action: str, context: Context) -> bool:
    hit = any(_matches(a, action, context, ignore_case=True) for a in statement.actions)
    return hit != statement.not_actions


def _resource_applies(statement: Statement, arn: str, context: Context) -> bool:
    hit = any(_matches(r, arn, context) for r in statement.resources)
    return hit != statement.not_resources


def _condition_holds(operator: str, key: str, expected: tuple[str, ...],
                     context: Context) -> bool:
    prefix, _, base = operator.rpartition(":")
    if_exists = base.endswith("IfExists")
    base = base[:-len("IfExists")] if if_exists else base
    actual = context.lookup(key)
    if base == "Null":
        return (actual is None) == (expected[0].lower() == "true")
    if actual is None:
        return if_exists or base in _NEGATED or prefix == "ForAllValues"
    values = list(actual) if isinstance(actual, (list, tuple)) else [actual]
    try:
        wanted = [_substitute(e, context, glob=False) for e in expected]
    except _Unresolved:
        return base in _NEGATED

    def one(value: str) -> bool:
        if base == "Bool":
            return value.lower() in [w.lower() for w in wanted]
        if base in ("StringEquals", "StringNotEquals"):
            hit = value in wanted
        elif base in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
            hit = value.lower() in [w.lower() for w in wanted]
        else:
            hit = any(_matches(e, value, context) for e in expected)
        return not hit if base in _NEGATED else hit

    if prefix == "ForAllValues":
        return all(one(v) for v in values)
    return any(one(v) for v in values)


def _applies(statement: Statement, action: str, arn: str, context: Context) -> bool:
    return (_action_applies(statement, action, context)
            and _resource_applies(statement, arn, context)
            and all(_condition_holds(op, key, values, context)
                    for op, key, values in statement.conditions))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # "allowed", "explicit deny", "no statement allows"
    policy: str | None = None
    statement: int | None = None

    def __bool__(self) -> bool:
        return self.allowed


def _policies(documents) -> list[Policy]:
    if isinstance(documents, (Policy, dict, str, bytes)):
        documents = [documents]
    return [Policy.parse(d) for d in documents]


def decide(documents, action: str, resource_name: str, context: Context | None = None,
           ) -> Decision:
    """AWS IoT's decision for ``action`` on ``resource_name`` (a client ID, a
    topic or a topic filter: the part of the ARN after ``client/``, ``topic/``
    or ``topicfilter/``)."""
    context = context or Context()
    kind = RESOURCE_TYPE.get(action.lower())
    if kind is None:
        raise PolicyError(f"{action} is not one of {ACTIONS}")
    arn = context.arn(kind, resource_name)
    allow = None
    for policy in _policies(documents):
        for statement in policy.statements:
            if not _applies(statement, action, arn, context):
                continue
            if statement.effect == "Deny":
                return Decision(False, "explicit deny", policy.name, statement.index)
            allow = allow or Decision(True, "allowed", policy.name, statement.index)
    return allow or Decision(False, "no statement allows")


def allowed(documents, action: str, resource_name: str, context: Context | None = None) -> bool:
    return decide(documents, action, resource_name, context).allowed


def connect_allowed(documents, client_id: str, context: Context | None = None) -> Decision:
    """iot:Connect for ``client_id``; the context's client_id is set to it."""
    context = context or Context()
    context = Context(**{**context.__dict__, "client_id": client_id})
    return decide(documents, "iot:Connect", client_id, context)


# ------------------------------------------------------------------ mosquitto

@dataclass
class AclRendering:
    username: str
    lines: list[str]
    notes: list[str]
    # MQTT filters per action, for mosquitto's dynamic-security plugin, which
    # tells them apart (acl_file's "read" is Subscribe and Receive together).
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    receive: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([f"user {self.username}", *self.lines]) + "\n"

    def dynsec_acls(self) -> list[dict]:
        """The rules as the dynamic-security plugin's role ACLs (all allows; its
        default denies the rest, and a refused SUBSCRIBE gets SUBACK 0x80)."""
        kinds = (("publishClientSend", self.publish), ("subscribePattern", self.subscribe),
                 ("publishClientReceive", self.receive))
        return [{"acltype": kind, "topic": topic, "priority": 0, "allow": True}
                for kind, topics in kinds for topic in dict.fromkeys(topics)]


def _to_mqtt(glob: str) -> list[str] | None:
    """The MQTT filters that match exactly the topics ``glob`` matches, or None."""
    if glob == "*":
        return ["#", "$aws/#"]
    if "?" in glob or "+" in glob or "#" in glob:
        return None
    if "*" not in glob:
        return [glob]
    if glob.endswith("/*") and "*" not in glob[:-2]:
        # AWS's a/* also matches "a/" itself, as MQTT's a/# does; a/# also
        # matches "a", which a/* does not: near enough, and noted below.
        return [glob[:-2] + "/#"]
    return None


def _covers(wide: str, narrow: str) -> bool:
    """Whether MQTT filter ``wide`` matches every topic ``narrow`` matches."""
    w, n = wide.split("/"), narrow.split("/")
    for i, level in enumerate(w):
        if level == "#":
            return not (i == 0 and n[0].startswith("$") and not w[0].startswith("$"))
        if i >= len(n):
            return False
        if level == "+":
            if n[i] == "#" or (i == 0 and n[0].startswith("$")):
                return False
            continue
        if level != n[i]:
            return False
    return len(w) == len(n)


def _literal_prefix(pattern: str) -> str:
    cut = [i for i in (pattern.find("*"), pattern.find("?"), pattern.find("${"),
                       pattern.find("+"), pattern.find("#")) if i >= 0]
    return pattern[:min(cut)] if cut else pattern


def _resource_glob(resolved: str, kind: str, context: Context) -> str | None:
    """The resource-name part of an ARN pattern, if it names ``kind`` resources
    of this partition, region and account; None if it cannot."""
    if resolved == "*":
        return "*"
    parts = resolved.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        return None
    wanted = ["arn", context.partition, "iot", context.region, context.account]
    if not all(_matches(p, w, context) for p, w in zip(parts[:5], wanted)):
        return None
    rest = parts[5]
    if not rest.startswith(kind + "/"):
        return "" if _matches(rest, kind + "/x", context) else None
    return rest[len(kind) + 1:]


def _statement_state(st: Statement, context: Context) -> bool | None:
    """Whether the statement's conditions hold; None if they depend on the
    client ID, which is unknown until the client connects."""
    if not st.conditions:
        return True
    for _, key, values in st.conditions:
        if context.client_id is None and ("iot:ClientId" in key
                                          or any("iot:ClientId" in v for v in values)):
            return None
    return all(_condition_holds(op, key, values, context) for op, key, values in st.conditions)


def _statements(policies: list[Policy], effect: str, action: str, context: Context):
    """(statement, condition state) of every ``effect`` statement for ``action`` whose
    conditions do not rule it out (state None: undecidable before the connection)."""
    for policy in policies:
        for st in policy.statements:
            if st.effect != effect or not _action_applies(st, action, context):
                continue
            state = _statement_state(st, context)
            if state is not False:
                yield st, state


def _allow_patterns(policies: list[Policy], action: str, kind: str, context: Context,
                    notes: list[str]) -> list[str]:
    """MQTT filters for what Allow statements grant for ``action``, exact only."""
    deny_prefixes = []
    for st, state in _statements(policies, "Deny", action, context):
        for r in st.resources:
            deny_prefixes.append("" if st.not_resources or state is None
                                 else _literal_prefix(r))
    out = []
    for st, state in _statements(policies, "Allow", action, context):
        if st.not_resources or state is None:
            notes.append(f"{action}: statement {st.index} has NotResource or a "
                         "Condition on the client ID; not rendered")
            continue
        for resource in st.resources:
            try:
                resolved = _substitute(resource, context, glob=False)
            except _Unresolved as exc:
                notes.append(f"{action}: {resource} needs ${{{exc}}}, unknown before "
                             "the client connects; not rendered")
                continue
            glob = _resource_glob(resolved, kind, context)
            if glob is None:
                continue
            if glob == "":
                notes.append(f"{action}: {resource} has wildcards in the resource "
                             "type; not rendered")
                continue
            arn_prefix = "" if resolved == "*" else context.arn(kind, "")
            lit = arn_prefix + _literal_prefix(glob)
            if any(lit.startswith(d) or d.startswith(lit) for d in deny_prefixes):
                notes.append(f"{action}: {resource} may overlap a Deny; not rendered")
                continue
            filters = _to_mqtt(glob)
            if filters is None:
                notes.append(f"{action}: {resource} has no exact MQTT filter; not rendered")
                continue
            if glob.endswith("/*"):
                notes.append(f"{glob[:-2]}/# also matches {glob[:-2]} itself, "
                             f"which {glob} does not")
            out.extend(filters)
    return out


def _reserved_answer(topic: str) -> bool:
    return topic.startswith("$aws/") and topic.rsplit("/", 1)[-1] in ("accepted", "rejected")


def render_acl(username: str, documents, context: Context | None = None,
               topics: Iterable[str] = ()) -> AclRendering:
    """An acl_file section granting ``username`` what the policies grant.

    ``topics``: concrete topic names decided exactly and written literally
    (the stand-in's own protocol topics), whatever the patterns allow."""
    context = context or Context()
    topics = list(topics)
    policies = _policies(documents)
    notes: list[str] = []
    write = _allow_patterns(policies, "iot:Publish", "topic", context, notes)
    subscribe = _allow_patterns(policies, "iot:Subscribe", "topicfilter", context, notes)
    receive = _allow_patterns(policies, "iot:Receive", "topic", context, notes)
    read = [s for s in subscribe if any(_covers(r, s) for r in receive)]
    read += [r for r in receive if r not in read and any(_covers(s, r) for s in subscribe)]
    # AWS IoT's reserved topics: a client publishes requests there, never the
    # service's answers, whatever its policy's patterns say ("unsupported
    # publish ... to reserved topics"); an acl_file pattern cannot leave the
    # answers out, so under $aws/ only the concrete ``topics`` are writable.
    if any(w.startswith("$aws/") for w in write):
        notes.append("iot:Publish under $aws/ is rendered for the request topics only: "
                     "clients may not publish the service's answers")
    write = [w for w in write if not w.startswith("$aws/")]
    for topic in topics:
        if not any(_covers(w, topic) for w in write) and not _reserved_answer(topic) \
                and allowed(policies, "iot:Publish", topic, context):
            write.append(topic)
        if not any(_covers(r, topic) for r in read) \
                and allowed(policies, "iot:Subscribe", topic, context) \
                and allowed(policies, "iot:Receive", topic, context):
            read.append(topic)
    lines = []
    for topic in dict.fromkeys(write + read):
        access = ("readwrite" if topic in write and topic in read
                  else "write" if topic in write else "read")
        lines.append(f"topic {access} {topic}")
    subscribe += [t for t in topics if not any(_covers(f, t) for f in subscribe)
                  and allowed(policies, "iot:Subscribe", t, context)]
    receive += [t for t in topics if not any(_covers(r, t) for r in receive)
                and allowed(policies, "iot:Receive", t, context)]
    return AclRendering(username, lines, list(dict.fromkeys(notes)), publish=list(write),
                        subscribe=list(dict.fromkeys(subscribe)),
                        receive=list(dict.fromkeys(receive)))
