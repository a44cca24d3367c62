"""The certificate request for a key pair held in a PKCS#11 token, signed in the token.

asn1crypto, not cryptography: a later boot never needs to load cryptography.
"""
from __future__ import annotations

import hashlib

from .keys import csr_common_name
from .pkcs11_token import KeyPair, load_pkcs11, token_errors


def make_csr(pair: KeyPair, serial_id: str) -> bytes:
    """A PEM CSR for ``pair`` (subject CN from ``csr_common_name``), signed in the token."""
    from asn1crypto import csr, keys, pem, x509
    p = load_pkcs11()
    info = csr.CertificationRequestInfo({
        "version": "v1",
        "subject": x509.Name.build({"common_name": csr_common_name(serial_id)}),
        "subject_pk_info": keys.PublicKeyInfo.load(pair.public_key_der()),
        "attributes": [],
    })
    body = info.dump()
    with token_errors("sign the certificate request in the token",
                       unsupported_hint="KEY_ALGORITHM: the token may not offer it"):
        if pair.private.key_type == p.KeyType.EC:
            from pkcs11.util.ec import encode_ecdsa_signature
            # Raw CKM_ECDSA over our own SHA-256 digest: tokens (SoftHSM, TPMs)
            # offer it more widely than CKM_ECDSA_SHA256.
            raw = pair.private.sign(hashlib.sha256(body).digest(),
                                    mechanism=p.Mechanism.ECDSA)
            signature, algorithm = encode_ecdsa_signature(raw), "sha256_ecdsa"
        else:
            signature = pair.private.sign(body, mechanism=p.Mechanism.SHA256_RSA_PKCS)
            algorithm = "sha256_rsa"
    request = csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": {"algorithm": algorithm},
        "signature": bytes(signature),
    })
    return pem.armor("CERTIFICATE REQUEST", request.dump())
