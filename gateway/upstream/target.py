"""Runtime upstreams and targets, compiled from config once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.upstream.balancer import Balancer
from gateway.upstream.pool import Pool

if TYPE_CHECKING:
    import ssl


class Target:
    """One address of an upstream, with its idle-connection pool."""

    __slots__ = (
        "builtin",
        "host",
        "host_header",
        "label",
        "pool",
        "port",
        "server_hostname",
        "ssl",
        "weight",
    )

    def __init__(self, host: str, port: int, weight: int, pool: Pool, builtin: str = "") -> None:
        self.host = host
        self.port = port
        self.weight = weight
        self.pool = pool
        self.builtin = builtin  # "echo" for the built-in demo upstream, bound at start
        default_port = port == 80
        name = f"[{host}]" if ":" in host else host
        self.host_header = (name if default_port else f"{name}:{port}").encode("ascii")
        self.label = f"{name}:{port}"
        # https targets (set by the compiler): the client context, and the name sent as SNI
        # and checked against the certificate. Both None for plain http.
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname: str | None = None

    def __repr__(self) -> str:
        return f"<Target {self.label}>"


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    connect: float
    read: float


class Upstream:
    __slots__ = ("balancer", "name", "targets", "timeouts")

    def __init__(
        self, name: str, targets: tuple[Target, ...], balancer: Balancer, timeouts: UpstreamTimeouts
    ) -> None:
        self.name = name
        self.targets = targets
        self.balancer = balancer
        self.timeouts = timeouts

    def pick(self) -> Target:
        if len(self.targets) == 1:
            return self.targets[0]
        return self.targets[self.balancer.pick()]

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {list(self.targets)}>"
