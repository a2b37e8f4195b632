"""Verification keys: parsed once (PEM, JWK, JWKS), each bound to the algorithms it may verify.

A key's algorithms follow from its type, never from the token: an RSA key verifies RS*/PS*
only, an EC key the one ES* of its curve, an Ed25519/Ed448 key EdDSA, and only a configured
secret verifies HS*. So a token cannot make the gateway use an RSA public key as an HMAC secret
(the classic RS256 -> HS256 confusion): HS* is looked up only among secrets. A JWK's own
``alg`` narrows the set further; a JWK with ``use: enc`` is not a signing key and is skipped.
Private keys are accepted (their public half is kept). RSA keys under 2048 bits are refused.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)
from cryptography.x509 import load_pem_x509_certificate
from jwt.algorithms import (
    Algorithm,
    ECAlgorithm,
    HMACAlgorithm,
    OKPAlgorithm,
    RSAAlgorithm,
    get_default_algorithms,
)
from jwt.exceptions import InvalidKeyError

log = logging.getLogger("gateway.plugins.jwt")

_PYJWT = get_default_algorithms()

#: alg -> pyjwt's verifier. ``none`` is deliberately absent: it can never be looked up.
ALGORITHMS: dict[str, Algorithm] = {
    alg: _PYJWT[alg]
    for alg in (
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
        "HS256",
        "HS384",
        "HS512",
    )
}
HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALG_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_MIN_RSA_BITS = 2048
_HMAC_MIN = {"HS256": 32, "HS384": 48, "HS512": 64}


class BadKey(ValueError):
    """A key that cannot be used: bad encoding, unsupported type, too weak."""


class Key:
    """One verification key: the cryptography object (or secret bytes) and its algorithms."""

    __slots__ = ("algs", "kid", "obj", "thumb")

    def __init__(self, obj: Any, algs: frozenset[str], kid: str | None) -> None:
        self.obj = obj
        self.algs = algs
        self.kid = kid
        #: Identity for comparisons across fetches (same key material = same key).
        self.thumb = _fingerprint(obj)

    @classmethod
    def hmac(cls, secret: bytes, kid: str | None, jwk_alg: str | None = None) -> Key:
        """A secret verifies the HS* whose hash is no longer than it (RFC 7518 3.2)."""
        algs = frozenset(a for a, size in _HMAC_MIN.items() if len(secret) >= size)
        if not algs:
            raise BadKey("an HMAC secret must be at least 32 bytes (RFC 7518 3.2)")
        if jwk_alg is not None:
            if jwk_alg not in algs:
                raise BadKey(f"{jwk_alg} needs a secret of at least {_HMAC_MIN.get(jwk_alg)} bytes")
            algs = frozenset({jwk_alg})
        return cls(secret, algs, kid)

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        """True when ``signature`` is valid for ``alg``; the caller checked ``alg in algs``."""
        return ALGORITHMS[alg].verify(signing_input, self.obj, signature)

    def __repr__(self) -> str:
        return f"<Key kid={self.kid!r} {sorted(self.algs)}>"


def _fingerprint(obj: Any) -> bytes:
    if isinstance(obj, bytes):
        return b"oct:" + obj
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return bytes(obj.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def _algs_for(obj: Any) -> frozenset[str]:
    if isinstance(obj, rsa.RSAPublicKey):
        if obj.key_size < _MIN_RSA_BITS:
            raise BadKey(f"RSA key of {obj.key_size} bits: at least {_MIN_RSA_BITS} required")
        return _RSA_ALGS
    if isinstance(obj, ec.EllipticCurvePublicKey):
        alg = _EC_ALG_BY_CURVE.get(obj.curve.name)
        if alg is None:
            raise BadKey(f"unsupported EC curve {obj.curve.name}")
        return frozenset({alg})
    if isinstance(obj, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    raise BadKey(f"unsupported key type {type(obj).__name__}")


def _public(obj: Any) -> Any:
    if isinstance(
        obj,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        return obj.public_key()
    return obj


def make_key(obj: Any, kid: str | None, jwk_alg: str | None = None) -> Key:
    """A ``Key`` for a cryptography key object; ``jwk_alg`` (a JWK's ``alg``) narrows it."""
    obj = _public(obj)
    algs = _algs_for(obj)
    if jwk_alg is not None:
        if jwk_alg not in algs:
            raise BadKey(f"the key's alg {jwk_alg!r} does not fit its key type")
        algs = frozenset({jwk_alg})
    return Key(obj, algs, kid)


def parse_jwk_dict(jwk: dict[str, Any], kid: str | None = None, allow_secret: bool = False) -> Key:
    """One JWK. Symmetric (``oct``) keys only when ``allow_secret`` (configured, not fetched)."""
    if not isinstance(jwk, dict):
        raise BadKey("a JWK must be a JSON object")
    kty = jwk.get("kty")
    kid = kid if kid is not None else jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise BadKey("kid must be a string")
    jwk_alg = jwk.get("alg")
    if jwk_alg is not None and jwk_alg not in ALGORITHMS:
        raise BadKey(f"unsupported alg {jwk_alg!r}")
    if jwk.get("use", "sig") != "sig":
        raise BadKey(f"use {jwk.get('use')!r}: not a signing key")
    try:
        if kty == "oct":
            if not allow_secret:
                raise BadKey("symmetric (oct) keys are accepted only from the config")
            if jwk_alg is not None and jwk_alg not in HMAC_ALGS:
                raise BadKey(f"the key's alg {jwk_alg!r} does not fit its key type")
            return Key.hmac(HMACAlgorithm.from_jwk(jwk), kid, jwk_alg)
        if kty == "RSA":
            obj: Any = RSAAlgorithm.from_jwk(jwk)
        elif kty == "EC":
            obj = ECAlgorithm.from_jwk(jwk)
        elif kty == "OKP":
            obj = OKPAlgorithm.from_jwk(jwk)
        else:
            raise BadKey(f"unsupported kty {kty!r}")
    except (InvalidKeyError, ValueError, TypeError) as exc:
        if isinstance(exc, BadKey):
            raise
        raise BadKey(f"invalid {kty} JWK: {exc}") from None
    return make_key(obj, kid, jwk_alg)


def parse_key_text(data: bytes, kid: str | None, what: str) -> list[Key]:
    """A PEM (public key, private key or certificate), a JWK or a JWKS document."""
    text = data.strip()
    if text.startswith(b"{"):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise BadKey(f"{what}: invalid JSON: {exc}") from None
        if isinstance(doc, dict) and "keys" in doc:
            keys, problems = parse_jwks(doc, allow_secret=True)
            if problems and not keys:
                raise BadKey(f"{what}: " + "; ".join(problems))
            return keys
        return [parse_jwk_dict(doc, kid, allow_secret=True)]
    if b"-----BEGIN" not in text:
        raise BadKey(f"{what}: expected a PEM key or certificate, a JWK or a JWKS")
    try:
        if b"-----BEGIN CERTIFICATE-----" in text:
            obj: Any = load_pem_x509_certificate(text).public_key()
        elif b"PRIVATE KEY-----" in text:
            obj = load_pem_private_key(text, password=None)
        else:
            obj = load_pem_public_key(text)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"{what}: not a usable PEM key: {exc}") from None
    return [make_key(obj, kid)]


def parse_jwks(doc: Any, allow_secret: bool = False) -> tuple[list[Key], list[str]]:
    """The usable keys of a JWKS document, and why the others were skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return [], ['not a JWKS document (no "keys" list)']
    keys: list[Key] = []
    problems: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        try:
            keys.append(parse_jwk_dict(jwk, allow_secret=allow_secret))
        except BadKey as exc:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            problems.append(f"key {i} (kid {kid!r}): {exc}")
    return keys, problems


class KeySet:
    """An issuer's current keys: by ``kid``, and the ones usable without a ``kid``."""

    __slots__ = ("by_kid", "keys", "without_kid")

    def __init__(self, keys: list[Key]) -> None:
        self.keys = tuple(keys)
        self.by_kid: dict[str, Key] = {}
        for key in keys:
            if key.kid is not None:
                self.by_kid.setdefault(key.kid, key)  # a duplicate kid: the first one wins
        self.without_kid = tuple(keys)

    def find(self, kid: str | None, alg: str) -> Key | None:
        """The key for ``kid``; a token without ``kid`` needs exactly one key fit for ``alg``
        (trying several would multiply the signature work a forged token costs)."""
        if kid is not None:
            return self.by_kid.get(kid)
        fit = [k for k in self.without_kid if alg in k.algs]
        return fit[0] if len(fit) == 1 else None

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"<KeySet {list(self.by_kid) or len(self.keys)}>"
