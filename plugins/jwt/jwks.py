"""Where an issuer's keys come from: the config (``StaticKeys``) or a JWKS endpoint
(``RemoteKeys``), fetched with the control-plane client, never on the request path except for
the throttled unknown-``kid`` refetch below.

Theory of operation (``RemoteKeys``, one per issuer and worker, shared by every route's plugin
that names the same issuer, URL and settings):

* ``start()`` fetches the key set before the worker reports ready, waiting at most
  ``startup_timeout``; a slow fetch goes on in the background (``status()`` says not ready).
* A background loop refreshes the set when due: ``Cache-Control: max-age`` clamped to
  ``[min_refresh, max_refresh]``, else ``refresh``; after a failure, ``retry`` later.
* A failed fetch (connection, HTTP status, bad JSON, no usable key) keeps the last good set
  serving (stale-if-error), counts ``jwt_jwks_fetches_total{result="error"}`` and sets
  ``jwt_jwks_stale`` to 1 until a fetch succeeds.
* A successful fetch replaces the set atomically (one attribute store on the event loop), and
  tells its subscribers which keys disappeared, so verified-token caches drop what those keys
  signed: a key removed from the JWKS stops validating right after that refresh.
* A token whose ``kid`` is unknown asks ``refetch_for(kid)``: at most one fetch is in flight
  (every caller waits on the same task: single flight), a new one starts at most once per
  ``unknown_kid_throttle``, and a kid still unknown after a fetch is remembered (negative cache)
  until the next refetch is allowed. Callers wait at most ``unknown_kid_wait``.

Key sets are per worker: N workers fetch N times per refresh (the IdP sees ``N x`` routes'
distinct issuers, not ``N x`` routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway import metrics
from gateway.control import client
from plugins.jwt.config import IssuerConfig, JwksSettings
from plugins.jwt.keys import Key, KeySet, parse_jwks

log = logging.getLogger("gateway.plugins.jwt")

FETCHES = metrics.counter(
    "jwt_jwks_fetches_total", "JWKS and discovery fetches by result", ("issuer", "result")
)
STALE = metrics.gauge(
    "jwt_jwks_stale",
    "1 while an issuer's last JWKS fetch failed and the previous keys are served",
    ("issuer",),
    mode="max",
)

_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)")
_NEGATIVE_LIMIT = 1024

RemovedCallback = Callable[[frozenset[bytes]], None]


class StaticKeys:
    """Keys from the config: always present, never refetched."""

    remote = False

    def __init__(self, keys: list[Key]) -> None:
        self.keyset: KeySet | None = KeySet(keys)

    def refetch_for(self, kid: str | None) -> asyncio.Future[None] | None:
        return None

    def remember_unknown(self, kid: str | None) -> None:
        pass

    def subscribe(self, callback: RemovedCallback) -> None:
        pass

    def unsubscribe(self, callback: RemovedCallback) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        assert self.keyset is not None
        return {"source": "config", "keys": len(self.keyset), "ready": True}


class RemoteKeys:
    """A JWKS endpoint's keys, fetched, refreshed and refetched as described above."""

    remote = True

    def __init__(
        self,
        issuer: str,
        jwks_url: str | None,
        discovery: bool,
        settings: JwksSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.discovery = discovery
        self.settings = settings
        self.clock = clock
        self.keyset: KeySet | None = None
        self.users = 0
        self.fetches = 0
        self.failures = 0
        self.unknown_refetches = 0
        self.stale = False
        self.last_error = ""
        self._subscribers: list[RemovedCallback] = []
        self._inflight: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._due = 0.0  # monotonic time of the next scheduled refresh
        self._next_unknown = 0.0  # no unknown-kid refetch before this (clock)
        self._negative: dict[str, float] = {}
        self._ok = FETCHES.labels(issuer, "ok")
        self._error = FETCHES.labels(issuer, "error")
        self._stale = STALE.labels(issuer)

    # -- the request path ------------------------------------------------------------------
    def refetch_for(self, kid: str | None) -> asyncio.Future[None] | None:
        """An in-flight or new fetch to wait on for an unknown ``kid``, or ``None`` when one
        is not allowed now (throttled, or the kid is negatively cached)."""
        task = self._inflight
        if task is not None:
            return task
        now = self.clock()
        until = self._negative.get(kid or "")
        if until is not None and until > now:
            return None
        if now < self._next_unknown:
            return None
        self._next_unknown = now + self.settings.unknown_kid_throttle
        self.unknown_refetches += 1
        return self._fetch_now("unknown kid")

    def remember_unknown(self, kid: str | None) -> None:
        """``kid`` is still unknown after a fetch: refuse it without waiting until the next
        refetch is allowed."""
        if len(self._negative) >= _NEGATIVE_LIMIT:
            self._negative.clear()
        self._negative[kid or ""] = max(self._next_unknown, self.clock() + 1.0)

    def subscribe(self, callback: RemovedCallback) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: RemovedCallback) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.users += 1
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._refresh_loop())
            if self.keyset is None:
                self._fetch_now("startup")
        task = self._inflight
        if self.keyset is None and task is not None:
            try:
                async with asyncio.timeout(self.settings.startup_timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                log.warning(
                    "JWKS for %s not loaded within %ss; serving 503 for its tokens until it is",
                    self.issuer,
                    self.settings.startup_timeout,
                    extra={"issuer": self.issuer},
                )

    async def stop(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        _shared.pop(_share_key(self), None)
        for task in (self._loop_task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._inflight = None

    def status(self) -> dict[str, Any]:
        return {
            "source": self.jwks_url or "discovery",
            "ready": self.keyset is not None,
            "keys": len(self.keyset) if self.keyset is not None else 0,
            "kids": sorted(self.keyset.by_kid) if self.keyset is not None else [],
            "stale": self.stale,
            "fetches": self.fetches,
            "failures": self.failures,
            "unknown_kid_refetches": self.unknown_refetches,
            "last_error": self.last_error,
        }

    # -- fetching --------------------------------------------------------------------------
    def _fetch_now(self, why: str) -> asyncio.Task[None]:
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(why))
            self._inflight = task
            task.add_done_callback(self._fetched)
        return task

    def _fetched(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _refresh_loop(self) -> None:
        while True:
            delay = self._due - time.monotonic()
            if delay > 0 or self._inflight is not None:
                await asyncio.sleep(max(delay, 0.05))
                continue
            await asyncio.shield(self._fetch_now("refresh"))

    async def _fetch(self, why: str) -> None:
        s = self.settings
        self.fetches += 1
        try:
            url = self.jwks_url or await self._discover()
            doc, resp = await self._get_json(url)
            keys, problems = parse_jwks(doc)
            for problem in problems:
                log.warning("JWKS %s: skipped %s", url, problem, extra={"issuer": self.issuer})
            if not keys:
                raise client.ControlError(f"GET {url}: no usable signing key")
        except client.ControlError as exc:
            self.failures += 1
            self.last_error = str(exc)
            self._error.inc()
            if self.keyset is not None and not self.stale:
                self.stale = True
                self._stale.set(1)
            self._due = time.monotonic() + s.retry
            log.warning(
                "JWKS fetch (%s) for %s failed: %s%s",
                why,
                self.issuer,
                exc,
                "; serving the previous keys" if self.keyset is not None else "",
                extra={"issuer": self.issuer},
            )
            return
        self._install(keys)
        self._ok.inc()
        if self.stale:
            self.stale = False
            self._stale.set(0)
        self.last_error = ""
        self._due = time.monotonic() + _refresh_in(resp.header("cache-control"), s)

    def _install(self, keys: list[Key]) -> None:
        old = self.keyset
        self.keyset = new = KeySet(keys)
        self._negative.clear()
        if old is None:
            return
        kept = {(k.kid, k.thumb) for k in new.keys}
        removed = frozenset(k.thumb for k in old.keys if (k.kid, k.thumb) not in kept)
        if removed:
            log.info(
                "JWKS for %s: %d key(s) removed",
                self.issuer,
                len(removed),
                extra={"issuer": self.issuer},
            )
            for callback in self._subscribers:
                callback(removed)

    async def _get_json(self, url: str) -> tuple[Any, client.Response]:
        """GET ``url`` and parse its JSON body; ``ControlError`` for anything but a 200 with
        valid JSON."""
        s = self.settings
        resp = await client.request(
            "GET",
            url,
            headers=[("accept", "application/json")],
            timeout=s.timeout,
            max_body=s.max_body,
        )
        if resp.status != 200:
            raise client.ControlError(f"GET {url}: HTTP {resp.status}")
        try:
            return orjson.loads(resp.body), resp
        except orjson.JSONDecodeError as exc:
            raise client.ControlError(f"GET {url}: invalid JSON: {exc}") from None

    async def _discover(self) -> str:
        """``jwks_uri`` from the issuer's OpenID configuration (OIDC Discovery 1.0 section 4)."""
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc, _ = await self._get_json(url)
        if not isinstance(doc, dict):
            raise client.ControlError(f"GET {url}: not a JSON object")
        if doc.get("issuer") != self.issuer:  # section 4.3: must match exactly
            raise client.ControlError(
                f"GET {url}: issuer {doc.get('issuer')!r} differs from {self.issuer!r}"
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("http://", "https://")):
            raise client.ControlError(f"GET {url}: no http(s) jwks_uri")
        return jwks_uri


def _refresh_in(cache_control: str | None, s: JwksSettings) -> float:
    if cache_control:
        m = _MAX_AGE.search(cache_control.lower())
        if m is not None:
            return min(max(float(m.group(1)), s.min_refresh), s.max_refresh)
        if "no-cache" in cache_control or "no-store" in cache_control:
            return s.min_refresh
    return min(max(s.refresh, s.min_refresh), s.max_refresh)


# -- sharing between routes ------------------------------------------------------------------
_shared: dict[tuple[Any, ...], RemoteKeys] = {}


def _share_key(keys: RemoteKeys) -> tuple[Any, ...]:
    return (keys.issuer, keys.jwks_url, keys.discovery, keys.settings)


def key_source(cfg: IssuerConfig) -> StaticKeys | RemoteKeys:
    """The issuer's key source; remote ones are shared by plugins naming the same endpoint."""
    if cfg.keys:
        return StaticKeys([k for spec in cfg.keys for k in spec.load()])
    fresh = RemoteKeys(cfg.issuer, cfg.jwks_url, cfg.discovery, cfg.jwks)
    return _shared.setdefault(_share_key(fresh), fresh)
