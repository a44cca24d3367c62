"""One later boot's connection, with a key file or a key in a PKCS#11 token.

Connects with mutual TLS, publishes one boot message with QoS 1, waits for
its PUBACK and disconnects; prints one JSON line of timings.  With
``--pkcs11-library`` the device key is the token's: the PIN file is read, the
token's final key is checked against the certificate (as a later boot does)
and awscrt signs the handshake in the token.

    python bench/connect_once.py --port P --ca CA --cert CERT --key KEY
    python bench/connect_once.py --port P --ca CA --cert CERT \\
        --pkcs11-library /usr/lib/softhsm/libsofthsm2.so --token-label L --pin-file F

Exit codes as the product's: 0, 75 (transient), 78 (configuration).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from entomologist import errors, logs, mqtt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, help="a private key file")
    parser.add_argument("--pkcs11-library", type=Path)
    parser.add_argument("--token-label")
    parser.add_argument("--pin-file", type=Path)
    parser.add_argument("--key-label", default="entomologist-device")
    parser.add_argument("--client-id", default="CAM-0001")
    parser.add_argument("--topic", default="cameraDevice/CAM-0001/booted")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    if (args.key is None) == (args.pkcs11_library is None):
        parser.error("give either --key or --pkcs11-library")
    logs.setup_logging()
    endpoint = mqtt.Endpoint(args.host, args.port, args.ca)
    times: dict[str, float] = {}

    def body() -> None:
        if args.key is not None:
            before = time.monotonic()
            session = mqtt.connect(endpoint, args.cert, args.key, args.client_id,
                                   args.timeout)
        else:
            from entomologist import pkcs11_key
            settings = pkcs11_key.TokenSettings(args.pkcs11_library, args.token_label,
                                                args.pin_file, args.key_label)
            with pkcs11_key.open_token(settings) as token:
                cert_key = pkcs11_key.certificate_public_key_der(args.cert.read_bytes())
                if token.reconcile(cert_key) is None:
                    raise errors.ConfigError("no key in the token matches the certificate")
            key = pkcs11_key.token_key(settings)
            before = time.monotonic()
            session = mqtt.connect(endpoint, args.cert, key, args.client_id, args.timeout,
                                   build=pkcs11_key.build_connection)
        times["connect_s"] = time.monotonic() - before
        try:
            payload = json.dumps({"serialID": args.client_id, "bootStatus": True}).encode()
            session.publish(args.topic, payload, args.timeout)
        finally:
            session.close()
        times["total_s"] = time.monotonic() - started

    code = errors.run_main(body)
    if code == 0:
        print(json.dumps({k: round(v, 4) for k, v in times.items()}))
    return code


if __name__ == "__main__":
    sys.exit(main())
