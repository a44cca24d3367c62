"""The fleet inventory: the operator's command line for the pre-provisioning hook's table.

    python cloud/inventory.py [--table NAME] add SERIAL... --secrets-dir DIR
    python cloud/inventory.py [--table NAME] allow-reprovision SERIAL
    python cloud/inventory.py [--table NAME] revoke SERIAL
    python cloud/inventory.py [--table NAME] show SERIAL
    python cloud/inventory.py [--table NAME] list

It talks to DynamoDB through boto3 with the standard AWS environment
(AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL, ...).  ``add`` makes each camera's
provisioning secret (secrets.token_urlsafe(32)), writes it to
DIR/<SERIAL>.secret (mode 0600 from birth, never over an existing file) for
the image build, and stores only its SHA-256.  A camera's item then goes
manufactured -> provisioned (the hook, at its registration; within the
stack's re-registration window the camera may register again with its own
secret, after a lost answer); an operator moves it to reprovision-allowed
(one more registration, e.g. after a replaced SD card) or revoked (never
again).  ``show`` lists the certificates the hook allowed (certificateIds,
the last 10, oldest first): all but the one the camera uses are orphans to
deactivate in AWS IoT.

Exit codes: 0 done; 2 usage; 65 no such serial, or a change its state does
not allow; 73 a secret file cannot be written; 75 DynamoDB unreachable or
throttling; 78 no region or credentials, or no such table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import secrets
import stat
import sys
from pathlib import Path

try:  # run as a script (python cloud/inventory.py) or imported as cloud.inventory
    from hook import SERIAL, secret_hash
except ImportError:
    from cloud.hook import SERIAL, secret_hash

log = logging.getLogger("inventory")

DEFAULT_TABLE = "ento-fleet-inventory"
TABLE_SUFFIX = "-fleet-inventory"  # the stack's table: <NamePrefix>-fleet-inventory
MAX_THING_NAME = 128
EX_DATAERR, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = 65, 73, 75, 78


class InventoryError(Exception):
    code = EX_DATAERR


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def read_secret(path: Path) -> str:
    """A secret file an earlier `add` left: ours only if no one else can read or change it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise InventoryError(f"{path} exists and is not a 0600 secret file of this user: "
                                 "remove it or choose another --secrets-dir")
        secret = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not secret:
        raise InventoryError(f"{path} is empty: remove it and run add again")
    return secret


def write_secret(path: Path, secret: str) -> Path:
    """The secret and a line end, 0600 from birth, never replacing a file, durable."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, (secret + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


class Inventory:
    """One table of the fleet inventory, through a boto3 DynamoDB client."""

    def __init__(self, client, table: str = DEFAULT_TABLE):
        self.client = client
        self.table = table

    def create_table(self) -> None:
        """What cloud/stack.yaml makes on AWS; the local stand-in makes it here."""
        self.client.create_table(
            TableName=self.table, BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "serial", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "serial", "AttributeType": "S"}])

    def add(self, serial: str, secrets_dir: Path) -> Path:
        """A manufactured camera: its secret file for the image, its hash in the table.

        Safe to run again for the same serial: a secret file left by an earlier
        run whose outcome was unknown (a lost answer, a timeout) is reused, and
        a table that already holds its hash means that run succeeded.  A secret
        file is removed only when the table certainly does not hold it."""
        _check_serial(serial)
        if self.table.endswith(TABLE_SUFFIX):
            # The stack names things <NamePrefix>-<serial>, at most 128 characters:
            # a longer one would pass the hook and then fail in RegisterThing.
            thing = f"{self.table[:-len(TABLE_SUFFIX)]}-{serial}"
            if len(thing) > MAX_THING_NAME:
                raise InventoryError(f"serial {serial[:40]}...: its thing name would be "
                                     f"{len(thing)} characters, over AWS's {MAX_THING_NAME}")
        path = Path(secrets_dir) / f"{serial}.secret"
        made = not os.path.lexists(path)
        if made:
            secret = new_secret()
            write_secret(path, secret)
        else:
            secret = read_secret(path)
        digest = secret_hash(secret)
        try:
            self.put(serial, digest)
        except InventoryError:
            # The serial is there: with this file's hash (our own write whose answer
            # was lost, then retried), or with another secret (a real duplicate).
            if self.stored_hash(serial) == digest:
                return path
            if made:
                path.unlink()
            raise
        except BaseException:
            # The write may have landed: keeping the file lets `add` be run again.
            log.error("%s: the inventory did not confirm the write; the secret stays in %s: "
                      "run add %s again", serial, path, serial)
            raise
        return path

    def stored_hash(self, serial: str) -> str | None:
        item = self.client.get_item(TableName=self.table, Key={"serial": {"S": serial}},
                                    ConsistentRead=True).get("Item")
        return item.get("secretSha256", {}).get("S") if item else None

    def put(self, serial: str, digest: str) -> None:
        """A manufactured camera whose secret has this SHA-256; never over an existing one."""
        _check_serial(serial)
        try:
            self.client.put_item(
                TableName=self.table,
                Item={"serial": {"S": serial}, "secretSha256": {"S": digest},
                      "state": {"S": "manufactured"}, "version": {"N": "0"},
                      "registrations": {"N": "0"}, "updatedAt": {"S": _now()}},
                ConditionExpression="attribute_not_exists(serial)")
        except Exception as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                raise InventoryError(f"{serial} is already in the inventory") from None
            raise

    def _set_state(self, serial: str, state: str, refuse: tuple[str, ...]) -> None:
        _check_serial(serial)
        names = {"#state": "state", "#version": "version"}
        values = {":state": {"S": state}, ":one": {"N": "1"}, ":now": {"S": _now()}}
        condition = "attribute_exists(serial)"
        for i, other in enumerate(refuse):
            condition += f" AND #state <> :refuse{i}"
            values[f":refuse{i}"] = {"S": other}
        try:
            self.client.update_item(
                TableName=self.table, Key={"serial": {"S": serial}},
                UpdateExpression="SET #state = :state, #version = #version + :one, "
                                 "updatedAt = :now",
                ConditionExpression=condition, ExpressionAttributeNames=names,
                ExpressionAttributeValues=values)
        except Exception as exc:
            if _code(exc) != "ConditionalCheckFailedException":
                raise
            item = self.show(serial)
            raise InventoryError(f"{serial} is {item['state']}: it cannot become "
                                 f"{state}") from None

    def allow_reprovision(self, serial: str) -> None:
        """One more registration (a new SD card, a repaired camera); revoked stays revoked."""
        self._set_state(serial, "reprovision-allowed", refuse=("revoked",))

    def revoke(self, serial: str) -> None:
        self._set_state(serial, "revoked", refuse=())

    def show(self, serial: str) -> dict:
        _check_serial(serial)
        item = self.client.get_item(TableName=self.table, Key={"serial": {"S": serial}},
                                    ConsistentRead=True).get("Item")
        if item is None:
            raise InventoryError(f"{serial} is not in the inventory")
        return _plain(item)

    def list(self) -> list[dict]:
        items, start = [], None
        while True:
            page = self.client.scan(TableName=self.table, ConsistentRead=True,
                                    **({"ExclusiveStartKey": start} if start else {}))
            items += [_plain(i) for i in page.get("Items", [])]
            start = page.get("LastEvaluatedKey")
            if not start:
                return sorted(items, key=lambda i: i["serial"])


def _plain(item: dict) -> dict:
    """An item as the operator reads it; the secret's hash is left out."""
    out = {}
    for key, value in item.items():
        if key == "secretSha256":
            continue
        out[key] = _value(value)
    return out


def _value(value: dict):
    (kind, raw), = value.items()
    if kind == "N":
        return int(raw)
    if kind == "L":
        return [_value(v) for v in raw]
    return raw


def _check_serial(serial: str) -> None:
    # A thing name's characters: also keeps the secret's file name inside its folder.
    if not SERIAL.fullmatch(serial):
        raise InventoryError(f"serial {serial[:160]!r} must be 1 to 128 characters of "
                             "A-Z a-z 0-9 : _ -")


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def client_from_environment():
    """A DynamoDB client from the standard AWS environment (AWS_ENDPOINT_URL included)."""
    import boto3
    from botocore.config import Config
    # AWS_REGION is what the CLI and the SDKs of other languages read; boto3
    # reads only AWS_DEFAULT_REGION.
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
    return boto3.client("dynamodb", region_name=region, config=Config(
        connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"}))


def _exit_code(exc: Exception) -> tuple[int, str]:
    from botocore import exceptions as bex
    code = _code(exc)
    if isinstance(exc, InventoryError):
        return exc.code, str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return EX_CANTCREAT, f"cannot write the secret file: {exc.strerror}: {exc.filename}"
    if isinstance(exc, (bex.NoRegionError, bex.NoCredentialsError, bex.PartialCredentialsError)):
        return EX_CONFIG, f"{exc}; set AWS_REGION and credentials (AWS_PROFILE, ...)"
    if code == "ResourceNotFoundException":
        return EX_CONFIG, "no such table: check --table and the region"
    if code in ("AccessDeniedException", "UnrecognizedClientException"):
        return EX_CONFIG, f"DynamoDB refused the credentials ({code})"
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError,
                        bex.ReadTimeoutError, bex.HTTPClientError, OSError)) or code in (
            "ProvisionedThroughputExceededException", "ThrottlingException",
            "RequestLimitExceeded", "InternalServerError", "ServiceUnavailable"):
        return EX_TEMPFAIL, f"DynamoDB did not answer; try again ({code or type(exc).__name__})"
    raise exc


def run(inventory: Inventory, args, out=sys.stdout) -> int:
    if args.command == "add":
        directory = Path(args.secrets_dir)
        for serial in args.serial:
            path = inventory.add(serial, directory)
            out.write(f"{serial}: manufactured; secret in {path} (mode 0600): put it in "
                      "the camera's image and name it in PROVISIONING_SECRET_FILE\n")
    elif args.command == "allow-reprovision":
        inventory.allow_reprovision(args.serial)
        out.write(f"{args.serial}: reprovision-allowed (one registration)\n")
    elif args.command == "revoke":
        inventory.revoke(args.serial)
        out.write(f"{args.serial}: revoked; also revoke its certificate in AWS IoT\n")
    elif args.command == "show":
        out.write(json.dumps(inventory.show(args.serial), indent=2, sort_keys=True) + "\n")
    else:
        for item in inventory.list():
            out.write(f"{item['serial']}\t{item['state']}\t{item.get('registrations', 0)}\t"
                      f"{item.get('updatedAt', '')}\n")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", default=DEFAULT_TABLE,
                   help="the inventory table (the stack's InventoryTableName output; "
                        "default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="manufactured cameras: make their secrets")
    add.add_argument("serial", nargs="+")
    add.add_argument("--secrets-dir", required=True,
                     help="where each camera's <SERIAL>.secret is written (0600)")
    for name, text in (("allow-reprovision", "allow one more registration"),
                       ("revoke", "refuse every registration from now on"),
                       ("show", "one camera's record")):
        sub.add_parser(name, help=text).add_argument("serial")
    sub.add_parser("list", help="every camera: serial, state, registrations, last change")
    return p


def main(argv: list[str] | None = None, client=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        inventory = Inventory(client or client_from_environment(), args.table)
        return run(inventory, args)
    except Exception as exc:
        code, message = _exit_code(exc)
        log.error("%s", message)
        return code


if __name__ == "__main__":
    sys.exit(main())
