"""The Redis backend in-process against a real redis-server: exactness under concurrency,
batching, hash tags, script reload after a restart, degraded modes and recovery."""

from __future__ import annotations

import asyncio
import time

import hiredis

from gateway.config.model import StateConfig
from gateway.state import CLOSED, LOCAL, OK, OPEN
from gateway.state.gcra import Limit
from gateway.state.redis import RedisBackend
from tests.support.redis import RedisClusterServers, RedisSentinel, RedisServer

HOURLY = (Limit(30, 3600, 30, "h"),)


async def started(redis: RedisServer, **kw: object) -> RedisBackend:
    # A timeout this busy test machine never reaches unless Redis is made to fail.
    kw.setdefault("timeout", 2.0)
    backend = RedisBackend(StateConfig(backend="redis", url=redis.url, **kw))  # type: ignore[arg-type]
    await backend.start()
    return backend


async def test_concurrent_takes_are_exact_and_batched(redis: RedisServer) -> None:
    backend = await started(redis)
    try:
        buckets = backend.buckets(HOURLY)
        verdicts = await asyncio.gather(*(buckets.take("client-1", 1) for _ in range(300)))
        assert sum(v.allowed for v in verdicts) == 30
        assert all(v.mode == OK for v in verdicts)
        status = backend.status()
        assert status["checks"] == 300
        assert status["avg_batch_size"] > 10, status  # one loop iteration, few round trips
        # The buckets of one key share a hash tag (one Cluster slot).
        keys = redis.command("KEYS", "gw:rl:*")
        assert b"gw:rl:{client-1}:h" in keys
    finally:
        await backend.close()


async def test_long_or_braced_keys_are_hashed_into_the_tag(redis: RedisServer) -> None:
    backend = await started(redis)
    try:
        buckets = backend.buckets(HOURLY)
        assert (await buckets.take("a}b{c", 1)).allowed
        assert (await buckets.take("x" * 500, 1)).allowed
        keys = redis.command("KEYS", "gw:rl:*")
        assert b"a}b{c" not in keys and b"x" * 100 not in keys
        assert keys.count(b"gw:rl:{") == 2
    finally:
        await backend.close()


async def test_script_reloaded_after_the_cache_is_flushed(redis: RedisServer) -> None:
    backend = await started(redis)
    try:
        buckets = backend.buckets(HOURLY)
        assert (await buckets.take("k", 1)).allowed
        redis.command("SCRIPT", "FLUSH")
        verdict = await buckets.take("k", 1)
        assert verdict.allowed and verdict.mode == OK
        assert HOURLY[0].remaining(verdict.waits[0]) == 28
    finally:
        await backend.close()


async def test_counters(redis: RedisServer) -> None:
    backend = await started(redis)
    try:
        assert await backend.add("tokens", 5, 60) == 5
        assert await backend.add("tokens", 7, 60) == 12
        assert b"gw:n:{tokens}" in redis.command("KEYS", "gw:n:*")
    finally:
        await backend.close()


async def wait_mode(backend: RedisBackend, mode: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while backend.mode != mode:
        assert time.monotonic() < deadline, backend.status()
        await asyncio.sleep(0.05)


async def test_stall_degrades_each_mode_within_the_timeout_and_recovers(
    redis: RedisServer,
) -> None:
    backends = {
        mode: await started(redis, on_error=mode, timeout=0.2, nodes=3)
        for mode in (LOCAL, OPEN, CLOSED)
    }
    try:
        buckets = {mode: b.buckets(HOURLY) for mode, b in backends.items()}
        for b in buckets.values():
            assert (await b.take("s", 1)).mode == OK
        redis.freeze()  # answers nothing until thawed: every check meanwhile waits in vain
        for mode, b in buckets.items():
            started_at = time.monotonic()
            verdicts = [await b.take("s", 1) for _ in range(12)]
            assert time.monotonic() - started_at < 2.0  # the first waits 200 ms, then none
            assert {v.mode for v in verdicts} == {mode}
            if mode == LOCAL:  # 30/h over 3 nodes: 10 per node
                assert [v.allowed for v in verdicts] == [True] * 10 + [False] * 2
            else:
                assert all(v.allowed == (mode == OPEN) for v in verdicts)
            assert backends[mode].status()["healthy"] is False
            assert backends[mode].errors >= 1
        redis.thaw()
        for mode, backend in backends.items():
            await wait_mode(backend, OK)
            assert (await buckets[mode].take("s", 1)).mode == OK
    finally:
        for backend in backends.values():
            await backend.close()


async def test_killed_then_restarted(redis: RedisServer) -> None:
    backend = await started(redis, on_error=CLOSED, timeout=0.2)
    try:
        buckets = backend.buckets(HOURLY)
        assert (await buckets.take("k", 1)).mode == OK
        redis.kill()
        started_at = time.monotonic()
        verdict = await buckets.take("k", 1)
        assert verdict.mode == CLOSED and not verdict.allowed
        assert time.monotonic() - started_at < 2.0
        redis.start()
        await wait_mode(backend, OK)
        verdict = await buckets.take("k", 1)  # a new, empty server: the script is reloaded
        assert verdict.allowed and verdict.mode == OK
    finally:
        await backend.close()


async def test_starting_with_redis_down_starts_degraded(redis: RedisServer) -> None:
    redis.kill()
    backend = await started(redis, on_error=OPEN, timeout=0.2)
    try:
        assert backend.mode == OPEN
        assert (await backend.buckets(HOURLY).take("k", 1)).allowed
        redis.start()
        await wait_mode(backend, OK)
    finally:
        await backend.close()


async def test_redis_cluster_keeps_a_requests_buckets_on_one_slot() -> None:
    cluster = RedisClusterServers()
    try:
        config = StateConfig(backend="redis", url=cluster.url, timeout=2.0)
        backend = RedisBackend(config)
        await backend.start()
        try:
            assert backend.healthy, backend.status()
            limits = (Limit(30, 3600, 30, "hourly"), Limit(5, 3600, 5, "burst"))
            buckets = backend.buckets(limits)
            # Many keys, spread over the three primaries; two limits each (one script, two keys).
            verdicts = await asyncio.gather(
                *(buckets.take(f"client-{i % 8}", 1) for i in range(200))
            )
            assert sum(v.allowed for v in verdicts) == 8 * 5  # the burst limit: 5 per client
            assert {v.mode for v in verdicts} == {OK}
            for node in cluster.nodes:  # the script is loaded again where it is missing
                node.command("SCRIPT", "FLUSH")
            assert not (await buckets.take("client-0", 1)).allowed
            assert (await buckets.take("client-new", 1)).allowed
        finally:
            await backend.close()
    finally:
        cluster.stop()


async def test_sentinel_url_finds_the_master(redis: RedisServer) -> None:
    sentinel = RedisSentinel(redis)
    try:
        backend = RedisBackend(StateConfig(backend="redis", url=sentinel.url, timeout=2.0))
        await backend.start()
        try:
            assert backend.healthy, backend.status()
            assert backend.status()["server"] == f"127.0.0.1:{redis.port}"  # the master
            verdict = await backend.buckets(HOURLY).take("via-sentinel", 1)
            assert verdict.allowed and verdict.mode == OK
            assert b"gw:rl:{via-sentinel}:h" in redis.command("KEYS", "gw:rl:*")
        finally:
            await backend.close()
    finally:
        sentinel.stop()


async def test_sentinel_naming_a_replica_is_refused_until_it_is_a_master(
    redis: RedisServer,
) -> None:
    """Sentinel still names the master after it became a replica (Sentinel only moves on by
    a failover): the backend checks ``ROLE``, stays degraded with the reason, and connects
    once the node is a master again."""
    other = RedisServer()
    sentinel = RedisSentinel(redis)
    try:
        assert redis.command("REPLICAOF", "127.0.0.1", other.port).startswith(b"+OK")
        config = StateConfig(backend="redis", url=sentinel.url, timeout=2.0, nodes=1)
        backend = RedisBackend(config)
        await backend.start()
        try:
            assert not backend.healthy
            error = backend.status()["last_error"]
            assert error == (
                f"ConnectionError: Sentinel names 127.0.0.1:{redis.port} as the master of "
                "'gw', but its role is 'slave'"
            ), error
            verdict = await backend.buckets(HOURLY).take("stale-master", 1)
            assert verdict.allowed and verdict.mode == LOCAL  # on_error: local
            assert redis.command("REPLICAOF", "NO", "ONE").startswith(b"+OK")
            await wait_mode(backend, OK)
            verdict = await backend.buckets(HOURLY).take("stale-master", 1)
            assert verdict.allowed and verdict.mode == OK
            assert b"gw:rl:{stale-master}:h" in redis.command("KEYS", "gw:rl:*")
        finally:
            await backend.close()
    finally:
        redis.command("REPLICAOF", "NO", "ONE")
        sentinel.stop()
        other.stop()


async def test_keys_that_are_not_valid_utf8_are_hashed_not_fatal(redis: RedisServer) -> None:
    # A lone surrogate (a JSON claim can carry one) cannot be encoded as UTF-8.
    backend = await started(redis)
    try:
        buckets = backend.buckets(HOURLY)
        for key in ("\ud800", "x" * 200 + "\udcff"):
            verdict = await buckets.take(key, 1)
            assert verdict.allowed and verdict.mode == OK
        assert backend.healthy and backend.errors == 0
        assert redis.command("KEYS", "gw:rl:*").count(b"gw:rl:{") == 2
    finally:
        await backend.close()


class ScriptlessRedis(asyncio.Protocol):
    """A fault injector speaking RESP: a server that has lost its scripts and then stalls
    on ``SCRIPT LOAD`` (what a Redis restarting and then hanging looks like to a client)."""

    stall_loads = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (cmd := self.reader.gets()) is not False:
            name = cmd[0].upper()
            if name == b"PING":
                self.transport.write(b"+PONG\r\n")  # type: ignore[attr-defined]
            elif name == b"SCRIPT":
                if not ScriptlessRedis.stall_loads:
                    self.transport.write(b"$40\r\n" + b"0" * 40 + b"\r\n")  # type: ignore[attr-defined]
            elif name == b"EVALSHA":
                self.transport.write(b"-NOSCRIPT No matching script.\r\n")  # type: ignore[attr-defined]
            else:
                self.transport.write(b"-ERR unexpected\r\n")  # type: ignore[attr-defined]


async def test_a_stalled_script_reload_still_answers_within_the_timeout() -> None:
    server = await asyncio.get_running_loop().create_server(ScriptlessRedis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    backend = RedisBackend(StateConfig(backend="redis", url=url, timeout=0.2, nodes=1))
    try:
        await backend.start()
        assert backend.healthy, backend.status()
        ScriptlessRedis.stall_loads = True
        started_at = time.monotonic()
        verdict = await asyncio.wait_for(backend.buckets(HOURLY).take("k", 1), 5)
        assert verdict.mode == LOCAL and verdict.allowed  # the degraded answer, in time
        assert time.monotonic() - started_at < 2.0  # bounded by the timeout, not plugin_timeout
        assert not backend.healthy and backend.last_error == "timeout"
        assert backend._in_flight == 0  # its slot is free for the next batch
    finally:
        ScriptlessRedis.stall_loads = False
        await backend.close()
        server.close()
