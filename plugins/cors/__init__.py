"""``cors``: Cross-Origin Resource Sharing at the edge.

Preflight requests (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) are
answered by the gateway (204) and never reach the upstream; a preflight from an origin,
method or header that is not allowed gets a 403 JSON error. Actual requests pass through,
and their responses get ``Access-Control-Allow-Origin`` (plus credentials and exposed
headers) when the origin is allowed, and ``Vary: Origin`` whenever the answer depends on it.

```yaml
- cors:
    allow_origins: ["https://app.example.com"]   # or ["*"]
    allow_methods: [GET, POST]
    allow_headers: [authorization, content-type] # empty: echo what the browser asks for
    expose_headers: [x-request-id]
    allow_credentials: true
    max_age: 10m
```
"""

from __future__ import annotations

from pydantic import Field, model_validator

from gateway.config.units import Duration
from gateway.plugin import Plugin, PluginConfig, Reply
from gateway.proxy.exchange import Exchange

_DEFAULT_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


class CorsConfig(PluginConfig):
    allow_origins: list[str] = Field(min_length=1)
    allow_methods: list[str] = _DEFAULT_METHODS
    allow_headers: list[str] = []
    expose_headers: list[str] = []
    allow_credentials: bool = False
    max_age: Duration = 600.0

    @model_validator(mode="after")
    def _check(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError(
                "allow_credentials cannot be combined with '*' in allow_origins: "
                "list the trusted origins"
            )
        for origin in self.allow_origins:
            if origin != "*" and ("://" not in origin or origin.endswith("/")):
                raise ValueError(f"origin {origin!r}: expected scheme://host[:port] or '*'")
        return self


class CorsPlugin(Plugin):
    name = "cors"
    Config = CorsConfig

    def __init__(self, config: PluginConfig) -> None:
        assert isinstance(config, CorsConfig)
        super().__init__(config)
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(o.lower().encode() for o in config.allow_origins if o != "*")
        self.methods = frozenset(m.upper().encode() for m in config.allow_methods)
        self.methods_value = ", ".join(m.upper() for m in config.allow_methods).encode()
        self.headers = frozenset(h.lower().encode() for h in config.allow_headers)
        self.headers_value = ", ".join(config.allow_headers).encode()
        self.expose_value = ", ".join(config.expose_headers).encode()
        self.credentials = config.allow_credentials
        self.max_age = str(int(config.max_age)).encode()

    def _allowed(self, origin: bytes) -> bool:
        return self.any_origin or origin.lower() in self.origins

    def _origin_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        if self.any_origin and not self.credentials:
            return [(b"access-control-allow-origin", b"*")]
        out = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out

    def on_request(self, ex: Exchange) -> Reply | None:
        if ex.method != b"OPTIONS":
            return None
        headers = ex.headers
        origin = headers.get(b"origin")
        wanted = headers.get(b"access-control-request-method")
        if origin is None or wanted is None:
            return None  # not a preflight: a plain OPTIONS goes upstream
        if not self._allowed(origin):
            return Reply.error("forbidden", "CORS preflight: origin not allowed")
        if wanted.strip().upper() not in self.methods:
            return Reply.error("forbidden", "CORS preflight: method not allowed")
        asked = headers.get(b"access-control-request-headers") or b""
        asked_names = [h.strip().lower() for h in asked.split(b",") if h.strip()]
        if self.headers:
            if any(h not in self.headers for h in asked_names):
                return Reply.error("forbidden", "CORS preflight: header not allowed")
            allow_headers = self.headers_value
        else:
            allow_headers = b", ".join(asked_names)
        out = self._origin_headers(origin)
        out.append((b"access-control-allow-methods", self.methods_value))
        if allow_headers:
            out.append((b"access-control-allow-headers", allow_headers))
        out.append((b"access-control-max-age", self.max_age))
        if not self.headers:
            out.append((b"vary", b"Access-Control-Request-Headers"))
        return Reply(204, b"", out)

    def on_response(self, ex: Exchange) -> None:
        origin = ex.headers.get(b"origin")
        if origin is None:
            return
        if ex.method == b"OPTIONS" and b"access-control-request-method" in ex.headers:
            return  # a preflight: answered (or refused) by on_request with its own headers
        if not self._allowed(origin):
            if not self.any_origin:
                ex.response_headers.add(b"Vary", b"Origin")
            return
        rh = ex.response_headers
        rh.remove(b"access-control-allow-origin")
        for name, value in self._origin_headers(origin):
            rh.add(name, value)
        if self.expose_value:
            rh.set(b"Access-Control-Expose-Headers", self.expose_value)
