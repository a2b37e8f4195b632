"""Target discovery: a target URL names a host; every address it resolves to is a target.

IP literals become targets when the config is compiled. Host names are resolved with the
event loop's ``getaddrinfo`` (in a thread: never blocking the loop) when a worker starts,
then every ``resolve_interval``. A refresh keeps the ``Target`` objects of addresses that
remain (their pools, counters and health), adds new ones and drops the rest (their idle
connections closed, busy ones finishing). A failed lookup keeps the last known addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.upstream.target import Target, Upstream

log = logging.getLogger("gateway.upstream")

#: Bound on one resolution of all of an upstream's names.
RESOLVE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One ``targets[]`` entry as configured."""

    index: int
    url: str
    hostname: str
    port: int
    weight: int
    builtin: str = ""
    https: bool = False

    @property
    def literal(self) -> bool:
        if self.builtin:
            return True
        try:
            ipaddress.ip_address(self.hostname)
        except ValueError:
            return False
        return True


#: Builds the Target for (spec, address); the compiler supplies it (pool sizes, limits).
TargetFactory = Callable[[TargetSpec, str], "Target"]


async def resolve(hostname: str, port: int) -> list[str]:
    """The addresses ``hostname`` has, in the resolver's order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        hostname, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    out: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in out:
            out.append(addr)
    return out


async def refresh(up: Upstream, specs: tuple[TargetSpec, ...], make: TargetFactory) -> None:
    """Resolve every host-name spec of ``up`` and install the resulting target list."""
    current = {(t.spec_index, t.host): t for t in up.targets}
    names = [s for s in specs if not s.literal]
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            found = await asyncio.gather(
                *(resolve(s.hostname, s.port) for s in names), return_exceptions=True
            )
    except TimeoutError:
        log.warning("resolving the targets of upstream %s timed out", up.name)
        return
    addresses: dict[int, list[str]] = {}
    for spec, result in zip(names, found, strict=True):
        if isinstance(result, BaseException):
            log.warning(
                "cannot resolve %s for upstream %s: %s; keeping its last addresses",
                spec.hostname,
                up.name,
                result,
            )
            addresses[spec.index] = [h for (i, h) in current if i == spec.index]
        else:
            addresses[spec.index] = result
    targets: list[Target] = []
    for spec in specs:
        if spec.literal:
            targets.extend(t for (i, _), t in current.items() if i == spec.index)
            continue
        for addr in addresses.get(spec.index, []):
            t = current.get((spec.index, addr))
            targets.append(t if t is not None else make(spec, addr))
    if [id(t) for t in targets] == [id(t) for t in up.targets]:
        return
    kept = {id(t) for t in targets}
    for t in up.targets:
        if id(t) not in kept:
            t.upstream = None
            t.pool.close_all()
    log.info(
        "upstream targets changed",
        extra={"upstream": up.name, "targets": [t.label for t in targets]},
    )
    up.set_targets(tuple(targets))
    if up.stats is not None:
        for t in targets:
            up.stats.target_up(t)


async def refresh_loop(
    up: Upstream, specs: tuple[TargetSpec, ...], make: TargetFactory, interval: float
) -> None:
    while True:
        await asyncio.sleep(interval)
        await refresh(up, specs, make)
