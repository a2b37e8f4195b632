"""The jwt plugin's pure parts: key parsing, token parsing, signature checks, claim checks,
and the published JWS vectors (RFC 7515 appendix A, RFC 7520 section 4, RFC 8037 A.4) with
their keys, as jwcrypto ships them, through the plugin's own verification path."""

from __future__ import annotations

import importlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto.common import base64url_encode

from plugins.jwt.keys import HMAC_ALGS, BadKey, KeySet, parse_jwk_dict, parse_jwks, parse_key_text
from plugins.jwt.verify import (
    ALG,
    BAD_CLAIM,
    BAD_HEADER,
    CLAIM,
    CRIT,
    EXPIRED,
    IAT_FUTURE,
    KEY_MISMATCH,
    MALFORMED,
    NO_EXP,
    NOT_YET,
    REQUIRED,
    SCOPE,
    SIGNATURE,
    TOO_LARGE,
    UNKNOWN_KID,
    ClaimPolicy,
    Jws,
    Reason,
    parse_jws,
    token_scopes,
    verify_signature,
)
from tests.support.jwks_server import ec_key, ed_key, mint, public_jwk, rsa_key

vectors = importlib.import_module("jwcrypto.tests")
cookbook = importlib.import_module("jwcrypto.tests-cookbook")

ALL_ALGS = frozenset({"RS256", "PS384", "ES256", "ES512", "EdDSA", "HS256", "RS512"})


def compact(protected: str | bytes, payload: bytes, signature: bytes) -> bytes:
    if isinstance(protected, str):
        protected = protected.encode()
    return ".".join(base64url_encode(x) for x in (protected, payload, signature)).encode()


def check(token: bytes | str, keys: KeySet, allowed: frozenset[str] = ALL_ALGS) -> Any:
    raw = token.encode() if isinstance(token, str) else token
    jws = parse_jws(raw, 16384)
    if isinstance(jws, Reason):
        return jws
    return verify_signature(jws, keys, allowed)


# -- published vectors -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["A1", "A2", "A3", "A4"])
def test_rfc7515_appendix_a_examples_verify(name: str) -> None:
    ex = getattr(vectors, f"{name}_example")
    key = parse_jwk_dict(ex["key"], allow_secret=True)
    token = compact(ex["protected"], ex["payload"], ex["signature"])
    assert check(token, KeySet([key])) is key
    # one flipped payload bit and the same signature fails
    tampered = compact(ex["protected"], ex["payload"][:-1] + b"X", ex["signature"])
    assert check(tampered, KeySet([key])) is SIGNATURE


def test_rfc7515_a5_unsecured_jws_is_refused() -> None:
    token = compact(vectors.A5_example["protected"], vectors.A5_example["payload"], b"")
    assert check(token, KeySet([])) is ALG


@pytest.mark.parametrize(
    ("compact_name", "key_name"),
    [
        ("JWS_compact_4_1_3", "RSA_Public_Key_3_3"),  # RS256
        ("JWS_compact_4_2_3", "RSA_Public_Key_3_3"),  # PS384
        ("JWS_compact_4_3_3", "EC_Public_Key_3_1"),  # ES512
        ("JWS_compact_4_4_3", "Symmetric_Key_MAC_3_5"),  # HS256
    ],
)
def test_rfc7520_section4_examples_verify(compact_name: str, key_name: str) -> None:
    token = getattr(cookbook, compact_name).encode()
    key = parse_jwk_dict(getattr(cookbook, key_name), allow_secret=True)
    assert check(token, KeySet([key])) is key
    h, p, s = token.split(b".")
    assert check(h + b"." + p + b"A." + s, KeySet([key])) in (SIGNATURE, MALFORMED)


def test_rfc8037_a4_ed25519_example_verifies() -> None:
    key = parse_jwk_dict(vectors.PublicKeys_EdDsa["keys"][0])
    token = (
        b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
        b"hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    )
    assert check(token, KeySet([key])) is key


def test_rfc7515_a2_claims_pass_at_their_own_time_and_expire_after() -> None:
    claims = json.loads(bytes(vectors.A2_example["payload"]))
    policy = ClaimPolicy()
    assert policy.check_time(claims, 1300819000) is None
    assert policy.check_time(claims, 1300819380) is EXPIRED


# -- keys ------------------------------------------------------------------------------------
def test_key_types_bind_their_algorithms() -> None:
    assert parse_jwk_dict(public_jwk(rsa_key(), "r")).algs == {
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"
    }  # fmt: skip
    assert parse_jwk_dict(public_jwk(ec_key(), "e")).algs == {"ES256"}
    assert parse_jwk_dict(vectors.A4_example["key"]).algs == {"ES512"}
    assert parse_jwk_dict(public_jwk(ed_key(), "o")).algs == {"EdDSA"}
    assert parse_jwk_dict(public_jwk(rsa_key(), "r", "PS256")).algs == {"PS256"}


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        (
            {"kty": "oct", "k": "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr8"},
            "only from the config",
        ),
        (public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "w"), "2048"),
        ({"kty": "XYZ"}, "unsupported kty"),
        ({**public_jwk(ec_key(), "e"), "alg": "RS256"}, "does not fit"),
        ({**public_jwk(ec_key(), "e"), "use": "enc"}, "not a signing key"),
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, "invalid EC JWK"),
    ],
)
def test_unusable_fetched_keys_are_refused(jwk: dict[str, Any], message: str) -> None:
    with pytest.raises(BadKey, match=message):
        parse_jwk_dict(jwk)


def test_jwks_skips_bad_keys_and_keeps_good_ones() -> None:
    good = public_jwk(ec_key(), "good")
    keys, problems = parse_jwks({"keys": [{"kty": "nope", "kid": "bad"}, good]})
    assert [k.kid for k in keys] == ["good"]
    assert len(problems) == 1 and "'bad'" in problems[0]
    assert parse_jwks({"nokeys": []}) == ([], ['not a JWKS document (no "keys" list)'])


def test_pem_public_private_and_certificate_keys() -> None:
    from cryptography.hazmat.primitives import serialization

    private = rsa_key()
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    priv_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    a = parse_key_text(pub_pem, "k", "pem")[0]
    b = parse_key_text(priv_pem, "k", "pem")[0]
    assert a.thumb == b.thumb and "RS256" in a.algs
    with pytest.raises(BadKey, match="expected a PEM"):
        parse_key_text(b"hello", None, "x.pem")
    with pytest.raises(BadKey, match="not a usable PEM"):
        parse_key_text(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", None, "p")


def test_a_token_without_kid_needs_exactly_one_fitting_key() -> None:
    one, two = parse_jwk_dict(public_jwk(ec_key(), "a")), parse_jwk_dict(public_jwk(ec_key(), "b"))
    assert KeySet([one]).find(None, "ES256") is one
    assert KeySet([one, two]).find(None, "ES256") is None
    assert KeySet([one]).find(None, "RS256") is None


# -- attacks at the verification layer -------------------------------------------------------
RSA = rsa_key()
RSA_KEYS = KeySet([parse_jwk_dict(public_jwk(RSA, "rsa1"))])


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> bytes:
    return compact(json.dumps(header), json.dumps(payload).encode(), signature)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_casing_is_refused(alg: str) -> None:
    token = forge({"alg": alg, "kid": "rsa1"}, {"sub": "x"})
    assert check(token, RSA_KEYS, frozenset(ALL_ALGS | {"none"})) is ALG
    assert check(token + b"c2ln", RSA_KEYS) is ALG


def test_rs256_to_hs256_confusion_with_the_public_key_as_secret() -> None:
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization

    pem = RSA.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = forge({"alg": "HS256", "kid": "rsa1"}, {"sub": "admin"}).rsplit(b".", 1)[0]
    sig = hmac.new(pem, unsigned, hashlib.sha256).digest()
    token = unsigned + b"." + base64url_encode(sig).encode()
    # HS256 allowed on the issuer, yet the RSA key is never usable as an HMAC secret
    assert check(token, RSA_KEYS, frozenset(ALL_ALGS | HMAC_ALGS)) is KEY_MISMATCH


@pytest.mark.parametrize("alg", ["ES256", "ES512"])
def test_ecdsa_zero_signatures_are_refused(alg: str) -> None:
    """The "psychic signature" class (CVE-2022-21449): r = s = 0 must never verify."""
    key = ec_key() if alg == "ES256" else ec_key(ec.SECP521R1())
    keys = KeySet([parse_jwk_dict(public_jwk(key, "ec1"))])
    size = 64 if alg == "ES256" else 132
    for sig in (bytes(size), bytes(size // 2) + b"\x01" * (size // 2), b"\x00"):
        token = forge({"alg": alg, "kid": "ec1"}, {"sub": "x"}, sig)
        assert check(token, keys) is SIGNATURE


def test_signed_by_an_unknown_key_with_a_known_kid() -> None:
    token = mint(rsa_key("attacker"), "RS256", kid="rsa1", sub="x")
    assert check(token, RSA_KEYS) is SIGNATURE
    assert check(mint(RSA, "RS256", kid="rsa1", sub="x"), RSA_KEYS) is not SIGNATURE


def test_unknown_kid_and_key_header_injection() -> None:
    assert check(mint(RSA, "RS256", kid="other"), RSA_KEYS) is UNKNOWN_KID
    # a jwk/jku/x5u/x5c header carrying the attacker's key changes nothing
    attacker = rsa_key("attacker")
    hdrs = {"jwk": public_jwk(attacker, "rsa1"), "jku": "http://127.0.0.1:1/", "x5u": "x"}
    assert check(mint(attacker, "RS256", kid="rsa1", headers=hdrs), RSA_KEYS) is SIGNATURE


def test_tampered_payload_is_refused() -> None:
    h, _, s = mint(RSA, "RS256", kid="rsa1", sub="alice").encode().split(b".")
    evil = base64url_encode(json.dumps({"sub": "admin", "exp": 9999999999}).encode()).encode()
    assert check(b".".join((h, evil, s)), RSA_KEYS) is SIGNATURE


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (b"", MALFORMED),
        (b"abc", MALFORMED),
        (b"a.b", MALFORMED),
        (b"a.b.c.d", MALFORMED),
        (b"e30=.e30.", MALFORMED),  # padding is not base64url
        (b"e3+/.e30.", MALFORMED),  # base64, not base64url
        (b"a.e30.", MALFORMED),  # a single base64 character cannot be decoded
        (b"bm90IGpzb24.e30.", BAD_HEADER),  # "not json"
        (b"WzFd.e30.", BAD_HEADER),  # [1]
        (b"eyJhbGciOjF9.e30.", BAD_HEADER),  # alg is a number
        (b"\xff\xfe.e30.", MALFORMED),
        (b"A" * 20000, TOO_LARGE),
    ],
)
def test_garbage_is_refused_before_any_signature_work(token: bytes, reason: Reason) -> None:
    assert parse_jws(token, 16384) is reason


def test_unknown_crit_is_refused() -> None:
    token = mint(RSA, "RS256", kid="rsa1", headers={"crit": ["exp"], "exp": 1})
    assert parse_jws(token.encode(), 16384) is CRIT


def test_a_100kb_token_is_refused_on_its_size() -> None:
    token = mint(RSA, "RS256", kid="rsa1", pad="x" * 100_000)
    assert parse_jws(token.encode(), 8192) is TOO_LARGE


# -- claims ----------------------------------------------------------------------------------
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": NOW + 10}, None),
        ({}, NO_EXP),
        ({"exp": NOW - 31}, EXPIRED),
        ({"exp": NOW - 29}, None),  # within the 30 s leeway
        ({"exp": "soon"}, BAD_CLAIM),
        ({"exp": True}, BAD_CLAIM),
        ({"exp": NOW + 10, "nbf": NOW + 31}, NOT_YET),
        ({"exp": NOW + 10, "nbf": NOW + 29}, None),
        ({"exp": NOW + 10, "iat": NOW + 60}, IAT_FUTURE),
        ({"exp": NOW + 10, "iat": "x"}, BAD_CLAIM),
    ],
)
def test_time_claims_with_leeway(claims: dict[str, Any], reason: Reason | None) -> None:
    assert ClaimPolicy(leeway=30).check_time(claims, NOW) is reason


def test_exp_can_be_made_optional() -> None:
    assert ClaimPolicy(require_exp=False).check_time({}, NOW) is None


def test_audience_string_or_list() -> None:
    p, aud = ClaimPolicy(), frozenset({"orders", "billing"})
    assert p.check_audience({"aud": "orders"}, aud) is None
    assert p.check_audience({"aud": ["x", "billing"]}, aud) is None
    assert p.check_audience({"aud": ["x"]}, aud) is not None
    assert p.check_audience({"aud": "ORDERS"}, aud) is not None
    assert p.check_audience({}, aud) is not None
    assert p.check_audience({}, frozenset()) is None


def test_scopes_any_of_all_of_from_scope_or_scp() -> None:
    assert token_scopes({"scope": "a  b", "scp": ["c", 1]}) == {"a", "b", "c"}
    any_p = ClaimPolicy(any_scopes=["a", "z"])
    all_p = ClaimPolicy(all_scopes=["a", "b"])
    assert any_p.check_rest({"scope": "z"}) is None
    assert any_p.check_rest({"scope": "q"}) is SCOPE
    assert all_p.check_rest({"scp": ["a", "b", "c"]}) is None
    assert all_p.check_rest({"scp": ["a"]}) is SCOPE
    assert all_p.check_rest({}) is SCOPE


def test_required_claims_and_matchers() -> None:
    p = ClaimPolicy(required=["sub"], matchers=[("role", ("admin",)), ("n", (1, 2))])
    assert p.check_rest({"sub": "a", "role": "admin", "n": 2}) is None
    assert p.check_rest({"role": "admin", "n": 2}) is REQUIRED
    assert p.check_rest({"sub": "a", "role": "user", "n": 2}) is CLAIM
    assert p.check_rest({"sub": "a", "role": ["user", "admin"], "n": 1}) is None
    assert p.check_rest({"sub": "a", "role": "admin", "n": True}) is CLAIM  # True is not 1
    assert p.check_rest({"sub": "a", "role": "admin"}) is CLAIM


def test_parse_jws_exposes_the_signing_input() -> None:
    token = mint(RSA, "RS256", kid="rsa1", sub="x").encode()
    jws = parse_jws(token, 8192)
    assert isinstance(jws, Jws)
    assert jws.signing_input == token.rsplit(b".", 1)[0]
    assert jws.alg == "RS256" and jws.kid == "rsa1"


def test_every_reason_is_listed_once() -> None:
    import plugins.jwt.verify as v

    defined = {id(x) for x in vars(v).values() if isinstance(x, Reason)}
    assert defined == {id(r) for r in v.ALL_REASONS}
    assert len(v.ALL_REASONS) == len(defined)
