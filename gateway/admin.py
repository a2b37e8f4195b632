"""The admin API, served by the supervisor on its own listener (loopback by default).

``GET /healthz`` (the supervisor is up), ``GET /readyz`` (all workers of the current
generation ready, their plugins too), ``GET /metrics`` (Prometheus text, all workers),
``GET /status`` (JSON), ``POST /reload``. With ``admin.token`` set, every endpoint but the
two probes needs ``Authorization: Bearer <token>`` (compared in constant time).

Control-plane traffic: h11 over asyncio streams, one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

import h11
import orjson

from gateway import metrics
from gateway.config.compile import parse_bind

if TYPE_CHECKING:
    from gateway.supervisor import Supervisor

log = logging.getLogger("gateway.admin")

MAX_REQUEST = 64 * 1024
TIMEOUT = 10.0
PROBES = frozenset({"/healthz", "/readyz"})
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AdminServer:
    def __init__(self, supervisor: Supervisor, bind: str, token: str | None) -> None:
        self.supervisor = supervisor
        self.bind = bind
        self._token = f"Bearer {token}".encode() if token is not None else None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = parse_bind(self.bind)
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        log.info("admin listening", extra={"bind": self.bind})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            async with asyncio.timeout(TIMEOUT):
                request, body = await _read_request(conn, reader)
            status, headers, payload = await self._handle(request, body)
        except (TimeoutError, h11.RemoteProtocolError, ValueError):
            status, headers, payload = _json(400, {"error": "bad request"})
        except ConnectionError:
            writer.close()
            return
        headers = [*headers, ("content-length", str(len(payload))), ("connection", "close")]
        try:
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            writer.write(conn.send(h11.Data(data=payload)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _handle(
        self, request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        path = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode("latin-1")
        if self._token is not None and path not in PROBES:
            given = b""
            for name, value in request.headers:
                if name == b"authorization":
                    given = bytes(value)
            if not hmac.compare_digest(given, self._token):
                status, headers, payload = _json(
                    401, {"error": "unauthorized", "message": "a valid admin token is required"}
                )
                return status, [*headers, ("www-authenticate", 'Bearer realm="admin"')], payload
        routes: dict[str, tuple[str, Any]] = {
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metrics": ("GET", self._metrics),
            "/status": ("GET", self._status),
            "/reload": ("POST", self._reload),
        }
        found = routes.get(path)
        if found is None:
            return _json(404, {"error": "not found", "endpoints": sorted(routes)})
        want, handler = found
        if method != want and not (want == "GET" and method == "HEAD"):
            status, headers, payload = _json(405, {"error": f"use {want}"})
            return status, [*headers, ("allow", want)], payload
        result: tuple[int, list[tuple[str, str]], bytes] = await handler()
        return result

    async def _healthz(self) -> tuple[int, list[tuple[str, str]], bytes]:
        return _json(200, {"status": "ok"})

    async def _readyz(self) -> tuple[int, list[tuple[str, str]], bytes]:
        ok, problems = self.supervisor.ready()
        if ok:
            return _json(200, {"status": "ready"})
        return _json(503, {"status": "not ready", "problems": problems})

    async def _metrics(self) -> tuple[int, list[tuple[str, str]], bytes]:
        metrics.flush()  # the supervisor's own counters
        async with self.supervisor._metrics_lock:  # not while a dead worker's are archived
            text = await asyncio.to_thread(metrics.exposition, self.supervisor.metrics_dir)
        return 200, [("content-type", METRICS_TYPE)], text

    async def _status(self) -> tuple[int, list[tuple[str, str]], bytes]:
        return _json(200, self.supervisor.status())

    async def _reload(self) -> tuple[int, list[tuple[str, str]], bytes]:
        result = await self.supervisor.reload()
        body = {
            "result": "success" if result.ok else "failure",
            "message": result.message,
            "version": result.version,
            "generation": self.supervisor.generation.number,
            "errors": result.errors,
        }
        return _json(200 if result.ok else 422, body)


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[Any, bytes]:
    request = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and conn.their_state is h11.IDLE:
                raise ConnectionError("closed")
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST:
                raise ValueError("body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, body
        else:
            raise ConnectionError("closed")


def _json(status: int, body: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    return (
        status,
        [("content-type", "application/json")],
        orjson.dumps(body, option=orjson.OPT_INDENT_2, default=str) + b"\n",
    )
