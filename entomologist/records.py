"""The two JSON records CERT_DIR keeps: the registration an attempt recorded and has
not finished installing (registration.json.staging), and whom the installed pair
was registered for (installed-for.json).  Each is encoded here, and parsed with
every field checked: a record that does not parse raises ValueError, KeyError or
TypeError, and the caller ignores it with one warning."""
from __future__ import annotations

import json
from dataclasses import dataclass

from . import config as configuration

REGISTRATION_LIMIT = 256 * 1024
INSTALLED_FOR_LIMIT = 4096


@dataclass(frozen=True)
class Registration:
    thing_name: str
    certificate_id: str
    device_configuration: dict
    serial_id: str | None = None  # the camera it was registered for (None: a record from
                                  # before the field, taken as this camera's)


def _serial(value) -> bool:
    return isinstance(value, str) and bool(configuration.SERIAL_RE.fullmatch(value))


def encode_registration(reg: Registration) -> bytes:
    return json.dumps({"thingName": reg.thing_name, "certificateId": reg.certificate_id,
                       "deviceConfiguration": reg.device_configuration,
                       "serialId": reg.serial_id}).encode()


def parse_registration(raw: bytes) -> Registration:
    doc = json.loads(raw)
    reg = Registration(doc["thingName"], doc["certificateId"],
                       doc.get("deviceConfiguration") or {}, doc.get("serialId"))
    if not (configuration.THING_NAME_RE.fullmatch(reg.thing_name)
            and configuration.CERTIFICATE_ID_RE.fullmatch(reg.certificate_id)
            and isinstance(reg.device_configuration, dict)
            and (reg.serial_id is None or _serial(reg.serial_id))):
        raise ValueError("invalid fields")
    return reg


def encode_installed_for(serial_id: str, reg: Registration) -> bytes:
    return json.dumps({"serialId": serial_id, "thingName": reg.thing_name,
                       "certificateId": reg.certificate_id}).encode()


def parse_installed_for(raw: bytes) -> str:
    """The SERIAL_ID the record names."""
    serial = json.loads(raw)["serialId"]
    if not _serial(serial):
        raise ValueError("invalid serialId")
    return serial
