"""The lean RESP connection (``gateway.state.resp``) against a real redis-server, on uvloop as
in a worker: pipelined replies in order, error replies, a lost connection, a garbled or
unasked-for reply, AUTH and SELECT from the URL, TLS with a client certificate."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from gateway.config.model import StateConfig
from gateway.state import OK
from gateway.state.gcra import Limit
from gateway.state.redis import RedisBackend
from gateway.state.resp import Endpoint, RespConnection, RespError, connect
from tests.support.redis import RedisServer


def endpoint(redis: RedisServer, **kw: Any) -> Endpoint:
    return Endpoint(host="127.0.0.1", port=redis.port, **kw)


def test_urls_parse_into_endpoints() -> None:
    e = Endpoint.from_url("redis://:pa%40ss@10.0.0.9:6380/3")
    assert (e.host, e.port, e.password, e.username, e.db, e.tls) == (
        "10.0.0.9",
        6380,
        "pa@ss",
        None,
        3,
        False,
    )
    e = Endpoint.from_url("rediss://alice:pw@cache.example?ssl_cert_reqs=none")
    assert (e.host, e.port, e.username, e.password, e.tls, e.tls_verify) == (
        "cache.example",
        6379,
        "alice",
        "pw",
        True,
        False,
    )
    assert e.ssl_context() is not None
    e = Endpoint.from_url("unix:///run/redis.sock?db=2")
    assert (e.path, e.db, e.describe()) == ("/run/redis.sock", 2, "/run/redis.sock")
    e = Endpoint.from_url("redis://10.0.0.9?password=p%2Bw&username=bob&db=4")
    assert (e.username, e.password, e.db) == ("bob", "p+w", 4)
    e = Endpoint.from_url("unix://:@/run/my%20redis.sock")
    assert (e.path, e.password) == ("/run/my redis.sock", None)
    with pytest.raises(ValueError, match="not a standalone Redis URL"):
        Endpoint.from_url("redis+cluster://h:1")


def test_pipelined_replies_reach_their_callbacks_in_order(redis: RedisServer) -> None:
    async def main() -> None:
        conn = await connect(endpoint(redis))
        got: list[Any] = []
        conn.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n", got.append)
        conn.send(b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n", got.append)
        conn.send(b"*2\r\n$4\r\nHGET\r\n$1\r\nk\r\n", got.append)  # wrong arity: an error
        conn.send(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", got.append)
        assert conn.pending == 4
        assert await conn.call("PING") == b"PONG"  # answered after all four
        assert got[:2] == [b"OK", 8] and got[3] == b"8"
        assert isinstance(got[2], RespError) and "wrong number of arguments" in str(got[2])
        with pytest.raises(RespError, match="unknown command"):
            await conn.call("NOSUCHCOMMAND")
        conn.close()
        assert not conn.alive

    uvloop.run(main())


def test_a_lost_connection_answers_every_waiting_callback(redis: RedisServer) -> None:
    async def main() -> None:
        conn = await connect(endpoint(redis))
        got: list[Any] = []
        conn.send(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$3\r\n0.5\r\n", got.append)
        conn.send(b"*1\r\n$4\r\nPING\r\n", got.append)
        await asyncio.sleep(0.05)
        redis.kill()
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(got) == 2 and all(isinstance(g, ConnectionError) for g in got), got
        assert not conn.alive
        with pytest.raises(ConnectionError, match="not connected"):
            conn.send(b"*1\r\n$4\r\nPING\r\n", got.append)

    uvloop.run(main())


def test_garbage_or_an_unasked_for_reply_closes_the_connection() -> None:
    class Transport:
        aborted = False

        def write(self, data: bytes) -> None:
            pass

        def abort(self) -> None:
            self.aborted = True

    garbled = RespConnection()
    transport = Transport()
    garbled.connection_made(transport)  # type: ignore[arg-type]
    got: list[Any] = []
    garbled.send(b"*1\r\n$4\r\nPING\r\n", got.append)
    garbled.data_received(b"?what\r\n")
    assert transport.aborted and not garbled.alive
    assert len(got) == 1 and isinstance(got[0], ConnectionError)
    assert "protocol error" in str(got[0])

    unasked = RespConnection()
    transport = Transport()
    unasked.connection_made(transport)  # type: ignore[arg-type]
    unasked.data_received(b"+OK\r\n")
    assert transport.aborted and not unasked.alive


@pytest.fixture
def secured() -> Iterator[RedisServer]:
    server = RedisServer()
    server.extra = ("--requirepass", "s3cret")
    server.restart()
    yield server
    server.stop()


def test_auth_and_select_from_the_url(secured: RedisServer) -> None:
    async def main() -> None:
        conn = await connect(endpoint(secured, password="s3cret", db=2))
        await conn.call("SET", "where", "db2")
        conn.close()
        conn = await connect(endpoint(secured, username="default", password="s3cret", db=2))
        assert await conn.call("GET", "where") == b"db2"
        conn.close()
        with pytest.raises(RespError, match=r"WRONGPASS|invalid password"):
            await connect(endpoint(secured, password="wrong"))
        anonymous = await connect(endpoint(secured))
        with pytest.raises(RespError, match="NOAUTH"):
            await anonymous.call("GET", "where")
        anonymous.close()

    uvloop.run(main())


def test_backend_with_a_password_url_on_uvloop(secured: RedisServer) -> None:
    async def main() -> None:
        url = f"redis://:s3cret@127.0.0.1:{secured.port}/1"
        backend = RedisBackend(StateConfig(backend="redis", url=url, timeout=2.0))
        await backend.start()
        try:
            assert backend.healthy, backend.status()
            assert backend.status()["server"] == f"127.0.0.1:{secured.port}"
            buckets = backend.buckets((Limit(3, 60, 3, "m"),))
            verdicts = await asyncio.gather(*(buckets.take("k", 1) for _ in range(5)))
            assert [v.allowed for v in verdicts] == [True, True, True, False, False]
            assert {v.mode for v in verdicts} == {OK}
            assert [v.waits[0] // 1_000_000 for v in verdicts[:3]] == [20, 40, 60]
        finally:
            await backend.close()
        bad = RedisBackend(
            StateConfig(backend="redis", url=url.replace("s3cret", "nope"), timeout=0.2)
        )
        await bad.start()
        try:
            assert not bad.healthy
            assert "WRONGPASS" in bad.status()["last_error"] or "invalid" in bad.last_error
        finally:
            await bad.close()

    uvloop.run(main())


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    """A redis-server speaking only TLS, asking clients for a certificate from its CA."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    client = ca.issue_cert("gateway")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.crt"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    server = RedisServer()
    server.extra = ("--port", "0", "--tls-port", str(server.port),
                    "--tls-cert-file", str(tmp_path / "server.pem"),
                    "--tls-key-file", str(tmp_path / "server.pem"),
                    "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
                    "--tls-auth-clients", "yes")  # fmt: skip
    server.restart()
    yield server, tmp_path
    server.stop()


def test_rediss_with_a_client_certificate(tls_redis: tuple[RedisServer, Path]) -> None:
    server, certs = tls_redis
    base = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={certs / 'ca.pem'}"
    with_cert = f"{base}&ssl_certfile={certs / 'client.crt'}&ssl_keyfile={certs / 'client.key'}"
    e = Endpoint.from_url(with_cert)
    assert (e.tls, e.tls_cert, e.tls_key) == (
        True,
        str(certs / "client.crt"),
        str(certs / "client.key"),
    )

    async def main() -> None:
        backend = RedisBackend(StateConfig(backend="redis", url=with_cert, timeout=2.0))
        await backend.start()
        try:
            assert backend.healthy, backend.status()
            buckets = backend.buckets((Limit(2, 60, 2, "m"),))
            verdicts = await asyncio.gather(*(buckets.take("k", 1) for _ in range(3)))
            assert [v.allowed for v in verdicts] == [True, True, False]
            assert {v.mode for v in verdicts} == {OK}
        finally:
            await backend.close()
        # The server asks for a certificate: without one the handshake fails, and the backend
        # says why (degraded; on_error decides what checks get).
        bare = RedisBackend(StateConfig(backend="redis", url=base, timeout=0.5))
        await bare.start()
        try:
            assert not bare.healthy and bare.status()["last_error"]
        finally:
            await bare.close()
        # A certificate file that is not there: the same, with the reason.
        missing = with_cert.replace("client.crt", "nowhere.crt")
        gone = RedisBackend(StateConfig(backend="redis", url=missing, timeout=0.5))
        await gone.start()
        try:
            assert not gone.healthy and "No such file" in gone.status()["last_error"]
        finally:
            await gone.close()

    uvloop.run(main())
