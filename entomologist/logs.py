"""Log lines fit for the journal, and strings from outside made safe to log.

A string from the service or from a file can hold a newline (a forged log
line), terminal escapes, megabytes of text, PEM blocks or the ownership
token: ``shown`` escapes and cuts it, and a filter on the handler redacts
every secret registered with ``redact``, whatever path it took into a line.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Mapping

SHOWN_LIMIT = 160
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|\Z)", re.S)


# A service that echoes part of a secret leaks that part: any run of this many
# characters of a secret is redacted too.
SECRET_FRAGMENT = 16
SHORT_SECRET = 4
LINE_LIMIT = 1000
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _Redactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()
        # Secrets too short to be cut out of any text without garbling it ("pw"
        # in "pwd"): cut out where they stand alone, between non-alphanumerics.
        self.short: set[str] = set()

    def redact(self, text: str) -> str:
        for secret in self.short:
            if secret in text:
                text = re.sub(rf"(?<![^\W_]){re.escape(secret)}(?![^\W_])", "[redacted]", text)
        # Every window of every secret is looked for in the text as it came, and
        # the union of what they cover is cut out at once: cutting one fragment
        # first would hide its overlap with the next and leave the rest showing.
        covered = bytearray(len(text))
        for secret in self.secrets:
            size = min(len(secret), SECRET_FRAGMENT)
            for start in range(len(secret) - size + 1):
                piece = secret[start:start + size]
                found = text.find(piece)
                while found != -1:
                    covered[found:found + size] = b"\x01" * size
                    found = text.find(piece, found + 1)
        if not any(covered):
            return text
        parts, index = [], 0
        while index < len(text):
            end = index
            while end < len(text) and covered[end] == covered[index]:
                end += 1
            parts.append("[redacted]" if covered[index] else text[index:end])
            index = end
        return "".join(parts)

    def line(self, text: str) -> str:
        clean = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"),
                             self.redact(text))
        if len(clean) > LINE_LIMIT:
            clean = clean[:LINE_LIMIT] + f"...[{len(clean) - LINE_LIMIT} more characters]"
        return clean

    def filter(self, record: logging.LogRecord) -> bool:
        """Every record becomes one bounded line without secrets, whatever reached
        its message (a path from the config can hold a newline or an escape).
        A traceback keeps its lines, but not a secret that an exception's text holds."""
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact(_TRACEBACKS.formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        text = record.getMessage()
        clean = self.line(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


_REDACTOR = _Redactor()
_TRACEBACKS = logging.Formatter()


def holds_secret(text: str) -> bool:
    """Whether ``text`` holds a registered secret, or a fragment of one."""
    return _REDACTOR.redact(text) != text


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """``value`` as one printable, bounded line, PEM text and secrets redacted (before
    the cut: a cut secret would no longer match the log filter)."""
    text = value if isinstance(value, str) else repr(value)
    text = _PEM.sub("[PEM text redacted]", text)
    text = _REDACTOR.redact(text)
    if len(text) > limit:
        text = text[:limit] + f"...[{len(text) - limit} more characters]"
    # unicode_escape turns newlines, escapes and other controls into \n, \x1b.
    return text.encode("unicode_escape").decode("ascii")


def clean_line(text: str) -> str:
    """``text`` as a log record's line would show it: secrets redacted, controls
    escaped, cut to LINE_LIMIT (for output that is not a log record)."""
    return _REDACTOR.line(text)


def redact(secret: str | None) -> None:
    """Never let ``secret`` reach a log line (ownership tokens, PINs, passwords)."""
    if secret and len(secret) >= SHORT_SECRET:
        _REDACTOR.secrets.add(secret)
    elif secret:
        _REDACTOR.short.add(secret)


class JournalFormatter(logging.Formatter):
    """Syslog priority prefix and no timestamp: the journal adds its own."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                  logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITIES.get(record.levelno, 6)
        # The journal splits its stream at newlines: every line of a
        # traceback gets the priority of the event it belongs to.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(stream=None, env: Mapping[str, str] | None = None) -> bool:
    """True when the stream is the journal's (see systemd.exec, $JOURNAL_STREAM)."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(verbose: bool = False, stream=None) -> logging.Handler:
    """Log to ``stream`` (stderr), with journal priorities when it is the journal."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(_REDACTOR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
