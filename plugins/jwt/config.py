"""The ``jwt`` plugin's configuration: validated (keys parsed, algorithms checked) at load.

A single issuer can be written inline (``issuer``, ``audience``, ``jwks_url`` ... at the top, as
in DESIGN.md's sketch) or several under ``issuers``; ``JwtConfig.issuer_list()`` gives the same
list of ``IssuerConfig`` either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.config.units import Duration, Size
from gateway.http.headers import HOP_BY_HOP, is_token
from gateway.plugin import PluginConfig
from plugins.jwt.keys import ALGORITHMS, HMAC_ALGS, BadKey, parse_jwk_dict, parse_key_text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeySpec(_Strict):
    """One static key: exactly one of ``pem``, ``jwk``, ``file`` (PEM or JWK) or ``secret``."""

    kid: str | None = None
    pem: str | None = None
    jwk: dict[str, Any] | None = None
    file: str | None = None
    secret: str | None = None

    @model_validator(mode="after")
    def _check(self) -> KeySpec:
        given = [k for k in ("pem", "jwk", "file", "secret") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of pem, jwk, file, secret")
        try:
            self.load()
        except BadKey as exc:
            raise ValueError(str(exc)) from None
        return self

    def load(self) -> list[Any]:
        """The parsed keys (``plugins.jwt.keys.Key``); raises ``BadKey``."""
        from plugins.jwt.keys import Key

        if self.secret is not None:
            return [Key.hmac(self.secret.encode(), self.kid)]
        if self.jwk is not None:
            return [parse_jwk_dict(self.jwk, self.kid, allow_secret=True)]
        if self.pem is not None:
            return parse_key_text(self.pem.encode(), self.kid, "pem")
        assert self.file is not None
        try:
            data = Path(self.file).read_bytes()
        except OSError as exc:
            raise BadKey(f"cannot read {self.file}: {exc.strerror or exc}") from None
        return parse_key_text(data, self.kid, self.file)


class JwksSettings(_Strict):
    """How a remote key set is fetched and refreshed."""

    refresh: Duration = 600.0  # when the response has no Cache-Control max-age
    min_refresh: Duration = 60.0  # max-age is clamped to [min_refresh, max_refresh]
    max_refresh: Duration = 86400.0
    retry: Duration = 10.0  # after a failed fetch, try again this soon (the old keys still serve)
    timeout: Duration = 5.0  # one fetch, connect to last byte
    startup_timeout: Duration = 10.0  # how long start() waits for the first key set
    unknown_kid_throttle: Duration = 30.0  # at most one unknown-kid refetch per this window
    unknown_kid_wait: Duration = 2.0  # how long a request waits for that refetch
    max_body: Size = 1024 * 1024

    @model_validator(mode="after")
    def _check(self) -> JwksSettings:
        if self.min_refresh > self.max_refresh:
            raise ValueError("min_refresh must not exceed max_refresh")
        return self


_HMAC_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
ASYMMETRIC = [a for a in ALGORITHMS if a not in HMAC_ALGS]


class IssuerConfig(_Strict):
    issuer: str = Field(min_length=1)
    audience: str | list[str] | None = None
    algorithms: list[str] = Field(default_factory=lambda: list(ASYMMETRIC), min_length=1)
    keys: list[KeySpec] = []
    jwks_url: str | None = None
    discovery: bool = False  # <issuer>/.well-known/openid-configuration -> jwks_uri
    jwks: JwksSettings = JwksSettings()

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: list[str]) -> list[str]:
        for alg in v:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted")
            if alg not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r} (known: {', '.join(ALGORITHMS)})")
        return v

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _check(self) -> IssuerConfig:
        sources = sum((bool(self.keys), self.jwks_url is not None, self.discovery))
        if sources != 1:
            raise ValueError("give exactly one key source: keys, jwks_url or discovery: true")
        if self.discovery and not self.issuer.startswith(("http://", "https://")):
            raise ValueError("discovery needs an http:// or https:// issuer")
        hmac = [a for a in self.algorithms if a in HMAC_ALGS]
        secret_algs = {a for spec in self.keys for k in spec.load() for a in k.algs} & HMAC_ALGS
        for alg in hmac:
            if secret_algs and alg not in secret_algs:
                raise ValueError(f"{alg} needs a secret of {_HMAC_BYTES[alg]} bytes or more")
        secrets = [k for k in self.keys if k.secret is not None or _is_oct(k)]
        if hmac and not secrets:
            raise ValueError(f"{', '.join(hmac)} listed but no secret key is configured")
        if secrets and not hmac:
            raise ValueError("a secret key is configured but no HS256/384/512 in algorithms")
        return self

    def audiences(self) -> tuple[str, ...]:
        if self.audience is None:
            return ()
        return (self.audience,) if isinstance(self.audience, str) else tuple(self.audience)


def _is_oct(spec: KeySpec) -> bool:
    return spec.jwk is not None and spec.jwk.get("kty") == "oct"


class TokenSource(_Strict):
    """Where the token is read from. Default: ``Authorization: Bearer <token>``."""

    kind: Literal["bearer", "header", "cookie", "query"] = Field(default="bearer", alias="from")
    name: str | None = None  # header, cookie or query parameter name

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> TokenSource:
        if self.kind == "bearer":
            if self.name is not None:
                raise ValueError("'name' is for from: header, cookie or query")
        elif not self.name:
            raise ValueError(f"from: {self.kind} needs a name")
        elif self.kind == "header" and not is_token(self.name.encode("latin-1", "replace")):
            raise ValueError(f"{self.name!r} is not a valid header name")
        return self


class ScopeRule(_Strict):
    any_of: list[str] = []
    all_of: list[str] = []


class ClaimMatch(_Strict):
    equals: str | int | bool | None = None
    is_in: list[str | int | bool] | None = Field(default=None, alias="in")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> ClaimMatch:
        if (self.equals is None) == (self.is_in is None):
            raise ValueError("give exactly one of equals, in")
        return self


class CacheSettings(_Strict):
    max_entries: int = Field(default=10_000, ge=0)  # 0 disables the verified-token cache


#: Names the gateway manages or that carry framing: a claim cannot be forwarded in them.
_MANAGED = HOP_BY_HOP | {b"content-length", b"host"}


class JwtConfig(PluginConfig):
    # one issuer, written inline ...
    issuer: str | None = None
    audience: str | list[str] | None = None
    algorithms: list[str] | None = None
    keys: list[KeySpec] | None = None
    jwks_url: str | None = None
    discovery: bool | None = None
    jwks: JwksSettings | None = None
    # ... or several
    issuers: list[IssuerConfig] = []

    token: TokenSource = Field(default_factory=lambda: TokenSource.model_validate({}))
    max_token_size: Size = 8192
    leeway: float = Field(30.0, ge=0)  # seconds of clock skew allowed for exp, nbf, iat
    require_exp: bool = True
    required_claims: list[str] = []
    scopes: ScopeRule = ScopeRule()
    claims: dict[str, ClaimMatch] = {}
    forward_claims: dict[str, str] = {}  # claim -> upstream header
    forward_token: bool = True  # false: the token's header/cookie/parameter is not forwarded
    allow_anonymous: bool = False  # no token: pass without identity (a bad token still fails)
    skip_preflight: bool = True  # CORS preflights (OPTIONS + Origin + A-C-Request-Method) pass
    cache: CacheSettings = CacheSettings()

    @field_validator("forward_claims")
    @classmethod
    def _forward(cls, v: dict[str, str]) -> dict[str, str]:
        for claim, header in v.items():
            raw = header.encode("latin-1", "replace")
            if not is_token(raw):
                raise ValueError(f"claim {claim!r}: {header!r} is not a valid header name")
            if raw.lower() in _MANAGED:
                raise ValueError(f"claim {claim!r}: {header!r} is managed by the gateway")
        return v

    @model_validator(mode="after")
    def _check(self) -> JwtConfig:
        inline = {
            k: getattr(self, k)
            for k in ("issuer", "audience", "algorithms", "keys", "jwks_url", "discovery", "jwks")
            if getattr(self, k) is not None
        }
        if inline and self.issuers:
            raise ValueError(
                f"use either the inline issuer keys ({', '.join(inline)}) or issuers, not both"
            )
        if not inline and not self.issuers:
            raise ValueError("issuer required (or a list of issuers)")
        if inline:
            if "issuer" not in inline:
                raise ValueError("issuer: required")
            try:
                IssuerConfig.model_validate(inline)
            except ValidationError as exc:  # name the inline keys, as the user wrote them
                raise ValueError("; ".join(_describe(e) for e in exc.errors())) from None
        seen = set()
        for entry in self.issuers:
            if entry.issuer in seen:
                raise ValueError(f"issuer {entry.issuer!r} listed twice")
            seen.add(entry.issuer)
        return self

    def issuer_list(self) -> list[IssuerConfig]:
        if self.issuers:
            return list(self.issuers)
        inline = {
            k: getattr(self, k)
            for k in ("issuer", "audience", "algorithms", "keys", "jwks_url", "discovery", "jwks")
            if getattr(self, k) is not None
        }
        return [IssuerConfig.model_validate(inline)]


def _describe(error: Any) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
