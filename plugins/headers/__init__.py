"""``headers``: set, add and remove request and response headers.

```yaml
- headers:
    request:  {set: {x-env: prod}, add: {x-tag: a}, remove: [x-debug]}
    response: {set: {cache-control: no-store}, remove: [server]}
```
``set`` replaces every existing value, ``add`` appends one more, ``remove`` drops all.
Request edits apply before the upstream is contacted; response edits apply to upstream
responses and to the gateway's own replies alike.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from gateway.http.headers import HOP_BY_HOP, Headers, is_token
from gateway.plugin import Plugin, PluginConfig
from gateway.proxy.exchange import Exchange


class HeaderEdits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: list[str] = []

    @field_validator("set", "add")
    @classmethod
    def _values(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            _check_name(name)
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: value contains a line break or NUL")
        return v

    @field_validator("remove")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_name(name)
        return v


#: Headers the gateway writes itself. Editing framing headers would let the upstream read the
#: body differently from the gateway (a configured request-smuggling hole); the others would
#: be silently overridden, so refusing them at load is more honest.
_MANAGED = HOP_BY_HOP | {b"content-length", b"host"}


def _check_name(name: str) -> None:
    raw = name.encode("latin-1", "replace")
    if not is_token(raw):
        raise ValueError(f"{name!r} is not a valid header name")
    if raw.lower() in _MANAGED:
        raise ValueError(f"{name!r} is managed by the gateway and cannot be edited")


class HeadersConfig(PluginConfig):
    request: HeaderEdits = HeaderEdits()
    response: HeaderEdits = HeaderEdits()


class _Edits:
    """Header edits compiled once: the names to drop (lower-case bytes) and the header
    triples to append, so applying them allocates one list at most."""

    __slots__ = ("append", "drop")

    def __init__(self, edits: HeaderEdits) -> None:
        pairs = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.set.items()]
        pairs += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.add.items()]
        self.append = tuple((n.lower(), n, v) for n, v in pairs)
        self.drop = frozenset(n.lower().encode("latin-1") for n in edits.remove) | frozenset(
            n.lower().encode("latin-1") for n in edits.set
        )

    def apply(self, headers: Headers) -> None:
        drop = self.drop
        if drop:
            headers.items = [h for h in headers.items if h[0] not in drop]
        headers.items.extend(self.append)

    @property
    def empty(self) -> bool:
        return not (self.append or self.drop)


class HeadersPlugin(Plugin):
    name = "headers"
    Config = HeadersConfig

    def __init__(self, config: PluginConfig) -> None:
        assert isinstance(config, HeadersConfig)
        super().__init__(config)
        request, response = _Edits(config.request), _Edits(config.response)
        self.request_edits = None if request.empty else request
        self.response_edits = None if response.empty else response

    def on_request(self, ex: Exchange) -> None:
        edits = self.request_edits
        if edits is not None:
            edits.apply(ex.headers)

    def on_response(self, ex: Exchange) -> None:
        edits = self.response_edits
        if edits is not None:
            edits.apply(ex.response_headers)
