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
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
            if len(secret) >= 2 * SECRET_FRAGMENT:
                for start in range(0, len(secret) - SECRET_FRAGMENT + 1, SECRET_FRAGMENT // 2):
                    fragment = secret[start:start + SECRET_FRAGMENT]
                    if fragment in text:
                        text = text.replace(fragment, "[redacted]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Every record becomes one bounded line without secrets, whatever reached
        its message (a path from the config can hold a newline or an escape)."""
        text = record.getMessage()
        clean = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"),
                             self.redact(text))
        if len(clean) > LINE_LIMIT:
            clean = clean[:LINE_LIMIT] + f"...[{len(clean) - LINE_LIMIT} more characters]"
        if clean != text:
            record.msg, record.args = clean, None
        return True


_REDACTOR = _Redactor()


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
