"""The ``redis`` backend: exact cluster-wide buckets through one atomic Lua script.

Theory of operation
-------------------
``TAKE_SCRIPT`` checks a whole batch of requests in one ``EVALSHA``: for each check in turn it
reads the buckets' TATs, decides with Redis's own clock (``TIME``: the nodes' clocks do not
matter) and writes them back, all atomically, so two checks of one key in a batch see each
other exactly as if they had come one by one. A request's buckets share a hash tag
(``gw:rl:{key}:limit``), so in a Redis Cluster they live on one slot.

Batching: ``take`` queues the check and schedules a flush with ``loop.call_soon``; every check
queued during that loop iteration goes out in one script call, one round trip. At most
``MAX_IN_FLIGHT`` batches are outstanding; while they are, new checks accumulate into the
next batch, so batches grow with load instead of with connections (``MAX_BATCH`` checks at
most per call, which keeps each script run short).

Transport: standalone Redis (``redis://``, ``rediss://``, ``unix://``) and the master found
through Sentinel are spoken to over one pipelined connection (``gateway.state.resp``):
pre-encoded command bytes out, hiredis-parsed replies handed back in order, no task per round
trip. Redis Cluster goes through redis-py's cluster pipeline (one ``EVALSHA`` per check,
routed by its slot), which is slower per check but finds the slot owners.

Time bound: a batch's timer (``timeout``, default 50 ms) starts when its first check is queued;
when it fires, every check of the batch still waiting is answered by the degraded mode and the
backend turns *unhealthy*. While unhealthy, checks go straight to the degraded mode, and one
task probes Redis (a new connection, ``PING``, ``SCRIPT LOAD``) with exponential backoff
(50 ms doubling to 2 s, jittered) until it answers; then checks go to Redis again. A check that
timed out may still be applied by Redis later. Degraded modes (``on_error``):

- ``local``: the node's shared-memory bucket (``memory`` backend), with each limit divided by
  the number of nodes: ``state.nodes`` if set, else the count of nodes seen alive in Redis (each
  node refreshes its entry in ``gw:nodes``, a sorted set scored by Redis time, every 5 s).
- ``open``: admitted without a check. ``closed``: refused; the caller answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import random
import socket
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gateway import metrics, runinfo
from gateway.config.model import StateConfig
from gateway.state import CLOSED, LOCAL, OK, OPEN, Buckets, StateBackend, StateError, Verdict, resp
from gateway.state.gcra import Limit
from gateway.state.memory import SLOT_CACHE_SIZE, LocalBuckets, close_table, open_table
from gateway.state.shm import SharedTable

log = logging.getLogger("gateway.state")

MAX_IN_FLIGHT = 2
MAX_BATCH = 256
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
HEARTBEAT_INTERVAL = 5.0
NODE_TTL = 15
#: A key longer than this, or with braces (which would break the hash tag), is hashed.
MAX_PLAIN_KEY = 96

#: ARGV: the number of checks, then per check: its limit count n, its cost, n emission
#: intervals, n tolerances (all in µs). KEYS: per check, its n bucket keys. Returns, per
#: check: 1 (admitted) or 0, then the n waits (TAT minus now, after the take).
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local k = 0
local a = 1
for c = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a + 1])
  local cost = tonumber(ARGV[a + 2])
  local tats = {}
  local allowed = 1
  for i = 1, n do
    local tat = tonumber(redis.call('GET', KEYS[k + i])) or 0
    if tat < now then tat = now end
    tats[i] = tat
    if tat + cost * tonumber(ARGV[a + 2 + i]) - now > tonumber(ARGV[a + 2 + n + i]) then
      allowed = 0
    end
  end
  out[#out + 1] = allowed
  for i = 1, n do
    local wait = tats[i] - now
    if allowed == 1 and cost > 0 then
      wait = wait + cost * tonumber(ARGV[a + 2 + i])
      redis.call('SET', KEYS[k + i], string.format('%d', now + wait), 'PX', math.ceil(wait / 1000))
    end
    out[#out + 1] = wait
  end
  k = k + n
  a = a + 2 + 2 * n
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
    "Checks sent to Redis in one round trip",
    (),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _hosts(netloc: str) -> tuple[str | None, list[tuple[str, int]]]:
    """The password and the ``host:port`` list of a Sentinel or Cluster URL's netloc."""
    auth, _, hostlist = netloc.rpartition("@")
    password = unquote(auth.split(":", 1)[-1]) if auth else None
    hosts = []
    for hp in hostlist.split(","):
        host, _, port = hp.rpartition(":")
        hosts.append((host.strip("[]") or "127.0.0.1", int(port or 6379)))
    return password, hosts


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"[:200]


def _socket_timeout(timeout: float) -> float:
    # Frees a connection stuck on a stalled server; callers never wait that long (the batch
    # timer answers them after ``timeout``).
    return max(1.0, timeout * 20)


def _segment(args: tuple[Any, ...]) -> bytes:
    """``args`` as RESP bulk strings, without the array header: a piece of a command."""
    packed = resp.pack_command(args)
    return packed[packed.index(b"\r\n") + 2 :]


def _bulk_int(n: int) -> bytes:
    digits = b"%d" % n
    return b"$%d\r\n%s\r\n" % (len(digits), digits)


class _Batch:
    __slots__ = ("answered", "holds_slot", "items", "payload", "retried", "timer", "values")

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.timer: asyncio.TimerHandle | None = None
        self.payload = b""
        self.values = 0  # the script's reply length: per check, admitted and one wait per limit
        self.answered = False  # every check has had its verdict (all are answered together)
        self.holds_slot = False  # sent, counted in the backend's in-flight batches
        self.retried = False  # sent again after NOSCRIPT


#: ``on_done(arg, allowed, waits, limits, mode)``: a verdict's fields, no object (see enqueue)
OnDone = Callable[[Any, bool, list[int], tuple[Limit, ...], str], None]
Item = tuple["RedisBuckets", str, int, OnDone, Any]
Done = Callable[[_Batch, Any], None]


class _Link:
    """How the backend reaches Redis. ``open`` (re)connects; ``call`` runs one command;
    ``submit`` sends a batch of checks and calls ``done(batch, reply)`` exactly once, where
    ``reply`` is the script's flat reply, a list with one reply per check (``per_check``),
    or an exception (the whole batch failed)."""

    per_check = False
    #: where it is connected, for /status ("" when unknown: Cluster, or not yet connected)
    server = ""

    async def open(self) -> None:
        raise NotImplementedError

    async def call(self, *args: Any) -> Any:
        raise NotImplementedError

    async def load_scripts(self, *scripts: str) -> None:
        for script in scripts:
            await self.call("SCRIPT", "LOAD", script)

    def submit(self, batch: _Batch, sha: bytes, done: Done) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class RespLink(_Link):
    """Standalone Redis, or the master a Sentinel names: one pipelined ``RespConnection``;
    a batch is one ``EVALSHA`` of the script over all its checks."""

    def __init__(self, url: str, timeout: float) -> None:
        self.conn: resp.RespConnection | None = None
        self._sentinel: Any = None
        self._service = ""
        self._endpoint: resp.Endpoint | None = None
        parts = urlsplit(url)
        if parts.scheme.lower() == "redis+sentinel":
            from redis.asyncio.sentinel import Sentinel

            password, hosts = _hosts(parts.netloc)
            path = [p for p in parts.path.split("/") if p]
            if not path:
                raise ValueError(
                    "a redis+sentinel URL names the service: redis+sentinel://h:p/name"
                )
            self._service = path[0]
            self._master_password = password
            self._master_db = int(path[1]) if len(path) > 1 else 0
            self._sentinel = Sentinel(
                hosts, sentinel_kwargs={"socket_timeout": _socket_timeout(timeout)}
            )
        else:
            self._endpoint = resp.Endpoint.from_url(url)

    async def _where(self) -> resp.Endpoint:
        if self._endpoint is not None:
            return self._endpoint
        host, port = await self._sentinel.discover_master(self._service)
        return resp.Endpoint(
            host=host, port=int(port), password=self._master_password, db=self._master_db
        )

    async def open(self) -> None:
        resp.close_quietly(self.conn)
        self.conn = None
        where = await self._where()
        conn = await resp.connect(where)
        self.conn = conn
        self.server = where.describe()
        await conn.call("PING")
        if self._sentinel is not None:
            # Sentinel can still name a master that has become a replica (a failover it has
            # not finished, an old master back as a replica). Writing there would fail each
            # batch with READONLY; refusing it keeps the backend degraded, with a clear
            # error, and the reconnect loop asks Sentinel again.
            role = await conn.call("ROLE")
            if not isinstance(role, list) or not role or role[0] != b"master":
                self.conn = None
                resp.close_quietly(conn)
                named = (
                    role[0].decode(errors="replace") if isinstance(role, list) and role else role
                )
                raise ConnectionError(
                    f"Sentinel names {self.server} as the master of {self._service!r}, "
                    f"but its role is {named!r}"
                )

    async def call(self, *args: Any) -> Any:
        conn = self.conn
        if conn is None:
            raise ConnectionError("not connected to Redis")
        return await conn.call(*args)

    def submit(self, batch: _Batch, sha: bytes, done: Done) -> None:
        if not batch.payload:
            keys: list[bytes] = []
            args: list[bytes] = []
            nkeys = 0
            nargs = 1
            for buckets, key, cost, _, _ in batch.items:
                # The segments' caches read inline (per check, a method call costs ~500
                # instructions); a miss makes them.
                kseg, kn = buckets.segments.get(key) or buckets.key_segment(key)
                aseg, an = buckets.args.get(cost) or buckets.arg_segment(cost)
                keys.append(kseg)
                args.append(aseg)
                nkeys += kn
                nargs += an
            head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (
                3 + nkeys + nargs,
                sha,
                _bulk_int(nkeys),
            )
            batch.payload = b"".join((head, *keys, _bulk_int(len(batch.items)), *args))
            batch.values = len(batch.items) + nkeys  # one key per limit
        conn = self.conn
        try:
            if conn is None:
                raise ConnectionError("not connected to Redis")
            conn.send(batch.payload, functools.partial(done, batch))
        except ConnectionError as exc:
            done(batch, exc)

    async def close(self) -> None:
        resp.close_quietly(self.conn)
        self.conn = None
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                with contextlib.suppress(Exception):
                    await sentinel.aclose()


class ClusterLink(_Link):
    """Redis Cluster through redis-py: a batch is one cluster pipeline with an ``EVALSHA``
    per check, each routed to its slot's primary."""

    per_check = True

    def __init__(self, url: str, timeout: float) -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        parts = urlsplit(url)
        password, hosts = _hosts(parts.netloc)
        query = parse_qs(parts.query)
        sock_timeout = _socket_timeout(timeout)
        self.client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in hosts],
            password=password,
            require_full_coverage="false" not in query.get("require_full_coverage", []),
            socket_timeout=sock_timeout,
            socket_connect_timeout=sock_timeout,
            health_check_interval=0,
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        await self.client.ping()

    async def call(self, *args: Any) -> Any:
        if args[0] == "EVAL":
            return await self.client.eval(*args[1:])
        return await self.client.execute_command(*args)

    async def load_scripts(self, *scripts: str) -> None:
        for script in scripts:
            await self.client.script_load(script)  # on every primary

    def submit(self, batch: _Batch, sha: bytes, done: Done) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch, sha.decode(), done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: _Batch, sha: str, done: Done) -> None:
        from redis.exceptions import NoScriptError

        items = batch.items
        results: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        try:
            for attempt in range(2):
                pipe = self.client.pipeline(transaction=False)
                for i in todo:
                    buckets, key, cost, _, _ = items[i]
                    keys = buckets.redis_keys(key)
                    # execute_command, not evalsha(): redis-py's cluster pipeline blocks the
                    # evalsha method, but routes the command itself by its keys' slot.
                    pipe.execute_command(
                        "EVALSHA", sha, len(keys), *keys, 1, *buckets.arg_values(cost)
                    )
                answers = await pipe.execute(raise_on_error=False)
                retry = []
                for i, res in zip(todo, answers, strict=True):
                    if isinstance(res, NoScriptError) and attempt == 0:
                        retry.append(i)
                    else:
                        results[i] = res
                if not retry:
                    break
                # A node restarted (or flushed its scripts): load it, send those again.
                await self.client.script_load(TAKE_SCRIPT)
                todo = retry
        except asyncio.CancelledError:
            done(batch, ConnectionError("closing"))
            raise
        except Exception as exc:
            done(batch, exc)
            return
        done(batch, results)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.client.aclose()


def make_link(url: str, timeout: float) -> _Link:
    """The link for a URL. ``redis://``, ``rediss://``, ``unix://``: standalone.
    ``redis+sentinel://[:pw@]h:p[,h:p]/service[/db]``: the service's master through Sentinel.
    ``redis+cluster://[:pw@]h:p[,h:p]``: Redis Cluster (startup nodes)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix", "redis+sentinel"):
        return RespLink(url, timeout)
    if scheme == "redis+cluster":
        return ClusterLink(url, timeout)
    raise ValueError(f"unsupported Redis URL scheme {scheme!r}")


class RedisBuckets(Buckets):
    """A plugin's limits on Redis: script arguments and Redis key names encoded once."""

    __slots__ = ("_keys", "_local", "_local_nodes", "args", "backend", "n", "segments")

    def __init__(self, backend: RedisBackend, limits: tuple[Limit, ...]) -> None:
        super().__init__(limits)
        self.backend = backend
        self.n = len(limits)
        self._keys: dict[str, tuple[str, ...]] = {}
        #: key -> its KEYS segment and their count; cost -> its ARGV segment and length
        self.segments: dict[str, tuple[bytes, int]] = {}
        self.args: dict[int, tuple[bytes, int]] = {}
        self._local: LocalBuckets | None = None
        self._local_nodes = 0

    def redis_keys(self, key: str) -> tuple[str, ...]:
        found = self._keys.get(key)
        if found is None:
            tag = key
            try:
                raw = key.encode()
            except UnicodeEncodeError:  # lone surrogates (say, from a JSON claim): hashed
                raw = key.encode("utf-8", "surrogatepass")
                tag = ""
            if not tag or len(tag) > MAX_PLAIN_KEY or "{" in tag or "}" in tag:
                tag = hashlib.blake2b(raw, digest_size=16).hexdigest()
            prefix = self.backend.prefix
            found = tuple(f"{prefix}rl:{{{tag}}}:{limit.name}" for limit in self.limits)
            if len(self._keys) >= SLOT_CACHE_SIZE:
                self._keys.clear()
            self._keys[key] = found
        return found

    def key_segment(self, key: str) -> tuple[bytes, int]:
        """The check's KEYS, RESP-encoded, and their count."""
        found = self.segments.get(key)
        if found is None:
            keys = self.redis_keys(key)
            found = (_segment(keys), len(keys))
            if len(self.segments) >= SLOT_CACHE_SIZE:
                self.segments.clear()
            self.segments[key] = found
        return found

    def arg_values(self, cost: int) -> tuple[int, ...]:
        limits = self.limits
        return (
            self.n,
            cost,
            *[lim.interval for lim in limits],
            *[lim.tolerance for lim in limits],
        )

    def arg_segment(self, cost: int) -> tuple[bytes, int]:
        """The check's ARGV part, RESP-encoded, and its length."""
        found = self.args.get(cost)
        if found is None:
            values = self.arg_values(cost)
            found = (_segment(values), len(values))
            if len(self.args) >= 64:
                self.args.clear()
            self.args[cost] = found
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
    loop: asyncio.AbstractEventLoop  # set by start(); checks are queued only once started

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
        self._link: _Link | None = None
        self._sha = _sha1(TAKE_SCRIPT).encode()
        self._batch: _Batch | None = None  # the batch being filled
        self._ready: deque[_Batch] = deque()  # full batches waiting for a send slot
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
        self.loop = asyncio.get_running_loop()
        self._node_id = f"{socket.gethostname()}:{runinfo.run_dir()}"
        self._link = make_link(self.config.url, self.timeout)
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
        assert self._link is not None
        await self._link.open()
        await self._link.load_scripts(TAKE_SCRIPT, ADD_SCRIPT)
        if self.config.nodes is None:
            await self._count_nodes()

    async def close(self) -> None:
        self._closed = True
        self.healthy = False  # checks from now on take the degraded path, without waiting
        for task in (self._probe, self._heartbeat, *self._tasks):
            if task is not None:
                task.cancel()
        self._fail_pending()
        if self._link is not None:
            with contextlib.suppress(Exception):
                await self._link.close()
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
        else:
            self._err_error.inc()
        self.last_error = _describe(exc)
        if self.healthy or self._probe is None or self._probe.done():
            self._set_healthy(False)
            self._fail_pending()
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
                self.last_error = _describe(exc)
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
        assert self._link is not None
        n = await self._link.call(
            "EVAL", NODES_SCRIPT, 1, self.prefix + "nodes", self._node_id, NODE_TTL
        )
        self.nodes_observed = max(1, int(n))

    # -- degraded answers ------------------------------------------------------------------------
    def degraded(self, buckets: RedisBuckets, key: str, cost: int) -> Verdict:
        """The answer of the degraded mode (``on_error``); no I/O."""
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
            return self.degraded(buckets, key, cost)
        fut: asyncio.Future[Verdict] = self.loop.create_future()

        def done(
            _: Any, allowed: bool, waits: list[int], limits: tuple[Limit, ...], mode: str
        ) -> None:
            if not fut.done():  # the caller may have been cancelled
                fut.set_result(Verdict(allowed, waits, limits, mode))

        self.enqueue(buckets, key, cost, done, None)
        return await fut

    def enqueue(
        self, buckets: RedisBuckets, key: str, cost: int, on_done: OnDone, arg: Any
    ) -> None:
        """``take`` without a coroutine: ``on_done(arg, allowed, waits, limits, mode)`` (a
        ``Verdict``'s fields: per check, an object and a closure cost ~1.5k instructions) is
        called exactly once, from a later loop iteration (the reply, or the degraded mode
        after an error or the timeout), and must not raise. Only while ``healthy``; otherwise
        ask ``degraded``."""
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            batch.timer = self.loop.call_later(self.timeout, self._expire, batch)
        items = batch.items
        items.append((buckets, key, cost, on_done, arg))
        if len(items) >= MAX_BATCH:
            self._ready.append(batch)
            self._batch = None
        if not self._flush_scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        link = self._link
        if link is None or self._closed:
            return
        ready = self._ready
        while self._in_flight < MAX_IN_FLIGHT:
            if ready:
                batch = ready.popleft()
            elif self._batch is not None:
                batch = self._batch
                self._batch = None
            else:
                return
            n = len(batch.items)
            self.batches += 1
            self.checks += n
            if n > self.largest_batch:
                self.largest_batch = n
            self._batch_hist.observe(n)
            self._in_flight += 1
            batch.holds_slot = True
            try:
                link.submit(batch, self._sha, self._answered)
            except Exception as exc:  # a bug, not Redis: still answer, and free the slot
                log.exception("sending a rate-limit batch failed")
                self._answered(batch, exc)

    def _release(self, batch: _Batch) -> None:
        """Give back the batch's in-flight slot (once: a batch that timed out gives it back
        then, not when its late reply or connection error comes)."""
        if batch.holds_slot:
            batch.holds_slot = False
            self._in_flight -= 1

    def _expire(self, batch: _Batch) -> None:
        """A batch's timeout: its checks get the degraded mode's answer, now."""
        if batch is self._batch:
            self._batch = None
        with contextlib.suppress(ValueError):
            self._ready.remove(batch)
        if not batch.answered:
            self._release(batch)
            self._failed(TimeoutError())
            self._answer_degraded(batch)
            self._schedule_flush()

    def _fail_pending(self) -> None:
        """Answer every check not yet sent with the degraded mode."""
        batches = list(self._ready)
        self._ready.clear()
        if self._batch is not None:
            batches.append(self._batch)
            self._batch = None
        for batch in batches:
            if batch.timer is not None:
                batch.timer.cancel()
            self._answer_degraded(batch)

    def _answered(self, batch: _Batch, reply: Any) -> None:
        """A batch's reply (see ``_Link``): hand each check its verdict."""
        if batch.answered:  # timed out already; its slot was given back then
            return
        if (
            isinstance(reply, resp.RespError)
            and str(reply).startswith("NOSCRIPT")
            and not batch.retried
        ):
            # Redis restarted or flushed its scripts: load the script, send the batch again,
            # holding the same slot, under the same timer.
            batch.retried = True
            task = self.loop.create_task(self._reload_and_resend(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._release(batch)
        if batch.timer is not None:
            batch.timer.cancel()
        if isinstance(reply, list):
            try:
                if self._link is not None and self._link.per_check:
                    self._deliver(batch, self._verdicts_each(batch, reply))
                else:
                    self._deliver_all(batch, reply)
            except Exception as bad:
                reply = ValueError(f"unexpected reply from Redis: {bad!r}"[:200])
            else:
                reply = None
        if reply is not None:
            if self.healthy and not self._closed:
                exc = reply if isinstance(reply, BaseException) else ValueError(repr(reply)[:200])
                self._failed(exc)
            self._answer_degraded(batch)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        pending = self._batch is not None or self._ready
        if pending and not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _deliver_all(self, batch: _Batch, reply: list[Any]) -> None:
        """The script's flat reply: per check, admitted (1/0) then its waits. Checked whole
        before anyone is answered (a short reply raises, and the batch goes degraded)."""
        items = batch.items
        if len(reply) != batch.values:
            raise IndexError(f"{len(reply)} values for {len(items)} checks")
        batch.answered = True
        i = 0
        for buckets, _, _, on_done, arg in items:
            n = buckets.n
            try:
                on_done(arg, reply[i] == 1, reply[i + 1 : i + 1 + n], buckets.limits, OK)
            except Exception:
                log.exception("rate-limit verdict callback failed")
            i += 1 + n

    def _verdicts_each(self, batch: _Batch, replies: list[Any]) -> list[Verdict]:
        out = []
        for (buckets, key, cost, *_), res in zip(batch.items, replies, strict=True):
            if isinstance(res, BaseException):
                out.append(self.degraded(buckets, key, cost))
            else:
                out.append(Verdict(res[0] == 1, res[1:], buckets.limits, OK))
        return out

    def _deliver(self, batch: _Batch, verdicts: list[Verdict]) -> None:
        batch.answered = True
        for (*_, on_done, arg), v in zip(batch.items, verdicts, strict=True):
            try:
                on_done(arg, v.allowed, v.waits, v.limits, v.mode)
            except Exception:
                log.exception("rate-limit verdict callback failed")

    def _answer_degraded(self, batch: _Batch) -> None:
        verdicts = []
        for buckets, key, cost, _, _ in batch.items:
            try:
                verdicts.append(self.degraded(buckets, key, cost))
            except Exception:  # a bug: answer anyway, as open or closed, never leave it waiting
                log.exception("the degraded rate-limit answer failed")
                mode = OPEN if self.on_error == OPEN else CLOSED
                verdicts.append(Verdict(mode == OPEN, [], buckets.limits, mode))
        self._deliver(batch, verdicts)

    async def _reload_and_resend(self, batch: _Batch) -> None:
        assert self._link is not None
        try:
            await asyncio.wait_for(
                self._link.call("SCRIPT", "LOAD", TAKE_SCRIPT), timeout=self.timeout
            )
        except asyncio.CancelledError:  # closing
            self._answered(batch, ConnectionError("closing"))
            raise
        except Exception as exc:
            self._answered(batch, exc)
            return
        if not batch.answered:
            self._link.submit(batch, self._sha, self._answered)

    # -- counters ---------------------------------------------------------------------------------
    async def add(self, name: str, amount: int, ttl: float) -> int:
        assert self._link is not None
        key = f"{self.prefix}n:{{{name}}}"
        try:
            return int(
                await asyncio.wait_for(
                    self._link.call("EVAL", ADD_SCRIPT, 1, key, amount, max(1, int(ttl * 1000))),
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
            server=self._link.server if self._link is not None else "",
            transport="redis-py cluster pipeline"
            if isinstance(self._link, ClusterLink)
            else "resp",
            pid=os.getpid(),
        )
        return out
