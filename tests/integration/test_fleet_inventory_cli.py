"""cloud/inventory.py, the operator's command line, against a real local DynamoDB (moto's server)."""
import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from cloud import inventory as cli
from e2e import ROOT
from standin import template as templates
from standin.inventory import InventoryServer

TABLE = "ento-fleet-inventory"


@pytest.fixture
def server():
    s = InventoryServer(templates.load_stack())
    s.start()
    yield s
    s.stop()


def run(server, *argv, env=None):
    """The command as an operator runs it: a process, the standard AWS environment."""
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
                   "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                   **(server.environment() if server else {}), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cloud" / "inventory.py"), *argv],
                          capture_output=True, text=True, timeout=60, env=environment)


def items(server) -> list[dict]:
    return server.client().scan(TableName=TABLE)["Items"]


def test_add_writes_one_0600_secret_per_camera_and_stores_only_its_hash(server, tmp_path):
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    proc = run(server, "add", "CAM-0001", "CAM-0002", "--secrets-dir", str(secrets_dir))
    assert proc.returncode == 0, proc.stderr
    files = sorted(secrets_dir.iterdir())
    assert [p.name for p in files] == ["CAM-0001.secret", "CAM-0002.secret"]
    stored = {i["serial"]["S"]: i for i in items(server)}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        secret = path.read_text()
        assert secret.endswith("\n") and len(secret.strip()) >= 43  # 256 random bits
        secret = secret.rstrip("\n")
        item = stored[path.name.removesuffix(".secret")]
        assert item["secretSha256"]["S"] == hashlib.sha256(secret.encode()).hexdigest()
        assert item["state"]["S"] == "manufactured"
        assert secret not in json.dumps(item) and secret not in proc.stdout + proc.stderr
    assert files[0].read_text() != files[1].read_text()


def test_a_secret_file_is_born_0600_whatever_the_umask(server, tmp_path):
    old = os.umask(0)
    try:
        cli.Inventory(server.client(), TABLE).add("CAM-0001", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "CAM-0001.secret").stat().st_mode) == 0o600


def test_add_never_replaces_a_secret_file_nor_an_inventory_item(server, tmp_path):
    assert run(server, "add", "CAM-0001", "--secrets-dir", str(tmp_path)).returncode == 0
    first = (tmp_path / "CAM-0001.secret").read_text()
    before = items(server)
    # Run again (as after a lost answer): the file and the table agree, nothing changes.
    proc = run(server, "add", "CAM-0001", "--secrets-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    other = tmp_path / "other"
    other.mkdir()
    proc = run(server, "add", "CAM-0001", "--secrets-dir", str(other))
    assert proc.returncode == 65 and "already in the inventory" in proc.stderr, proc.stderr
    assert list(other.iterdir()) == []  # a secret the table does not know is not left behind
    assert (tmp_path / "CAM-0001.secret").read_text() == first and items(server) == before


def in_process(server, *argv) -> int:
    """The command's main() in this process, on the server's table: for the steps a
    test only sets up (each process start imports boto3, half a second)."""
    return cli.main(list(argv), client=server.client())


def test_allow_reprovision_revoke_show_and_list(server, tmp_path, caplog):
    assert in_process(server, "add", "CAM-0001", "CAM-0002", "--secrets-dir", str(tmp_path)) == 0
    assert in_process(server, "allow-reprovision", "CAM-0001") == 0
    assert in_process(server, "revoke", "CAM-0002") == 0
    shown = run(server, "show", "CAM-0001")
    record = json.loads(shown.stdout)
    assert record["state"] == "reprovision-allowed" and record["version"] == 1
    assert "secretSha256" not in record
    listed = run(server, "list").stdout.splitlines()
    assert [line.split("\t")[:2] for line in listed] == [["CAM-0001", "reprovision-allowed"],
                                                         ["CAM-0002", "revoked"]]
    proc = run(server, "allow-reprovision", "CAM-0002")
    assert proc.returncode == 65 and "CAM-0002 is revoked" in proc.stderr
    for command in ("allow-reprovision", "revoke", "show"):
        caplog.clear()
        assert in_process(server, command, "CAM-7777") == 65
        assert [r.getMessage() for r in caplog.records] == ["CAM-7777 is not in the inventory"]


@pytest.mark.parametrize("serial", ["../etc/passwd", "CAM 1", "", "x" * 129, "CAM.1"])
def test_a_serial_that_is_no_thing_name_is_refused_before_anything_is_written(server, tmp_path,
                                                                              serial):
    assert cli.main(["add", serial, "--secrets-dir", str(tmp_path)],
                    client=server.client()) == 65
    assert list(tmp_path.iterdir()) == [] and items(server) == []


def test_the_environment_decides_where_and_failures_have_their_exit_codes(server, tmp_path):
    proc = run(None, "list", env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"})
    assert proc.returncode == 78 and "AWS_REGION" in proc.stderr, proc.stderr
    proc = run(server, "--table", "no-such-table", "list")
    assert proc.returncode == 78 and "no such table" in proc.stderr, proc.stderr
    proc = run(server, "list", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert proc.returncode == 75 and "try again" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_show_lists_every_certificate_the_hook_allowed_so_orphans_can_be_deactivated(
        server, tmp_path):
    from cloud import hook
    assert in_process(server, "add", "CAM-0001", "--secrets-dir", str(tmp_path)) == 0
    secret = (tmp_path / "CAM-0001.secret").read_text().strip()
    environ = {**server.environment(), "INVENTORY_TABLE": TABLE}
    for certificate_id in ("1" * 64, "2" * 64):  # the first one's answer lost on its way
        event = {"certificateId": certificate_id, "clientId": "CAM-0001",
                 "parameters": {"SerialNumber": "CAM-0001", "ProvisioningSecret": secret}}
        assert hook.handler(event, None, environ=environ)["allowProvisioning"]
    shown = run(server, "show", "CAM-0001")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["certificateIds"] == ["1" * 64, "2" * 64]
    assert record["lastCertificateId"] == "2" * 64 and record["registrations"] == 2
    assert secret not in shown.stdout


def test_a_write_whose_answer_was_lost_keeps_the_secret_and_add_again_completes(server, tmp_path):
    """The table took the hash but the answer never came: the secret file must stay."""
    inventory = cli.Inventory(server.client(), TABLE)
    real_put = inventory.client.put_item

    def landed_then_lost(**kwargs):
        real_put(**kwargs)
        raise ConnectionResetError("the answer was lost")

    inventory.client.put_item = landed_then_lost
    with pytest.raises(ConnectionResetError):
        inventory.add("CAM-0042", tmp_path)
    secret = (tmp_path / "CAM-0042.secret").read_text().strip()
    stored = items(server)[0]["secretSha256"]["S"]
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    inventory.client.put_item = real_put
    # Repeated as botocore's retry does: the item exists with this file's hash.
    assert inventory.add("CAM-0042", tmp_path) == tmp_path / "CAM-0042.secret"
    assert (tmp_path / "CAM-0042.secret").read_text().strip() == secret


def test_a_leftover_secret_file_others_can_read_is_not_reused(server, tmp_path):
    (tmp_path / "CAM-0043.secret").write_text("x" * 43 + "\n")
    os.chmod(tmp_path / "CAM-0043.secret", 0o644)
    assert cli.main(["add", "CAM-0043", "--secrets-dir", str(tmp_path)],
                    client=server.client()) == 65
    assert items(server) == []


def test_a_serial_whose_thing_name_would_be_too_long_is_refused(server, tmp_path):
    serial = "C" * 124  # ento- + 124 = 129 characters
    assert cli.main(["add", serial, "--secrets-dir", str(tmp_path)],
                    client=server.client()) == 65
    assert list(tmp_path.iterdir()) == [] and items(server) == []
    assert cli.main(["add", "C" * 123, "--secrets-dir", str(tmp_path)],
                    client=server.client()) == 0


def test_aws_region_alone_is_enough(server, tmp_path):
    environment = {k: v for k, v in server.environment().items() if k != "AWS_DEFAULT_REGION"}
    region = server.environment().get("AWS_DEFAULT_REGION", "us-east-1")
    proc = run(None, "list", env={**environment, "AWS_REGION": region})
    assert proc.returncode == 0, proc.stderr
