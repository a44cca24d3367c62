"""CERT_DIR: the installed credentials, and what waits to be installed.

Installed: certificate.pem.crt (0644), private.pem.key (0600) and
AmazonRootCA1.pem (0644); device-configuration.json (0644) when the template
returns one.  A certificate is never there without its key.

Staged, as soon as its content exists:
- private.pem.key.device-made: a key made here (CSR mode), before anything is sent;
- private.pem.key.staging: a key the service sent, when CreateKeysAndCertificate answers;
- certificate.pem.crt.staging: the new certificate, at the same moment;
- registration.json.staging: written when RegisterThing is accepted; while it
  exists the next run installs the staged pair without any request; removed last;
- registration.reserve: room held for that marker while RegisterThing is
  awaited, freed just before the marker is written (a full disk cannot refuse it).

installed-for.json (0644): the SERIAL_ID, thing and certificate the installed
pair was registered for, written with the pair.  An image copied from another
camera after its first boot carries that camera's pair: its record names
another serial, and the pair is moved aside into foreign-<serial>/ (0700),
never used and never deleted.  So is a registration that waited to be installed
when the image was copied: registration.json.staging names the serial too.

provisioning-spend.json (0600): what attempts that installed nothing spent at
the service (entomologist.spend); removed once a pair is installed.

States.  ``CertDir.state()`` only reads, and returns exactly one of these (the
first that holds, in this order); ``CertDir.recover()`` takes the local step
that state calls for; provisioning (the network) is boot.py's.

  state           what holds                                  recover()            then
  REGISTERED      registration.json.staging parses, names no  install()            SOUND
                  other SERIAL_ID, and its certificate is
                  staged with its key (or the pair it names is
                  already installed)
  FOREIGN         registration.json.staging or                aside.set_aside()    EMPTY/STAGED
                  installed-for.json names another SERIAL_ID
  EMPTY           no certificate installed, nothing staged    nothing: provision   REGISTERED
  STAGED          no certificate installed; an unregistered   nothing: provision   REGISTERED
                  attempt's files (a device-made key is reused)
  BROKEN          a certificate, but no key that belongs to   nothing: provision   REGISTERED
                  it, or one that does not parse
  KEY_UNPROMOTED  (token) installed and sound, but its key is  promote the key,     SOUND
                  not the only one under the final label, or  delete the staged
                  not under it yet, or a staged key is stale  one, then as SOUND
  SOUND           a certificate and its key                   discard leftovers,   SOUND
                                                              record installed-for

A provisioning attempt moves EMPTY, STAGED or BROKEN to STAGED (its files
written as soon as their content exists), to REGISTERED (the marker, when
RegisterThing is accepted), then install() to SOUND; a failed attempt goes
back to STAGED (``discard_unregistered``).  A credential file that is there but
cannot be read (``files.read_credential``) puts CERT_DIR in no state: the run ends (73).
"""
from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import aside, certs, config as configuration, files, records, spend, token_pair
from .errors import EntoError, ReadOnlyStorage
from .files import read_credential
from .records import Registration

log = logging.getLogger("entomologist")

RESERVE_BYTES = 64 * 1024
# Files an attempt creates before its registration is recorded (the spend record,
# the staged key and certificate, a device-made key), with a margin.
RESERVE_INODES = 8
CERT_DIR_HINT = "CERT_DIR in the config"


class State(enum.Enum):
    EMPTY = "empty"
    STAGED = "staged, not registered"
    REGISTERED = "registered, not installed"
    FOREIGN = "installed for another camera"
    BROKEN = "installed and broken"
    KEY_UNPROMOTED = "installed, the token key not under its final label"
    SOUND = "installed and sound"


@dataclass(frozen=True)
class Look:
    """What ``CertDir.state()`` found: the state and what acting on it needs."""
    state: State
    problem: str | None = None              # EMPTY, STAGED, BROKEN: why nothing sound is installed
    registration: Registration | None = None  # REGISTERED
    owner: str | None = None                # the SERIAL_ID installed-for.json names, if any

    @property
    def installed(self) -> bool:
        return self.state in (State.SOUND, State.KEY_UNPROMOTED)

    @property
    def needs_provisioning(self) -> bool:
        return self.state in (State.EMPTY, State.STAGED, State.BROKEN, State.FOREIGN)


class CertDir:
    """``token``: with KEY_STORAGE "pkcs11" the device key lives in that token and
    CERT_DIR holds no key file; a pair is then the certificate and the token key
    whose public key it carries."""

    def __init__(self, path: Path, token=None):
        self.path = path
        self.token = token
        self.cert = path / "certificate.pem.crt"
        self.key = path / "private.pem.key"
        self.ca = path / "AmazonRootCA1.pem"
        self.device_configuration = path / "device-configuration.json"
        self.staged_key = path / "private.pem.key.staging"
        self.device_key = path / "private.pem.key.device-made"
        self.staged_cert = path / "certificate.pem.crt.staging"
        self.registration_marker = path / "registration.json.staging"
        self.reserve_file = path / "registration.reserve"
        self.installed_for_file = path / "installed-for.json"
        self.spend_record = path / spend.RECORD_NAME

    @classmethod
    def open(cls, directory: Path, create: bool = False, token=None) -> "CertDir":
        """CERT_DIR, checked to be writable by nobody but us and root (made 0700 with ``create``)."""
        return cls(files.trusted_dir(directory, "CERT_DIR", create=create), token)

    @classmethod
    def existing(cls, directory: Path, token=None) -> "CertDir | None":
        try:
            return cls.open(directory, token=token)
        except files.FileProblem as exc:
            if exc.missing:
                return None
            raise

    # -- what is installed

    def state(self, serial_id: str) -> Look:
        """The one state CERT_DIR (and the token) is in, for the camera ``serial_id``;
        reads only (the table in the module's docstring)."""
        recorded = self._recorded_registration()
        if recorded is not None and recorded.serial_id not in (None, serial_id):
            # An image copied while that camera's registration waited to be installed.
            return Look(State.FOREIGN, owner=recorded.serial_id)
        registration = self._still_installable(recorded)
        if registration is not None:
            return Look(State.REGISTERED, registration=registration)
        owner = self.installed_for()
        if owner is not None and owner != serial_id:
            return Look(State.FOREIGN, owner=owner)
        problem, unpromoted = self._installed()
        if problem is None:
            return Look(State.KEY_UNPROMOTED if unpromoted else State.SOUND, owner=owner)
        if os.path.lexists(self.cert):
            return Look(State.BROKEN, problem=problem, owner=owner)
        staged = any(os.path.lexists(path) for path in (
            self.device_key, self.staged_key, self.staged_cert, self.registration_marker,
            self.reserve_file))
        return Look(State.STAGED if staged else State.EMPTY, problem=problem, owner=owner)

    def installed_problem(self) -> str | None:
        """None if a certificate and its key are installed, else what is wrong."""
        return self._installed()[0]

    def _installed(self) -> tuple[str | None, bool]:
        """(what is wrong with the installed pair or None, whether a token key still
        waits for its final label or a promotion a killed run left half done)."""
        try:
            cert = read_credential(self.cert, "certificate")
        except files.FileProblem as exc:
            return (f"no certificate in {self.path}" if exc.missing else str(exc)), False
        if self.token is not None:
            return token_pair.look(self.token, cert)
        try:
            key = read_credential(self.key, "private key")
        except files.FileProblem as exc:
            return str(exc), False
        return certs.pair_problem(cert, key), False

    def promote_token_key(self) -> None:
        """See token_pair.promote (the KEY_UNPROMOTED step)."""
        token_pair.promote(self.token, files.read_bounded(self.cert, "certificate"))

    # -- acting on the state

    def recover(self, look: Look, cfg: configuration.Config) -> Path | None:
        """The local step ``look`` calls for (see the table): install a registered
        pair, set a foreign pair aside (its folder is returned), or tidy a sound
        one.  EMPTY, STAGED and BROKEN need provisioning, which is not local:
        nothing is done here."""
        if look.state is State.REGISTERED:
            self.install(cfg, look.registration, cfg.root_ca)
        elif look.state is State.FOREIGN:
            return aside.set_aside(self, look.owner)
        elif look.installed:
            if self.token is not None:
                self.promote_token_key()
            # What a --force run killed before it registered left behind.
            try:
                self.discard_stale()
            except ReadOnlyStorage as exc:
                # A read-only root: the sound pair needs none of it removed to report
                # the boot, and the mount will not heal by a retry.
                log.warning("leaving what an earlier run staged: %s", exc)
            if look.owner is None:
                self._record_installed_for_existing(cfg)
        return None

    def _record_installed_for_existing(self, cfg: configuration.Config) -> None:
        """A pair installed before installed-for.json existed is this camera's (nothing
        says otherwise): record it, so that a copy of this image is recognised."""
        try:
            self.record_installed_for(cfg.serial_id,
                                      Registration(cfg.thing_name or "",
                                                   cfg.device.get("CERTIFICATE_ID") or "", {}))
        except EntoError as exc:  # a read-only root: the boot report needs no write
            log.debug("cannot record whom the pair is installed for: %s", exc)

    def installed_for(self) -> str | None:
        """The SERIAL_ID the installed pair was registered for; None when no record
        says (a pair installed before the record existed, or a garbled record).  A
        record that is there but cannot be read ends the run (StorageError)."""
        try:
            # Unreadable is not absent: the record may name another camera (73, retried).
            serial = records.parse_installed_for(read_credential(
                self.installed_for_file, "installed-for record", records.INSTALLED_FOR_LIMIT))
        except files.FileProblem as exc:
            if not exc.missing:
                log.warning("ignoring %s: %s", self.installed_for_file, exc)
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: it does not parse (%s)", self.installed_for_file,
                        type(exc).__name__)
            return None
        return serial

    def record_installed_for(self, serial_id: str, reg: Registration) -> None:
        files.write_file_atomic(self.installed_for_file,
                                records.encode_installed_for(serial_id, reg), 0o644)

    def ca_problem(self) -> str | None:
        """Why the CA copy installed with the pair cannot be used (a failing card
        garbled it), or None; a missing copy is no problem: ROOT_CA stands in."""
        if not self.ca.is_file():
            return None
        try:
            return certs.certificate_problem(files.read_bounded(self.ca, "CA copy"))
        except files.FileProblem as exc:
            return str(exc)

    def ca_for_connection(self, fallback: Path, warn: bool = True) -> Path:
        """The CA copy beside the pair; ROOT_CA when it is missing or garbled, which is
        the product's own file gone bad, not the site's configuration: the boot is
        reported from ROOT_CA, with a warning, rather than stopped until someone comes."""
        if not self.ca.is_file():
            return fallback
        problem = self.ca_problem()
        if problem is None:
            return self.ca
        if warn:
            log.warning("the CA copy %s cannot be used (%s): verifying the endpoint with "
                        "ROOT_CA %s instead", self.ca, problem, fallback)
        return fallback

    # -- what is staged

    def _recorded_registration(self) -> Registration | None:
        """The registration record as it parses, whatever is staged beside it (one
        that does not parse is ignored with a warning)."""
        try:
            reg = records.parse_registration(read_credential(
                self.registration_marker, "registration record", records.REGISTRATION_LIMIT))
        except files.FileProblem as exc:
            if exc.missing:
                return None
            log.warning("ignoring %s: %s", self.registration_marker, exc)
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: it does not parse (%s)", self.registration_marker,
                        type(exc).__name__)
            return None
        return reg

    def registration(self) -> Registration | None:
        """The registration an earlier run recorded and has not finished installing."""
        return self._still_installable(self._recorded_registration())

    def _still_installable(self, reg: Registration | None) -> Registration | None:
        """``reg`` if its pair is still staged with its key, or already installed."""
        if reg is None:
            return None
        if self.staged_cert.exists():
            if self.staged_key_for_cert() is None:
                log.warning("ignoring %s: no staged key belongs to its certificate",
                            self.registration_marker)
                return None
        elif self.installed_problem() is not None:
            log.warning("ignoring %s: its credentials are gone", self.registration_marker)
            return None
        return reg

    def staged_key_for_cert(self) -> Path | None:
        """The key that belongs to the staged certificate: staged, or already moved
        into place by a run killed before the certificate followed (with a token:
        the token, as ``self.key``, if it holds that key)."""
        try:
            cert = read_credential(self.staged_cert, "staged certificate")
        except files.FileProblem:
            return None
        if self.token is not None:
            return self.key if token_pair.holds(self.token, cert) else None
        for path in (self.staged_key, self.device_key, self.key):
            try:
                if certs.pair_problem(cert, read_credential(path, "staged key")) is None:
                    return path
            except files.FileProblem:
                continue
        return None

    def stage_created(self, cert_pem: bytes, key_pem: bytes | None) -> None:
        if key_pem is not None:
            files.write_file_atomic(self.staged_key, key_pem, 0o600)
        files.write_file_atomic(self.staged_cert, cert_pem, 0o644)

    def reserve(self) -> None:
        files.write_file_atomic(self.reserve_file, b"\0" * RESERVE_BYTES, 0o600)
        # Bytes are not all: each staged file takes an inode, and a certificate the
        # service created that cannot be staged is spent for nothing.
        files.require_inodes(self.path, RESERVE_INODES)

    def record_registration(self, reg: Registration) -> None:
        data = records.encode_registration(reg)
        try:
            os.unlink(self.reserve_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot free %s: %s", self.reserve_file, exc.strerror)
        files.write_file_atomic(self.registration_marker, data, 0o600)

    def discard_unregistered(self) -> None:
        """After a run that registered nothing: its staged certificate and the key the
        service sent are of no use (the device-made key is kept for the next run)."""
        for path in (self.staged_cert, self.staged_key, self.reserve_file):
            files.remove_durably(path)

    def discard_stale(self) -> None:
        """When the installed pair is sound and nothing is registered and waiting."""
        for path in (self.staged_cert, self.staged_key, self.device_key, self.reserve_file,
                     self.registration_marker):
            files.remove_durably(path)

    # -- installing

    def install(self, cfg: configuration.Config, reg: Registration, root_ca: Path) -> None:
        """Install the staged, registered pair.  Every step may be repeated, so a
        run killed anywhere in here is completed by the next one.

        Order: the config first (it must never vouch for a boot the new
        credentials did not make), the CA copy, then the old certificate away,
        the key, the certificate last (its presence marks the pair complete),
        and the registration record once all is in place.
        """
        configuration.update_device_config(cfg, {"THING_NAME": reg.thing_name,
                                                 "CERTIFICATE_ID": reg.certificate_id,
                                                 "PROVISION_STATUS": "False"})
        self.record_installed_for(cfg.serial_id, reg)
        ca_pem = files.read_bounded(root_ca, "ROOT_CA", hint="ROOT_CA in the config")
        files.write_file_atomic(self.ca, ca_pem, 0o644)
        if self.staged_cert.exists():
            key = self.staged_key_for_cert()
            files.remove_durably(self.cert)
            if key is not None and key != self.key:
                files.rename_durably(key, self.key)
            files.rename_durably(self.staged_cert, self.cert)
        if self.token is not None:
            # The new pair is installed: give its key the final label, and delete
            # the key it replaces, last.
            self.promote_token_key()
        if reg.device_configuration:
            files.write_file_atomic(self.device_configuration,
                                    (json.dumps(reg.device_configuration, indent=2) + "\n"
                                     ).encode(), 0o644)
        else:
            files.remove_durably(self.device_configuration)
        files.remove_durably(self.registration_marker)
        for path in (self.staged_key, self.device_key, self.reserve_file, self.spend_record):
            files.remove_durably(path)

    def remove_stray_files(self) -> None:
        files.remove_stray_temp_files(self.path)
