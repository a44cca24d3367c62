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

Each entry is dated three ways: the wall clock, the boot (the kernel's
boot_id) and CLOCK_BOOTTIME, at writing.  An entry of this boot is aged by
CLOCK_BOOTTIME, exact whatever is done to the wall clock meanwhile (set back a
day, corrected by NTP, swung by a hostile time server): the waits and the
daily cap hold within a boot.  Only an entry of an earlier boot is aged by
the wall clock, the one clock two boots share.

The record is trusted as far as it can be: an entry of an earlier boot dated
after the clock is taken as now (the clock is behind, or ran ahead when the
entry was written) and left as it is, so that a clock corrected later still
sees it at its true time; one dated more than 24 h after the clock could hold
nothing back by its true time once the clock is right, so it is rewritten as
now, which delays by one ordinary wait, never for ever.  A record that cannot
be read or parsed is replaced by the worst it could hide, one unanswered
RegisterThing now.  Both are logged.  Records without the boot fields still
parse: their entries count as of an earlier boot.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import files
from .clock import BOOT_ID_RE, REAL, Clock
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
    at: float                        # the wall clock at writing
    certificate_id: str | None = None
    boot: str | None = None          # the boot_id at writing
    boottime: float | None = None    # CLOCK_BOOTTIME at writing

    def to_json(self) -> dict:
        doc = {"kind": self.kind, "at": self.at, "certificateId": self.certificate_id}
        if self.boot is not None and self.boottime is not None:
            doc.update(boot=self.boot, boottime=self.boottime)
        return doc


def _number(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and value == value and abs(value) != float("inf"))


def _parse(raw: bytes) -> list[Entry]:
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ValueError("not a version 1 record")
    entries = []
    for item in doc["entries"]:
        kind, at, cert = item["kind"], item["at"], item.get("certificateId")
        boot, boottime = item.get("boot"), item.get("boottime")
        if (kind not in KINDS or not _number(at)
                or not (cert is None or (isinstance(cert, str)
                                         and CERTIFICATE_ID_RE.fullmatch(cert)))
                or (boot is None) != (boottime is None)
                or not (boot is None or (isinstance(boot, str) and BOOT_ID_RE.fullmatch(boot)
                                         and _number(boottime) and boottime >= 0))):
            raise ValueError("invalid entry")
        entries.append(Entry(kind, float(at), cert, boot,
                             None if boottime is None else float(boottime)))
    return entries


class SpendRecord:
    """``CERT_DIR/provisioning-spend.json``: written atomically, fsynced, born 0600."""

    def __init__(self, path: Path, clock: Clock = REAL):
        self.path = path
        self.clock = clock
        self.boot = clock.boot_id()  # a process lives within one boot
        self.entries: list[Entry] = []

    def now(self) -> float:
        return self.clock.time()

    def _new(self, kind: str, certificate_id: str | None = None) -> Entry:
        entry = Entry(kind, 0.0, certificate_id)
        self._stamp(entry)
        return entry

    def _stamp(self, entry: Entry) -> None:
        """Dates ``entry`` now, in this boot."""
        entry.at = self.now()
        entry.boot, entry.boottime = self.boot, self.clock.boottime()
        if entry.boot is None or entry.boottime is None:
            entry.boot = entry.boottime = None

    def _at(self, entry: Entry, current: float) -> float:
        """When ``entry`` was written, on the wall clock as it reads now (``current``):
        by CLOCK_BOOTTIME for an entry of this boot, else its wall-clock date, never
        after now."""
        if entry.boot is not None and entry.boot == self.boot:
            since_boot = self.clock.boottime()
            if since_boot is not None:
                return current - max(0.0, since_boot - entry.boottime)
        return min(entry.at, current)

    @classmethod
    def open(cls, path: Path, clock: Clock = REAL, settle: bool = True) -> "SpendRecord":
        """The record at ``path``, settled if it cannot be trusted as is, and written back
        so unless ``settle`` is False (``boot.py --check`` writes nothing)."""
        record = cls(path, clock)
        current = record.now()
        try:
            raw = files.read_bounded(path, "provisioning spend record", MAX_RECORD_BYTES)
            record.entries = _parse(raw)
        except files.FileProblem as exc:
            if not exc.missing:
                record._assume_the_worst(str(exc), settle)
            return record
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            record._assume_the_worst(f"{path} does not parse ({type(exc).__name__})", settle)
            return record
        since_boot = clock.boottime()
        this_boot = [e for e in record.entries if e.boot is not None and e.boot == record.boot
                     and since_boot is not None]
        earlier = [e for e in record.entries if all(e is not t for t in this_boot)]
        ahead = [e for e in earlier if e.at > current]
        # Only a boot-time date past the boot's clock is impossible; the wall clock
        # may be anywhere.
        impossible = [e for e in this_boot if e.boottime > since_boot]
        far = [e for e in ahead if e.at > current + DAY]
        if ahead:
            log.warning("%s has %d entries of an earlier boot dated after the clock (up to %s, "
                        "the clock reads %s): taken as now%s; the clock is behind or ran ahead "
                        "when they were written", path, len(ahead),
                        utc(max(entry.at for entry in ahead)), utc(current),
                        f", {len(far)} more than 24 h ahead rewritten so" if far else "")
        if impossible:
            log.warning("%s has %d entries of this boot dated after the boot's clock: taken "
                        "as now and rewritten so", path, len(impossible))
        for entry in far + impossible:
            record._stamp(entry)
        if (far or impossible) and settle:
            record._save()
        return record

    def _assume_the_worst(self, problem: str, settle: bool) -> None:
        log.warning("%s: taken as one RegisterThing that got no answer now, the worst it "
                    "could hide", problem)
        self.entries = [self._new(UNREADABLE)]
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
        dated = sorted(((self._at(e, current), e.kind) for e in self.entries),
                       key=lambda pair: pair[0])
        day = [(at, kind) for at, kind in dated if current - at < DAY]
        costly = [(at, kind) for at, kind in day if kind in COSTLY]
        orphaning = [at for at, kind in costly if kind in ORPHANING]
        unregistered = [at for at, kind in day if kind in UNREGISTERED and current - at < HOUR]
        limits = [(0.0, "", "")]
        if costly:
            wait = WAITS[min(len(costly), len(WAITS)) - 1]
            last_at, last_kind = costly[-1]
            limits.append((last_at + wait, f"{len(costly)} unanswered RegisterThing(s) or "
                                           f"refused subscription(s) in 24 h, the last at "
                                           f"{utc(last_at)} ({_WHAT[last_kind]}): the next "
                                           f"attempt waits {_duration(wait)}", HINT))
        if len(orphaning) >= MAX_ORPHANING_PER_DAY:
            oldest = orphaning[len(orphaning) - MAX_ORPHANING_PER_DAY]
            limits.append((oldest + DAY, f"{len(orphaning)} RegisterThing requests in 24 h "
                                            f"got no answer, the most allowed per day", HINT))
        if len(unregistered) >= MAX_UNREGISTERED_PER_HOUR:
            oldest = unregistered[len(unregistered) - MAX_UNREGISTERED_PER_HOUR]
            limits.append((oldest + HOUR, f"{len(unregistered)} certificates asked for in "
                                             f"the last hour were never registered, the most "
                                             f"allowed per hour", UNREGISTERED_HINT))
        return max(limits)

    def unanswered_before(self, certificate_id: str) -> float | None:
        """When another certificate's RegisterThing last went unanswered in 24 h, if it did."""
        current = self.now()
        times = [self._at(e, current) for e in self.entries
                 if e.kind == SENT and e.certificate_id != certificate_id]
        times = [at for at in times if current - at < DAY]
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
        self.entries.append(self._new(CREATE_SENT))
        self._save()

    def create_rejected(self) -> None:
        """The create request was answered with a rejection: nothing was created."""
        pending = self._pending()
        if pending is not None:
            self.entries.remove(pending)
            self._save()

    def created(self, certificate_id: str) -> None:
        entry = self._pending() or self._new(CREATED)
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
        entry.kind = SENT
        self._stamp(entry)
        self._save()

    def unanswered(self, certificate_id: str) -> None:
        """The attempt gave up on RegisterThing's answer: the wait runs from now."""
        entry = self._entry(certificate_id)
        entry.kind = SENT
        self._stamp(entry)
        self._save()

    def rejected(self, certificate_id: str) -> None:
        """RegisterThing was answered with a rejection: nothing was registered."""
        self._entry(certificate_id).kind = REJECTED
        self._save()

    def subscription_refused(self) -> None:
        self.entries.append(self._new(REFUSED))
        self._save()

    def _entry(self, certificate_id: str) -> Entry:
        for entry in reversed(self.entries):
            if entry.certificate_id == certificate_id:
                return entry
        entry = self._new(CREATED, certificate_id)
        self.entries.append(entry)
        return entry

    def _save(self) -> None:
        current = self.now()
        self.entries = [e for e in self.entries
                        if current - self._at(e, current) < DAY][-MAX_ENTRIES:]
        if not self.entries:
            files.remove_durably(self.path)
            return
        data = json.dumps({"version": 1, "entries": [e.to_json() for e in self.entries]},
                          indent=1) + "\n"
        files.write_file_atomic(self.path, data.encode(), 0o600)
