"""The gateway's own error responses: one JSON shape, one table of codes.

``{"error": {"status": 429, "code": "rate_limited", "message": "...", "request_id": "..."}}``
"""

from __future__ import annotations

import orjson

#: code -> (status, default message). Every code the core can return is listed here and in
#: docs/errors.md.
ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "malformed HTTP request"),
    "unauthorized": (401, "authentication required"),
    "invalid_token": (401, "the access token is not valid"),
    "forbidden": (403, "forbidden"),
    "client_cert_required": (403, "a valid client certificate is required"),
    "insufficient_scope": (403, "the access token does not grant access to this resource"),
    "no_route": (404, "no route matches this request"),
    "request_timeout": (408, "the request headers were not received in time"),
    "body_timeout": (408, "the request body was not received in time"),
    "payload_too_large": (413, "request body too large"),
    "uri_too_long": (414, "request target too long"),
    "expectation_failed": (417, "only the 100-continue expectation is supported"),
    "rate_limited": (429, "too many requests"),
    "header_fields_too_large": (431, "request header fields too large"),
    "plugin_error": (500, "a plugin failed while handling this request"),
    "not_implemented": (501, "this request method or feature is not supported"),
    "upstream_connect_failed": (502, "could not connect to the upstream"),
    "upstream_reset": (502, "the upstream closed the connection before responding"),
    "upstream_bad_response": (502, "the upstream sent an invalid HTTP response"),
    "upstream_tls_failed": (502, "the TLS handshake with the upstream failed"),
    "no_healthy_upstream": (503, "no upstream target is available"),
    "upstream_overloaded": (503, "every upstream target is at its connection or request limit"),
    "too_many_connections": (503, "the gateway is at its connection limit"),
    "jwks_unavailable": (503, "the token issuer's signing keys could not be loaded"),
    "rate_limit_unavailable": (503, "the rate limit state backend is unavailable"),
    "upstream_connect_timeout": (504, "timed out connecting to the upstream"),
    "upstream_timeout": (504, "the upstream did not respond in time"),
    "plugin_timeout": (504, "the request plugins did not finish in time"),
}


def error_body(status: int, code: str, message: str, request_id: str) -> bytes:
    return orjson.dumps(
        {"error": {"status": status, "code": code, "message": message, "request_id": request_id}}
    )
