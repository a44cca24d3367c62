"""``boot.py --check``'s checks of local state: the config, the token, CERT_DIR and what
the next boot would do with it, the lock, the credentials, the clock, the room to
write, the provisioning secret and the spend record.  Each returns its detail (and
a value), or a Warn, or raises EntoError; none writes anything.
"""
from __future__ import annotations

import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import certs, clock, config as configuration, credentials, files, lock, secret, spend
from .credentials import CertDir, State
from .errors import ConfigError, StorageError

# Room a first boot needs in a folder it writes: the registration reserve (64 KiB)
# and a block each for a key, two certificates, the CA, the registration record,
# the device configuration and their temporary copies, with some margin.
ROOM_NEEDED = 128 * 1024
# Free inodes a first boot needs there: CERT_DIR itself, its lock and the reserve,
# then what the boot itself requires before its first request.
INODES_NEEDED = 3 + credentials.RESERVE_INODES
# The config's folder takes one file at a time: the rewrite's temporary copy.
CONFIG_INODES_NEEDED = 2
UNIT = "entomologist-provision.service"
SYSTEMCTL_TIMEOUT = 3.0


@dataclass
class Warn:
    detail: str
    hint: str | None = None


@dataclass
class Plan:
    """What the next boot would do with CERT_DIR."""

    action: str                  # "provision", "install" or "report"
    why: str
    cert_dir: CertDir | None     # None: it does not exist yet
    foreign: str | None = None   # the camera whose credentials the boot sets aside first


def check_config(path: Path):
    config = configuration.load_config(path)
    storage = "a PKCS#11 token" if config.token else "a key file"
    via = f", through the HTTP proxy {config.proxy}" if config.proxy else ""
    return (f"{path}: SERIAL_ID {config.serial_id}, endpoint {config.host}:{config.port}, "
            f"device key in {storage}{via}", config)


def check_token(config: configuration.Config):
    from . import pkcs11_key
    settings = config.token
    with pkcs11_key.open_token(settings) as token:
        pairs = len(token.pairs(settings.key_label))
    return (f"module {settings.library}, token {settings.token_label!r}: the PIN is accepted; "
            f"{pairs} key pair(s) labelled {settings.key_label!r}")


PLAN_WORDS = {"provision": "provision the camera",
              "install": "install them, without any request",
              "report": "only send its boot message"}


def check_cert_dir(config: configuration.Config):
    cert_dir = CertDir.existing(config.cert_dir, config.token)
    if cert_dir is None:
        files.trusted_path(Path(os.path.join(os.getcwd(), config.cert_dir)).parent,
                           "the folder of CERT_DIR")
        plan = Plan("provision", f"no {config.cert_dir} yet", None)
    elif (look := cert_dir.state(config.serial_id)).state is State.REGISTERED:
        plan = Plan("install", f"thing {look.registration.thing_name} is registered and its "
                               f"credentials wait in {config.cert_dir}", cert_dir)
    elif look.state is State.FOREIGN:
        plan = Plan("provision", f"the credentials in {config.cert_dir} were installed for "
                                 f"camera {look.owner}, not this one (an image copied after its "
                                 f"first boot): they will be set aside", cert_dir,
                    foreign=look.owner)
    elif not look.installed:
        plan = Plan("provision", f"not provisioned: {look.problem}", cert_dir)
    else:
        plan = Plan("report", f"provisioned (credentials in {config.cert_dir})", cert_dir)
    return f"{plan.why}; the next boot will {PLAN_WORDS[plan.action]}", plan


def check_lock(config: configuration.Config, plan: Plan):
    if plan.cert_dir is None:
        return "no boot running (no CERT_DIR yet)"
    # Run by hand, the unit's RuntimeDirectory is not in the environment.
    runtime = os.environ.get("RUNTIME_DIRECTORY") or lock.UNIT_RUNTIME_DIRECTORY
    held = lock.holder(plan.cert_dir.path, runtime)
    if held is not None:
        return Warn(f"a boot is running now (it holds {held}); what follows may change "
                    "when it ends, and no MQTT connection is tried (it would drop the "
                    "boot's own)", hint="the journal: journalctl -u entomologist-provision")
    return "no boot running"


def check_claim(config: configuration.Config):
    settings = configuration.provisioning_settings(config)
    certs.check_claim(settings.claim_cert, settings.claim_key, config.root_ca)
    return (f"claim certificate {settings.claim_cert} and its key match; ROOT_CA "
            f"{config.root_ca} parses; template {settings.template_name}, {settings.api}",
            settings)


def check_secret(settings: configuration.ProvisioningSettings):
    if settings.secret_file is None:
        return ("no PROVISIONING_SECRET_FILE: RegisterThing carries no ProvisioningSecret (a "
                "template with the fleet inventory's hook refuses it)")
    text = secret.read_secret(settings.secret_file)
    return (f"provisioning secret file {settings.secret_file}: owner and mode trusted, "
            f"{len(text)} characters, sent as ProvisioningSecret")


def check_spend(plan: Plan, timer: clock.Clock):
    """What the boot's spend record allows now, read as the boot reads it, written never."""
    if plan.cert_dir is None:
        return "CERT_DIR does not exist yet: no failed attempt recorded"
    if plan.foreign is not None:
        return (f"what camera {plan.foreign} spent is set aside with its credentials: this "
                f"camera has spent nothing")
    record = spend.SpendRecord.open(plan.cert_dir.spend_record, timer, settle=False)
    record.check()
    if not record.entries:
        return "no failed attempt recorded: nothing holds the next one back"
    return (f"{len(record.entries)} failed attempt(s) recorded in {plan.cert_dir.spend_record}; "
            f"none holds the next one back")


def device_ca(config: configuration.Config, plan: Plan) -> Path:
    return plan.cert_dir.ca_for_connection(config.root_ca, warn=False)


def check_device_credentials(config: configuration.Config, plan: Plan):
    """What update_boot_status needs: the pair (already found sound) and its CA."""
    ca = device_ca(config, plan)
    hint = "ROOT_CA in the config"
    problem = certs.certificate_problem(files.read_bounded(ca, "CA file", hint=hint))
    if problem:
        raise ConfigError(f"CA file {ca}: {problem}", hint=hint)
    key = f"token {config.token.token_label!r}" if config.token else str(plan.cert_dir.key)
    garbled = plan.cert_dir.ca_problem()
    instead = f" (the copy {plan.cert_dir.ca} cannot be used: {garbled})" if garbled else ""
    return f"certificate {plan.cert_dir.cert} and its key in {key} match; CA {ca} parses{instead}"


def check_clock(certificate_files: list[Path], now: Callable[[], float]):
    clock.check_clock(certificate_files, now)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now()))} is after the start " \
           f"of validity of {', '.join(map(str, certificate_files))}"


def unit_write_rules() -> list[Path] | None:
    """The only folders the unit may write when its ``ProtectSystem=strict`` shows every
    other one read-only (its ``ReadWritePaths=``, drop-ins included), as the running
    systemd says; None when that does not apply or cannot be known: inside the unit
    (its mount table then shows its view), or with no systemd that knows the unit."""
    if os.environ.get("INVOCATION_ID"):
        return None
    try:
        proc = subprocess.run(["systemctl", "show", UNIT,
                               "--property=LoadState,ProtectSystem,ReadWritePaths"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=SYSTEMCTL_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    shown = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if (proc.returncode != 0 or shown.get("LoadState") != "loaded"
            or shown.get("ProtectSystem") != "strict"):
        return None
    # A leading "-" (ignore if missing) or "+" is no part of the path.
    return [Path(os.path.realpath(p.lstrip("-+"))) for p in shown.get("ReadWritePaths",
                                                                      "").split()]


def _unwritable(directory: Path, writable: list[Path] | None,
                inodes: int = INODES_NEEDED) -> tuple[str, bool] | None:
    """Why the boot could not create files in ``directory``, found without writing,
    and whether it is because the folder is read-only (None: it can).  ``writable``:
    the unit's write rules (``unit_write_rules``).

    The unit runs as root without capabilities: as root, only the owner's write
    bit of a folder root owns counts."""
    try:
        st = os.stat(directory)
        vfs = os.statvfs(directory)
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}", False
    if vfs.f_flag & os.ST_RDONLY:
        return "is on a read-only file system", True
    real = Path(os.path.realpath(directory))
    if writable is not None and not any(real == p or p in real.parents for p in writable):
        return ("is read-only inside the unit's sandbox (ProtectSystem=strict, and it is not "
                "under the unit's ReadWritePaths=)"), True
    if os.geteuid() == 0:
        if not (st.st_uid == 0 and st.st_mode & stat.S_IWUSR):
            return "is not writable by root without privileges (the unit's case)", False
    elif not os.access(directory, os.W_OK):
        return "is not writable by this user", False
    if vfs.f_bavail * vfs.f_frsize < ROOM_NEEDED:
        return f"has less than {ROOM_NEEDED // 1024} KiB free", False
    if files.too_few_inodes(vfs, inodes):
        return (f"has fewer than {inodes} free inodes ({vfs.f_favail}): no room for "
                "new files"), False
    return None


def check_storage(config: configuration.Config, plan: Plan):
    folders: list[tuple[str, Path]] = []
    if plan.action in ("provision", "install"):
        if plan.action == "provision":
            configuration.longest_update(config)  # renders faithfully, within the limit
        if plan.cert_dir:
            folders.append(("CERT_DIR", plan.cert_dir.path))
        else:
            folders.append(("the folder of CERT_DIR",
                            Path(os.path.join(os.getcwd(), config.cert_dir)).parent))
    if plan.action != "report" or not config.provisioned:
        folders.append(("the config's folder", config.real_path.parent))
    writable = unit_write_rules() if folders else None
    for what, folder in folders:
        found = _unwritable(folder, writable, CONFIG_INODES_NEEDED
                            if what == "the config's folder" else INODES_NEEDED)
        if found is None:
            continue
        problem, read_only = found
        hint = (files.SANDBOX_HINT if "sandbox" in problem
                else f"that {folder} is writable and the disk is not full")
        if plan.action == "report" and read_only:
            # As the boot: a reported boot whose status cannot be recorded on a
            # read-only mount is a warning, not a failure.
            return Warn(f"{what} {folder} {problem}: the boot will be reported, but "
                        f"PROVISION_STATUS will stay False", hint=hint)
        raise StorageError(f"{what} {folder} {problem}; the next boot must write there",
                           hint=hint)
    if not folders:
        return "nothing to write: PROVISION_STATUS is already True"
    return "can write " + " and ".join(f"{what} {folder}" for what, folder in folders)
