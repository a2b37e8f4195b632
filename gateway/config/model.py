"""The config file's shape: frozen pydantic models; unknown keys are errors.

Every key here is documented in docs/configuration.md. Values are checked for form here;
cross-references (a route's upstream exists, plugin configs, CIDRs, regexes) are checked by
``gateway.config.load`` and ``gateway.config.compile``, which report errors with their path.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from gateway.config.units import Duration, Size


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _workers(value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected 'auto' or a number of worker processes")
    try:
        n = int(value)
    except ValueError:
        raise ValueError("expected 'auto' or a number of worker processes") from None
    if not 1 <= n <= 1024:
        raise ValueError("workers must be between 1 and 1024")
    return n


Workers = Annotated[int, BeforeValidator(_workers)]


def _as_text(value: object) -> object:
    """YAML reads ``1.2`` and ``403`` as numbers; these keys take them as text."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


TLSVersionName = Annotated[Literal["1.2", "1.3"], BeforeValidator(_as_text)]


class CertificateConfig(Strict):
    cert: str = Field(min_length=1, description="PEM file: the certificate, then its chain")
    key: str = Field(min_length=1, description="PEM file: the private key")
    password: str | None = None
    #: SNI names this certificate serves; default: its DNS subjectAltNames.
    names: list[str] = []


class ClientCertHeaders(Strict):
    subject: str | None = "x-client-cert-subject"
    sans: str | None = "x-client-cert-san"


class ClientCertConfig(Strict):
    mode: Literal["required", "optional"] = "required"
    ca: str = Field(min_length=1, description="PEM bundle of the CAs that sign client certs")
    on_failure: Annotated[Literal["handshake", "403"], BeforeValidator(_as_text)] = "handshake"
    headers: ClientCertHeaders = ClientCertHeaders()


class HstsConfig(Strict):
    max_age: Duration = 31_536_000.0
    include_subdomains: bool = False
    preload: bool = False


class ListenerTLSConfig(Strict):
    certificates: list[CertificateConfig] = Field(min_length=1)
    min_version: TLSVersionName = "1.2"
    ciphers: str | None = None
    session_tickets: bool = True
    client_cert: ClientCertConfig | None = None
    hsts: HstsConfig | None = None


class RedirectHttpsConfig(Strict):
    port: int = Field(default=443, ge=1, le=65535)
    status: Literal[301, 308] = 301


class ListenerConfig(Strict):
    name: str = Field(min_length=1)
    bind: str = Field(min_length=1, description="host:port, e.g. 0.0.0.0:8080 or [::1]:8080")
    backlog: int = Field(default=2048, ge=1, le=65535)
    tls: ListenerTLSConfig | None = None
    redirect_https: RedirectHttpsConfig | None = None


class TargetConfig(Strict):
    url: str = Field(
        min_length=1, description="http://host:port (each address of host a target), builtin:echo"
    )
    weight: int = Field(default=1, ge=1, le=1000)


class UpstreamTimeouts(Strict):
    connect: Duration = 2.0
    read: Duration = 30.0
    total: Duration | None = None


class RouteTimeouts(Strict):
    """A route's own upstream timeouts; unset ones are the upstream's."""

    connect: Duration | None = None
    read: Duration | None = None
    total: Duration | None = None


class KeepaliveConfig(Strict):
    max_idle: int = Field(default=64, ge=0, le=100_000)
    idle_timeout: Duration = 60.0
    max_requests: int = Field(default=10_000, ge=1)


def _statuses(value: object) -> object:
    """``[200, "300-399"]``: statuses and inclusive ranges."""
    if not isinstance(value, list):
        return value
    out: list[int] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and "-" in item:
            a, _, b = item.partition("-")
            if not (a.strip().isdigit() and b.strip().isdigit()):
                raise ValueError(f"invalid status range {item!r}: use e.g. 200-299")
            lo, hi = int(a), int(b)
        elif isinstance(item, str) and item.strip().isdigit():
            lo = hi = int(item)
        else:
            raise ValueError(f"invalid status {item!r}: use a number or a range such as 200-299")
        if not 100 <= lo <= hi <= 599:
            raise ValueError(f"invalid status {item!r}: statuses are 100..599")
        out.extend(range(lo, hi + 1))
    return out


Statuses = Annotated[list[int], BeforeValidator(_statuses)]


class HealthCheckConfig(Strict):
    path: str = Field(default="/healthz", pattern=r"^/[^\s]*$")
    interval: Duration = 5.0
    timeout: Duration = 2.0
    healthy: int = Field(default=2, ge=1, le=100)
    unhealthy: int = Field(default=3, ge=1, le=100)
    expected_statuses: Statuses = Field(default_factory=lambda: list(range(200, 400)))
    jitter: float = Field(default=0.2, ge=0, le=1)


class OutlierConfig(Strict):
    consecutive_failures: int = Field(default=5, ge=0, le=10_000)
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0
    max_ejected_percent: int = Field(default=50, ge=0, le=100)


class BackoffConfig(Strict):
    base: Duration = 0.025
    max: Duration = 0.25


RetryCondition = Literal["connect_failure", "reset", "timeout"]


class RetryConfig(Strict):
    attempts: int = Field(default=2, ge=1, le=10)
    retry_on: list[RetryCondition | Annotated[int, Field(ge=500, le=599)]] = [
        "connect_failure",
        "reset",
        502,
        503,
        504,
    ]
    budget: float = Field(default=0.2, ge=0, le=1)
    min_per_second: float = Field(default=3.0, ge=0, le=10_000)
    backoff: BackoffConfig = BackoffConfig()
    max_body: Size = 64 * 1024


class CircuitBreakerConfig(Strict):
    max_connections: int | None = Field(default=None, ge=1)
    max_pending: int | None = Field(default=None, ge=1)


class UpstreamTLSConfig(Strict):
    verify: bool = True
    ca: str | None = None
    server_name: str | None = None
    cert: str | None = None
    key: str | None = None
    password: str | None = None
    min_version: TLSVersionName = "1.2"


class UpstreamConfig(Strict):
    balancer: Literal["round_robin", "least_conn", "p2c_ewma", "consistent_hash", "random"] = (
        "round_robin"
    )
    hash_on: Literal["client_ip", "header", "cookie", "jwt_claim", "path"] = "client_ip"
    hash_key: str | None = None
    targets: list[TargetConfig] = Field(min_length=1)
    resolve_interval: Duration = 30.0
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    keepalive: KeepaliveConfig = KeepaliveConfig()
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierConfig = OutlierConfig()
    all_down: Literal["panic", "fail_fast"] = "panic"
    slow_start: Duration | None = None
    retries: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()

    tls: UpstreamTLSConfig | None = None


class MatchConfig(Strict):
    hosts: list[str] = []
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: list[str] = []
    headers: dict[str, str] = {}


class RouteConfig(Strict):
    name: str = Field(min_length=1)
    match: MatchConfig = MatchConfig()
    upstream: str = Field(min_length=1)
    strip_prefix: bool = False
    prefix_rewrite: str | None = None
    preserve_host: bool = False
    max_body_size: Size | None = None
    timeouts: RouteTimeouts | None = None
    access_log: bool = True
    #: ``[{plugin_name: {config}}]``; validated against each plugin's Config by the loader.
    plugins: list[Any] = []


class LimitsConfig(Strict):
    max_url_bytes: Size = 8192
    max_header_bytes: Size = 32768
    max_header_count: int = Field(default=100, ge=1, le=10_000)
    max_body_size: Size = 10 * 1024 * 1024
    header_timeout: Duration = 10.0
    body_timeout: Duration = 60.0
    idle_timeout: Duration = 60.0
    send_timeout: Duration = 60.0
    plugin_timeout: Duration = 10.0
    max_connections: int = Field(default=10_000, ge=1)


class ForwardingConfig(Strict):
    trusted_proxies: list[str] = []
    via: str | None = "gateway"
    request_id_header: str = "x-request-id"


class LogConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")


class StateConfig(Strict):
    """Where state shared between workers and nodes lives (rate limits, later budgets)."""

    backend: Literal["memory", "redis"] = "memory"
    #: redis://, rediss://, unix://, redis+sentinel://host:port[,host:port]/service[/db],
    #: redis+cluster://host:port[,host:port]
    url: str | None = None
    on_error: Literal["local", "open", "closed"] = "local"
    timeout: Duration = 0.05
    #: nodes sharing the Redis limits, for on_error: local (null: counted through Redis)
    nodes: int | None = Field(default=None, ge=1, le=10_000)
    #: slots of the node's shared-memory table (memory backend, and the local fallback)
    max_keys: int = Field(default=65536, ge=64, le=1 << 26)
    key_prefix: str = Field(default="gw:", max_length=64)

    @model_validator(mode="after")
    def _url_for_redis(self) -> StateConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError("url: required when backend is redis")
        scheme, _, rest = (self.url or "").partition("://")
        if self.url and scheme.lower() not in _REDIS_SCHEMES:
            raise ValueError(f"url: expected one of {', '.join(s + '://' for s in _REDIS_SCHEMES)}")
        if scheme.lower() == "redis+sentinel" and not rest.partition("/")[2].strip("/"):
            raise ValueError(
                "url: a redis+sentinel URL names the service: redis+sentinel://h:p/name"
            )
        if self.backend == "memory" and self.url:
            raise ValueError("url: only for backend: redis")
        if self.timeout <= 0 or self.timeout > 10:
            raise ValueError("timeout: must be between 0 and 10 seconds")
        return self


class AdminConfig(Strict):
    bind: str = Field(default="127.0.0.1:9901", min_length=1)
    token: str | None = Field(default=None, min_length=1)  # "": a typo, not "no token"


class AccessLogConfig(Strict):
    enabled: bool = True
    path: str = Field(default="-", min_length=1, description="a file, or - for stdout")
    max_pending: Size = 64 * 1024 * 1024


class TracingConfig(Strict):
    enabled: bool = True
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


class GatewayConfig(Strict):
    workers: Workers = 1
    listener_sharing: Literal["reuseport", "inherit"] = "reuseport"
    drain_timeout: Duration = 30.0
    admin: AdminConfig | None = None
    access_log: AccessLogConfig = AccessLogConfig()
    tracing: TracingConfig = TracingConfig()
    listeners: list[ListenerConfig] = Field(min_length=1)
    upstreams: dict[str, UpstreamConfig] = {}
    routes: list[RouteConfig] = []
    plugins: list[Any] = []
    limits: LimitsConfig = LimitsConfig()
    forwarding: ForwardingConfig = ForwardingConfig()
    log: LogConfig = LogConfig()
    state: StateConfig = StateConfig()

    @model_validator(mode="after")
    def _state_timeout_below_plugin_timeout(self) -> GatewayConfig:
        if self.state.backend == "redis" and self.state.timeout >= self.limits.plugin_timeout:
            raise ValueError(
                f"state.timeout ({self.state.timeout:g} s) must be below limits.plugin_timeout "
                f"({self.limits.plugin_timeout:g} s): a check waiting on Redis would get "
                "plugin_timeout instead of the on_error answer"
            )
        return self
