"""``gateway keys``: make a signing key and mint test tokens for the ``jwt`` plugin.

    gateway keys generate --alg ES256 --kid test-1 --out signing.pem > jwks.json
    gateway keys mint --key signing.pem --kid test-1 --iss https://idp.test/ --aud orders \\
        --sub alice --ttl 1h --scope "orders:read" --claim tenant=t1

``generate`` writes the private key (PEM, mode 0600) and prints the public JWKS, ready for
``keys: [{file: jwks.json}]`` or a JWKS endpoint. ``mint`` prints one signed token. For tests
and development only: real tokens come from an identity provider.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.config.units import parse_duration

_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", *_CURVES, "EdDSA")


def _generate(alg: str) -> Any:
    if alg in _CURVES:
        return ec.generate_private_key(_CURVES[alg])
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    pub = private.public_key()
    algo: Any
    if isinstance(pub, rsa.RSAPublicKey):
        algo = RSAAlgorithm
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        algo = ECAlgorithm
    else:
        algo = OKPAlgorithm
    return {**algo.to_jwk(pub, as_dict=True), "kid": kid, "alg": alg, "use": "sig"}


def cmd_generate(args: argparse.Namespace) -> int:
    private = _generate(args.alg)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    out = Path(args.out)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    jwks = {"keys": [_public_jwk(private, args.kid, args.alg)]}
    print(orjson.dumps(jwks, option=orjson.OPT_INDENT_2).decode())
    print(f"private key written to {out}", file=sys.stderr)
    return 0


def _claim_value(text: str) -> Any:
    """``k=v``: v as JSON when it parses (numbers, true, lists), else as a string."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def cmd_mint(args: argparse.Namespace) -> int:
    try:
        key = serialization.load_pem_private_key(Path(args.key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        print(f"gateway keys mint: cannot load {args.key}: {exc}", file=sys.stderr)
        return 2
    alg = args.alg
    if alg is None:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            alg = {256: "ES256", 384: "ES384", 521: "ES512"}[key.curve.key_size]
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            alg = "EdDSA"
        else:
            alg = "RS256"
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "exp": now + int(parse_duration(args.ttl))}
    for name in ("iss", "sub"):
        if getattr(args, name):
            claims[name] = getattr(args, name)
    if args.aud:
        claims["aud"] = args.aud[0] if len(args.aud) == 1 else args.aud
    if args.scope:
        claims["scope"] = args.scope
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"gateway keys mint: --claim {item!r}: expected name=value", file=sys.stderr)
            return 2
        claims[name] = _claim_value(value)
    headers = {"kid": args.kid} if args.kid else None
    try:
        print(jwt.encode(claims, key, algorithm=alg, headers=headers))  # type: ignore[arg-type]
    except (jwt.InvalidKeyError, NotImplementedError, TypeError, ValueError) as exc:
        print(f"gateway keys mint: {alg}: {exc}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub: Any) -> None:
    """Register ``gateway keys`` on the CLI's subparsers."""
    keys = sub.add_parser("keys", help="make a signing key and mint test JWTs")
    verbs = keys.add_subparsers(dest="keys_command", required=True)
    gen = verbs.add_parser("generate", help="write a private key, print its public JWKS")
    gen.add_argument("--alg", choices=_ASYMMETRIC, default="ES256")
    gen.add_argument("--kid", default="test-key")
    gen.add_argument("--out", required=True, help="where to write the private key (PEM)")
    gen.set_defaults(func=cmd_generate)
    mint = verbs.add_parser("mint", help="print a signed JWT")
    mint.add_argument("--key", required=True, help="private key (PEM)")
    mint.add_argument("--alg", choices=_ASYMMETRIC, help="default: from the key type")
    mint.add_argument("--kid")
    mint.add_argument("--iss")
    mint.add_argument("--sub")
    mint.add_argument("--aud", action="append", default=[])
    mint.add_argument("--scope")
    mint.add_argument("--ttl", default="1h", help="lifetime (e.g. 10m, 1h)")
    mint.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE")
    mint.set_defaults(func=cmd_mint)
