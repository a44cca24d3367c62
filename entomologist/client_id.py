"""The claim connection's MQTT client ID: unguessable, new for every attempt.

A second connection with a client ID drops the first (AWS IoT, and MQTT in
general), and the claim pair is on every camera's card.  With a guessable ID
(the serial) anyone holding a claim pair could keep a camera from
provisioning, or drop it right after RegisterThing reached the service so the
answer is lost.  The serial stays in front so the service's logs still say
which camera asked.
"""
import secrets

MAX_LEN = 128          # AWS IoT's client ID limit
RANDOM_HEX = 16        # 64 bits


def claim_client_id(serial: str) -> str:
    """``<serial>-<16 hex>``, the serial cut so the whole fits in 128 characters."""
    tail = "-" + secrets.token_hex(RANDOM_HEX // 2)
    return serial[:MAX_LEN - len(tail)] + tail
