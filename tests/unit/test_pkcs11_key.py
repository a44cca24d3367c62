"""The device key inside a PKCS#11 token, against a fresh SoftHSM2 token per test."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from entomologist import errors
from entomologist import pkcs11_key, pkcs11_token
from entomologist.keys import csr_common_name
from entomologist.pkcs11_csr import make_csr
from entomologist.pkcs11_key import TokenSettings, open_token, read_pin, token_key
from softhsm import SOFTHSM_MODULE, SPY_MODULE, USER_PIN, make_token

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALGORITHMS = ["EC-P256", "RSA-2048"]
FINAL, STAGING = "entomologist-device", "entomologist-device.staging"


@pytest.fixture
def token(tmp_path, monkeypatch):
    return make_token(tmp_path, monkeypatch=monkeypatch)


@pytest.fixture(autouse=True)
def fresh_pin_memory(monkeypatch):
    monkeypatch.setattr(pkcs11_key, "_refused_pins", set())


def labels(objects):
    return sorted((cls, label) for cls, label, _ in objects)


def spki_of_certificate_key(der: bytes) -> bytes:
    key = serialization.load_der_public_key(der)
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


# ----------------------------------------------------------- key generation

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_new_key_is_sensitive_unextractable_sign_only_and_a_token_object_under_staging_label(
        token, algorithm):
    with open_token(token.settings()) as t:
        pair = t.generate(algorithm)
        assert (pair.label, pair.algorithm) == (STAGING, algorithm)
    attrs = token.private_key_attributes(STAGING)
    assert attrs == {"SENSITIVE": True, "EXTRACTABLE": False, "TOKEN": True, "PRIVATE": True,
                     "ALWAYS_SENSITIVE": True, "NEVER_EXTRACTABLE": True, "LOCAL": True,
                     "SIGN": True, "DECRYPT": False, "UNWRAP": False, "DERIVE": False}
    assert labels(token.objects()) == [("PRIVATE_KEY", STAGING), ("PUBLIC_KEY", STAGING)]
    ids = {key_id for _, _, key_id in token.objects()}
    # Marked as this program's, then random.
    (key_id,) = ids
    assert key_id.startswith(pkcs11_token.ID_TAG) and len(key_id) == len(pkcs11_token.ID_TAG) + 8


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_public_key_der_is_the_subject_public_key_info_a_certificate_carries(token, algorithm):
    with open_token(token.settings()) as t:
        der = t.generate(algorithm).public_key_der()
    assert spki_of_certificate_key(der) == der


def test_a_staging_pair_left_by_an_interrupted_run_is_reused_not_duplicated(token):
    with open_token(token.settings()) as t:
        first = t.staged_or_new("EC-P256")
    # The run was killed here; the next run opens the token again.
    with open_token(token.settings()) as t:
        again = t.staged_or_new("EC-P256")
        assert again.id == first.id
        (staged,) = t.pairs(STAGING)
        assert again.public_key_der() == staged.public_key_der()
    assert labels(token.objects()) == [("PRIVATE_KEY", STAGING), ("PUBLIC_KEY", STAGING)]


def test_a_staging_pair_of_another_algorithm_is_replaced_by_one_new_pair(token):
    with open_token(token.settings()) as t:
        old = t.staged_or_new("RSA-2048")
        new = t.staged_or_new("EC-P256")
        assert new.id != old.id and new.algorithm == "EC-P256"
    objects = token.objects()
    assert labels(objects) == [("PRIVATE_KEY", STAGING), ("PUBLIC_KEY", STAGING)]
    assert {key_id for _, _, key_id in objects} == {new.id}


def test_an_unknown_algorithm_is_a_config_error_and_makes_nothing(token):
    with open_token(token.settings()) as t, pytest.raises(errors.ConfigError):
        t.generate("EC-P384")
    assert token.objects() == []


# ----------------------------------------------- relabel, promote, delete

def test_relabel_moves_both_objects_to_the_new_label(token):
    with open_token(token.settings()) as t:
        pair = t.generate("EC-P256")
        t.relabel(pair, FINAL)
        assert t.pairs(STAGING) == [] and [p.id for p in t.pairs(FINAL)] == [pair.id]
    assert labels(token.objects()) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]


def test_promote_gives_the_final_label_and_deletes_the_key_it_replaces(token):
    with open_token(token.settings()) as t:
        old = t.generate("EC-P256", label=FINAL)
        new = t.staged_or_new("EC-P256")
        t.promote(new)
        assert [p.id for p in t.pairs(FINAL)] == [new.id]
    objects = token.objects()
    assert labels(objects) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]
    assert old.id not in {key_id for _, _, key_id in objects}


def test_delete_label_removes_both_objects_and_nothing_else(token):
    with open_token(token.settings()) as t:
        t.generate("EC-P256", label=FINAL)
        t.generate("EC-P256")
        assert t.delete_label(FINAL) == 1
    assert labels(token.objects()) == [("PRIVATE_KEY", STAGING), ("PUBLIC_KEY", STAGING)]


def test_reconcile_finishes_a_promotion_killed_between_relabel_and_delete(token):
    with open_token(token.settings()) as t:
        old = t.generate("EC-P256", label=FINAL)
        new = t.generate("EC-P256")
        installed = new.public_key_der()
        t.relabel(new, FINAL)          # killed here: two pairs labelled final
    with open_token(token.settings()) as t:
        assert t.reconcile(installed).id == new.id
    objects = token.objects()
    assert labels(objects) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]
    assert {key_id for _, _, key_id in objects} == {new.id} != {old.id}


def test_reconcile_finishes_a_relabel_killed_after_the_public_key(token):
    import pkcs11
    with open_token(token.settings()) as t:
        t.generate("EC-P256", label=FINAL)
        new = t.generate("RSA-2048")
        installed = new.public_key_der()
        new.public[pkcs11.Attribute.LABEL] = FINAL   # killed before the private key's label
    assert sorted(labels(token.objects())) == [("PRIVATE_KEY", FINAL), ("PRIVATE_KEY", STAGING),
                                               ("PUBLIC_KEY", FINAL), ("PUBLIC_KEY", FINAL)]
    with open_token(token.settings()) as t:
        assert t.reconcile(installed).id == new.id
    assert labels(token.objects()) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]


def test_reconcile_finds_nothing_when_no_key_matches_the_certificate(token):
    with open_token(token.settings()) as t:
        t.generate("EC-P256", label=FINAL)
        other = t.generate("EC-P256", label="someone-else")
        assert t.reconcile(other.public_key_der()) is None
    assert len(token.objects()) == 4


def test_half_pairs_under_our_labels_are_removed_with_a_warning_and_other_labels_left_alone(
        token, caplog):
    with open_token(token.settings()) as t:
        lone_public = t.generate("EC-P256", label=FINAL)
        lone_public.private.destroy()           # a delete cut short
        lone_private = t.generate("EC-P256")
        lone_private.public.destroy()           # a half-made pair
        foreign = t.generate("EC-P256", label="another-app")
        foreign.public.destroy()
        t.remove_orphans()
    assert labels(token.objects()) == [("PRIVATE_KEY", "another-app")]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "removing 2 key object(s) without their other half from the token"]


def another_apps_pair(t, label, key_id):
    """A key pair some other software made in the same token, as it would: its own ID."""
    import pkcs11
    return t._session.generate_keypair(pkcs11.KeyType.RSA, 2048, store=True, label=label,
                                       id=key_id)


@pytest.mark.parametrize("label", [FINAL, STAGING])
def test_a_second_key_pair_under_our_label_not_made_by_us_is_78_and_nothing_is_deleted(
        token, label):
    with open_token(token.settings()) as t:
        ours = t.generate("EC-P256", label=FINAL)
        installed = ours.public_key_der()
        another_apps_pair(t, label, b"their-key-01")
    before = token.objects()
    with open_token(token.settings()) as t:
        for operation in (lambda: t.reconcile(installed), lambda: t.staged_or_new("EC-P256"),
                          t.remove_orphans, lambda: t.pairs(FINAL)):
            with pytest.raises(errors.ConfigError) as caught:
                operation()
            assert errors.exit_code(caught.value) == 78
            assert (f"a private key and a public key under label {label!r} "
                    f"(CKA_ID {b'their-key-01'.hex()}) that this program did not make"
                    in str(caught.value))
    assert token.objects() == before


def test_keys_sharing_the_id_of_ours_are_78_and_ours_is_kept(token):
    with open_token(token.settings()) as t:
        ours = t.generate("EC-P256", label=FINAL)
        installed = ours.public_key_der()
        another_apps_pair(t, FINAL, ours.id)
    before = token.objects()
    with open_token(token.settings()) as t:
        with pytest.raises(errors.ConfigError) as caught:
            t.reconcile(installed)
        assert "2 private keys and 2 public keys share the CKA_ID" in str(caught.value)
    assert token.objects() == before


def test_a_lone_key_not_made_by_us_under_our_label_is_78_not_removed(token):
    with open_token(token.settings()) as t:
        public, _ = another_apps_pair(t, STAGING, b"their-key-02")
        public.destroy()   # only their private key is left
    before = token.objects()
    with open_token(token.settings()) as t:
        with pytest.raises(errors.ConfigError, match="a private key under label"):
            t.remove_orphans()
    assert token.objects() == before


def test_a_pair_from_before_keys_were_marked_still_serves_the_certificate_it_matches(token):
    with open_token(token.settings()) as t:
        public, private = another_apps_pair(t, FINAL, os.urandom(16))
        installed = pkcs11_token.KeyPair(private, public, FINAL, b"").public_key_der()
        assert t.reconcile(installed) is not None
    assert labels(token.objects()) == [("PRIVATE_KEY", FINAL), ("PUBLIC_KEY", FINAL)]


# ------------------------------------------------------------------ the CSR

@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("serial", ["CAM-42", "A1:b2_c3-d4." * 10 + "EXTRA128"])
def test_csr_is_signed_in_the_token_and_carries_its_public_key(token, algorithm, serial):
    assert len(serial) in (6, 128)
    with open_token(token.settings()) as t:
        pair = t.staged_or_new(algorithm)
        pem = make_csr(pair, serial)
        der = pair.public_key_der()
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert csr.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) == der
    (cn,) = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert cn.value == csr_common_name(serial) and len(cn.value) <= 64
    assert csr.signature_hash_algorithm.name == "sha256"


def test_common_name_is_the_serial_up_to_64_characters_then_prefix_and_digest():
    assert csr_common_name("X" * 64) == "X" * 64
    long_a, long_b = "CAM-" + "a" * 123 + "1", "CAM-" + "a" * 123 + "2"
    cn_a, cn_b = csr_common_name(long_a), csr_common_name(long_b)
    assert len(cn_a) == len(cn_b) == 64 and cn_a != cn_b
    assert cn_a.startswith(long_a[:47] + "-")


# --------------------------------------------------------- opening, failures

def test_missing_module_is_transient(token):
    with pytest.raises(errors.TransientError, match="not there"):
        open_token(token.settings(library=token.root / "no-such-module.so"))


def test_the_pin_is_redacted_from_every_line_once_read(token):
    from entomologist import logs
    pin = read_pin(token.pin_file)
    assert logs.clean_line(f"the token said {pin}") == "the token said [redacted]"


def test_absent_token_label_is_transient(token):
    with pytest.raises(errors.TransientError, match="no token labelled 'not-up-yet'"):
        open_token(token.settings(token_label="not-up-yet"))


def test_a_file_that_is_not_a_pkcs11_module_is_a_config_error(token):
    bogus = token.root / "bogus.so"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(errors.ConfigError, match="cannot be loaded"):
        open_token(token.settings(library=bogus))


def test_wrong_pin_is_a_config_error_and_is_not_offered_twice_in_a_run(token, caplog):
    caplog.set_level(logging.DEBUG)
    token.pin_file.write_text("0000\n")
    with pytest.raises(errors.ConfigError, match="refused the PIN") as first:
        open_token(token.settings())
    with pytest.raises(errors.ConfigError, match="earlier in this run") as second:
        open_token(token.settings())
    for text in (str(first.value), str(second.value), first.value.hint, caplog.text):
        assert "0000" not in text
    # The right PIN, once the file is fixed, is tried.
    token.pin_file.write_text(USER_PIN)
    with open_token(token.settings()) as t:
        assert t.pairs(FINAL) == []
    assert token.objects() == []


def spy_run(token, tmp_path, pin: str, attempts: int) -> tuple[int, list[str]]:
    """Open the token ``attempts`` times in a child process through OpenSC's pkcs11-spy;
    the C_Login calls the token received, and each attempt's outcome."""
    token.pin_file.write_text(pin)
    log_path = tmp_path / "spy.log"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT_DIR!r})
        from entomologist import errors
        from entomologist.pkcs11_key import TokenSettings, open_token
        settings = TokenSettings({str(SPY_MODULE)!r}, {token.label!r}, {str(token.pin_file)!r})
        for _ in range({attempts}):
            try:
                open_token(settings).close()
                print("ok")
            except errors.EntoError as exc:
                print(type(exc).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **token.env, "PKCS11SPY": str(SOFTHSM_MODULE),
                               "PKCS11SPY_OUTPUT": str(log_path)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [line for line in log_path.read_text().splitlines() if "C_Login" in line]
    return len(calls), proc.stdout.split()


def test_a_wrong_pin_reaches_the_token_once_however_often_the_run_asks(token, tmp_path):
    assert SPY_MODULE.exists(), "pkcs11-spy.so missing: `make setup` installs opensc-pkcs11"
    assert spy_run(token, tmp_path, "0000", attempts=3) == (
        1, ["ConfigError", "ConfigError", "ConfigError"])


def test_the_spy_counts_every_login_of_a_right_pin(token, tmp_path):
    assert spy_run(token, tmp_path, USER_PIN, attempts=2) == (2, ["ok", "ok"])


def test_a_generated_key_pair_is_said_with_its_algorithm_token_and_label(token, caplog):
    with caplog.at_level(logging.INFO), open_token(token.settings()) as t:
        t.generate("EC-P256", label=FINAL)
    assert (f"generated an EC-P256 key pair in token {token.label!r} under label {FINAL!r}"
            in caplog.messages)


def test_each_opening_of_the_token_closes_its_session_before_it_finalizes(token, tmp_path):
    assert spy_run(token, tmp_path, USER_PIN, attempts=2)[1] == ["ok", "ok"]
    calls = [line.split()[-1] for line in (tmp_path / "spy.log").read_text().splitlines()
             if line.split() and line.split()[-1] in ("C_OpenSession", "C_CloseSession",
                                                      "C_Finalize")]
    assert calls == ["C_OpenSession", "C_CloseSession", "C_Finalize"] * 2


def test_the_pin_stays_out_of_the_token_key_repr(token):
    key = token_key(token.settings(key_label=FINAL))
    assert USER_PIN not in repr(key) and key.pin == USER_PIN
    assert (key.token_label, key.key_label) == (token.label, FINAL)


# ------------------------------------------------------------- the PIN file

@pytest.mark.parametrize("content, pin", [("1234\n", "1234"), ("1234", "1234"),
                                          ("12 34\r\n", "12 34"), ("pïn", "pïn")])
def test_pin_file_holds_one_line_without_its_line_end(tmp_path, content, pin):
    path = tmp_path / "pin"
    path.write_text(content)
    os.chmod(path, 0o600)
    assert read_pin(path) == pin


def test_a_pin_file_readable_by_its_group_is_accepted(tmp_path):
    path = tmp_path / "pin"
    path.write_text("1234")
    os.chmod(path, 0o640)
    assert read_pin(path) == "1234"
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o604, 0o666])
def test_a_pin_file_others_can_read_or_others_or_the_group_can_change_is_refused(
        tmp_path, mode):
    path = tmp_path / "pin"
    path.write_text("1234")
    os.chmod(path, mode)
    with pytest.raises(errors.ConfigError, match="mode|written by group or others") as err:
        read_pin(path)
    assert "1234" not in str(err.value)


@pytest.mark.parametrize("content, problem", [
    ("", "empty"), ("\n", "empty"), ("12\n34", "more than one line"),
    ("x" * 300, "too large"), (b"\xff\xfe", "not UTF-8")])
def test_a_pin_file_that_is_not_one_short_line_is_refused(tmp_path, content, problem):
    path = tmp_path / "pin"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.chmod(path, 0o600)
    with pytest.raises(errors.ConfigError, match=problem):
        read_pin(path)


def test_a_missing_pin_file_or_a_folder_is_refused(tmp_path):
    with pytest.raises(errors.ConfigError, match="does not exist"):
        read_pin(tmp_path / "absent")
    with pytest.raises(errors.ConfigError, match="not a regular file"):
        read_pin(tmp_path)


def test_a_pin_file_owned_by_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this case needs root to give the file away (CI runs as root)")
    path = tmp_path / "pin"
    path.write_text("1234")
    os.chmod(path, 0o600)
    os.chown(path, 4242, 4242)
    with pytest.raises(errors.ConfigError, match="owned by uid 4242"):
        read_pin(path)


def test_settings_staging_label_follows_the_key_label():
    s = TokenSettings(SOFTHSM_MODULE, "t", "/p", key_label="cam-key")
    assert s.staging_label == "cam-key.staging"
    assert TokenSettings(SOFTHSM_MODULE, "t", "/p").key_label == FINAL
