"""What provisioning attempts spent at the service, kept in CERT_DIR, so that no
fault of the cloud, the policy or the network makes a camera mint certificates
without end.

Every certificate the service creates is recorded, before anything else is
sent, until a run installs it (which clears the record); so is every refused
subscription.  From the record, ``next_attempt`` says when the next claim
connection may start:

- A RegisterThing that was sent and got no answer may still have registered
  the certificate: an active certificate that no device holds.  After the
  1st, 2nd, 3rd and each later such failure within 24 h the next attempt
  waits 1 min, 10 min, 1 h, then 6 h; and at most 6 of them per 24 h.
- A refused subscription (SUBACK 0x80: the claim policy lacks a topic)
  creates nothing, but a unit restarting every minute would ask again for
  ever: it takes the same lengthening waits.
- A certificate created and never registered (RegisterThing not sent, or
  answered with a rejection; or a create request whose answer never came,
  which may have created one) stays inactive, and AWS deletes it once its
  ownership token expires, about an hour later.  It is cheap: up to 3 per
  hour go with the ordinary retry backoff only, the next waits until the
  oldest of them is an hour old.  So at most 3 inactive certificates of this
  camera exist at once, and the common case, a network fault right after
  CreateKeysAndCertificate, is retried at once.

The record is trusted as far as it can be: an entry dated after the clock
(the clock was set back, or ran ahead when it was written) is taken as now
and written back so, which delays by one ordinary wait, never for ever; a
record that cannot be read or parsed is replaced by the worst it could hide,
one unanswered RegisterThing now.  Both are logged.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import files
from .clock import REAL
from .config import CERTIFICATE_ID_RE
from .errors import TransientError

log = logging.getLogger("entomologist")

RECORD_NAME = "provisioning-spend.json"
MAX_RECORD_BYTES = 64 * 1024
MAX_ENTRIES = 200

CREATE_SENT = "create-sent"         # asked for a certificate, no answer (yet)
CREATED = "created"                 # created; RegisterThing not sent
SENT = "register-sent"              # RegisterThing sent, no answer (yet)
REJECTED = "register-rejected"      # RegisterThing answered with a rejection
REFUSED = "subscription-refused"    # a SUBACK refused; nothing created
UNREADABLE = "unreadable-record"    # the record could not be read
KINDS = (CREATE_SENT, CREATED, SENT, REJECTED, REFUSED, UNREADABLE)
# What may have left an active certificate behind.
ORPHANING = (SENT, UNREADABLE)
# What lengthens the wait.
COSTLY = ORPHANING + (REFUSED,)
UNREGISTERED = (CREATE_SENT, CREATED, REJECTED)

MINUTE, HOUR, DAY = 60.0, 3600.0, 24 * 3600.0
WAITS = (1 * MINUTE, 10 * MINUTE, 1 * HOUR, 6 * HOUR)
MAX_ORPHANING_PER_DAY = 6
MAX_UNREGISTERED_PER_HOUR = 3
HINT = ("the claim policy (iot:Receive and iot:Subscribe on the provisioning topics), "
        "then the network link; the wait ends by itself")

UNREGISTERED_HINT = ("the network link (answers lost after a certificate was created) and that "
                     "the claim policy allows iot:Receive on the certificate topics; the wait "
                     "ends by itself")

_WHAT = {SENT: "RegisterThing got no answer", REFUSED: "a subscription was refused",
         UNREADABLE: "the spend record was unreadable"}


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _duration(seconds: float) -> str:
    return f"{seconds / HOUR:g} h" if seconds >= HOUR else f"{seconds / MINUTE:g} min"


@dataclass
class Entry:
    kind: str
    at: float
    certificate_id: str | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "at": self.at, "certificateId": self.certificate_id}


def _parse(raw: bytes) -> list[Entry]:
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ValueError("not a version 1 record")
    entries = []
    for item in doc["entries"]:
        kind, at, cert = item["kind"], item["at"], item.get("certificateId")
        if (kind not in KINDS or isinstance(at, bool) or not isinstance(at, (int, float))
                or at != at or abs(at) == float("inf")
                or not (cert is None or (isinstance(cert, str)
                                         and CERTIFICATE_ID_RE.fullmatch(cert)))):
            raise ValueError("invalid entry")
        entries.append(Entry(kind, float(at), cert))
    return entries


class SpendRecord:
    """``CERT_DIR/provisioning-spend.json``: written atomically, fsynced, born 0600."""

    def __init__(self, path: Path, now: Callable[[], float] = REAL.time):
        self.path = path
        self.now = now
        self.entries: list[Entry] = []

    @classmethod
    def open(cls, path: Path, now: Callable[[], float] = REAL.time,
             settle: bool = True) -> "SpendRecord":
        """The record at ``path``, settled if it cannot be trusted as is, and written back
        so unless ``settle`` is False (``boot.py --check`` writes nothing)."""
        record = cls(path, now)
        current = now()
        try:
            raw = files.read_bounded(path, "provisioning spend record", MAX_RECORD_BYTES)
            record.entries = _parse(raw)
        except files.FileProblem as exc:
            if not exc.missing:
                record._assume_the_worst(current, str(exc), settle)
            return record
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            record._assume_the_worst(current, f"{path} does not parse ({type(exc).__name__})",
                                     settle)
            return record
        ahead = [entry for entry in record.entries if entry.at > current]
        if ahead:
            log.warning("%s has %d entries dated after the clock (up to %s, the clock reads "
                        "%s): taken as now, the clock was set back or ran ahead", path,
                        len(ahead), utc(max(entry.at for entry in ahead)), utc(current))
            for entry in ahead:
                entry.at = current
            if settle:
                record._save()
        return record

    def _assume_the_worst(self, current: float, problem: str, settle: bool) -> None:
        log.warning("%s: taken as one RegisterThing that got no answer now, the worst it "
                    "could hide", problem)
        self.entries = [Entry(UNREADABLE, current)]
        if settle:
            self._save()

    # -- queries

    def next_attempt(self) -> tuple[float, str]:
        """When the next claim connection may start (0: now), and why."""
        at, why, _ = self._limit()
        return at, why

    def _limit(self) -> tuple[float, str, str]:
        """The latest of the limits that apply: (when, why, what to check)."""
        current = self.now()
        day = sorted((e for e in self.entries if current - e.at < DAY), key=lambda e: e.at)
        costly = [e for e in day if e.kind in COSTLY]
        orphaning = [e for e in costly if e.kind in ORPHANING]
        unregistered = [e for e in day if e.kind in UNREGISTERED and current - e.at < HOUR]
        limits = [(0.0, "", "")]
        if costly:
            wait = WAITS[min(len(costly), len(WAITS)) - 1]
            last = costly[-1]
            limits.append((last.at + wait, f"{len(costly)} unanswered RegisterThing(s) or "
                                           f"refused subscription(s) in 24 h, the last at "
                                           f"{utc(last.at)} ({_WHAT[last.kind]}): the next "
                                           f"attempt waits {_duration(wait)}", HINT))
        if len(orphaning) >= MAX_ORPHANING_PER_DAY:
            oldest = orphaning[len(orphaning) - MAX_ORPHANING_PER_DAY]
            limits.append((oldest.at + DAY, f"{len(orphaning)} RegisterThing requests in 24 h "
                                            f"got no answer, the most allowed per day", HINT))
        if len(unregistered) >= MAX_UNREGISTERED_PER_HOUR:
            oldest = unregistered[len(unregistered) - MAX_UNREGISTERED_PER_HOUR]
            limits.append((oldest.at + HOUR, f"{len(unregistered)} certificates asked for in "
                                             f"the last hour were never registered, the most "
                                             f"allowed per hour", UNREGISTERED_HINT))
        return max(limits)
    def unanswered_before(self, certificate_id: str) -> float | None:
        """When another certificate's RegisterThing last went unanswered in 24 h, if it did."""
        current = self.now()
        times = [e.at for e in self.entries if e.kind == SENT and current - e.at < DAY
                 and e.certificate_id != certificate_id]
        return max(times, default=None)

    def hold(self) -> tuple[float, str]:
        """For ``with_retries``: seconds before the next attempt may start, and why."""
        at, why = self.next_attempt()
        seconds = at - self.now()
        if seconds <= 0:
            return 0.0, ""
        return seconds, f"the next provisioning attempt is allowed at {utc(at)}: {why}"

    def check(self) -> None:
        """TransientError, before anything is sent, if an attempt now would overspend."""
        seconds, why = self.hold()
        if seconds > 0:
            raise TransientError(f"provisioning held back, nothing sent: {why}",
                                 hint=self._limit()[2])

    # -- changes, each durable before the run goes on

    def create_sent(self) -> None:
        """Before CreateKeysAndCertificate or CreateCertificateFromCsr: an answer
        lost on the way may still have created a certificate."""
        self.entries.append(Entry(CREATE_SENT, self.now()))
        self._save()

    def create_rejected(self) -> None:
        """The create request was answered with a rejection: nothing was created."""
        pending = self._pending()
        if pending is not None:
            self.entries.remove(pending)
            self._save()

    def created(self, certificate_id: str) -> None:
        entry = self._pending() or Entry(CREATED, self.now())
        if entry not in self.entries:
            self.entries.append(entry)
        entry.kind, entry.certificate_id = CREATED, certificate_id
        self._save()

    def _pending(self) -> Entry | None:
        for entry in reversed(self.entries):
            if entry.kind == CREATE_SENT:
                return entry
        return None

    def register_sent(self, certificate_id: str) -> None:
        """Before RegisterThing goes out: a run killed awaiting its answer has spent it."""
        entry = self._entry(certificate_id)
        entry.kind, entry.at = SENT, max(entry.at, self.now())
        self._save()

    def unanswered(self, certificate_id: str) -> None:
        """The attempt gave up on RegisterThing's answer: the wait runs from now."""
        entry = self._entry(certificate_id)
        entry.kind, entry.at = SENT, max(entry.at, self.now())
        self._save()

    def rejected(self, certificate_id: str) -> None:
        """RegisterThing was answered with a rejection: nothing was registered."""
        self._entry(certificate_id).kind = REJECTED
        self._save()

    def subscription_refused(self) -> None:
        self.entries.append(Entry(REFUSED, self.now()))
        self._save()

    def _entry(self, certificate_id: str) -> Entry:
        for entry in reversed(self.entries):
            if entry.certificate_id == certificate_id:
                return entry
        entry = Entry(CREATED, self.now(), certificate_id)
        self.entries.append(entry)
        return entry

    def _save(self) -> None:
        current = self.now()
        self.entries = [e for e in self.entries if current - e.at < DAY][-MAX_ENTRIES:]
        if not self.entries:
            files.remove_durably(self.path)
            return
        data = json.dumps({"version": 1, "entries": [e.to_json() for e in self.entries]},
                          indent=1) + "\n"
        files.write_file_atomic(self.path, data.encode(), 0o600)
