"""The fleet guard end to end: the claim pair alone, used as an attacker would, against the
stand-in applying cloud/stack.yaml (its pre-provisioning hook on, the fleet inventory in moto).

The attacker drives AWS's own fleet provisioning client (standin.claimpair over
awsiot.iotidentity) with the claim files every camera carries.  A camera's own
registration is driven the same way with its secret, as boot.py sends it.
"""
import io
import threading
import time


import iot_standin
from e2e import run_script
from iot_standin import StandIn

THING = "ento-CAM-0001"




def refused_by_the_hook(outcome, standin, reason):
    assert not outcome.accepted and outcome.step == "register", outcome
    assert (outcome.status_code, outcome.error_code) == (403, "ACCESS_DENIED"), outcome
    hook = standin.events("hook")[-1]
    assert hook["allowProvisioning"] is False
    assert [d["reason"] for d in hook["decisions"]] == [reason]
    return True


def registered_things(standin) -> list[str]:
    return [e["thingName"] for e in standin.events("register-accepted")]


def test_the_device_config_names_its_secret_file_written_0600_as_the_factory_would(guarded):
    device = iot_standin.json.loads(guarded.config_path.read_text())["device"]
    path = guarded.workdir / device["PROVISIONING_SECRET_FILE"]
    assert path == guarded.secret_path and oct(path.stat().st_mode & 0o777) == "0o600"
    assert path.read_text() == guarded.secret + "\n"
    assert guarded.inventory.show(guarded.serial)["state"] == "manufactured"


def test_a_camera_with_its_secret_registers_once(guarded):
    outcome = guarded.claim_pair_register(guarded.serial, guarded.secret)
    assert outcome.accepted and outcome.answer["thingName"] == THING
    record = guarded.inventory.show(guarded.serial)
    assert record["state"] == "provisioned" and record["registrations"] == 1
    assert guarded.secret not in guarded.events_path.read_text()
    accepted, = guarded.events("register-accepted")
    assert guarded.secret not in str(accepted["attributes"])
    assert guarded.secret not in str(accepted["deviceConfiguration"])


def test_the_claim_pair_alone_cannot_register_an_unknown_serial(guarded):
    outcome = guarded.claim_pair_register("CAM-9999", "guessed", client_id="thief")
    assert refused_by_the_hook(outcome, guarded, "unknown-serial")
    assert registered_things(guarded) == []


def test_the_claim_pair_alone_cannot_register_a_serial_with_a_wrong_or_no_secret(guarded):
    assert refused_by_the_hook(guarded.claim_pair_register(guarded.serial, "guessed"),
                               guarded, "wrong-secret")
    assert refused_by_the_hook(guarded.claim_pair_register(guarded.serial), guarded,
                               "wrong-secret")
    assert registered_things(guarded) == []
    assert guarded.inventory.show(guarded.serial)["state"] == "manufactured"


def test_the_claim_pair_cannot_register_a_provisioned_serial_not_even_with_its_secret_after_the_window(
        after_window):
    guarded = after_window
    assert guarded.claim_pair_register(guarded.serial, guarded.secret).accepted
    assert refused_by_the_hook(guarded.claim_pair_register(guarded.serial, client_id="thief"),
                               guarded, "wrong-secret")
    assert refused_by_the_hook(guarded.claim_pair_register(guarded.serial, guarded.secret,
                                                           client_id="thief"),
                               guarded, "already-provisioned")
    assert registered_things(guarded) == [THING]


def test_the_claim_certificate_cannot_connect_with_a_things_client_id(guarded):
    assert guarded.claim_pair_connects(guarded.serial)  # the camera's own claim connection
    assert not guarded.claim_pair_connects(THING)
    assert not guarded.claim_pair_connects("ento-CAM-0002")
    denied = guarded.events("denied")
    assert [(d["action"], d["client_id"]) for d in denied] == [
        ("iot:Connect", THING), ("iot:Connect", "ento-CAM-0002")]
    assert all("explicit deny" in d["reason"] for d in denied)


def test_within_the_window_only_the_cameras_own_secret_registers_it_again(guarded):
    assert guarded.claim_pair_register(guarded.serial, guarded.secret).accepted
    assert refused_by_the_hook(guarded.claim_pair_register(guarded.serial, client_id="thief"),
                               guarded, "wrong-secret")
    again = guarded.claim_pair_register(guarded.serial, guarded.secret)
    assert again.accepted and again.answer["thingName"] == THING
    decision, = guarded.events("hook")[-1]["decisions"]
    assert decision["reason"] == "reregistration-within-window"
    record = guarded.inventory.show(guarded.serial)
    assert record["state"] == "provisioned" and record["registrations"] == 2
    first, second = record["certificateIds"]
    assert decision["replacesCertificateId"] == first and record["lastCertificateId"] == second
    assert registered_things(guarded) == [THING, THING]


def test_after_the_window_reprovisioning_works_only_after_allow_reprovision_and_only_once(
        after_window):
    guarded = after_window
    assert guarded.claim_pair_register(guarded.serial, guarded.secret).accepted
    assert refused_by_the_hook(guarded.claim_pair_register(guarded.serial, guarded.secret),
                               guarded, "already-provisioned")
    guarded.inventory.allow_reprovision(guarded.serial)
    assert guarded.claim_pair_register(guarded.serial, guarded.secret).accepted
    assert refused_by_the_hook(guarded.claim_pair_register(guarded.serial, guarded.secret),
                               guarded, "already-provisioned")
    assert registered_things(guarded) == [THING, THING]


def test_a_revoked_camera_is_refused(guarded):
    guarded.inventory.revoke(guarded.serial)
    assert refused_by_the_hook(guarded.claim_pair_register(guarded.serial, guarded.secret),
                               guarded, "revoked")
    assert registered_things(guarded) == []


def test_of_two_concurrent_registrations_of_one_serial_one_passes(after_window):
    # Without the window: the broker may hand the hook one request after the other
    # has written, and within the window the camera's own secret would pass again
    # (the race at the read is test_fleet_hook.py's, window on).
    guarded = after_window
    # The broker hands each answer to both requesters (AWS answers the requester
    # only), so the stand-in's record says which passed, not the clients.
    threads = [threading.Thread(target=guarded.claim_pair_register,
                                args=(guarded.serial, guarded.secret),
                                kwargs={"client_id": f"camera-{i}"}) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert guarded.wait_for("hook", 2)
    assert sorted(h["allowProvisioning"] for h in guarded.events("hook")) == [False, True]
    assert registered_things(guarded) == [THING]
    assert guarded.inventory.show(guarded.serial)["registrations"] == 1


def test_with_the_hook_disabled_the_claim_pair_alone_registers_anything(tmp_path):
    """What the stack's PreProvisioningHook=Disabled gives up (the README says so)."""
    with StandIn(tmp_path, hook=False) as standin:
        assert standin.stack.hook is None
        assert standin.claim_pair_register("CAM-9999", client_id="thief").accepted
        assert standin.claim_pair_register(standin.serial, client_id="thief").accepted
        assert standin.claim_pair_register(standin.serial, client_id="thief").accepted
        assert standin.events("hook") == []
        # The claim policy's Deny does not depend on the hook.
        assert not standin.claim_pair_connects(THING)


def test_the_demo_shows_the_claim_pair_alone_refused_and_says_its_window_is_off(tmp_path):
    with StandIn(tmp_path, hook=True, parameters=iot_standin.DEMO_PARAMETERS) as guarded:
        assert guarded.claim_pair_register(guarded.serial, guarded.secret).accepted
        out = io.StringIO()
        iot_standin._attacks(guarded, out)
    text = out.getvalue()
    assert "(ReregistrationWindowHours is 0 here, so the camera stands as it would 24 h " \
           "after its registration" in text
    assert "RegisterThing for an unknown serial CAM-9999: register rejected: 403 " \
           "ACCESS_DENIED (hook: unknown-serial)" in text
    assert "CAM-0001 again, without its secret: register rejected: 403 ACCESS_DENIED " \
           "(hook: wrong-secret)" in text
    assert "with the camera's own secret file: register rejected: 403 ACCESS_DENIED " \
           "(hook: already-provisioned)" in text
    assert f"Connect as {THING} with the claim certificate: refused" in text
    assert guarded.secret not in text


def test_a_claim_pair_holder_connecting_as_the_serial_in_a_loop_does_not_disturb_a_first_boot(
        guarded):
    stop, kicks = threading.Event(), []

    def attacker():
        while not stop.is_set():
            connected = guarded.claim_pair_connects(guarded.serial, timeout=5)
            kicks.append((time.monotonic(), connected))
            stop.wait(0.05)
    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        # The loop is going before the boot starts, and each answer is held a little,
        # so that it comes round while the boot runs however loaded the machine is.
        end = time.monotonic() + 30
        while sum(ok for _, ok in kicks) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        guarded.faults.delay = 0.3
        started = time.monotonic()
        result = run_script("boot.py", guarded.config_path, "--timeout", "20")
        ended = time.monotonic()
    finally:
        stop.set()
        thread.join(10)
    assert result.code == 0, result.stderr
    assert sum(ok for _, ok in kicks) >= 3, kicks
    assert any(ok for at, ok in kicks if started < at < ended), kicks
    assert registered_things(guarded) == [THING]
    assert guarded.inventory.show(guarded.serial)["registrations"] == 1
