"""Keys and tokens for the JWT benchmark scenarios: fixed, published test keys, so that every
process (harness, Locust workers, the gateway's config) agrees without sharing files.

* RS256: the RSA-2048 key of RFC 7515 appendix A.2 (published, for examples only);
* ES256: a P-256 key derived from a fixed scalar.

Tokens expire in 2100 and carry the issuer and audience the bench routes check. RSA PKCS#1
v1.5 signatures are deterministic; ECDSA ones are not, so each process mints its own valid
ES256 token (each is verified once, then cached, where the cache is on).
"""

from __future__ import annotations

from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://bench.example/"
AUDIENCE = "bench"
EXPIRES = 4102444800  # 2100-01-01

# RFC 7515 A.2 (https://www.rfc-editor.org/rfc/rfc7515#appendix-A.2)
RFC7515_A2_KEY = {
    "kty": "RSA",
    "n": "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP"
    "1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSH"
    "SXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I"
    "5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
    "e": "AQAB",
    "d": "Eq5xpGnNCivDflJsRQBXHx1hdR1k6Ulwe2JZD50LpXyWPEAeP88vLNO97IjlA7_GQ5sLKMgvfTeXZx9SE-7Yw"
    "Vol2NXOoAJe46sui395IW_GO-pWJ1O0BkTGoVEn2bKVRUCgu-GjBVaYLU6f3l9kJfFNS3E0QbVdxzubSu3Mkqzjkn"
    "439X0M_V51gfpRLI9JYanrC4D4qAdGcopV_0ZHHzQlBjudU2QvXt4ehNYTCBr6XCLQUShb1juUO1ZdiYoFaFQT5Tw"
    "8bGUl_x_jTj3ccPDVZFD9pIuhLhBOneufuBiB4cS98l2SR_RQyGWSeWjnczT0QU91p1DhOVRuOopznQ",
    "p": "4BzEEOtIpmVdVEZNCqS7baC4crd0pqnRH_5IB3jw3bcxGn6QLvnEtfdUdiYrqBdss1l58BQ3KhooKeQTa9AB0"
    "Hw_Py5PJdTJNPY8cQn7ouZ2KKDcmnPGBY5t7yLc1QlQ5xHdwW1VhvKn-nXqhJTBgIPgtldC-KDV5z-y2XDwGUc",
    "q": "uQPEfgmVtjL0Uyyx88GZFF1fOunH3-7cepKmtH4pxhtCoHqpWmT8YAmZxaewHgHAjLYsp1ZSe7zFYHj7C6ul7"
    "TjeLQeZD_YwD66t62wDmpe_HlB-TnBA-njbglfIsRLtXlnDzQkv5dTltRJ11BKBBypeeF6689rjcJIDEz9RWdc",
    "dp": "BwKfV3Akq5_MFZDFZCnW-wzl-CCo83WoZvnLQwCTeDv8uzluRSnm71I3QCLdhrqE2e9YkxvuxdBfpT_PI7Yz"
    "-FOKnu1R6HsJeDCjn12Sk3vmAktV2zb34MCdy7cpdTh_YVr7tss2u6vneTwrA86rZtu5Mbr1C1XsmvkxHQAdYo0",
    "dq": "h_96-mK1R_7glhsum81dZxjTnYynPbZpHziZjeeHcXYsXaaMwkOlODsWa7I9xXDoRwbKgB719rrmI2oKr6N3"
    "Do9U0ajaHF-NKJnwgjMd2w9cjz3_-kyNlxAr2v4IKhGNpmM5iIgOS1VZnOZ68m6_pbLBSp3nssTdlqvd0tIiTHU",
    "qi": "IYd7DHOhrWvxkwPQsRM2tOgrjbcrfvtQJipd-DlcxyVuuM9sQLdgjVk2oy26F0EmpScGLq2MowX7fhd_QJQ3"
    "ydy5cY7YIBi87w93IKLEdfnbJtoOPLUW0ITrJReOgo1cq9SbsxYawBgfp_gh6A5603k2-ZQwVK0JKSHuLFkuQ3U",
}
_PUBLIC_MEMBERS = ("kty", "n", "e")

RSA_PRIVATE: Any = RSAAlgorithm.from_jwk(RFC7515_A2_KEY)
EC_PRIVATE = ec.derive_private_key(0x5EED_0F_BE_4C_4_0A_2D_5E_ED, ec.SECP256R1())

RSA_JWK: dict[str, Any] = {
    **{k: RFC7515_A2_KEY[k] for k in _PUBLIC_MEMBERS},
    "kid": "bench-rs",
    "alg": "RS256",
}
EC_JWK: dict[str, Any] = {
    **ECAlgorithm.to_jwk(EC_PRIVATE.public_key(), as_dict=True),
    "kid": "bench-es",
    "alg": "ES256",
}
CLAIMS = {
    "iss": ISSUER,
    "aud": AUDIENCE,
    "sub": "bench-user",
    "scope": "bench:read",
    "iat": 1700000000,
    "exp": EXPIRES,
}


def token(alg: str) -> str:
    """A valid token for the bench routes, signed with RS256 or ES256."""
    if alg == "RS256":
        return jwt.encode(CLAIMS, RSA_PRIVATE, algorithm="RS256", headers={"kid": "bench-rs"})
    return jwt.encode(CLAIMS, EC_PRIVATE, algorithm="ES256", headers={"kid": "bench-es"})


def plugin_config(cache: bool) -> dict[str, Any]:
    """The bench routes' ``jwt`` plugin entry (static keys: no JWKS endpoint to run)."""
    return {
        "jwt": {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "algorithms": ["RS256", "ES256"],
            "keys": [{"jwk": RSA_JWK}, {"jwk": EC_JWK}],
            "forward_claims": {"sub": "x-user-id"},
            "cache": {"max_entries": 10_000 if cache else 0},
        }
    }
