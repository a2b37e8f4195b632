"""The ``redis`` backend: exact cluster-wide buckets through one atomic Lua script.

Theory of operation
-------------------
Each ``take`` becomes one ``EVALSHA`` of ``TAKE_SCRIPT``, which reads the buckets' TATs, decides
with Redis's own clock (``TIME``: the nodes' clocks do not matter) and writes them back, all
atomically. A request's buckets share a hash tag (``gw:rl:{key}:limit``), so in a Redis Cluster
they live on one slot and the script may touch them all.

Batching: ``take`` queues the check and schedules a flush with ``loop.call_soon``; every check
queued during that loop iteration goes out in one pipeline, one round trip. At most
``MAX_IN_FLIGHT`` pipelines are outstanding; while they are, new checks accumulate into the
next batch, so batches grow with load instead of connections.

Time bound: a batch's timer (``timeout``, default 50 ms) starts when its first check is queued;
when it fires, every check of the batch still waiting is answered by the degraded mode and the
backend turns *unhealthy*. While unhealthy, checks go straight to the degraded mode, and one
task probes Redis (``PING``, then ``SCRIPT LOAD``) with exponential backoff (50 ms doubling to
2 s, jittered) until it answers; then checks go to Redis again. Degraded modes (``on_error``):

- ``local``: the node's shared-memory bucket (``memory`` backend), with each limit divided by
  the number of nodes: ``state.nodes`` if set, else the count of nodes seen alive in Redis (each
  node refreshes its entry in ``gw:nodes``, a sorted set scored by Redis time, every 5 s).
- ``open``: admitted without a check. ``closed``: refused; the caller answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gateway import metrics, runinfo
from gateway.config.model import StateConfig
from gateway.state import CLOSED, LOCAL, OK, OPEN, Buckets, StateBackend, StateError, Verdict
from gateway.state.gcra import Limit
from gateway.state.memory import SLOT_CACHE_SIZE, LocalBuckets, close_table, open_table
from gateway.state.shm import SharedTable

log = logging.getLogger("gateway.state")

MAX_IN_FLIGHT = 4
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
HEARTBEAT_INTERVAL = 5.0
NODE_TTL = 15
#: A key longer than this, or with braces (which would break the hash tag), is hashed.
MAX_PLAIN_KEY = 96

TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local n = #KEYS
local tats = {}
local allowed = 1
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i])) or 0
  if tat < now then tat = now end
  tats[i] = tat
  if tat + cost * tonumber(ARGV[1 + i]) - now > tonumber(ARGV[1 + n + i]) then allowed = 0 end
end
local out = {allowed}
for i = 1, n do
  local wait = tats[i] - now
  if allowed == 1 and cost > 0 then
    wait = wait + cost * tonumber(ARGV[1 + i])
    redis.call('SET', KEYS[i], string.format('%d', now + wait), 'PX', math.ceil(wait / 1000))
  end
  out[i + 1] = wait
end
return out
"""

ADD_SCRIPT = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""

NODES_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"""

_errors = metrics.counter(
    "state_backend_errors_total",
    "State backend operations that failed or timed out",
    ("backend", "reason"),
)
_mode_gauge = metrics.gauge(
    "state_backend_mode",
    "1 for the state backend's current mode (ok, local, open, closed), else 0",
    ("backend", "mode"),
    mode="max",
)
_batch_size = metrics.histogram(
    "state_redis_batch_size",
    "Checks sent to Redis in one pipeline round trip",
    (),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def make_client(url: str, timeout: float) -> tuple[Any, list[Any]]:
    """A ``redis.asyncio`` client for a standalone, Sentinel or Cluster URL.

    ``redis://``, ``rediss://``, ``unix://``: standalone. ``redis+sentinel://[:pw@]h:p[,h:p]/
    service[/db]``: the service's master through Sentinel. ``redis+cluster://[:pw@]h:p[,h:p]``:
    Redis Cluster (startup nodes). Returns the client and the other clients to close with it
    (the Sentinels').
    """
    import redis.asyncio as aredis

    # The socket timeout frees a connection stuck on a stalled server; callers never wait
    # that long (the batch timer answers them after ``timeout``).
    sock_timeout = max(1.0, timeout * 20)
    opts: dict[str, Any] = {
        "socket_timeout": sock_timeout,
        "socket_connect_timeout": sock_timeout,
        "health_check_interval": 0,
    }
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return aredis.Redis.from_url(url, **opts), []
    hosts = []
    netloc = parts.netloc.rsplit("@", 1)
    password = unquote(netloc[0].split(":", 1)[-1]) if len(netloc) == 2 else None
    for hp in netloc[-1].split(","):
        host, _, port = hp.rpartition(":")
        hosts.append((host.strip("[]") or "127.0.0.1", int(port or 6379)))
    if scheme == "redis+sentinel":
        from redis.asyncio.sentinel import Sentinel

        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a redis+sentinel URL names the service: redis+sentinel://h:p/name")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs={"socket_timeout": sock_timeout}, **opts
        )
        return sentinel.master_for(path[0], db=db, password=password), list(sentinel.sentinels)
    if scheme == "redis+cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        query = parse_qs(parts.query)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in hosts],
            password=password,
            require_full_coverage="false" not in query.get("require_full_coverage", []),
            **opts,
        )
        return cluster, []
    raise ValueError(f"unsupported Redis URL scheme {scheme!r}")


Item = tuple["RedisBuckets", str, int, "asyncio.Future[Verdict]"]


class _Batch:
    __slots__ = ("items", "timer")

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.timer: asyncio.TimerHandle | None = None


class RedisBuckets(Buckets):
    """A plugin's limits on Redis: script arguments computed once, Redis key names cached."""

    __slots__ = ("_keys", "_local", "_local_nodes", "args", "backend")

    def __init__(self, backend: RedisBackend, limits: tuple[Limit, ...]) -> None:
        super().__init__(limits)
        self.backend = backend
        self.args = (*[lim.interval for lim in limits], *[lim.tolerance for lim in limits])
        self._keys: dict[str, tuple[str, ...]] = {}
        self._local: LocalBuckets | None = None
        self._local_nodes = 0

    def redis_keys(self, key: str) -> tuple[str, ...]:
        found = self._keys.get(key)
        if found is None:
            tag = key
            if len(tag) > MAX_PLAIN_KEY or "{" in tag or "}" in tag:
                tag = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
            prefix = self.backend.prefix
            found = tuple(f"{prefix}rl:{{{tag}}}:{limit.name}" for limit in self.limits)
            if len(self._keys) >= SLOT_CACHE_SIZE:
                self._keys.clear()
            self._keys[key] = found
        return found

    def local(self, table: SharedTable, nodes: int) -> LocalBuckets:
        """The per-node fallback: these limits divided by the node count."""
        found = self._local
        if found is None or self._local_nodes != nodes or found.table is not table:
            scaled = tuple(limit.scaled(nodes) for limit in self.limits)
            found = self._local = LocalBuckets(table, scaled, LOCAL)
            self._local_nodes = nodes
        return found

    async def take(self, key: str, cost: int) -> Verdict:
        return await self.backend.take(self, key, cost)


class RedisBackend(StateBackend):
    kind = "redis"
    synchronous = False

    def __init__(self, config: StateConfig) -> None:
        assert config.url is not None
        self.config = config
        self.timeout = config.timeout
        self.on_error = config.on_error
        self.prefix = config.key_prefix
        self.healthy = False
        self.nodes_observed = 1
        self.errors = 0
        self.batches = 0
        self.checks = 0
        self.largest_batch = 0
        self.last_error = ""
        self._client: Any = None
        self._also_close: list[Any] = []
        self._sha = _sha1(TAKE_SCRIPT)
        self._add_sha = _sha1(ADD_SCRIPT)
        self._batch: _Batch | None = None
        self._flush_scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._table: SharedTable | None = None
        self._closed = False
        self._node_id = ""  # set at start: this gateway instance (its run directory)
        self._mode_children = {m: _mode_gauge.labels("redis", m) for m in (OK, LOCAL, OPEN, CLOSED)}
        self._err_timeout = _errors.labels("redis", "timeout")
        self._err_error = _errors.labels("redis", "error")
        self._batch_hist = _batch_size.labels()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        assert self.config.url is not None
        self._closed = False
        self._node_id = f"{socket.gethostname()}:{runinfo.run_dir()}"
        self._client, self._also_close = make_client(self.config.url, self.timeout)
        if self.on_error == LOCAL:
            self._table = open_table(self.config.max_keys)
        try:
            await asyncio.wait_for(self._connect(), timeout=max(self.timeout * 10, 0.5))
        except Exception as exc:
            self._failed(exc)
        else:
            self._set_healthy(True)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _connect(self) -> None:
        await self._client.ping()
        await self._client.script_load(TAKE_SCRIPT)
        await self._client.script_load(ADD_SCRIPT)
        if self.config.nodes is None:
            await self._count_nodes()

    async def close(self) -> None:
        self._closed = True
        for task in (self._probe, self._heartbeat, *self._tasks):
            if task is not None:
                task.cancel()
        self._fail_pending(StateError("closing"))
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            for other in self._also_close:
                with contextlib.suppress(Exception):
                    await other.aclose()
        if self._table is not None:
            close_table(self._table)
            self._table = None

    # -- health ---------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return OK if self.healthy else self.on_error

    def _set_healthy(self, healthy: bool) -> None:
        was = self.healthy
        self.healthy = healthy
        for m, child in self._mode_children.items():
            child.set(1 if m == self.mode else 0)
        if healthy and not was:
            log.info("state backend redis: connected", extra={"mode": OK})
        elif was and not healthy:
            log.warning(
                "state backend redis: unavailable, degraded to %s",
                self.on_error,
                extra={"mode": self.on_error, "error": self.last_error},
            )

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            self._err_timeout.inc()
            self.last_error = "timeout"
        else:
            self._err_error.inc()
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        if self.healthy or self._probe is None or self._probe.done():
            self._set_healthy(False)
            self._fail_pending(StateError(self.last_error))
            if not self._closed and (self._probe is None or self._probe.done()):
                self._probe = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = BACKOFF_MIN
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            try:
                await asyncio.wait_for(self._connect(), timeout=max(self.timeout * 10, 0.5))
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:200] or "timeout"
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self._set_healthy(True)
            return

    async def _beat(self) -> None:
        while not self._closed:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            if self.healthy and self.config.nodes is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._count_nodes(), timeout=1.0)

    async def _count_nodes(self) -> None:
        n = await self._client.eval(NODES_SCRIPT, 1, self.prefix + "nodes", self._node_id, NODE_TTL)
        self.nodes_observed = max(1, int(n))

    # -- degraded answers ------------------------------------------------------------------------
    def _degraded(self, buckets: RedisBuckets, key: str, cost: int) -> Verdict:
        mode = self.on_error
        if mode == OPEN:
            return Verdict(True, [], buckets.limits, OPEN)
        if mode == CLOSED or self._table is None:
            return Verdict(False, [], buckets.limits, CLOSED)
        nodes = self.config.nodes or self.nodes_observed
        return buckets.local(self._table, nodes).take_now(key, cost)

    # -- the batched take ------------------------------------------------------------------------
    def buckets(self, limits: tuple[Limit, ...]) -> RedisBuckets:
        return RedisBuckets(self, limits)

    async def take(self, buckets: RedisBuckets, key: str, cost: int) -> Verdict:
        if not self.healthy:
            return self._degraded(buckets, key, cost)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Verdict] = loop.create_future()
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            batch.timer = loop.call_later(self.timeout, self._expire, batch)
        batch.items.append((buckets, key, cost, fut))
        if not self._flush_scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            return await fut
        except StateError:
            return self._degraded(buckets, key, cost)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch = self._batch
        if batch is None or not batch.items:
            return
        self._batch = None
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expire(self, batch: _Batch) -> None:
        if batch is self._batch:
            self._batch = None
        waiting = [item for item in batch.items if not item[3].done()]
        if waiting:
            self._failed(TimeoutError())
            err = StateError("timeout")
            for *_, fut in waiting:
                if not fut.done():
                    fut.set_exception(err)

    def _fail_pending(self, err: StateError) -> None:
        batch = self._batch
        self._batch = None
        if batch is not None:
            if batch.timer is not None:
                batch.timer.cancel()
            for *_, fut in batch.items:
                if not fut.done():
                    fut.set_exception(err)

    async def _send(self, batch: _Batch) -> None:
        items = batch.items
        n = len(items)
        self.batches += 1
        self.checks += n
        if n > self.largest_batch:
            self.largest_batch = n
        self._batch_hist.observe(n)
        try:
            results = await self._pipeline(items)
            for (buckets, _, _, fut), res in zip(items, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, Exception):
                    fut.set_exception(StateError(str(res)))
                else:
                    fut.set_result(Verdict(res[0] == 1, res[1:], buckets.limits, OK))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            err = StateError(self.last_error)
            for *_, fut in items:
                if not fut.done():
                    fut.set_exception(err)
        finally:
            if batch.timer is not None:
                batch.timer.cancel()
            self._in_flight -= 1
            if self._batch is not None and not self._flush_scheduled and not self._closed:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _pipeline(self, items: list[Item]) -> list[Any]:
        from redis.exceptions import NoScriptError

        results: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            sha = self._sha
            for i in todo:
                buckets, key, cost, _ = items[i]
                keys = buckets.redis_keys(key)
                # execute_command, not evalsha(): redis-py's cluster pipeline blocks the
                # evalsha method, but routes the command itself by its keys' slot.
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, cost, *buckets.args)
            answers = await pipe.execute(raise_on_error=False)
            retry = []
            for i, res in zip(todo, answers, strict=True):
                if isinstance(res, NoScriptError) and attempt == 0:
                    retry.append(i)
                else:
                    results[i] = res
            if not retry:
                break
            # Redis restarted (or flushed its scripts): load the script, send those again.
            await self._client.script_load(TAKE_SCRIPT)
            todo = retry
        return results

    # -- counters ---------------------------------------------------------------------------------
    async def add(self, name: str, amount: int, ttl: float) -> int:
        key = f"{self.prefix}n:{{{name}}}"
        try:
            return int(
                await asyncio.wait_for(
                    self._client.eval(ADD_SCRIPT, 1, key, amount, max(1, int(ttl * 1000))),
                    timeout=self.timeout,
                )
            )
        except Exception as exc:
            self._failed(exc)
            raise StateError(self.last_error) from exc

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(
            healthy=self.healthy,
            on_error=self.on_error,
            timeout_s=self.timeout,
            errors=self.errors,
            last_error=self.last_error,
            nodes=self.config.nodes or self.nodes_observed,
            batches=self.batches,
            checks=self.checks,
            avg_batch_size=round(self.checks / self.batches, 2) if self.batches else 0.0,
            largest_batch=self.largest_batch,
            pid=os.getpid(),
        )
        return out
