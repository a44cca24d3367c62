"""CERT_DIR's states, each built in tmp_path (or a SoftHSM2 token), read by the pure
state() and moved on by recover(); install()'s steps in their order."""
import json
import logging
import os

import pytest
from cryptography.hazmat.primitives import serialization

from entomologist import config as configuration
from entomologist import files, pkcs11_key
from entomologist.credentials import CertDir, Registration, State
from softhsm import make_token

REG = Registration("thing-CAM-42", "a" * 64, {"site": "meadow"})


@pytest.fixture
def cert_dir(device):
    return CertDir.open(device.cert_dir, create=True)


@pytest.fixture
def ca(cloud):
    return cloud.ca


def write(path, data, mode):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def install_pair(cert_dir, ca, serial="CAM-42"):
    cert, key = ca.pair()
    write(cert_dir.cert, cert, 0o644)
    write(cert_dir.key, key, 0o600)
    if serial:
        write(cert_dir.installed_for_file, json.dumps(
            {"serialId": serial, "thingName": "t", "certificateId": "c"}), 0o644)
    return cert, key


def stage_registered(cert_dir, ca, reg=REG):
    cert, key = ca.pair()
    write(cert_dir.staged_cert, cert, 0o644)
    write(cert_dir.staged_key, key, 0o600)
    write(cert_dir.registration_marker, json.dumps(
        {"thingName": reg.thing_name, "certificateId": reg.certificate_id,
         "deviceConfiguration": reg.device_configuration}), 0o600)
    return cert, key


def snapshot(path):
    return sorted((p.name, oct(p.stat().st_mode & 0o777), p.read_bytes())
                  for p in path.iterdir() if p.is_file())


# ----------------------------------------------------------- one state each

def test_a_new_cert_dir_is_empty(cert_dir):
    look = cert_dir.state("CAM-42")
    assert look.state is State.EMPTY and "no certificate" in look.problem
    assert look.needs_provisioning


def test_a_device_made_key_alone_is_staged_not_registered(cert_dir):
    write(cert_dir.device_key, b"key", 0o600)
    assert cert_dir.state("CAM-42").state is State.STAGED


def test_a_staged_pair_without_its_marker_is_staged_not_registered(cert_dir, ca):
    cert, key = ca.pair()
    write(cert_dir.staged_cert, cert, 0o644)
    write(cert_dir.staged_key, key, 0o600)
    assert cert_dir.state("CAM-42").state is State.STAGED


def test_a_marker_with_its_staged_pair_is_registered_not_installed(cert_dir, ca):
    stage_registered(cert_dir, ca)
    look = cert_dir.state("CAM-42")
    assert look.state is State.REGISTERED and look.registration == REG


def test_a_marker_whose_staged_certificate_has_no_key_is_only_staged(cert_dir, ca):
    stage_registered(cert_dir, ca)
    os.unlink(cert_dir.staged_key)
    assert cert_dir.state("CAM-42").state is State.STAGED


def test_a_garbled_marker_is_ignored(cert_dir, ca):
    stage_registered(cert_dir, ca)
    write(cert_dir.registration_marker, b"{not json", 0o600)
    assert cert_dir.state("CAM-42").state is State.STAGED


def test_a_marker_whose_pair_was_already_moved_into_place_is_registered(cert_dir, ca):
    install_pair(cert_dir, ca, serial=None)
    write(cert_dir.registration_marker, json.dumps(
        {"thingName": REG.thing_name, "certificateId": REG.certificate_id}), 0o600)
    assert cert_dir.state("CAM-42").state is State.REGISTERED


def test_a_certificate_and_its_key_are_installed_and_sound(cert_dir, ca):
    install_pair(cert_dir, ca)
    look = cert_dir.state("CAM-42")
    assert look.state is State.SOUND and look.owner == "CAM-42" and look.installed


def test_a_certificate_with_another_key_is_installed_and_broken(cert_dir, ca):
    install_pair(cert_dir, ca)
    write(cert_dir.key, ca.pair()[1], 0o600)
    look = cert_dir.state("CAM-42")
    assert look.state is State.BROKEN and look.needs_provisioning


def test_a_certificate_without_a_key_is_installed_and_broken(cert_dir, ca):
    install_pair(cert_dir, ca)
    os.unlink(cert_dir.key)
    assert cert_dir.state("CAM-42").state is State.BROKEN


def test_a_pair_installed_for_another_serial_is_foreign(cert_dir, ca):
    install_pair(cert_dir, ca, serial="CAM-7")
    look = cert_dir.state("CAM-42")
    assert look.state is State.FOREIGN and look.owner == "CAM-7"


@pytest.mark.parametrize("build", ["empty", "staged", "registered", "sound", "broken",
                                   "foreign"])
def test_state_changes_nothing(cert_dir, ca, build):
    if build == "staged":
        write(cert_dir.device_key, b"key", 0o600)
    elif build == "registered":
        stage_registered(cert_dir, ca)
    elif build in ("sound", "broken", "foreign"):
        install_pair(cert_dir, ca, serial="CAM-7" if build == "foreign" else "CAM-42")
        write(cert_dir.staged_key, ca.pair()[1], 0o600)  # a leftover recover() removes
        if build == "broken":
            os.unlink(cert_dir.key)
    before = snapshot(cert_dir.path)
    cert_dir.state("CAM-42")
    cert_dir.state("CAM-42")
    assert snapshot(cert_dir.path) == before


# ----------------------------------------------------------- transitions

def test_recover_installs_a_registered_pair_and_it_is_sound(device, cert_dir, ca):
    cert, key = stage_registered(cert_dir, ca)
    write(cert_dir.spend_record, b"{}", 0o600)
    cert_dir.recover(cert_dir.state("CAM-42"), device.config())
    assert cert_dir.state("CAM-42").state is State.SOUND
    assert cert_dir.cert.read_text() == cert and cert_dir.key.read_text() == key
    assert oct(cert_dir.key.stat().st_mode & 0o777) == "0o600"
    assert oct(cert_dir.cert.stat().st_mode & 0o777) == "0o644"
    assert json.loads(cert_dir.device_configuration.read_text()) == {"site": "meadow"}
    assert sorted(p.name for p in cert_dir.path.iterdir()) == sorted(
        ["certificate.pem.crt", "private.pem.key", "AmazonRootCA1.pem",
         "device-configuration.json", "installed-for.json"])
    assert device.device["THING_NAME"] == REG.thing_name
    assert device.device["CERTIFICATE_ID"] == REG.certificate_id
    assert device.device["PROVISION_STATUS"] == "False"


def test_recover_sets_a_foreign_pair_aside_and_leaves_cert_dir_empty(device, cert_dir, ca):
    cert, _ = install_pair(cert_dir, ca, serial="CAM-7")
    folder = cert_dir.recover(cert_dir.state("CAM-42"), device.config())
    assert folder == cert_dir.path / "foreign-CAM-7"
    assert (folder / "certificate.pem.crt").read_text() == cert
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert cert_dir.state("CAM-42").state is State.EMPTY


def test_recover_of_a_sound_pair_removes_leftovers_and_records_whom_it_is_for(
        device, cert_dir, ca):
    install_pair(cert_dir, ca, serial=None)
    for path in (cert_dir.staged_cert, cert_dir.staged_key, cert_dir.device_key,
                 cert_dir.reserve_file):
        write(path, b"left", 0o600)
    look = cert_dir.state("CAM-42")
    assert look.state is State.SOUND and look.owner is None
    cert_dir.recover(look, device.config())
    assert sorted(p.name for p in cert_dir.path.iterdir()) == [
        "certificate.pem.crt", "installed-for.json", "private.pem.key"]
    assert cert_dir.installed_for() == "CAM-42"
    assert cert_dir.state("CAM-42").state is State.SOUND


@pytest.mark.parametrize("build", ["empty", "staged", "broken"])
def test_recover_leaves_a_state_that_needs_provisioning_as_it_is(device, cert_dir, ca, build):
    if build == "staged":
        write(cert_dir.device_key, b"key", 0o600)
    elif build == "broken":
        install_pair(cert_dir, ca)
        os.unlink(cert_dir.key)
    before = snapshot(cert_dir.path)
    cert_dir.recover(cert_dir.state("CAM-42"), device.config())
    assert snapshot(cert_dir.path) == before


# ----------------------------------------------------------- install(), step by step

INSTALL_STEPS = [
    ("config", "THING_NAME CERTIFICATE_ID PROVISION_STATUS=False"),
    ("write", "installed-for.json"),
    ("write", "AmazonRootCA1.pem"),
    ("remove", "certificate.pem.crt"),
    ("rename", "private.pem.key.staging -> private.pem.key"),
    ("rename", "certificate.pem.crt.staging -> certificate.pem.crt"),
    ("write", "device-configuration.json"),
    ("remove", "registration.json.staging"),
    ("remove", "private.pem.key.staging"),
    ("remove", "private.pem.key.device-made"),
    ("remove", "registration.reserve"),
    ("remove", "provisioning-spend.json"),
]


def record_steps(monkeypatch, steps, fail_at=None):
    def step(entry, real, *args):
        if len(steps) == fail_at:
            raise OSError("power cut")
        steps.append(entry)
        return real(*args)

    real_update = configuration.update_device_config
    real_write, real_rename, real_remove = (files.write_file_atomic, files.rename_durably,
                                            files.remove_durably)
    monkeypatch.setattr(configuration, "update_device_config", lambda cfg, ch: step(
        ("config", " ".join(k if k != "PROVISION_STATUS" else f"{k}={v}" for k, v in ch.items())),
        real_update, cfg, ch))
    def write(path, data, mode, **kw):
        if path.name == "ento.conf":  # the config step's own write
            return real_write(path, data, mode, **kw)
        return step(("write", path.name), real_write, path, data, mode)

    monkeypatch.setattr(files, "write_file_atomic", write)
    monkeypatch.setattr(files, "rename_durably", lambda a, b: step(
        ("rename", f"{a.name} -> {b.name}"), real_rename, a, b))
    monkeypatch.setattr(files, "remove_durably", lambda path: step(
        ("remove", path.name), real_remove, path))


def test_install_takes_its_steps_in_this_order(monkeypatch, device, cert_dir, ca):
    install_pair(cert_dir, ca)  # the pair a --force run replaces
    stage_registered(cert_dir, ca)
    steps = []
    record_steps(monkeypatch, steps)
    cert_dir.install(device.config(), REG, device.config().root_ca)
    assert steps == INSTALL_STEPS


def test_install_without_a_device_configuration_removes_a_stale_one(monkeypatch, device,
                                                                   cert_dir, ca):
    reg = Registration(REG.thing_name, REG.certificate_id, {})
    stage_registered(cert_dir, ca, reg)
    write(cert_dir.device_configuration, b'{"old": "1"}', 0o644)
    steps = []
    record_steps(monkeypatch, steps)
    cert_dir.install(device.config(), reg, device.config().root_ca)
    assert ("remove", "device-configuration.json") in steps
    assert ("write", "device-configuration.json") not in steps
    assert not cert_dir.device_configuration.exists()


@pytest.mark.parametrize("killed_at", range(1, len(INSTALL_STEPS)))
def test_an_install_killed_at_any_step_is_still_registered_and_recover_completes_it(
        monkeypatch, device, cert_dir, ca, killed_at):
    old_cert, _ = install_pair(cert_dir, ca)
    new_cert, new_key = stage_registered(cert_dir, ca)
    steps = []
    with monkeypatch.context() as patched:
        record_steps(patched, steps, fail_at=killed_at)
        with pytest.raises(OSError):
            cert_dir.install(device.config(), REG, device.config().root_ca)
    look = cert_dir.state("CAM-42")
    if killed_at <= INSTALL_STEPS.index(("remove", "registration.json.staging")):
        assert look.state is State.REGISTERED
        cert_dir.recover(look, device.config())
    else:
        # Only leftovers remain; the next boot's SOUND recover removes them.
        assert look.state is State.SOUND
        cert_dir.recover(look, device.config())
    assert cert_dir.state("CAM-42").state is State.SOUND
    assert cert_dir.cert.read_text() == new_cert and cert_dir.key.read_text() == new_key
    assert not cert_dir.registration_marker.exists() and not cert_dir.staged_key.exists()


# ----------------------------------------------------------- a SoftHSM2 token

@pytest.fixture
def token(tmp_path, monkeypatch):
    monkeypatch.setattr(pkcs11_key, "_refused_pins", set())
    return make_token(tmp_path / "hsm", monkeypatch=monkeypatch)


def token_cert(ca, settings, label):
    """A certificate for a new token key, left under ``label``."""
    with pkcs11_key.open_token(settings) as t:
        pair = t.staged_or_new("EC-P256")
        if label != settings.staging_label:
            t.relabel(pair, label)
        public = serialization.load_der_public_key(pair.public_key_der())
    return ca.sign(public)


def labels(token):
    return sorted(label for cls, label, _ in token.objects() if cls == "PRIVATE_KEY")


def test_a_token_key_under_its_final_label_is_sound(device, ca, token):
    settings = token.settings()
    cert_dir = CertDir.open(device.cert_dir, create=True, token=settings)
    write(cert_dir.cert, token_cert(ca, settings, settings.key_label), 0o644)
    assert cert_dir.state("CAM-42").state is State.SOUND


def test_a_token_key_left_under_the_staging_label_is_unpromoted_until_recover(
        device, ca, token):
    settings = token.settings()
    cert_dir = CertDir.open(device.cert_dir, create=True, token=settings)
    write(cert_dir.cert, token_cert(ca, settings, settings.staging_label), 0o644)
    look = cert_dir.state("CAM-42")
    assert look.state is State.KEY_UNPROMOTED and look.installed
    assert labels(token) == [settings.staging_label]  # state() changed nothing
    cert_dir.recover(look, device.config())
    assert labels(token) == [settings.key_label]
    assert cert_dir.state("CAM-42").state is State.SOUND


def test_a_stale_staged_token_key_beside_the_installed_one_goes_in_recover_and_is_said(
        device, ca, token, caplog):
    settings = token.settings()
    cert_dir = CertDir.open(device.cert_dir, create=True, token=settings)
    write(cert_dir.cert, token_cert(ca, settings, settings.key_label), 0o644)
    token_cert(ca, settings, settings.staging_label)  # a --force run killed before registering
    look = cert_dir.state("CAM-42")
    assert look.state is State.KEY_UNPROMOTED
    assert labels(token) == sorted([settings.key_label, settings.staging_label])
    with caplog.at_level(logging.INFO):
        cert_dir.recover(look, device.config())
    assert labels(token) == [settings.key_label]
    assert "removed a key a run killed before registering left in the token" in caplog.messages


def test_a_certificate_whose_key_is_not_in_the_token_is_broken(device, ca, token):
    settings = token.settings()
    cert_dir = CertDir.open(device.cert_dir, create=True, token=settings)
    write(cert_dir.cert, ca.pair()[0], 0o644)
    look = cert_dir.state("CAM-42")
    assert look.state is State.BROKEN and "no key in token" in look.problem
    assert token.objects() == []


def test_a_garbled_certificate_in_token_mode_is_broken_and_names_the_certificate(
        device, token):
    settings = token.settings()
    cert_dir = CertDir.open(device.cert_dir, create=True, token=settings)
    write(cert_dir.cert, "-----BEGIN CERTIFICATE-----\ngarbled\n-----END CERTIFICATE-----\n",
          0o644)
    look = cert_dir.state("CAM-42")
    assert look.state is State.BROKEN and not look.installed
    assert "certificate" in look.problem


def test_a_token_install_promotes_the_new_key_after_the_certificate_and_drops_the_old(
        monkeypatch, device, ca, token):
    settings = token.settings()
    cert_dir = CertDir.open(device.cert_dir, create=True, token=settings)
    write(cert_dir.cert, token_cert(ca, settings, settings.key_label), 0o644)
    new_cert = token_cert(ca, settings, settings.staging_label)
    write(cert_dir.staged_cert, new_cert, 0o644)
    write(cert_dir.registration_marker, json.dumps(
        {"thingName": REG.thing_name, "certificateId": REG.certificate_id}), 0o600)
    look = cert_dir.state("CAM-42")
    assert look.state is State.REGISTERED
    steps = []
    record_steps(monkeypatch, steps)
    real_promote = CertDir.promote_token_key
    monkeypatch.setattr(CertDir, "promote_token_key",
                        lambda self: (steps.append(("token", "promote")), real_promote(self)))
    cert_dir.recover(look, device.config())
    assert steps[:6] == [
        ("config", "THING_NAME CERTIFICATE_ID PROVISION_STATUS=False"),
        ("write", "installed-for.json"),
        ("write", "AmazonRootCA1.pem"),
        ("remove", "certificate.pem.crt"),
        ("rename", "certificate.pem.crt.staging -> certificate.pem.crt"),
        ("token", "promote")]
    assert steps.index(("remove", "registration.json.staging")) > steps.index(("token", "promote"))
    assert cert_dir.cert.read_text() == new_cert
    assert labels(token) == [settings.key_label]
    assert not cert_dir.key.exists()
    assert cert_dir.state("CAM-42").state is State.SOUND


# ----------------------------------------------------------- boot.py --check reads, never recovers

@pytest.mark.parametrize("build, action", [("registered", "install"), ("foreign", "provision"),
                                           ("broken", "provision"), ("sound", "report")])
def test_check_plans_from_the_state_and_changes_nothing(device, cert_dir, ca, build, action):
    from entomologist import check
    if build == "registered":
        stage_registered(cert_dir, ca)
    else:
        install_pair(cert_dir, ca, serial=None if build == "sound" else
                     "CAM-7" if build == "foreign" else "CAM-42")
        write(cert_dir.staged_key, ca.pair()[1], 0o600)  # what recover() would remove
        if build == "broken":
            os.unlink(cert_dir.key)
    before = snapshot(cert_dir.path)
    _, plan = check.check_cert_dir(device.config())
    assert plan.action == action
    assert snapshot(cert_dir.path) == before


def test_check_leaves_an_unpromoted_token_key_as_it_is(device, ca, token):
    from entomologist import check
    settings = token.settings()
    device.update(KEY_STORAGE="pkcs11", PROVISIONING_API="CreateCertificateFromCsr",
                  PKCS11_LIBRARY=str(settings.library),
                  PKCS11_TOKEN_LABEL=settings.token_label, PKCS11_PIN_FILE=str(settings.pin_file))
    cert_dir = CertDir.open(device.cert_dir, create=True, token=device.config().token)
    write(cert_dir.cert, token_cert(ca, settings, settings.staging_label), 0o644)
    _, plan = check.check_cert_dir(device.config())
    assert plan.action == "report"
    assert labels(token) == [settings.staging_label]


def test_the_boot_report_alone_promotes_a_token_key_left_under_the_staging_label(
        device, ca, token, cloud):
    import update_boot_status as ubs
    from entomologist.retries import Deadline
    settings = token.settings()
    device.update(KEY_STORAGE="pkcs11", PROVISIONING_API="CreateCertificateFromCsr",
                  PKCS11_LIBRARY=str(settings.library), PROVISION_STATUS="False",
                  PKCS11_TOKEN_LABEL=settings.token_label, PKCS11_PIN_FILE=str(settings.pin_file))
    cert_dir = CertDir.open(device.cert_dir, create=True, token=device.config().token)
    write(cert_dir.cert, token_cert(ca, settings, settings.staging_label), 0o644)
    ubs.update_boot_status(device.config(), Deadline(5), build=cloud)
    assert labels(token) == [settings.key_label]
    assert cloud.published()[0][0] == "cameraDevice/CAM-42/booted"
    assert device.device["PROVISION_STATUS"] == "True"


def test_an_installed_for_record_is_read_up_to_4_kib_and_a_larger_one_is_ignored(
        cert_dir, ca, caplog):
    install_pair(cert_dir, ca)
    record = json.dumps({"serialId": "CAM-7", "thingName": "t", "certificateId": "c"}).encode()
    cert_dir.installed_for_file.write_bytes(record.ljust(4096))
    assert cert_dir.installed_for() == "CAM-7"
    cert_dir.installed_for_file.write_bytes(record.ljust(4097))
    assert cert_dir.installed_for() is None
    assert any("too large" in m for m in caplog.messages)


def test_a_registration_record_that_does_not_parse_is_ignored_with_one_warning(
        cert_dir, ca, caplog):
    install_pair(cert_dir, ca)
    write(cert_dir.registration_marker, b"{not json", 0o600)
    with caplog.at_level(logging.WARNING):
        assert cert_dir.state("CAM-42").state is State.SOUND
    assert [m for m in caplog.messages if "registration.json.staging" in m] == [
        f"ignoring {cert_dir.registration_marker}: it does not parse (JSONDecodeError)"]


def test_a_registration_whose_staged_certificate_has_no_key_is_ignored_saying_so(
        cert_dir, ca, caplog):
    stage_registered(cert_dir, ca)
    cert_dir.staged_key.unlink()
    with caplog.at_level(logging.WARNING):
        assert cert_dir.registration() is None
    assert caplog.messages == [f"ignoring {cert_dir.registration_marker}: no staged key "
                               f"belongs to its certificate"]


def test_the_reserve_holds_64_kib_for_the_registration_record(cert_dir):
    cert_dir.reserve()
    assert cert_dir.reserve_file.stat().st_size == 64 * 1024
    assert oct(cert_dir.reserve_file.stat().st_mode & 0o777) == "0o600"


def test_a_registration_record_is_read_up_to_256_kib_and_a_larger_one_is_ignored(device,
                                                                                  cloud, caplog):
    import boot
    from entomologist.retries import Deadline
    from fakes import FakeClock
    boot.boot(device.config_path, Deadline(30, clock=FakeClock()), build=cloud)
    cert_dir = CertDir.existing(device.cert_dir)  # the pair installed, the record left over
    record = json.dumps({"thingName": "thing-CAM-42", "certificateId": "a" * 64}).encode()
    cert_dir.registration_marker.write_bytes(record.ljust(256 * 1024))  # JSON allows the blanks
    assert cert_dir.registration() == Registration("thing-CAM-42", "a" * 64, {})
    cert_dir.registration_marker.write_bytes(record.ljust(256 * 1024 + 1))
    assert cert_dir.registration() is None
    assert any("too large" in m for m in caplog.messages)
