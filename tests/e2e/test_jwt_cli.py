"""``gateway keys``: the key it generates and the tokens it mints pass the jwt plugin's own
verification (in this process), and bad input gets a clear error."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from plugins.jwt import JwtPlugin
from plugins.jwt.config import JwtConfig
from tests.support.procs import run_cli
from tests.unit.test_jwt_plugin import bearer


def test_generated_key_and_minted_token_pass_the_plugin(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    gen = run_cli("keys", "generate", "--alg", "EdDSA", "--kid", "t1", "--out", str(key))
    assert gen.returncode == 0, gen.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    jwks = tmp_path / "jwks.json"
    jwks.write_text(gen.stdout)
    assert json.loads(gen.stdout)["keys"][0]["kid"] == "t1"
    mint = run_cli(
        "keys", "mint", "--key", str(key), "--kid", "t1", "--iss", "https://idp.test/",
        "--aud", "orders", "--sub", "alice", "--scope", "a b", "--claim", "tier=3",
        "--claim", "team=blue", "--ttl", "10m",
    )  # fmt: skip
    assert mint.returncode == 0, mint.stderr
    plugin = JwtPlugin(
        JwtConfig.model_validate(
            {
                "issuer": "https://idp.test/",
                "audience": "orders",
                "keys": [{"file": str(jwks)}],
                "scopes": {"all_of": ["a", "b"]},
                "claims": {"tier": {"equals": 3}, "team": {"in": ["blue"]}},
            }
        )
    )
    ex = bearer(mint.stdout.strip())
    assert plugin.on_request(ex) is None
    assert ex.user == "alice"
    claims = ex.var("jwt.claims")
    assert 500 < claims["exp"] - claims["iat"] <= 600


def test_bad_input_is_reported(tmp_path: Path) -> None:
    missing = run_cli("keys", "mint", "--key", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2 and "cannot load" in missing.stderr
    key = tmp_path / "k.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    bad = run_cli("keys", "mint", "--key", str(key), "--claim", "novalue")
    assert bad.returncode == 2 and "expected name=value" in bad.stderr
