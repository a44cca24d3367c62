"""Fleet provisioning templates, evaluated at RegisterThing as AWS IoT does.

The stand-in reads the template an operator deploys: load_stack() takes
cloud/stack.yaml (CloudFormation YAML with its short tags such as !Sub and
!Ref), evaluates the few stack properties it needs (the template's name and
body, the claim certificate's policies) with the stack's parameter defaults
and stand-in pseudo parameters, and parses the TemplateBody JSON into a
ProvisioningTemplate.  ProvisioningTemplate.register() then does what
RegisterThing does with it.

Supported, as AWS documents for fleet provisioning templates:
  * Parameters of Type String with an optional Default.  A declared parameter
    the device does not send and that has no Default is a 400 rejection
    naming it.  ``AWS::IoT::Certificate::Id`` is the new certificate's ID.
  * Mappings (literal, two levels), Conditions (Fn::Equals, Fn::Not, Fn::And,
    Fn::Or, {"Condition": name}), DeviceConfiguration (string values, or
    intrinsic functions that give strings).
  * Intrinsic functions: Ref, Fn::Join, Fn::Sub (string or [string, map],
    ``${!Literal}``), Fn::Select, Fn::Split, Fn::If, Fn::FindInMap.  Any other
    ``Fn::`` (Fn::GetAtt, Fn::Base64, ...) is a TemplateError when the
    template is loaded, not when a device registers.
  * Resources: one AWS::IoT::Thing (ThingName, AttributePayload, ThingTypeName,
    ThingGroups, BillingGroup), one AWS::IoT::Certificate (CertificateId,
    Status), any number of AWS::IoT::Policy (PolicyDocument as an object or
    JSON text, or PolicyName of an existing policy).  PolicyDocument text is
    AWS IoT's: its ``${iot:...}`` are policy variables, left for the policy
    evaluator (standin.policy).
  * Checks AWS makes on the result: thing name [a-zA-Z0-9:_-]{1,128};
    attribute names [a-zA-Z0-9_.,@/:#-]{1,128} and values
    [a-zA-Z0-9_.,@/:#-]{0,800}; Fn::Select out of range and Fn::FindInMap
    without the key are 400 rejections.

Known differences from AWS:
  * Rejection codes and messages are the stand-in's own (400
    InvalidParameters, 400 InvalidRequest); AWS's exact errorCode and wording
    for each template failure are not documented.
  * A Ref or ${...} to a name the template does not declare (AWS's own
    pre-provisioning-hook example refs an undeclared SerialNumber) is allowed:
    it is listed in ProvisioningTemplate.warnings at load time and taken from
    the request's parameters, else rejected.  AWS's behaviour here is not
    documented.
  * No registry: thing types, thing groups, billing groups and named policies
    are not checked to exist; OverrideSettings are accepted and ignored (every
    registration is a first one).  A PreProvisioningHook is read from the
    stack (load_stack: its Lambda function's handler module beside the stack
    file, its environment); the stand-in calls it (standin/responder.py).
  * Parameter types other than String, per-resource Condition attributes and
    AWS::NoValue are refused at load time; AWS may accept some of them.
  * DeviceConfiguration: AWS says it does not support nested objects; a
    nested object is refused at load time.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from standin import policy as iot_policy

CERTIFICATE_ID = "AWS::IoT::Certificate::Id"
TEMPLATE_FUNCTIONS = frozenset({"Ref", "Fn::Join", "Fn::Sub", "Fn::Select", "Fn::Split",
                                "Fn::If", "Fn::FindInMap"})
CONDITION_FUNCTIONS = frozenset({"Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Condition"})
# CloudFormation (the stack file) has these too; the stand-in evaluates only
# the stack properties it needs, and a property that needs Fn::GetAtt is
# never one of them.
STACK_FUNCTIONS = TEMPLATE_FUNCTIONS | {"Fn::GetAtt", "Fn::Base64", "Fn::GetAZs",
                                       "Fn::ImportValue", "Fn::Cidr", "Fn::Length",
                                       "Fn::ToJsonString"}
RESOURCE_TYPES = ("AWS::IoT::Thing", "AWS::IoT::Certificate", "AWS::IoT::Policy")
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
ATTRIBUTE_NAME = re.compile(r"[a-zA-Z0-9_.,@/:#-]{1,128}")
ATTRIBUTE_VALUE = re.compile(r"[a-zA-Z0-9_.,@/:#-]{0,800}")
_SUB_VARIABLE = re.compile(r"\$\{([^}]*)\}")


class TemplateError(ValueError):
    """The template cannot be used; raised when it is loaded."""


@dataclass
class Rejection(Exception):
    """RegisterThing's answer on .../provision/json/rejected."""

    status: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def payload(self) -> dict:
        return {"statusCode": self.status, "errorCode": self.code,
                "errorMessage": self.message}


class _NoValue:
    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()


# ------------------------------------------------------------------ YAML

class CloudFormationLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML with CloudFormation's short tags, read as their long forms (with libyaml
    where PyYAML has it: a tenth of the pure-Python loader's time, at every stand-in start)."""


def _construct(loader: CloudFormationLoader, tag_suffix: str, node: yaml.Node):
    name = "Ref" if tag_suffix == "Ref" else "Condition" if tag_suffix == "Condition" \
        else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if name == "Fn::GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


CloudFormationLoader.add_multi_constructor("!", _construct)


def load_yaml(text: str):
    return yaml.load(text, Loader=CloudFormationLoader)  # noqa: S506 (SafeLoader subclass)


# ------------------------------------------------------------------ evaluation

def _function(node) -> tuple[str, Any] | None:
    if isinstance(node, dict) and len(node) == 1:
        (key, value), = node.items()
        if key == "Ref" or key == "Condition" or key.startswith("Fn::"):
            return key, value
    return None


class _Evaluator:
    """Intrinsic functions over one set of parameters, mappings and conditions."""

    def __init__(self, values: Mapping[str, Any], mappings: Mapping, conditions: Mapping,
                 fallback: Mapping[str, Any] | None = None, no_value: bool = False,
                 where: str = "template"):
        self.values = values
        self.fallback = fallback or {}
        self.mappings = mappings
        self.condition_defs = conditions
        self.no_value = no_value
        self.where = where
        self._conditions: dict[str, bool] = {}

    def ref(self, name: str):
        if name in self.values:
            return self.values[name]
        if name == "AWS::NoValue" and self.no_value:
            return NO_VALUE
        if name in self.fallback:
            return self.fallback[name]
        raise Rejection(400, "InvalidParameters",
                        f"parameter {name} is required by the {self.where} but was not provided")

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            if name not in self.condition_defs:
                raise TemplateError(f"condition {name} is not declared")
            self._conditions[name] = None  # a cycle reads as a TemplateError below
            value = self.value(self.condition_defs[name])
            if not isinstance(value, bool):
                raise TemplateError(f"condition {name} is not a condition function")
            self._conditions[name] = value
        elif self._conditions[name] is None:
            raise TemplateError(f"condition {name} refers to itself")
        return self._conditions[name]

    def value(self, node):
        fn = _function(node)
        if fn:
            return getattr(self, "_" + fn[0].replace("Fn::", "").lower())(fn[1])
        if isinstance(node, dict):
            out = {k: self.value(v) for k, v in node.items()}
            return {k: v for k, v in out.items() if v is not NO_VALUE}
        if isinstance(node, list):
            return [v for v in (self.value(n) for n in node) if v is not NO_VALUE]
        return node

    def string(self, node, what: str) -> str:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise Rejection(400, "InvalidRequest", f"{what} is not a string: {value!r}")
        return str(value)

    def _ref(self, name):
        return self.ref(name)

    def _condition(self, name):
        return self.condition(name)

    def _join(self, args):
        delimiter, items = args
        items = self.value(items)
        return self.value(delimiter).join(self.string(i, "an Fn::Join item") for i in items)

    def _sub(self, args):
        text, variables = (args, {}) if isinstance(args, str) else args
        variables = {k: self.value(v) for k, v in variables.items()}

        def one(m: re.Match) -> str:
            name = m.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            value = variables[name] if name in variables else self.ref(name)
            return self.string(value, f"${{{name}}}")
        return _SUB_VARIABLE.sub(one, text)

    def _select(self, args):
        index, items = self.value(args[0]), self.value(args[1])
        try:
            index = int(index)
            if index < 0:
                raise IndexError
            chosen = items[index]
        except (ValueError, TypeError, IndexError):
            raise Rejection(400, "InvalidRequest",
                            f"Fn::Select index {args[0]!r} is out of range of {items!r}") from None
        if chosen is None:
            raise Rejection(400, "InvalidRequest", "Fn::Select chose a null value")
        return chosen

    def _split(self, args):
        return self.string(args[1], "Fn::Split's string").split(self.value(args[0]))

    def _if(self, args):
        name, then, otherwise = args
        return self.value(then if self.condition(name) else otherwise)

    def _findinmap(self, args):
        name, first, second = (self.string(a, "an Fn::FindInMap key") for a in args)
        try:
            return self.mappings[name][first][second]
        except (KeyError, TypeError):
            raise Rejection(400, "InvalidRequest",
                            f"Fn::FindInMap: no {name}/{first}/{second} in Mappings") from None

    def _equals(self, args):
        a, b = (self.value(x) for x in args)
        return str(a) == str(b)

    def _not(self, args):
        return not self._bool(args[0])

    def _and(self, args):
        return all(self._bool(a) for a in args)

    def _or(self, args):
        return any(self._bool(a) for a in args)

    def _bool(self, node) -> bool:
        value = self.value(node)
        if not isinstance(value, bool):
            raise TemplateError(f"{node!r} is not a condition")
        return value

    def _getatt(self, args):
        raise TemplateError(f"Fn::GetAtt {args!r} is known only to CloudFormation")


_ARITY = {"Fn::Join": 2, "Fn::Select": 2, "Fn::Split": 2, "Fn::If": 3, "Fn::FindInMap": 3,
          "Fn::Equals": 2, "Fn::Not": 1}


def _check(node, allowed: frozenset, where: str, refs: set, subs: set,
           in_condition: bool = False) -> None:
    """Refuse, at load time, functions the evaluator does not support."""
    fn = _function(node)
    if fn:
        name, args = fn
        if name == "Condition" and not in_condition:
            raise TemplateError(f"{where}: Condition is only for Conditions")
        if name not in allowed and name not in (CONDITION_FUNCTIONS if in_condition else ()):
            raise TemplateError(
                f"{where}: {name} is not supported; provisioning templates support "
                f"{', '.join(sorted(allowed))} (and {', '.join(sorted(CONDITION_FUNCTIONS))} "
                "in Conditions)")
        if name in ("Ref", "Condition"):
            if not isinstance(args, str):
                raise TemplateError(f"{where}: {name} takes a name")
            if name == "Ref":
                refs.add(args)
            return
        if name == "Fn::Sub":
            text = args if isinstance(args, str) else (
                args[0] if isinstance(args, list) and len(args) == 2
                and isinstance(args[0], str) and isinstance(args[1], dict) else None)
            if text is None:
                raise TemplateError(f"{where}: Fn::Sub takes a string or [string, map]")
            local = set(args[1]) if isinstance(args, list) else set()
            subs.update(v for v in _SUB_VARIABLE.findall(text)
                        if not v.startswith("!") and v not in local)
            if isinstance(args, list):
                _check(args[1], allowed, where, refs, subs, in_condition)
            return
        if name in ("Fn::And", "Fn::Or"):
            if not isinstance(args, list) or not 2 <= len(args) <= 10:
                raise TemplateError(f"{where}: {name} takes 2 to 10 conditions")
        elif name in _ARITY:
            if not isinstance(args, list) or len(args) != _ARITY[name]:
                raise TemplateError(f"{where}: {name} takes a list of {_ARITY[name]}")
        _check(args, allowed, where, refs, subs,
               in_condition or name in ("Fn::Not", "Fn::And", "Fn::Or"))
        return
    if isinstance(node, dict):
        for key, value in node.items():
            _check(value, allowed, f"{where}.{key}", refs, subs, in_condition)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check(value, allowed, f"{where}[{i}]", refs, subs, in_condition)


# ------------------------------------------------------------------ templates

@dataclass(frozen=True)
class PolicyResult:
    name: str | None
    document: dict | None  # None: an existing policy, by name


@dataclass(frozen=True)
class Registration:
    """What RegisterThing made, and what it answers."""

    thing_name: str | None
    attributes: dict[str, str]
    thing_type: str | None
    thing_groups: list[str]
    billing_group: str | None
    certificate_id: str
    certificate_status: str
    policies: list[PolicyResult]
    device_configuration: dict[str, str]
    parameters: dict[str, str]

    def accepted(self) -> dict:
        """The payload on .../provision/json/accepted."""
        return {"deviceConfiguration": self.device_configuration,
                "thingName": self.thing_name or ""}


@dataclass
class ProvisioningTemplate:
    body: dict
    name: str | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_body(cls, body, name: str | None = None) -> "ProvisioningTemplate":
        if isinstance(body, (str, bytes)):
            try:
                body = json.loads(body)
            except ValueError as exc:
                raise TemplateError(f"template body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise TemplateError("template body is a JSON object")
        template = cls(copy.deepcopy(body), name)
        template._validate()
        return template

    # -- load-time checks

    def _validate(self) -> None:
        body = self.body
        unknown = set(body) - {"Parameters", "Mappings", "Conditions", "Resources",
                               "DeviceConfiguration", "AWSTemplateFormatVersion", "Description"}
        if unknown:
            raise TemplateError(f"unknown template sections: {sorted(unknown)}")
        params = body.get("Parameters", {})
        if not isinstance(params, dict):
            raise TemplateError("Parameters is an object")
        for pname, spec in params.items():
            if not isinstance(spec, dict) or spec.get("Type") != "String":
                raise TemplateError(f"parameter {pname}: only Type String is supported")
            if "Default" in spec and not isinstance(spec["Default"], str):
                raise TemplateError(f"parameter {pname}: Default must be a string")
        mappings = body.get("Mappings", {})
        for mname, table in mappings.items():
            if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                raise TemplateError(f"mapping {mname} is not a two-level map")
            for first, row in table.items():
                for second, value in row.items():
                    if _function(value) or isinstance(value, dict):
                        raise TemplateError(f"mapping {mname}.{first}.{second}: "
                                            "Mappings hold literal values only")
        refs: set[str] = set()
        subs: set[str] = set()
        for cname, cond in body.get("Conditions", {}).items():
            _check(cond, TEMPLATE_FUNCTIONS, f"Conditions.{cname}", refs, subs, True)
        resources = body.get("Resources")
        if not isinstance(resources, dict) or not resources:
            raise TemplateError("Resources must declare the template's resources")
        kinds: dict[str, list[str]] = {}
        for logical, res in resources.items():
            if not isinstance(res, dict) or res.get("Type") not in RESOURCE_TYPES:
                raise TemplateError(f"resource {logical}: Type must be one of {RESOURCE_TYPES}")
            extra = set(res) - {"Type", "Properties", "OverrideSettings"}
            if extra:
                raise TemplateError(f"resource {logical}: unsupported keys {sorted(extra)}")
            kinds.setdefault(res["Type"], []).append(logical)
            _check(res.get("Properties", {}), TEMPLATE_FUNCTIONS,
                   f"Resources.{logical}.Properties", refs, subs)
        for kind in ("AWS::IoT::Thing", "AWS::IoT::Certificate"):
            if len(kinds.get(kind, [])) > 1:
                raise TemplateError(f"more than one {kind}: {kinds[kind]}")
        for logical in kinds.get("AWS::IoT::Certificate", []):
            props = resources[logical].get("Properties", {})
            if set(props) - {"CertificateId", "Status"} or "CertificateId" not in props:
                raise TemplateError(f"resource {logical}: a fleet provisioning template's "
                                    "certificate is given by CertificateId only")
        for logical in kinds.get("AWS::IoT::Policy", []):
            props = resources[logical].get("Properties", {})
            if ("PolicyName" in props) == ("PolicyDocument" in props):
                raise TemplateError(f"resource {logical}: PolicyName or PolicyDocument, "
                                    "not both")
            doc = props.get("PolicyDocument")
            if isinstance(doc, str) or (isinstance(doc, dict) and not _has_function(doc)):
                try:
                    iot_policy.Policy.parse(doc)
                except iot_policy.PolicyError as exc:
                    raise TemplateError(f"resource {logical}: {exc}") from None
        config = body.get("DeviceConfiguration", {})
        if not isinstance(config, dict):
            raise TemplateError("DeviceConfiguration is an object")
        for key, value in config.items():
            if isinstance(value, (dict, list)) and not _function(value):
                raise TemplateError(f"DeviceConfiguration.{key}: nested objects are not "
                                    "supported")
        _check(config, TEMPLATE_FUNCTIONS, "DeviceConfiguration", refs, subs)
        for cname in _condition_names(body):
            if cname not in body.get("Conditions", {}):
                raise TemplateError(f"Fn::If names condition {cname}, which is not declared")
        for mname in _literal_map_names(body):
            if mname not in mappings:
                raise TemplateError(f"Fn::FindInMap names mapping {mname}, which is not declared")
        known = set(params) | {CERTIFICATE_ID} | set(resources)
        for name in sorted((refs | subs) - known):
            self.warnings.append(f"{name} is referenced but not declared in Parameters; "
                                 "it is taken from the device's parameters")
        for name in (refs | subs) & set(resources):
            raise TemplateError(f"Ref {name}: references to resources are not supported")

    # -- RegisterThing

    @property
    def parameters(self) -> dict:
        return dict(self.body.get("Parameters", {}))

    def register(self, parameters: Mapping[str, Any] | None, certificate_id: str) -> Registration:
        """Evaluate the template for one RegisterThing request; raise Rejection."""
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, Mapping):
            raise Rejection(400, "InvalidParameters", "parameters must be an object")
        for key, value in parameters.items():
            if not isinstance(value, str):
                raise Rejection(400, "InvalidParameters", f"parameter {key} is not a string")
        values: dict[str, Any] = {}
        for pname, spec in self.parameters.items():
            if pname == CERTIFICATE_ID:
                continue
            if pname in parameters:
                values[pname] = parameters[pname]
            elif "Default" in spec:
                values[pname] = spec["Default"]
            else:
                raise Rejection(400, "InvalidParameters",
                                f"parameter {pname} is declared in "
                                f"{ev_where(self.name)} without a Default and was not sent")
        values[CERTIFICATE_ID] = certificate_id
        extra = {k: v for k, v in parameters.items() if k not in values}
        ev = _Evaluator(values, self.body.get("Mappings", {}),
                        self.body.get("Conditions", {}), fallback=extra,
                        where=ev_where(self.name))
        return self._evaluate(ev, certificate_id, values)

    def _evaluate(self, ev: _Evaluator, certificate_id: str, values: dict) -> Registration:
        thing_name, attributes, thing_type, groups, billing = None, {}, None, [], None
        status = "ACTIVE"
        policies: list[PolicyResult] = []
        for logical, res in self.body["Resources"].items():
            props = res.get("Properties", {})
            kind = res["Type"]
            if kind == "AWS::IoT::Thing":
                if "ThingName" in props:
                    thing_name = ev.string(props["ThingName"], "ThingName")
                    if not THING_NAME.fullmatch(thing_name):
                        raise Rejection(400, "InvalidRequest",
                                        f"thing name {thing_name!r} must match "
                                        "[a-zA-Z0-9:_-] and be 1 to 128 characters")
                attributes = self._attributes(ev, props.get("AttributePayload", {}))
                if "ThingTypeName" in props:
                    thing_type = ev.string(props["ThingTypeName"], "ThingTypeName")
                groups = [ev.string(g, "a thing group") for g in ev.value(
                    props.get("ThingGroups", []))]
                if "BillingGroup" in props:
                    billing = ev.string(props["BillingGroup"], "BillingGroup")
            elif kind == "AWS::IoT::Certificate":
                cert = ev.string(props["CertificateId"], "CertificateId")
                if cert != certificate_id:
                    raise Rejection(400, "InvalidRequest",
                                    "the template's CertificateId is not the certificate "
                                    "of the ownership token")
                status = ev.string(props.get("Status", "ACTIVE"), "Status").upper()
                if status not in ("ACTIVE", "INACTIVE"):
                    raise Rejection(400, "InvalidRequest", f"certificate Status {status}")
            else:
                if "PolicyName" in props:
                    policies.append(PolicyResult(ev.string(props["PolicyName"], "PolicyName"),
                                                 None))
                    continue
                doc = ev.value(props["PolicyDocument"])
                try:
                    parsed = json.loads(doc) if isinstance(doc, str) else doc
                    iot_policy.Policy.parse(parsed)
                except (ValueError, iot_policy.PolicyError) as exc:
                    raise Rejection(400, "InvalidRequest",
                                    f"policy {logical} is not a valid policy: {exc}") from None
                policies.append(PolicyResult(None, parsed))
        config = {k: ev.string(v, f"DeviceConfiguration.{k}")
                  for k, v in ev.value(self.body.get("DeviceConfiguration", {})).items()}
        return Registration(thing_name, attributes, thing_type, groups, billing, certificate_id,
                            status, policies, config,
                            {k: v for k, v in values.items() if k != CERTIFICATE_ID})

    @staticmethod
    def _attributes(ev: _Evaluator, payload) -> dict[str, str]:
        payload = ev.value(payload)
        # AWS's examples write attributes directly, the CloudFormation
        # resource nests them under "Attributes": accept both.
        if isinstance(payload, dict) and set(payload) == {"Attributes"} \
                and isinstance(payload["Attributes"], dict):
            payload = payload["Attributes"]
        if not isinstance(payload, dict):
            raise Rejection(400, "InvalidRequest", "AttributePayload is not an object")
        out = {}
        for key, value in payload.items():
            value = ev.string(value, f"attribute {key}")
            if not ATTRIBUTE_NAME.fullmatch(key) or not ATTRIBUTE_VALUE.fullmatch(value):
                raise Rejection(400, "InvalidRequest",
                                f"attribute {key}={value!r} has characters AWS IoT refuses")
            out[key] = value
        return out


def ev_where(name: str | None) -> str:
    return f"template {name}" if name else "the template"


def _has_function(node) -> bool:
    if _function(node):
        return True
    if isinstance(node, dict):
        return any(_has_function(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_function(v) for v in node)
    return False


def _walk_functions(node, name: str):
    fn = _function(node)
    if fn and fn[0] == name:
        yield fn[1]
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk_functions(v, name)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_functions(v, name)


def _condition_names(body) -> set[str]:
    names = {args[0] for args in _walk_functions(body, "Fn::If") if isinstance(args[0], str)}
    names |= {a for a in _walk_functions(body, "Condition") if isinstance(a, str)}
    return names


def _literal_map_names(body) -> set[str]:
    return {args[0] for args in _walk_functions(body, "Fn::FindInMap")
            if isinstance(args[0], str)}


# ------------------------------------------------------------------ the stack

STACK = Path(__file__).resolve().parent.parent / "cloud" / "stack.yaml"


@dataclass(frozen=True)
class Hook:
    """The template's pre-provisioning hook: a Lambda function whose handler
    module lies beside the stack file (cloud/hook.py for ``hook.handler``)."""

    function_name: str
    module_path: Path
    function: str
    environment: dict[str, str]
    payload_version: str


@dataclass
class Stack:
    """What the stand-in takes from cloud/stack.yaml."""

    template_name: str
    template: ProvisioningTemplate
    claim_policies: list[dict]
    parameters: dict[str, str]
    region: str
    account: str
    partition: str
    # DynamoDB tables the stack makes: TableName -> CreateTable's arguments.
    tables: dict[str, dict] = field(default_factory=dict)
    hook: Hook | None = None

    @property
    def inventory_table(self) -> str | None:
        if self.hook is not None and "INVENTORY_TABLE" in self.hook.environment:
            return self.hook.environment["INVENTORY_TABLE"]
        return next(iter(self.tables), None)

    def context(self, **fields) -> iot_policy.Context:
        """A policy Context in this stack's partition, region and account."""
        return iot_policy.Context(region=self.region, account=self.account,
                                  partition=self.partition, **fields)


def load_stack(path: Path | str = STACK, parameters: Mapping[str, str] | None = None, *,
               region: str = "us-east-1", account: str = "123456789012",
               partition: str = "aws", stack_name: str = "ento-standin") -> Stack:
    """Read the stack and evaluate what the stand-in needs; TemplateError if it cannot."""
    try:
        doc = load_yaml(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path}: not YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Resources"), dict):
        raise TemplateError(f"{path}: not a CloudFormation template")
    given = dict(parameters or {})
    values: dict[str, Any] = {}
    for pname, spec in (doc.get("Parameters") or {}).items():
        if pname in given:
            value = given.pop(pname)
        elif "Default" in spec:
            value = str(spec["Default"])
        else:
            continue  # only an error if a property the stand-in needs refers to it
        allowed_values = spec.get("AllowedValues")
        if allowed_values and value not in allowed_values:
            raise TemplateError(f"stack parameter {pname}={value!r}: not one of {allowed_values}")
        pattern = spec.get("AllowedPattern")
        if pattern and not re.fullmatch(pattern, value):
            raise TemplateError(f"stack parameter {pname}={value!r}: not {pattern}")
        values[pname] = value
    if given:
        raise TemplateError(f"the stack has no parameters {sorted(given)}")
    values.update({"AWS::Region": region, "AWS::AccountId": account, "AWS::Partition": partition,
                   "AWS::StackName": stack_name, "AWS::URLSuffix": "amazonaws.com"})
    resources = doc["Resources"]
    ev = _Evaluator(values, doc.get("Mappings") or {}, doc.get("Conditions") or {},
                    no_value=True, where="stack")

    def present(res) -> bool:
        return "Condition" not in res or ev.condition(res["Condition"])

    def evaluate(node, what):
        _check(node, STACK_FUNCTIONS, what, set(), set())
        try:
            return ev.value(node)
        except Rejection as exc:
            raise TemplateError(f"{what}: {exc.message}") from None

    templates = [(k, r) for k, r in resources.items()
                 if r.get("Type") == "AWS::IoT::ProvisioningTemplate" and present(r)]
    if len(templates) != 1:
        raise TemplateError(f"{path}: one AWS::IoT::ProvisioningTemplate expected, "
                            f"found {len(templates)}")
    logical, res = templates[0]
    props = res.get("Properties", {})
    if "TemplateName" not in props:
        raise TemplateError(f"{logical}: the stand-in needs a TemplateName")
    name = evaluate(props["TemplateName"], f"{logical}.TemplateName")
    body = evaluate(props.get("TemplateBody"), f"{logical}.TemplateBody")
    template = ProvisioningTemplate.from_body(body, name)

    certificates = [k for k, r in resources.items()
                    if r.get("Type") == "AWS::IoT::Certificate" and present(r)]
    if len(certificates) != 1:
        raise TemplateError(f"{path}: one claim AWS::IoT::Certificate expected, "
                            f"found {len(certificates)}")
    claim_policies = []
    for k, r in resources.items():
        if r.get("Type") != "AWS::IoT::PolicyPrincipalAttachment" or not present(r):
            continue
        p = r.get("Properties", {})
        principal = p.get("Principal")
        if principal not in ({"Fn::GetAtt": [certificates[0], "Arn"]},
                             {"Ref": certificates[0]}):
            continue
        target = p.get("PolicyName", {}).get("Ref") if isinstance(p.get("PolicyName"), dict) \
            else None
        if target not in resources or resources[target].get("Type") != "AWS::IoT::Policy":
            raise TemplateError(f"{k}: PolicyName must be a Ref to a policy in the stack")
        document = evaluate(resources[target]["Properties"]["PolicyDocument"],
                            f"{target}.PolicyDocument")
        try:
            iot_policy.Policy.parse(document)
        except iot_policy.PolicyError as exc:
            raise TemplateError(f"{target}: {exc}") from None
        claim_policies.append(document)
    tables = {}
    for k, r in resources.items():
        if r.get("Type") == "AWS::DynamoDB::Table" and present(r):
            p = r.get("Properties", {})
            if "TableName" not in p:
                raise TemplateError(f"{k}: the stand-in needs a TableName")
            tables[k] = {key: evaluate(p[key], f"{k}.{key}") for key in
                         ("TableName", "KeySchema", "AttributeDefinitions") if key in p}
    hook = _hook(props.get("PreProvisioningHook"), resources, ev, evaluate, present,
                 {k: t["TableName"] for k, t in tables.items()}, Path(path))
    return Stack(name, template, claim_policies,
                 {k: v for k, v in values.items() if not k.startswith("AWS::")},
                 region, account, partition,
                 {t["TableName"]: t for t in tables.values()}, hook)


def _hook(node, resources, ev, evaluate, present, table_names, path: Path) -> Hook | None:
    """The provisioning template's PreProvisioningHook, or None (absent, or
    AWS::NoValue through its condition)."""
    fn = _function(node)
    if fn and fn[0] == "Fn::If":
        condition, yes, no = fn[1]
        node = yes if ev.condition(condition) else no
    if node is None or node == {"Ref": "AWS::NoValue"}:
        return None
    target = node.get("TargetArn") if isinstance(node, dict) else None
    fn = _function(target)
    if not fn or fn[0] != "Fn::GetAtt" or fn[1][1] != "Arn" \
            or resources.get(fn[1][0], {}).get("Type") != "AWS::Lambda::Function" \
            or not present(resources[fn[1][0]]):
        raise TemplateError("PreProvisioningHook.TargetArn: the stand-in needs an "
                            "Fn::GetAtt [<a Lambda function in the stack>, Arn]")
    version = evaluate(node.get("PayloadVersion", "2020-04-01"), "PayloadVersion")
    if version != "2020-04-01":
        raise TemplateError(f"PreProvisioningHook.PayloadVersion {version}: only 2020-04-01")
    logical = fn[1][0]
    props = resources[logical].get("Properties", {})
    module, _, function = str(props.get("Handler", "")).rpartition(".")
    module_path = path.resolve().parent / f"{module}.py"
    if not module or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module) \
            or not module_path.is_file():
        raise TemplateError(f"{logical}.Handler: no module {module_path} beside the stack")
    variables = props.get("Environment", {}).get("Variables", {})
    env_ev = _Evaluator({**ev.values, **table_names}, ev.mappings, ev.condition_defs,
                        no_value=True, where="stack")
    _check(variables, STACK_FUNCTIONS, f"{logical}.Environment", set(), set())
    environment = {k: str(v) for k, v in env_ev.value(variables).items()}
    name = evaluate(props.get("FunctionName", logical), f"{logical}.FunctionName")
    return Hook(name, module_path, function, environment, version)
