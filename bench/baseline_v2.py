"""The baseline: the same boot job written the way AWS's current samples do it.

mqtt5 client, IotIdentityClientV2 (the request-response client), futures
waited on with a timeout, then a second mqtt5 connection with the new
certificate to publish the boot message.  No lock, no durability, no retries:
it is here only to be timed against boot.py through the same proxy.

    python bench/baseline_v2.py --config DIR/ento.conf
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import Future
from pathlib import Path

from awscrt import mqtt5, mqtt_request_response
from awsiot import iotidentity, mqtt5_client_builder


def connect(device: dict, base: Path, cert: str, key: str, client_id: str):
    connected: Future = Future()
    stopped: Future = Future()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=device["ENDPOINT_URL"], port=int(device["PORT"]),
        cert_filepath=str(base / cert), pri_key_filepath=str(base / key),
        ca_filepath=str(base / device["ROOT_CA"]), client_id=client_id, clean_session=True,
        keep_alive_secs=44,
        on_lifecycle_connection_success=lambda event: connected.set_result(True),
        on_lifecycle_connection_failure=lambda event: connected.done() or
        connected.set_exception(RuntimeError("connect failed")),
        on_lifecycle_stopped=lambda event: stopped.set_result(True))
    client.start()
    connected.result(30)
    return client, stopped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    base = args.config.parent
    doc = json.loads(args.config.read_text())
    device = doc["device"]
    cert_dir = base / device["CERT_DIR"]
    if not (cert_dir / "certificate.pem.crt").exists():
        client, stopped = connect(device, base, device["CLAIM_CERT"], device["CLAIM_KEY"],
                                  device["SERIAL_ID"])
        identity = iotidentity.IotIdentityClientV2(client, mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=2, max_streaming_subscriptions=0,
            operation_timeout_in_seconds=30))
        created = identity.create_keys_and_certificate(
            iotidentity.CreateKeysAndCertificateRequest()).result(30)
        registered = identity.register_thing(iotidentity.RegisterThingRequest(
            template_name=device["TEMPLATE_NAME"],
            certificate_ownership_token=created.certificate_ownership_token,
            parameters={"SerialNumber": device["SERIAL_ID"]})).result(30)
        client.stop()
        stopped.result(30)
        cert_dir.mkdir(mode=0o700, exist_ok=True)
        (cert_dir / "certificate.pem.crt").write_text(created.certificate_pem)
        (cert_dir / "private.pem.key").write_text(created.private_key)
        device["THING_NAME"] = registered.thing_name
        args.config.write_text(json.dumps(doc, indent=2))
    client, stopped = connect(device, base, f"{device['CERT_DIR']}/certificate.pem.crt",
                              f"{device['CERT_DIR']}/private.pem.key",
                              device.get("THING_NAME", device["SERIAL_ID"]))
    payload = json.dumps({"serialID": device["SERIAL_ID"], "bootStatus": True})
    client.publish(mqtt5.PublishPacket(topic=f"cameraDevice/{device['SERIAL_ID']}/booted",
                                       payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE)).result(30)
    client.stop()
    stopped.result(30)
    device["PROVISION_STATUS"] = "True"
    args.config.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
