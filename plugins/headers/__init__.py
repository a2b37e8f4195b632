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
    """Header edits compiled to lower-case bytes once."""

    __slots__ = ("add", "drop", "set")

    def __init__(self, edits: HeaderEdits) -> None:
        self.set = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.set.items())
        self.add = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.add.items())
        self.drop = frozenset(n.lower().encode("latin-1") for n in edits.remove) | frozenset(
            n.lower() for n, _ in self.set
        )

    def apply(self, headers: Headers) -> None:
        drop = self.drop
        items = [h for h in headers.items if h[0] not in drop] if drop else headers.items
        items.extend((n.lower(), n, v) for n, v in self.set)
        items.extend((n.lower(), n, v) for n, v in self.add)
        headers.items = items

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.drop)


class HeadersPlugin(Plugin):
    name = "headers"
    Config = HeadersConfig

    def __init__(self, config: PluginConfig) -> None:
        assert isinstance(config, HeadersConfig)
        super().__init__(config)
        self.request_edits = _Edits(config.request)
        self.response_edits = _Edits(config.response)

    def on_request(self, ex: Exchange) -> None:
        if self.request_edits:
            self.request_edits.apply(ex.headers)

    def on_response(self, ex: Exchange) -> None:
        if self.response_edits:
            self.response_edits.apply(ex.response_headers)
