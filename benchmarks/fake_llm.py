"""A fake OpenAI-style LLM server: ``POST /v1/chat/completions``, JSON or SSE stream.

Answers instantly (or with a configurable delay between stream chunks) with a made-up
completion whose token counts are known, so the gateway's token accounting can be checked
and its cost measured without a model:

- JSON: a ``chat.completion`` object with ``usage`` (prompt, completion, total tokens);
- ``"stream": true``: ``chat.completion.chunk`` events (the completion split into a
  configurable number of chunks), a final chunk with ``finish_reason``, then a chunk with
  ``choices: []`` and the ``usage`` block, then ``data: [DONE]``. OpenAI sends the usage chunk
  only when ``stream_options.include_usage`` is true; this server always sends it unless
  started with ``--usage-when-requested``.

Token counts: completion tokens are ``--completion-tokens`` (capped by the request's
``max_tokens``); prompt tokens are ``--prompt-tokens``, or when 0 estimated as one per 4
characters of message content. A request may override them with the headers
``x-fake-prompt-tokens``, ``x-fake-completion-tokens`` and ``x-fake-chunks``.

Run: ``python -m benchmarks.fake_llm --port 9100 [--completion-tokens 64 --chunks 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from benchmarks.httpserver import Request, Response, run

_JSON = ((b"content-type", b"application/json"),)
_SSE = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))


@dataclass(frozen=True, slots=True)
class Settings:
    prompt_tokens: int = 0  # 0: estimate from the messages
    completion_tokens: int = 64
    chunks: int = 16
    chunk_delay: float = 0.0  # seconds between stream chunks
    usage_when_requested: bool = False


def _error(status: int, message: str) -> Response:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    return Response(status, _JSON, body)


def _header_int(request: Request, name: bytes, default: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        return max(0, int(raw))
    except ValueError:
        return default


def _estimate_prompt_tokens(payload: dict[str, Any]) -> int:
    chars = 0
    for message in payload.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(
                len(str(part.get("text", ""))) for part in content if isinstance(part, dict)
            )
    return max(1, chars // 4)


def _split(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` chunks, as evenly as possible."""
    parts = max(1, parts)
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class FakeLLM:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ids = itertools.count(1)

    def handle(self, request: Request) -> Response:
        path = request.path
        if path == b"/v1/chat/completions":
            if request.method != b"POST":
                return _error(405, "use POST")
            return self.chat(request)
        if path == b"/v1/models":
            return Response(
                200, _JSON, orjson.dumps({"object": "list", "data": [{"id": "fake-model"}]})
            )
        if path == b"/healthz":
            return Response(200, _JSON, b'{"ok":true}')
        return _error(404, f"no route for {path.decode('latin-1')}")

    def chat(self, request: Request) -> Response:
        try:
            payload = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return _error(400, "request body is not JSON")
        if not isinstance(payload, dict):
            return _error(400, "request body must be a JSON object")
        s = self.settings
        prompt = _header_int(
            request, b"x-fake-prompt-tokens", s.prompt_tokens or _estimate_prompt_tokens(payload)
        )
        completion = _header_int(request, b"x-fake-completion-tokens", s.completion_tokens)
        max_tokens = payload.get("max_tokens") or payload.get("max_completion_tokens")
        if isinstance(max_tokens, int) and max_tokens > 0:
            completion = min(completion, max_tokens)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        model = str(payload.get("model") or "fake-model")
        ident = f"chatcmpl-fake{next(self._ids):x}"
        created = int(time.time())
        if payload.get("stream"):
            options = payload.get("stream_options")
            wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            chunks = _header_int(request, b"x-fake-chunks", s.chunks)
            send_usage = wants_usage or not s.usage_when_requested
            return Response(
                200,
                _SSE,
                stream=self._stream(ident, created, model, completion, chunks, usage, send_usage),
            )
        body = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _words(completion)},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        return Response(200, _JSON, orjson.dumps(body))

    def _stream(
        self,
        ident: str,
        created: int,
        model: str,
        completion: int,
        chunks: int,
        usage: dict[str, int],
        send_usage: bool,
    ) -> Callable[[], AsyncIterator[bytes]]:
        delay = self.settings.chunk_delay

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            obj = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        async def chunks_iter() -> AsyncIterator[bytes]:
            first = True
            for n in _split(completion, chunks):
                delta: dict[str, str] = {"content": _words(n)}
                if first:
                    delta["role"] = "assistant"
                    first = False
                yield event([{"index": 0, "delta": delta, "finish_reason": None}])
                if delay:
                    await asyncio.sleep(delay)
            yield event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            if send_usage:
                yield event([], usage=usage)
            yield b"data: [DONE]\n\n"

        return chunks_iter


def _words(n: int) -> str:
    """``n`` tokens of text (one short word and its space per token)."""
    return "lorem " * n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fake OpenAI-style LLM server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--processes", type=int, default=1, help="SO_REUSEPORT processes")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="0: estimate (chars/4)")
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=16, help="content chunks per stream")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument(
        "--usage-when-requested",
        action="store_true",
        help="send the stream's usage chunk only with stream_options.include_usage (as OpenAI)",
    )
    args = parser.parse_args(argv)
    settings = Settings(
        prompt_tokens=max(0, args.prompt_tokens),
        completion_tokens=max(0, args.completion_tokens),
        chunks=max(1, args.chunks),
        chunk_delay=max(0.0, args.chunk_delay_ms) / 1000,
        usage_when_requested=args.usage_when_requested,
    )
    run(FakeLLM(settings).handle, args.host, args.port, max(1, args.processes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
