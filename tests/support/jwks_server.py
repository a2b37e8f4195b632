"""A real JWKS / OpenID discovery server for tests, and keys and tokens to go with it.

``JwksServer`` runs an asyncio server (HTTP/1.1 through h11) in a background thread of the
test process, on a loopback port, so a test can rotate keys, take the endpoint down and count
fetches between requests:

    GET /jwks                                   the current key set (``set_keys``)
    GET /.well-known/openid-configuration       {"issuer": <issuer>, "jwks_uri": <url>/jwks}
    anything else                               404

Every request is recorded (``hits(path)``). ``down = True`` answers 503; ``max_age`` adds
``Cache-Control: max-age=N``. The same class serves as a "listener that must receive nothing"
(for ``jku``/``x5u`` header attacks): ``hits()`` counts every request and connection.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h11
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

# -- keys and tokens -----------------------------------------------------------------------
_RSA_CACHE: dict[str, rsa.RSAPrivateKey] = {}


def rsa_key(name: str = "default") -> rsa.RSAPrivateKey:
    """An RSA-2048 private key, generated once per name per process (generation is slow)."""
    if name not in _RSA_CACHE:
        _RSA_CACHE[name] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _RSA_CACHE[name]


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(private: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    """The public JWK of a private key, with ``kid`` (and ``alg`` when given)."""
    pub = private.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(pub, as_dict=True)
    jwk["kid"] = kid
    jwk["use"] = "sig"
    if alg:
        jwk["alg"] = alg
    return dict(jwk)


def mint(
    private: Any,
    alg: str,
    kid: str | None = None,
    ttl: float = 300.0,
    now: float | None = None,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed JWT; ``exp``/``iat`` from ``now`` and ``ttl`` unless given in ``claims``."""
    now = time.time() if now is None else now
    body: dict[str, Any] = {"iat": int(now), "exp": int(now + ttl), **claims}
    body = {k: v for k, v in body.items() if v is not None}
    extra = dict(headers or {})
    if kid is not None:
        extra["kid"] = kid
    return jwt.encode(body, private, algorithm=alg, headers=extra)


# -- the server ------------------------------------------------------------------------------
class JwksServer:
    """A JWKS/discovery endpoint on 127.0.0.1 in a background thread."""

    def __init__(self, issuer: str | None = None) -> None:
        self.keys: list[dict[str, Any]] = []
        self.down = False
        self.max_age: int | None = None
        self.requests: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("JWKS server did not start")
        assert self._server is not None
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.jwks_url = self.url + "/jwks"
        self.issuer = issuer or self.url

    def set_keys(self, *jwks: dict[str, Any]) -> None:
        with self._lock:
            self.keys = list(jwks)

    def hits(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for p in self.requests if path is None or p == path)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.connections = 0

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # -- inside the server thread ------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    def _answer(self, path: str) -> tuple[int, list[tuple[str, str]], bytes]:
        with self._lock:
            self.requests.append(path)
            down, keys, max_age = self.down, list(self.keys), self.max_age
        if down:
            return 503, [], b"down"
        headers = [("content-type", "application/json")]
        if path == "/jwks":
            if max_age is not None:
                headers.append(("cache-control", f"public, max-age={max_age}"))
            return 200, headers, orjson.dumps({"keys": keys})
        if path == "/.well-known/openid-configuration":
            doc = {"issuer": self.issuer, "jwks_uri": self.jwks_url}
            return 200, headers, orjson.dumps(doc)
        return 404, [], b"not found"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    path = event.target.decode().split("?", 1)[0]
                    status, headers, body = self._answer(path)
                    headers += [("content-length", str(len(body))), ("connection", "close")]
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
        except (h11.ProtocolError, ConnectionError):
            return
        finally:
            writer.close()


@contextmanager
def jwks_server(issuer: str | None = None) -> Iterator[JwksServer]:
    server = JwksServer(issuer)
    try:
        yield server
    finally:
        server.stop()
