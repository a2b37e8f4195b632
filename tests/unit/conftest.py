"""Fixtures shared by the unit tests that drive the protocols with fake transports."""

from __future__ import annotations

import asyncio

import pytest

import gateway.proxy.protocol as protocol_mod
from gateway.upstream.connection import UpstreamConnection
from gateway.upstream.target import Target


@pytest.fixture
def pending_connect(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.Future[UpstreamConnection]]:
    """Replace connecting with a future the test resolves: the upstream 'connects' when told."""
    pending: list[asyncio.Future[UpstreamConnection]] = []

    async def connect(target: Target, limit: float) -> UpstreamConnection:
        fut: asyncio.Future[UpstreamConnection] = asyncio.get_running_loop().create_future()
        pending.append(fut)
        return await fut

    monkeypatch.setattr(protocol_mod, "connect", connect)
    return pending
