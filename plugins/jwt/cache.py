"""The verified-token cache: a bounded LRU from the token as received to what it proved.

A hit costs one dict lookup, an ``exp`` comparison and an LRU bump, instead of base64, JSON
and a signature check. Entries never outlive the token: one is stored only while ``exp`` is in
the future (tokens without ``exp``, when allowed, are not cached) and read only while it still
is; claims cached before ``nbf``/``iat`` cannot happen, since such tokens are refused. When a
key disappears from its issuer's key set, every entry it verified is dropped at once
(``drop_keys``), so a revoked key stops working on the refresh that removed it.

Memory bound: ``max_entries`` entries, each the token bytes (at most ``max_token_size``,
8 KiB by default; about 1 KiB for typical access tokens) plus its claims dict and the
precomputed upstream headers (typically 1-2 KiB together). 10,000 entries of 1 KiB tokens are
about 20-30 MiB per worker; at the 8 KiB token limit, about 100 MiB. Size it to the number
of distinct live tokens a worker sees.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from plugins.jwt.keys import Key


class Verified:
    """What a verified token proved, ready to apply to a request."""

    __slots__ = ("claims", "expires", "headers", "key", "sub")

    def __init__(
        self,
        claims: dict[str, Any],
        expires: float,
        headers: tuple[tuple[bytes, bytes, bytes], ...],
        key: Key | None,
        sub: str | None,
    ) -> None:
        self.claims = claims
        self.expires = expires  # the token's exp (epoch seconds)
        self.headers = headers  # (lower name, name, value) for the upstream request
        self.key = key
        self.sub = sub


class TokenCache:
    """LRU of ``Verified`` by raw token. The plugin reads ``entries`` directly on hits."""

    __slots__ = ("entries", "max_entries")

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, Verified] = OrderedDict()

    def put(self, token: bytes, entry: Verified, now: float) -> None:
        if self.max_entries <= 0 or entry.expires <= now:
            return
        entries = self.entries
        entries[token] = entry
        entries.move_to_end(token)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def drop_keys(self, thumbs: frozenset[bytes]) -> int:
        """Drop the entries verified by keys with these fingerprints; return how many."""
        stale = [t for t, e in self.entries.items() if e.key is not None and e.key.thumb in thumbs]
        for t in stale:
            del self.entries[t]
        return len(stale)

    def __len__(self) -> int:
        return len(self.entries)
