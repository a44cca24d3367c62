"""ento.conf as a file: its JSON read with every value kept as written and rendered
back, and the wording every config error shares.

A rewrite keeps every key and value with its exact meaning: numbers keep their
text (the standard library's json would turn 1.0000000000000001 into 1.0 and
1e400 into Infinity, which is not JSON), strings that UTF-8 cannot encode keep
their escapes, and the result is parsed back and compared before it may replace
the file.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Mapping

from . import files
from .errors import ConfigError

MAX_CONFIG_BYTES = files.MAX_FILE_BYTES
MAX_DEPTH = 64
CONFIG_HINT = "the config file"
# One label of a DNS host name (RFC 1123).
HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def bad_key(key: str, problem: str) -> ConfigError:
    """A config key's value is wrong: ``problem`` says how (never quoting a secret)."""
    return ConfigError(f"config key {key!r} {problem}", hint=CONFIG_HINT)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _reject_constant(name: str):
    raise ConfigError(f"{name} is not valid JSON")


def _depth(value: object, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise ConfigError(f"nested more than {limit} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


class _AsWritten:
    """A JSON number that remembers the text it was read from."""
    text: str

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        self.text = text
        return self


class _Int(_AsWritten, int):
    """An integer kept as written (-0 stays -0)."""


class _Number(_AsWritten, Decimal):
    """A fraction or an exponent, kept as written (6e1 stays 6e1, 1e400 is no Infinity)."""


def parse_document(text: str, where: str) -> dict:
    if text.startswith("\ufeff"):
        raise ConfigError(f"{where} starts with a byte-order mark; save it as plain UTF-8",
                          hint=CONFIG_HINT)
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates,
                         parse_constant=_reject_constant, parse_float=_Number,
                         parse_int=_Int)
        _depth(doc, MAX_DEPTH)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}", hint=CONFIG_HINT) from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", hint=CONFIG_HINT) from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply", hint=CONFIG_HINT) from None
    except ValueError as exc:  # e.g. an integer longer than Python will convert
        raise ConfigError(f"{where} holds a value that cannot be read: {exc}",
                          hint=CONFIG_HINT) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must hold a JSON object", hint=CONFIG_HINT)
    if not isinstance(doc.get("device"), dict):
        raise ConfigError(f"{where}: key 'device' is missing or not an object", hint=CONFIG_HINT)
    return doc


def read_document(real_path: Path, shown_path: Path | None = None) -> dict:
    """The whole config file as a dict, or ConfigError with the reason."""
    where = f"config file {shown_path or real_path}"
    raw = files.read_bounded(real_path, "config file", MAX_CONFIG_BYTES, hint=CONFIG_HINT)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 (byte {exc.start})", hint=CONFIG_HINT) from None
    return parse_document(text, where)


def json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, Decimal)):
        return "a number"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array"}.get(type(value), type(value).__name__)


def _json_string(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: keep it as the \u escape it came as
        return json.dumps(text, ensure_ascii=True)
    return json.dumps(text, ensure_ascii=False)


def render(value: object, level: int = 0) -> str:
    """JSON text of a parsed config value, numbers as they were written."""
    pad, end = "\n" + "  " * (level + 1), "\n" + "  " * level
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{pad}{_json_string(k)}: {render(v, level + 1)}" for k, v in value.items())
        return "{" + ",".join(items) + end + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[" + ",".join(pad + render(v, level + 1) for v in value) + end + "]"
    if isinstance(value, str):
        return _json_string(value)
    if value is True or value is False or value is None:
        return json.dumps(value)
    if isinstance(value, (_Int, _Number)):
        return value.text
    if isinstance(value, (int, Decimal)):
        return str(value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def rendered_update(config_path: Path, doc: dict, changes: Mapping[str, object]) -> bytes:
    """The new file's bytes, checked to mean exactly ``doc`` with ``changes``."""
    new = {k: (dict(v, **changes) if k == "device" else v) for k, v in doc.items()}
    data = (render(new) + "\n").encode("utf-8")
    where = f"config file {config_path}"
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} would grow past {MAX_CONFIG_BYTES} bytes", hint=CONFIG_HINT)
    if parse_document(data.decode("utf-8"), where) != new:
        raise ConfigError(f"{where} cannot be rewritten faithfully", hint=CONFIG_HINT)
    return data
