"""The benchmark scenarios, as data: one ``Scenario`` entry each.

An entry is a route config (what the gateway's bench config gets for it: a route on the
scenario's path prefix to one of the stub upstreams, plus any plugins) and a load profile
(method, path, body, connections; or, for ``kind="idle"``, a number of idle keep-alive
connections to hold open). The harness, the Locust file and the report all read this list;
adding a scenario is adding an entry here and nothing else.

The upstream each scenario names is a stub from ``benchmarks.upstreams``: ``static`` answers
a small body, echoes POST bodies under ``/post`` and serves 1 MiB under ``/download``;
``llm`` is ``benchmarks.fake_llm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from benchmarks import jwt_bench

#: Body sizes the static upstream and the scenarios agree on.
SMALL_BODY = b'{"message":"hello from the benchmark upstream"}\n'
POST_BYTES = 4096
DOWNLOAD_BYTES = 1024 * 1024


def json_body(size: int) -> bytes:
    """A valid JSON document of exactly ``size`` bytes (``size`` >= 16)."""
    head, tail = b'{"padding":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    #: ``load``: driven by wrk/Locust for a time window; ``idle``: connections held open.
    kind: Literal["load", "idle"] = "load"
    #: Request path; the gateway route for this scenario is a ``path_prefix`` on it.
    path: str = "/"
    method: Literal["GET", "POST"] = "GET"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    #: Concurrent connections; ``None``: the ``--connections`` option.
    connections: int | None = None
    #: For ``kind="idle"``: connections opened, each used for one request, then held idle.
    idle_connections: int = 0
    #: Which stub upstream the route goes to (``static`` or ``llm``).
    upstream: Literal["static", "llm"] = "static"
    #: Targets the route balances over: that many entries for the same stub (the balancer's
    #: cost, not the stub's, is what a multi-target scenario measures; nginx gets the same).
    targets: int = 1
    balancer: str = "round_robin"
    #: Extra gateway route fields (``plugins``, ``max_body_size``, ...).
    route: dict[str, Any] = field(default_factory=dict)
    #: Extra nginx directives for this path's ``location`` in the reference proxy, where nginx
    #: can do the equivalent (none for plugins nginx lacks: the ratio is then to a plain proxy).
    nginx_location: str = ""
    #: Part of the Locust file's user classes.
    locust: bool = True
    #: Served over HTTPS by both proxies (TLS terminated by each; the upstream stays plain).
    tls: bool = False
    #: Needs a redis-server: the harness starts one and gives the gateway
    #: ``state: {backend: redis}`` (scenarios without it that must stay off Redis say so in
    #: their plugin config, e.g. ``rate_limit: {backend: memory}``).
    redis: bool = False

    def gateway_route(self) -> dict[str, Any]:
        route: dict[str, Any] = {
            "name": self.name,
            "match": {"path_prefix": self.path},
            "upstream": self.upstream_name,
            "access_log": False,  # nginx's reference config logs nothing either
        }
        route.update(self.route)
        return route

    @property
    def upstream_name(self) -> str:
        """The upstream in the proxies' configs: the stub's, or one balancing over it."""
        if self.targets == 1:
            return self.upstream
        return f"{self.upstream}_{self.balancer}_x{self.targets}"

    @property
    def locust_class(self) -> str:
        """The Locust user class name: ``plain_get`` -> ``PlainGetUser``."""
        return "".join(part.capitalize() for part in self.name.split("_")) + "User"

    def request_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.body and "content-type" not in {k.lower() for k in headers}:
            headers["Content-Type"] = "application/json"
        return headers


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("plain_get", "plain GET, small response", path="/plain"),
    Scenario(
        "post_4k", "POST 4 KB JSON, 4 KB echoed", path="/post", method="POST",
        body=json_body(POST_BYTES),
    ),
    Scenario(
        "observed_get", "plain GET with the access log on (metrics are always on)",
        path="/observed", route={"access_log": True},
        nginx_location="\n            access_log logs/observed.log json buffer=64k;",
    ),
    Scenario("download_1m", "GET 1 MB download", path="/download", connections=16),
    Scenario(
        "keepalive_200", "200 concurrent keep-alive connections", path="/keepalive",
        connections=200,
    ),
    Scenario(
        "balanced_get", "plain GET balanced over 3 targets (round_robin)", path="/balanced",
        targets=3,
    ),
    Scenario(
        "idle_2000", "2,000 idle keep-alive connections (RSS)", kind="idle", path="/idle",
        idle_connections=2000, locust=False,
    ),
    Scenario(
        "https_get", "plain GET over HTTPS (TLS 1.3), keep-alive", path="/https", tls=True,
    ),
    Scenario(
        "https_handshake", "GET over HTTPS, a new connection and full handshake per request",
        path="/https-new", tls=True, headers=(("Connection", "close"),),
    ),
    # JWT (plugins/jwt): one token per load generator, verified once then a cache hit ...
    Scenario(
        "jwt_cached", "JWT RS256, verified-token cache hit", path="/jwt-cached",
        headers=(("Authorization", f"Bearer {jwt_bench.token('RS256')}"),),
        route={"plugins": [jwt_bench.plugin_config(cache=True)]},
    ),
    # ... and with the cache off: a full verification per request (pyjwt's cost plus the proxy)
    Scenario(
        "jwt_cold_rs256", "JWT RS256, cache off: verified every request", path="/jwt-rs256",
        headers=(("Authorization", f"Bearer {jwt_bench.token('RS256')}"),),
        route={"plugins": [jwt_bench.plugin_config(cache=False)]},
    ),
    Scenario(
        "jwt_cold_es256", "JWT ES256, cache off: verified every request", path="/jwt-es256",
        headers=(("Authorization", f"Bearer {jwt_bench.token('ES256')}"),),
        route={"plugins": [jwt_bench.plugin_config(cache=False)]},
    ),
    # Limits far above the offered load: every request is checked and admitted. One key (the
    # client address) for all, the worst case for contention on the bucket.
    Scenario(
        "rate_limit", "rate-limited route, memory backend (node's shared-memory table)",
        path="/limited",
        route={"plugins": [{"rate_limit": {
            "key": "ip", "rate": "1000000/s", "backend": "memory",
        }}]},
    ),
    Scenario(
        "rate_limit_redis", "rate-limited route, Redis backend (local redis-server, batched)",
        path="/limited-redis", redis=True,
        route={"plugins": [{"rate_limit": {"key": "ip", "rate": "1000000/s"}}]},
    ),
)  # fmt: skip

#: Scenarios whose plugins do not exist yet; each is added to ``SCENARIOS`` by its issue.
PLANNED: tuple[tuple[str, str], ...] = (
    ("llm_json", "LLM chat completion, JSON, to the fake LLM (LLM plugin)"),
    ("llm_stream", "LLM chat completion, SSE stream, to the fake LLM (LLM plugin)"),
)

BY_NAME = {s.name: s for s in SCENARIOS}


def select(names: str | None) -> list[Scenario]:
    """Scenarios named in a comma-separated list (all when ``None``), in list order."""
    if not names:
        return list(SCENARIOS)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BY_NAME]
    if unknown:
        planned = {name for name, _ in PLANNED}
        notes = [f"{n} (planned, not built yet)" if n in planned else n for n in unknown]
        raise ValueError(f"unknown scenario(s): {', '.join(notes)}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in chosen]
