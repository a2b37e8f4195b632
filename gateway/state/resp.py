"""A lean Redis connection for the rate limiter's hot path: RESP2 over one asyncio protocol.

redis-py's asyncio pipeline costs on the order of 100 µs of CPU per round trip in a gateway
worker (command packing in Python, a lock, a timeout context, a task), which is more than the
proxying of a request. This connection does the least a pipelined client can do: the caller
hands it ready-made command bytes and a callback; replies are parsed by hiredis (in C) and
each one goes to the oldest waiting callback. No task, future or lock per round trip.

It is used for standalone and Sentinel-managed Redis (``gateway.state.redis``); Redis Cluster,
where commands are routed by slot, goes through redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

#: A reply: bytes, int, list, None, a ``RespError`` (an error reply), or an ``OSError``
#: (``ConnectionError`` when the connection was lost before the reply came).
Reply = Any
Callback = Callable[[Reply], None]

pack_command: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect: from a ``redis://``, ``rediss://`` or ``unix://`` URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    tls: bool = False
    tls_verify: bool = True
    tls_ca: str | None = None
    tls_cert: str | None = None  # a client certificate (PEM; may hold the key too)
    tls_key: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        query = parse_qs(parts.query)

        def param(name: str) -> str | None:
            values = query.get(name)
            return values[0] if values else None

        # As redis-py: credentials in the netloc, or in ?username= / ?password=.
        username = unquote(parts.username) if parts.username else param("username")
        password = unquote(parts.password) if parts.password else param("password")
        if scheme == "unix":
            return cls(
                path=unquote(parts.path),
                username=username or None,
                password=password or None,
                db=int(param("db") or 0),
            )
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"not a standalone Redis URL: {scheme}://")
        path = parts.path.strip("/")
        db = param("db") or path or "0"
        reqs = (param("ssl_cert_reqs") or "required").lower()
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            tls=scheme == "rediss",
            tls_verify=reqs not in ("none", "cert_none"),
            tls_ca=param("ssl_ca_certs"),
            tls_cert=param("ssl_certfile"),
            tls_key=param("ssl_keyfile"),
            username=username or None,
            password=password or None,
            db=int(db),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if not self.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.tls_cert is not None:  # for a server that asks for one (tls-auth-clients)
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def describe(self) -> str:
        return self.path or f"{self.host}:{self.port}"


class RespConnection(asyncio.Protocol):
    """One pipelined connection. ``send`` writes a command (or several, with as many
    callbacks) now; callbacks are called in order with each reply, or with a
    ``ConnectionError`` for every reply still due when the connection is lost or closed."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=RespError)
        self._waiting: deque[Callback] = deque()
        self.lost: BaseException | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        try:
            while (reply := reader.gets()) is not False:
                if not waiting:  # a reply nobody asked for: the stream is out of step
                    self.close(ConnectionError("unexpected reply from Redis"))
                    return
                waiting.popleft()(reply)
        except hiredis.ProtocolError as exc:
            self.close(ConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail_waiting(exc or ConnectionError("Redis closed the connection"))

    # -- use ------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.transport is not None

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def send(self, data: bytes, callback: Callback) -> None:
        """Write one command; ``callback`` gets its reply. Raises ``ConnectionError`` when
        the connection is gone (nothing is then sent and the callback is never called)."""
        transport = self.transport
        if transport is None:
            raise ConnectionError(f"not connected to Redis: {self.lost or 'closed'}")
        transport.write(data)
        self._waiting.append(callback)

    async def call(self, *args: Any) -> Reply:
        """One command; its reply, or raises ``RespError`` / ``ConnectionError``."""
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def done(reply: Reply) -> None:
            if not fut.done():
                fut.set_result(reply)

        self.send(pack_command(args), done)
        reply = await fut
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self, why: BaseException | None = None) -> None:
        """Close now; every callback still due is called with a ``ConnectionError``."""
        transport = self.transport
        self.transport = None
        if transport is not None:
            transport.abort()
        self._fail_waiting(why or ConnectionError("connection to Redis closed"))

    def _fail_waiting(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        if not isinstance(exc, ConnectionError):
            exc = ConnectionError(str(exc) or type(exc).__name__)
        waiting = self._waiting
        while waiting:
            waiting.popleft()(exc)


async def connect(endpoint: Endpoint) -> RespConnection:
    """Open a connection and authenticate / select the database. Unbounded in time: callers
    wrap it in their timeout. Raises ``OSError`` or ``RespError``."""
    loop = asyncio.get_running_loop()
    conn: RespConnection
    if endpoint.path is not None:
        _, conn = await loop.create_unix_connection(RespConnection, endpoint.path)
    else:
        context = endpoint.ssl_context()
        _, conn = await loop.create_connection(
            RespConnection,
            endpoint.host,
            endpoint.port,
            ssl=context,
            server_hostname=endpoint.host if context is not None else None,
        )
    try:
        if endpoint.password is not None:
            if endpoint.username is not None:
                await conn.call("AUTH", endpoint.username, endpoint.password)
            else:
                await conn.call("AUTH", endpoint.password)
        if endpoint.db:
            await conn.call("SELECT", endpoint.db)
    except BaseException:
        conn.close()
        raise
    return conn


def close_quietly(conn: RespConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
