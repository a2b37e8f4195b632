"""Compile a validated config into the runtime the data plane uses.

Compile, don't look up: routes, plugin chains, upstreams, header names (lower-case bytes)
and limits are resolved here once. A reload compiles a whole new ``Runtime``; connections
keep the runtime they started with.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gateway import state
from gateway.config.load import ConfigIssue, PluginSpec, Source, format_loc
from gateway.config.model import GatewayConfig, LimitsConfig, ListenerConfig, UpstreamConfig
from gateway.http.headers import is_token
from gateway.plugin import Plugin
from gateway.proxy.chain import Chain
from gateway.proxy.forward import Forwarding, IPNetwork
from gateway.proxy.router import Route, Router
from gateway.tls import (
    MODERN_CIPHERS,
    VERSIONS,
    CertificateConflict,
    CertKeyPair,
    ClientCertPolicy,
    HttpsRedirect,
    ListenerTLS,
    ServerCertificates,
    ServerOptions,
    TLSFileError,
    UpstreamTLSOptions,
    check_ca_file,
    hsts_header,
    load_pair,
    normalise_name,
    upstream_context,
)
from gateway.upstream.balancer import BALANCERS, make_key
from gateway.upstream.discovery import TargetSpec
from gateway.upstream.health import ActiveCheck, HealthPolicy, Outlier
from gateway.upstream.pool import Pool
from gateway.upstream.retry import RetryBudget, RetryPolicy
from gateway.upstream.stats import UpstreamStats
from gateway.upstream.target import UNLIMITED, Target, Upstream, UpstreamTimeouts

BUILTIN_ECHO = "builtin:echo"

log = logging.getLogger("gateway.config")


class CompileError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


@dataclass(frozen=True, slots=True)
class Limits:
    max_url_bytes: int
    max_header_bytes: int
    max_header_count: int
    max_body_size: int
    header_timeout: float
    body_timeout: float
    idle_timeout: float
    send_timeout: float
    plugin_timeout: float
    max_connections: int

    @classmethod
    def from_config(cls, c: LimitsConfig) -> Limits:
        return cls(
            c.max_url_bytes,
            c.max_header_bytes,
            c.max_header_count,
            c.max_body_size,
            c.header_timeout,
            c.body_timeout,
            c.idle_timeout,
            c.send_timeout,
            c.plugin_timeout,
            c.max_connections,
        )


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    host: str
    port: int
    backlog: int
    #: for ``loop.create_server(ssl=...)``; None: plain TCP
    ssl: ssl.SSLContext | None = None
    #: for ``loop.create_server(ssl_handshake_timeout=...)`` (None on plain listeners)
    ssl_handshake_timeout: float | None = None
    #: per-connection TLS work: metrics, client certificates (None on plain listeners)
    tls: ListenerTLS | None = None
    #: the ``Strict-Transport-Security`` header line added to responses (b"": none)
    hsts: bytes = b""
    #: plain listener answering every request with a redirect to https (None: proxies)
    redirect: HttpsRedirect | None = None


class Runtime:
    """Everything one config generation needs at request time."""

    __slots__ = (
        "config",
        "forwarding",
        "limits",
        "listeners",
        "plugins",
        "router",
        "upstreams",
        "warnings",
    )

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        upstreams: dict[str, Upstream],
        limits: Limits,
        forwarding: Forwarding,
        listeners: tuple[Listener, ...],
        plugins: tuple[Plugin, ...],
        warnings: tuple[ConfigIssue, ...] = (),
    ) -> None:
        self.config = config
        self.router = router
        self.upstreams = upstreams
        self.limits = limits
        self.forwarding = forwarding
        self.listeners = listeners
        self.plugins = plugins
        #: problems that do not stop the config (an expired certificate, verify: false)
        self.warnings = warnings

    def targets(self) -> list[Target]:
        return [t for u in self.upstreams.values() for t in u.targets]


def parse_bind(bind: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError."""
    host, sep, port_text = bind.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError("expected host:port, e.g. 0.0.0.0:8080")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("expected host:port, e.g. 0.0.0.0:8080")
    return host, port


class _Compiler:
    def __init__(self, config: GatewayConfig, source: Source) -> None:
        self.config = config
        self.source = source
        self.issues: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []
        #: request headers carrying client-certificate identities: never taken from a client
        self.identity_headers: list[str] = []

    def error(self, loc: tuple[str | int, ...], message: str) -> None:
        self.issues.append(ConfigIssue(format_loc(loc), message, self.source.line_of(loc)))

    def warn(self, loc: tuple[str | int, ...], message: str) -> None:
        self.warnings.append(ConfigIssue(format_loc(loc), message, self.source.line_of(loc)))

    def path(self, name: str) -> Path:
        """A file named in the config: relative paths are relative to the config file."""
        p = Path(name).expanduser()
        if p.is_absolute() or self.source.name.startswith("<"):
            return p
        return Path(self.source.name).parent / p

    def listeners(self) -> tuple[Listener, ...]:
        out = []
        names: set[str] = set()
        for i, lc in enumerate(self.config.listeners):
            if lc.name in names:
                self.error(("listeners", i, "name"), f"duplicate listener name {lc.name!r}")
            names.add(lc.name)
            try:
                host, port = parse_bind(lc.bind)
            except ValueError as exc:
                self.error(("listeners", i, "bind"), str(exc))
                continue
            listener = self.listener_tls(("listeners", i), lc, host, port)
            if listener is not None:
                out.append(listener)
        admin = self.config.admin
        if admin is not None:
            try:
                host, port = parse_bind(admin.bind)
            except ValueError as exc:
                self.error(("admin", "bind"), str(exc))
            else:
                if any((lst.host, lst.port) == (host, port) for lst in out):
                    self.error(("admin", "bind"), "the same address as a listener")
        return tuple(out)

    def listener_tls(
        self, loc: tuple[str | int, ...], lc: ListenerConfig, host: str, port: int
    ) -> Listener | None:
        """The listener with its TLS parts compiled; None (errors recorded) when they fail."""
        tc = lc.tls
        rc = lc.redirect_https
        if tc is None:
            redirect = HttpsRedirect(rc.port, rc.status) if rc is not None else None
            return Listener(lc.name, host, port, lc.backlog, redirect=redirect)
        if rc is not None:
            self.error((*loc, "redirect_https"), "only a plain (non-TLS) listener redirects")
        tloc = (*loc, "tls")
        errors = len(self.issues)
        pairs: list[CertKeyPair] = []
        for j, cc in enumerate(tc.certificates):
            cloc = (*tloc, "certificates", j)
            names = []
            for k, name in enumerate(cc.names):
                try:
                    names.append(normalise_name(name))
                except ValueError as exc:
                    self.error((*cloc, "names", k), str(exc))
            try:
                pair = load_pair(self.path(cc.cert), self.path(cc.key), cc.password, names)
            except TLSFileError as exc:
                self.error((*cloc, exc.key), str(exc))
                continue
            for w in pair.warnings:
                self.warn((*cloc, "cert"), w)
            if not pair.names and j:
                self.warn(cloc, "no DNS names (subjectAltName) and no names: never chosen by SNI")
            pairs.append(pair)
        policy = None
        cc_conf = tc.client_cert
        client_ca = None
        if cc_conf is not None:
            cloc = (*tloc, "client_cert")
            if cc_conf.mode == "optional" and cc_conf.on_failure == "403":
                self.error(
                    (*cloc, "on_failure"),
                    "403 applies to mode: required (with mode: optional a missing certificate "
                    "is allowed, and one that fails verification fails the handshake)",
                )
            try:
                for w in check_ca_file(self.path(cc_conf.ca)):
                    self.warn((*cloc, "ca"), w)
                client_ca = str(self.path(cc_conf.ca))
            except TLSFileError as exc:
                self.error((*cloc, "ca"), str(exc))
            hdrs = cc_conf.headers
            for key, value in (("subject", hdrs.subject), ("sans", hdrs.sans)):
                if value is None:
                    continue
                if not is_token(value.encode("latin-1", "replace")):
                    self.error((*cloc, "headers", key), "not a valid header name")
                else:
                    self.identity_headers.append(value.lower())
            policy = ClientCertPolicy(
                hdrs.subject,
                hdrs.sans,
                refuse=cc_conf.mode == "required" and cc_conf.on_failure == "403",
            )
        if len(self.issues) > errors:
            return None
        opts = ServerOptions(
            VERSIONS[tc.min_version],
            tc.ciphers or MODERN_CIPHERS,
            tc.session_tickets,
            client_ca,
            cc_conf is not None and cc_conf.mode == "required" and cc_conf.on_failure != "403",
        )
        try:
            certs = ServerCertificates(pairs, opts)
        except CertificateConflict as exc:
            self.error((*tloc, "certificates", exc.index), str(exc))
            return None
        except TLSFileError as exc:
            sub: tuple[str, ...] = ("client_cert", "ca") if exc.key == "ca" else (exc.key,)
            self.error((*tloc, *sub), str(exc))
            return None
        hsts = b""
        if tc.hsts is not None:
            h = tc.hsts
            hsts = hsts_header(int(h.max_age), h.include_subdomains, h.preload)
        return Listener(
            lc.name,
            host,
            port,
            lc.backlog,
            ssl=certs.default,
            ssl_handshake_timeout=self.config.limits.header_timeout,
            tls=ListenerTLS(lc.name, certs, policy),
            hsts=hsts,
        )

    def upstream_tls(self, name: str, uc: UpstreamConfig) -> ssl.SSLContext | None:
        """The client context for an upstream's https targets; None (errors recorded)."""
        tc = uc.tls
        loc: tuple[str | int, ...] = ("upstreams", name, "tls")
        if tc is None:
            return upstream_context(UpstreamTLSOptions(True, None, None, VERSIONS["1.2"]))
        errors = len(self.issues)
        ca = None
        if tc.ca is not None:
            if not tc.verify:
                self.error((*loc, "ca"), "a CA with verify: false would not be used")
            ca = self.path(tc.ca)
            try:
                for w in check_ca_file(ca):
                    self.warn((*loc, "ca"), w)
            except TLSFileError as exc:
                self.error((*loc, "ca"), str(exc))
        pair = None
        if (tc.cert is None) != (tc.key is None):
            self.error(loc, "a client certificate needs both cert and key")
        elif tc.cert is not None and tc.key is not None:
            try:
                pair = load_pair(self.path(tc.cert), self.path(tc.key), tc.password)
            except TLSFileError as exc:
                self.error((*loc, exc.key), str(exc))
            else:
                for w in pair.warnings:
                    self.warn((*loc, "cert"), w)
        if tc.server_name is not None:
            try:
                if normalise_name(tc.server_name).startswith("*."):
                    raise ValueError("a server name cannot be a wildcard")
            except ValueError as exc:
                self.error((*loc, "server_name"), str(exc))
        if len(self.issues) > errors:
            return None
        if not tc.verify:
            self.warn(
                (*loc, "verify"),
                f"certificate verification is OFF for upstream {name!r}: its identity is not "
                "checked and anyone on the path can read and change its traffic",
            )
        try:
            return upstream_context(
                UpstreamTLSOptions(tc.verify, ca, pair, VERSIONS[tc.min_version])
            )
        except TLSFileError as exc:
            self.error((*loc, exc.key), str(exc))
            return None

    def upstreams(self) -> dict[str, Upstream]:
        out = {}
        for name, uc in self.config.upstreams.items():
            specs = []
            tls_context: ssl.SSLContext | None = None
            tls_failed = False
            if uc.tls is not None and not any(t.url.startswith("https:") for t in uc.targets):
                self.error(("upstreams", name, "tls"), "applies to https:// targets; none here")
            for i, tc in enumerate(uc.targets):
                loc = ("upstreams", name, "targets", i, "url")
                if tc.url == BUILTIN_ECHO:
                    specs.append(TargetSpec(i, tc.url, "127.0.0.1", 0, tc.weight, builtin="echo"))
                    continue
                parts = urlsplit(tc.url)
                if parts.scheme not in ("http", "https"):
                    self.error(
                        loc, f"expected http://host[:port], https://host[:port] or {BUILTIN_ECHO}"
                    )
                    continue
                if not parts.hostname or parts.path not in ("", "/") or parts.query:
                    self.error(loc, f"a target is {parts.scheme}://host[:port] with no path")
                    continue
                https = parts.scheme == "https"
                try:
                    port = parts.port or (443 if https else 80)
                except ValueError:
                    self.error(loc, "invalid port")
                    continue
                if https:
                    if tls_context is None and not tls_failed:
                        tls_context = self.upstream_tls(name, uc)
                        tls_failed = tls_context is None
                    if tls_context is None:
                        continue
                specs.append(TargetSpec(i, tc.url, parts.hostname, port, tc.weight, https=https))
            if not specs:
                continue
            key_loc = ("upstreams", name, "hash_key")
            if uc.balancer == "consistent_hash" and uc.hash_on in ("header", "cookie", "jwt_claim"):
                if not uc.hash_key:
                    self.error(key_loc, f"required with hash_on: {uc.hash_on}")
                    continue
                if uc.hash_on == "header" and not is_token(uc.hash_key.encode("latin-1", "ignore")):
                    self.error(key_loc, "not a valid header name")
                    continue
            out[name] = self.upstream(name, uc, tuple(specs), tls_context)
        return out

    def upstream(
        self,
        name: str,
        uc: UpstreamConfig,
        specs: tuple[TargetSpec, ...],
        tls_context: ssl.SSLContext | None,
    ) -> Upstream:
        cb = uc.circuit_breaker
        # One request per HTTP/1.1 connection: connections in use are requests in flight, and
        # idle ones are reused before any is opened, so one counter enforces both limits.
        limit = min(cb.max_connections or UNLIMITED, cb.max_pending or UNLIMITED)
        ka = uc.keepalive

        def make_target(spec: TargetSpec, address: str) -> Target:
            pool = Pool(
                f"{name}/{spec.index}",
                min(ka.max_idle, cb.max_connections or UNLIMITED),
                ka.idle_timeout,
                ka.max_requests,
            )
            target = Target(
                address,
                spec.port,
                spec.weight,
                pool,
                builtin=spec.builtin,
                hostname=None if spec.literal else spec.hostname,
                limit=limit,
                spec_index=spec.index,
            )
            if spec.https:
                target.ssl = tls_context
                server_name = uc.tls.server_name if uc.tls is not None else None
                target.server_hostname = server_name or spec.hostname
                if spec.port == 443:
                    target.host_header = target.host_header.rsplit(b":", 1)[0]
            return target

        od = uc.outlier_detection
        hc = uc.health_check
        check = None
        if hc is not None:
            check = ActiveCheck(
                hc.path,
                hc.interval,
                min(hc.timeout, hc.interval),
                hc.healthy,
                hc.unhealthy,
                frozenset(hc.expected_statuses),
                hc.jitter,
            )
        health = HealthPolicy(
            check,
            Outlier(
                od.consecutive_failures,
                od.base_ejection,
                max(od.max_ejection, od.base_ejection),
                od.max_ejected_percent / 100,
            ),
            fail_fast=uc.all_down == "fail_fast",
            slow_start=uc.slow_start or 0.0,
        )
        rc = uc.retries
        retry = None
        if rc.attempts > 1:
            retry = RetryPolicy(
                rc.attempts,
                frozenset(c for c in rc.retry_on if isinstance(c, str)),
                frozenset(c for c in rc.retry_on if isinstance(c, int)),
                RetryBudget(rc.budget, rc.min_per_second),
                rc.backoff.base,
                max(rc.backoff.max, rc.backoff.base),
                rc.max_body,
            )
        t = uc.timeouts
        upstream = Upstream(
            name,
            tuple(make_target(s, s.hostname) for s in specs if s.literal),
            UpstreamTimeouts(t.connect, t.read, t.total or 0.0),
            BALANCERS[uc.balancer],
            make_key(uc.hash_on, uc.hash_key or ""),
            health,
            retry,
        )
        upstream.specs = specs
        upstream.make_target = make_target
        upstream.resolve_interval = uc.resolve_interval
        upstream.stats = UpstreamStats(name)
        return upstream

    def forwarding(self) -> Forwarding:
        fc = self.config.forwarding
        nets: list[IPNetwork] = []
        for i, cidr in enumerate(fc.trusted_proxies):
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                self.error(
                    ("forwarding", "trusted_proxies", i), f"invalid address or CIDR {cidr!r}"
                )
        if not is_token(fc.request_id_header.encode("latin-1", "replace")):
            self.error(("forwarding", "request_id_header"), "not a valid header name")
        if fc.via is not None and (not fc.via or any(c in fc.via for c in "\r\n,")):
            self.error(("forwarding", "via"), "must be a plain name, or null to send no Via")
        tc = self.config.tracing
        return Forwarding(
            nets,
            fc.via,
            fc.request_id_header,
            tc.enabled,
            tc.sample_ratio,
            identity_headers=self.identity_headers,
        )

    def plugins(self, specs: list[PluginSpec]) -> list[Plugin]:
        out = []
        for spec in specs:
            try:
                out.append(spec.cls(spec.config))
            except ValueError as exc:
                self.issues.append(ConfigIssue(spec.path, str(exc)))
        return out

    def routes(self, upstreams: dict[str, Upstream], global_plugins: list[Plugin]) -> list[Route]:
        out = []
        names: set[str] = set()
        for i, rc in enumerate(self.config.routes):
            loc: tuple[str | int, ...] = ("routes", i)
            if rc.name in names:
                self.error((*loc, "name"), f"duplicate route name {rc.name!r}")
            names.add(rc.name)
            upstream = upstreams.get(rc.upstream)
            if upstream is None:
                if rc.upstream not in self.config.upstreams:
                    known = ", ".join(sorted(self.config.upstreams)) or "none defined"
                    self.error(
                        (*loc, "upstream"), f"unknown upstream {rc.upstream!r} (known: {known})"
                    )
                continue
            m = rc.match
            exact, wild = [], []
            for j, host in enumerate(m.hosts):
                h = host.strip().lower()
                try:  # the idna codec refuses an empty label: encode the suffix after "*."
                    if h.startswith("*.") and len(h) > 2 and "*" not in h[2:]:
                        wild.append(b"." + h[2:].encode("idna"))
                    elif h and "*" not in h:
                        exact.append(h.encode("idna"))
                    else:
                        raise ValueError(h)
                except ValueError:  # UnicodeError included: empty or overlong labels
                    self.error((*loc, "match", "hosts", j), "expected a host name or *.domain")
            paths = [p for p in (m.path, m.path_prefix, m.path_regex) if p is not None]
            if len(paths) > 1:
                self.error((*loc, "match"), "use only one of path, path_prefix, path_regex")
            for key in ("path", "path_prefix"):
                value = getattr(m, key)
                if value is not None and not value.startswith("/"):
                    self.error((*loc, "match", key), "must start with /")
            regex = None
            if m.path_regex is not None:
                try:
                    regex = re.compile(m.path_regex.encode())
                except re.error as exc:
                    self.error((*loc, "match", "path_regex"), f"invalid regular expression: {exc}")
            methods = None
            if m.methods:
                methods = frozenset(x.upper().encode() for x in m.methods)
                for j, x in enumerate(m.methods):
                    if not is_token(x.encode("latin-1", "replace")):
                        self.error((*loc, "match", "methods", j), "not a valid method")
            conditions = []
            for name, value in m.headers.items():
                if not is_token(name.encode("latin-1", "replace")):
                    self.error((*loc, "match", "headers", name), "not a valid header name")
                conditions.append((name.lower().encode("latin-1"), value.encode("latin-1")))
            rewrite = None
            if rc.strip_prefix or rc.prefix_rewrite is not None:
                if m.path_prefix is None:
                    key = "strip_prefix" if rc.strip_prefix else "prefix_rewrite"
                    self.error((*loc, key), "needs match.path_prefix")
                elif rc.strip_prefix and rc.prefix_rewrite is not None:
                    self.error(
                        (*loc, "prefix_rewrite"), "use strip_prefix or prefix_rewrite, not both"
                    )
                else:
                    rewrite = (rc.prefix_rewrite or "/").encode()
                    if not rewrite.startswith(b"/"):
                        self.error((*loc, "prefix_rewrite"), "must start with /")
            timeouts = None
            if rc.timeouts is not None:
                base, rt = upstream.timeouts, rc.timeouts
                timeouts = UpstreamTimeouts(
                    rt.connect or base.connect,
                    rt.read or base.read,
                    rt.total or base.total,
                )
            route_plugins = self.plugins(rc.plugins)
            for p in route_plugins:
                p.route_name = rc.name
            out.append(
                Route(
                    name=rc.name,
                    order=i,
                    upstream=upstream,
                    chain=Chain([*global_plugins, *route_plugins]),
                    exact_hosts=exact,
                    wildcard_hosts=wild,
                    path=m.path.encode() if m.path is not None else None,
                    path_prefix=m.path_prefix.encode() if m.path_prefix is not None else None,
                    path_regex=regex,
                    methods=methods,
                    header_conditions=tuple(conditions),
                    prefix_rewrite=rewrite,
                    preserve_host=rc.preserve_host,
                    max_body_size=rc.max_body_size or 0,
                    timeouts=timeouts,
                    access_log=rc.access_log,
                )
            )
        return out


def compile_config(config: GatewayConfig, source: Source) -> Runtime:
    """Build a ``Runtime``; raises ``CompileError`` listing every problem found."""
    c = _Compiler(config, source)
    # Plugins built next (rate_limit, ...) read the state backend's config from here.
    state.use_config(config.state)
    listeners = c.listeners()
    upstreams = c.upstreams()
    forwarding = c.forwarding()
    global_plugins = c.plugins(config.plugins)
    routes = c.routes(upstreams, global_plugins)
    if c.issues:
        raise CompileError(c.issues)
    for w in c.warnings:
        # At load, start and reload alike; `gateway check` shows them on stderr too.
        log.warning("%s: warning: %s", source.name, w)
    all_plugins = {id(p): p for r in routes for p in r.chain.plugins}
    for p in global_plugins:
        all_plugins[id(p)] = p
    return Runtime(
        config,
        Router(routes),
        upstreams,
        Limits.from_config(config.limits),
        forwarding,
        listeners,
        tuple(all_plugins.values()),
        tuple(c.warnings),
    )
