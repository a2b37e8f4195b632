"""The request target: split into path and query, and normalise the path before routing.

Routing on a raw path would let ``/public/../admin`` match a ``/public`` route while the
upstream serves ``/admin``. So dot-segments (also percent-encoded ones) are resolved before
routing, as nginx does, and the resolved path is what is forwarded; a path that would climb
above the root is rejected.
"""

from __future__ import annotations


def split_target(url: bytes) -> tuple[bytes, bytes, bytes | None] | None:
    """``(path, query, authority)``; authority is set for absolute-form targets.

    Returns ``None`` for a target that is neither origin-form nor absolute-form.
    """
    authority = None
    if url[:1] != b"/":
        lower = url[:8].lower()
        if lower.startswith(b"http://"):
            rest = url[7:]
        elif lower.startswith(b"https://"):
            rest = url[8:]
        else:
            return None
        slash = rest.find(b"/")
        if slash < 0:
            q = rest.find(b"?")
            authority, url = (rest, b"/") if q < 0 else (rest[:q], b"/" + rest[q:])
        else:
            authority, url = rest[:slash], rest[slash:]
        if not authority or b"@" in authority:
            return None
    q = url.find(b"?")
    if q < 0:
        path, query = url, b""
    else:
        path, query = url[:q], url[q + 1 :]
    if b"#" in path:
        return None
    return path, query, authority


def needs_normalising(path: bytes) -> bool:
    return b"/." in path or (b"%" in path and b"%2e" in path.lower())


def normalise_path(path: bytes) -> bytes | None:
    """Resolve ``.`` and ``..`` segments (RFC 3986 5.2.4), decoding ``%2e``; ``None`` if the
    path escapes the root. Encoded slashes (``%2F``) are left alone, as upstreams expect."""
    if b"%" in path:
        path = path.replace(b"%2e", b".").replace(b"%2E", b".")
    segments = path.split(b"/")
    out: list[bytes] = []
    for seg in segments[1:]:
        if seg == b".":
            continue
        if seg == b"..":
            if not out:
                return None
            out.pop()
            continue
        out.append(seg)
    trailing = segments[-1] in (b".", b"..")
    result = b"/" + b"/".join(out)
    if trailing and not result.endswith(b"/"):
        result += b"/"
    return result
