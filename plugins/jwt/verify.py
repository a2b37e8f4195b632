"""Token verification, pure: no I/O, no clock of its own (``now`` is passed in).

Order of work, cheapest first, so that junk costs no signature check:
1. size and shape (three base64url segments, one regex match), then the header JSON;
2. header: ``alg`` in the issuer's allow-list (exact spelling: ``none``, ``None``, ``NONE``
   are never in it), no ``crit`` (no extension is understood, so any is refused, RFC 7515
   4.1.11); ``jku``, ``x5u``, ``jwk`` and ``x5c`` are ignored: keys come only from the config;
3. payload JSON, ``iss`` picks the issuer, time claims (expired tokens cost no signature);
4. the key: by ``kid`` from the issuer's key set, whose type must fit ``alg``;
5. the signature (pyjwt's algorithm objects over ``cryptography``);
6. the remaining claims: ``aud``, required claims, scopes, claim matchers.

Every function returns a result or a ``Reason`` (a rejection); exceptions are bugs.
"""

from __future__ import annotations

import binascii
import re
from base64 import urlsafe_b64decode
from collections.abc import Iterable
from typing import Any

import orjson

from plugins.jwt.keys import ALGORITHMS, Key, KeySet


class Reason:
    """Why a token was refused: the metric label, HTTP status, error code and description."""

    __slots__ = ("code", "description", "label", "status")

    def __init__(self, label: str, description: str, status: int = 401) -> None:
        self.label = label
        self.description = description
        self.status = status
        self.code = {401: "invalid_token", 403: "insufficient_scope", 503: "jwks_unavailable"}[
            status
        ]

    def __repr__(self) -> str:
        return f"<Reason {self.label}>"


MISSING = Reason("missing", "no access token")
TOO_LARGE = Reason("too_large", "the token is too large")
MALFORMED = Reason("malformed", "the token is not a well-formed JWS compact serialization")
BAD_HEADER = Reason("malformed", "the token header is not valid")
BAD_PAYLOAD = Reason("malformed", "the token payload is not a JSON object")
ALG = Reason("alg_not_allowed", "the token's algorithm is not allowed")
CRIT = Reason("crit_unsupported", "the token has critical header parameters")
ISSUER = Reason("wrong_issuer", "the token's issuer is not accepted")
UNKNOWN_KID = Reason("unknown_kid", "the token's signing key is not known")
KEY_MISMATCH = Reason("key_mismatch", "the signing key does not fit the token's algorithm")
SIGNATURE = Reason("bad_signature", "the token's signature is not valid")
EXPIRED = Reason("expired", "the token has expired")
NO_EXP = Reason("missing_claim", "the token has no exp claim")
NOT_YET = Reason("not_yet_valid", "the token is not valid yet")
IAT_FUTURE = Reason("iat_in_future", "the token was issued in the future")
BAD_CLAIM = Reason("malformed", "a registered claim has the wrong type")
AUDIENCE = Reason("wrong_audience", "the token is not meant for this audience")
REQUIRED = Reason("missing_claim", "the token lacks a required claim")
SCOPE = Reason("insufficient_scope", "the token lacks a required scope", 403)
CLAIM = Reason("claim_mismatch", "a claim of the token is not allowed here", 403)
KEYS_UNAVAILABLE = Reason("keys_unavailable", "the issuer's signing keys are unavailable", 503)

ALL_REASONS = (
    MISSING, TOO_LARGE, MALFORMED, BAD_HEADER, BAD_PAYLOAD, ALG, CRIT, ISSUER, UNKNOWN_KID,
    KEY_MISMATCH, SIGNATURE, EXPIRED, NO_EXP, NOT_YET, IAT_FUTURE, BAD_CLAIM, AUDIENCE,
    REQUIRED, SCOPE, CLAIM, KEYS_UNAVAILABLE,
)  # fmt: skip

# The whole compact serialization in one C-level match: three base64url segments, no padding
# (RFC 7515 2), the signature possibly empty (then rejected by the algorithm check).
_SHAPE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def b64url_decode(segment: bytes) -> bytes | None:
    """Decode an unpadded base64url segment whose alphabet was already checked."""
    try:
        return urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None


class Jws:
    """A compact JWS taken apart; the payload is still bytes."""

    __slots__ = ("alg", "header", "kid", "payload", "signature", "signing_input")

    def __init__(
        self,
        header: dict[str, Any],
        alg: str,
        kid: str | None,
        payload: bytes,
        signing_input: bytes,
        signature: bytes,
    ) -> None:
        self.header = header
        self.alg = alg
        self.kid = kid
        self.payload = payload
        self.signing_input = signing_input
        self.signature = signature


def parse_jws(token: bytes, max_size: int) -> Jws | Reason:
    """Steps 1-2 without the allow-list: shape, header JSON, ``alg``, ``kid``, ``crit``."""
    if len(token) > max_size:
        return TOO_LARGE
    if _SHAPE.fullmatch(token) is None:
        return MALFORMED
    h, p, s = token.split(b".")
    raw_header = b64url_decode(h)
    payload = b64url_decode(p)
    signature = b64url_decode(s)
    if raw_header is None or payload is None or signature is None:
        return MALFORMED
    try:
        header = orjson.loads(raw_header)
    except orjson.JSONDecodeError:
        return BAD_HEADER
    if type(header) is not dict:
        return BAD_HEADER
    alg = header.get("alg")
    kid = header.get("kid")
    if type(alg) is not str or (kid is not None and type(kid) is not str):
        return BAD_HEADER
    if "crit" in header:
        return CRIT
    return Jws(header, alg, kid, payload, token[: len(h) + 1 + len(p)], signature)


def verify_signature(jws: Jws, keys: KeySet, allowed: frozenset[str]) -> Key | Reason:
    """Steps 2 and 4-5: ``alg`` allowed, the key found and fit for it, the signature valid."""
    alg = jws.alg
    if alg not in allowed or alg not in ALGORITHMS:  # "none" is in no key's algs either
        return ALG
    key = keys.find(jws.kid, alg)
    if key is None:
        return UNKNOWN_KID
    if alg not in key.algs:
        return KEY_MISMATCH
    if not jws.signature or not key.verify(alg, jws.signing_input, jws.signature):
        return SIGNATURE
    return key


def parse_claims(jws: Jws) -> dict[str, Any] | Reason:
    try:
        claims = orjson.loads(jws.payload)
    except orjson.JSONDecodeError:
        return BAD_PAYLOAD
    if type(claims) is not dict:
        return BAD_PAYLOAD
    return claims


def _number(value: Any) -> bool:
    return (type(value) is int or type(value) is float) and value == value  # not NaN


class ClaimPolicy:
    """The claim checks of one plugin instance, compiled from its config."""

    __slots__ = ("all_scopes", "any_scopes", "leeway", "matchers", "require_exp", "required")

    def __init__(
        self,
        leeway: float = 0.0,
        require_exp: bool = True,
        required: Iterable[str] = (),
        any_scopes: Iterable[str] = (),
        all_scopes: Iterable[str] = (),
        matchers: Iterable[tuple[str, tuple[Any, ...]]] = (),
    ) -> None:
        self.leeway = leeway
        self.require_exp = require_exp
        self.required = tuple(required)
        self.any_scopes = frozenset(any_scopes)
        self.all_scopes = frozenset(all_scopes)
        self.matchers = tuple(matchers)

    def check_time(self, claims: dict[str, Any], now: float) -> Reason | None:
        """``exp`` (required unless configured otherwise), ``nbf``, ``iat``, with leeway."""
        leeway = self.leeway
        exp = claims.get("exp")
        if exp is None:
            if self.require_exp:
                return NO_EXP
        elif not _number(exp):
            return BAD_CLAIM
        elif now >= exp + leeway:
            return EXPIRED
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _number(nbf):
                return BAD_CLAIM
            if nbf > now + leeway:
                return NOT_YET
        iat = claims.get("iat")
        if iat is not None:
            if not _number(iat):
                return BAD_CLAIM
            if iat > now + leeway:
                return IAT_FUTURE
        return None

    def check_audience(self, claims: dict[str, Any], audiences: frozenset[str]) -> Reason | None:
        if not audiences:
            return None
        aud = claims.get("aud")
        if type(aud) is str:
            return None if aud in audiences else AUDIENCE
        if type(aud) is list and any(type(a) is str and a in audiences for a in aud):
            return None
        return AUDIENCE

    def check_rest(self, claims: dict[str, Any]) -> Reason | None:
        """Required claims, scopes and claim matchers (after the signature)."""
        for name in self.required:
            if name not in claims:
                return REQUIRED
        if self.any_scopes or self.all_scopes:
            scopes = token_scopes(claims)
            if self.any_scopes and self.any_scopes.isdisjoint(scopes):
                return SCOPE
            if not self.all_scopes <= scopes:
                return SCOPE
        for name, allowed in self.matchers:
            if not _matches(claims.get(name), allowed):
                return CLAIM
        return None


def token_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """``scope`` (space-delimited string, RFC 8693 4.2) and ``scp`` (a list, or a string)."""
    out: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if type(value) is str:
            out.update(value.split())
        elif type(value) is list:
            out.update(v for v in value if type(v) is str)
    return frozenset(out)


def _same(value: Any, expected: Any) -> bool:
    # type-exact: True must not match 1, nor "1" match 1
    return type(value) is type(expected) and value == expected


def _matches(value: Any, allowed: tuple[Any, ...]) -> bool:
    """A scalar claim must equal one allowed value; a list claim must contain one."""
    if value is None:
        return False
    if type(value) is list:
        return any(_same(v, a) for v in value for a in allowed)
    return any(_same(value, a) for a in allowed)
