"""The stub upstreams behind the proxies under test.

``static``: nginx when installed (it costs the load generator's cores least), otherwise the
asyncio server below. Both answer the same paths with the same sizes:

- ``/download...``: 1 MiB;
- ``/post...``: 4 KB (the asyncio server echoes the request body, which the POST scenario
  makes exactly 4 KB; nginx returns a fixed 4 KB JSON document);
- anything else: a small JSON body.

``llm``: ``benchmarks.fake_llm``.

Run the asyncio one alone: ``python -m benchmarks.upstreams --port 9000 [--processes N]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import nginx
from benchmarks.httpserver import Request, Response, run
from benchmarks.procs import Proc, Processes, free_port, wait_listening
from benchmarks.scenarios import DOWNLOAD_BYTES, SMALL_BODY

_JSON = ((b"content-type", b"application/json"),)
SMALL = Response(200, _JSON, SMALL_BODY)
DOWNLOAD = Response(200, ((b"content-type", b"application/octet-stream"),), b"x" * DOWNLOAD_BYTES)


def static_handler(request: Request) -> Response:
    path = request.target
    if path.startswith(b"/download"):
        return DOWNLOAD
    if path.startswith(b"/post"):
        return Response(200, _JSON, request.body)
    return SMALL


@dataclass(slots=True)
class Upstream:
    name: str  # the upstream's name in the bench configs
    kind: str  # what serves it, for the report
    port: int
    procs: list[Proc]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_static(
    procs: Processes, directory: Path, cpus: Iterable[int], prefer_nginx: bool = True
) -> Upstream:
    cpu_list = sorted(cpus)
    port = free_port()
    binary = nginx.find_nginx() if prefer_nginx else None
    if binary is not None:
        nginx.write_upstream_config(directory, port, workers=len(cpu_list))
        proc = procs.start(
            "nginx upstream",
            nginx.argv(binary, directory, "upstream"),
            directory / "upstream.out",
            cpus=cpu_list,
        )
        kind = f"nginx {nginx.nginx_version(binary)}"
    else:
        proc = procs.start(
            "asyncio upstream",
            [
                sys.executable, "-m", "benchmarks.upstreams",
                "--port", str(port), "--processes", str(len(cpu_list)),
            ],
            directory / "upstream.out",
            cpus=cpu_list,
        )  # fmt: skip
        kind = "asyncio (benchmarks.upstreams; nginx not installed)"
    wait_listening([proc], port)
    return Upstream("static", kind, port, [proc])


def start_llm(procs: Processes, directory: Path, cpus: Iterable[int]) -> Upstream:
    port = free_port()
    proc = procs.start(
        "fake LLM",
        [sys.executable, "-m", "benchmarks.fake_llm", "--port", str(port)],
        directory / "fake_llm.out",
        cpus=cpus,
    )
    wait_listening([proc], port)
    return Upstream("llm", "benchmarks.fake_llm", port, [proc])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="static stub upstream for the benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--processes", type=int, default=1, help="SO_REUSEPORT processes")
    args = parser.parse_args(argv)
    run(static_handler, args.host, args.port, max(1, args.processes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
