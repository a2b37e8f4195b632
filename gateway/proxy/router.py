"""Routing: pick the route for a request. Compiled once; per request a dict lookup and a
short scan.

Precedence (most specific wins, documented in docs/routing.md):

1. host: an exact host beats a wildcard (``*.example.com``; longer suffix first), which beats
   a route with no host condition;
2. path: ``path`` (exact) beats ``path_prefix`` (longer first), which beats ``path_regex``,
   which beats no path condition;
3. a route with more conditions (methods, headers) beats one with fewer;
4. otherwise the order in the config file.

Per request, the routes whose host condition admits the request's host are looked up in a
small cache keyed by host (bounded: hostile Host headers cannot grow it without limit), then
scanned in precedence order for the first whose path, method and header conditions hold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.observe import RouteObs

if TYPE_CHECKING:
    from gateway.proxy.chain import Chain
    from gateway.upstream.target import Upstream

HOST_CACHE_SIZE = 4096


class Route:
    __slots__ = (
        "chain",
        "exact_hosts",
        "header_conditions",
        "max_body_size",
        "methods",
        "name",
        "obs",
        "order",
        "path",
        "path_prefix",
        "path_regex",
        "prefix_rewrite",
        "preserve_host",
        "upstream",
        "wildcard_hosts",
    )

    def __init__(
        self,
        *,
        name: str,
        order: int,
        upstream: Upstream,
        chain: Chain,
        exact_hosts: Sequence[bytes] = (),
        wildcard_hosts: Sequence[bytes] = (),
        path: bytes | None = None,
        path_prefix: bytes | None = None,
        path_regex: re.Pattern[bytes] | None = None,
        methods: frozenset[bytes] | None = None,
        header_conditions: tuple[tuple[bytes, bytes], ...] = (),
        prefix_rewrite: bytes | None = None,
        preserve_host: bool = False,
        max_body_size: int = 0,
        access_log: bool = True,
    ) -> None:
        self.name = name
        self.obs = RouteObs(name, upstream.name, access_log)
        self.order = order
        self.upstream = upstream
        self.chain = chain
        self.exact_hosts = frozenset(exact_hosts)
        self.wildcard_hosts = tuple(wildcard_hosts)  # suffixes, e.g. b".example.com"
        self.path = path
        self.path_prefix = path_prefix
        self.path_regex = path_regex
        self.methods = methods
        self.header_conditions = header_conditions
        self.prefix_rewrite = prefix_rewrite
        self.preserve_host = preserve_host
        self.max_body_size = max_body_size

    def admits_host(self, host: bytes) -> bool:
        if not self.exact_hosts and not self.wildcard_hosts:
            return True
        if host in self.exact_hosts:
            return True
        return any(host.endswith(s) and len(host) > len(s) for s in self.wildcard_hosts)

    def host_rank(self, host: bytes) -> tuple[int, int]:
        if host in self.exact_hosts:
            return (0, 0)
        best = max((len(s) for s in self.wildcard_hosts if host.endswith(s)), default=-1)
        if best >= 0:
            return (1, -best)
        return (2, 0)

    def specificity(self) -> tuple[int, int, int]:
        if self.path is not None:
            path_rank = (0, 0)
        elif self.path_prefix is not None:
            path_rank = (1, -len(self.path_prefix))
        elif self.path_regex is not None:
            path_rank = (2, 0)
        else:
            path_rank = (3, 0)
        conditions = (self.methods is not None) + len(self.header_conditions)
        return (*path_rank, -conditions)

    def matches(
        self, path: bytes, method: bytes, headers: list[tuple[bytes, bytes, bytes]]
    ) -> bool:
        if self.path is not None:
            if path != self.path:
                return False
        elif self.path_prefix is not None:
            # On segment boundaries: /orders matches /orders, /orders/, /orders/1, not
            # /ordersX. Inlined, not a helper: this runs for every request.
            prefix = self.path_prefix
            if not path.startswith(prefix):
                return False
            n = len(prefix)
            if len(path) != n and path[n] != 0x2F and prefix[-1] != 0x2F:
                return False
        elif self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        for name, value in self.header_conditions:
            for lname, _, v in headers:
                if lname == name and v == value:
                    break
            else:
                return False
        return True

    def upstream_path(self, path: bytes) -> bytes:
        """The path sent upstream: the matched prefix replaced when a rewrite is configured."""
        if self.prefix_rewrite is None or self.path_prefix is None:
            return path
        rest = path[len(self.path_prefix.rstrip(b"/")) :]
        new = self.prefix_rewrite.rstrip(b"/") + rest
        if not new.startswith(b"/"):
            new = b"/" + new
        return new

    def __repr__(self) -> str:
        return f"<Route {self.name}>"


def normalise_host(raw: bytes) -> bytes:
    """``API.Example.com:8080`` -> ``api.example.com``; ``[::1]:80`` -> ``[::1]``."""
    host = raw.strip().lower()
    colon = host.rfind(b":")
    if colon >= 0 and host.find(b"]", colon) < 0:
        host = host[:colon]
    return host.rstrip(b".")


class Router:
    __slots__ = ("_cache", "routes")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._cache: dict[bytes, tuple[Route, ...]] = {}

    def candidates(self, raw_host: bytes) -> tuple[Route, ...]:
        """Routes admitting this Host header value, most specific first. Keyed by the raw
        value, so a cached host costs one dict lookup: no lower-casing or port stripping."""
        found = self._cache.get(raw_host)
        if found is None:
            host = normalise_host(raw_host)
            admitted = [r for r in self.routes if r.admits_host(host)]
            admitted.sort(key=lambda r: (r.host_rank(host), r.specificity(), r.order))
            found = tuple(admitted)
            if len(self._cache) >= HOST_CACHE_SIZE:
                self._cache.clear()
            self._cache[raw_host] = found
        return found

    def match(
        self, host: bytes, path: bytes, method: bytes, headers: list[tuple[bytes, bytes, bytes]]
    ) -> Route | None:
        found = self._cache.get(host)
        if found is None:
            found = self.candidates(host)
        for route in found:
            if route.matches(path, method, headers):
                return route
        return None

    def __repr__(self) -> str:
        return f"<Router {len(self.routes)} routes>"
