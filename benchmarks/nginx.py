"""nginx in two roles: the stub upstream (cheapest for the load generator's cores) and the
reference reverse proxy the gateway is measured against.

Each instance lives in its own directory: config, pid file, error log, temp paths and static
files, so nothing touches /etc/nginx or /var. It runs in the foreground (``daemon off``) under
the harness, which stops it with its session.

The reference proxy is configured to do what the gateway does for a route without plugins:
HTTP/1.1 to the upstream with a keep-alive pool, the same forwarding headers (X-Forwarded-*,
Via, a request id both ways), no access log, no spooling of responses to disk, and no limit on
requests per client connection (the gateway has none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from benchmarks.scenarios import DOWNLOAD_BYTES, POST_BYTES, SMALL_BODY, Scenario, json_body
from gateway.tls import MODERN_CIPHERS

TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
#: The gateway bench config's ``limits.max_connections``. nginx preallocates and touches its
#: connection table at start, so this also sets most of an idle nginx worker's RSS.
PROXY_WORKER_CONNECTIONS = 20000


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ").removeprefix("nginx/")


def _common(directory: Path, workers: int, role: str, connections: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    # Workers of a root master run as "nobody"; they must be able to enter the directory.
    directory.chmod(0o755)
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "\n".join(f"    {name}_temp_path {directory / name}_temp;" for name in TEMP_DIRS)
    return f"""{user}worker_processes {workers};
daemon off;
master_process on;
pid {directory / role}.pid;
error_log {directory / role}-error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    server_tokens off;
    log_format json escape=json '{{"ts":$msec,"request_id":"$request_id","client":"$remote_addr",'
        '"method":"$request_method","path":"$uri","status":$status,"bytes_in":$request_length,'
        '"bytes_out":$bytes_sent,"duration":$request_time,"upstream":"$upstream_addr",'
        '"upstream_duration":"$upstream_response_time"}}';
{temps}
"""


def argv(binary: str, directory: Path, role: str) -> list[str]:
    args = [binary, "-p", str(directory), "-c", str(directory / f"{role}.conf")]
    # -e (1.19.5+) sets the error log nginx opens before reading its config; older versions
    # try the compiled-in path, complain when it is not writable, and carry on.
    if _version_tuple(nginx_version(binary)) >= (1, 19, 5):
        args += ["-e", str(directory / f"{role}-error.log")]
    return args


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in version.split()[0].split("."))
    except (ValueError, IndexError):
        return (0,)


def write_upstream_config(directory: Path, port: int, workers: int) -> Path:
    """The static stub upstream: a small body on ``/``, 4 KB JSON on ``/post`` (the size the
    POST scenario sends; nginx cannot echo a body without extra modules), 1 MiB on
    ``/download`` (sendfile)."""
    www = directory / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "1mb.bin").write_bytes(b"x" * DOWNLOAD_BYTES)
    post = json_body(POST_BYTES).decode()
    # One config token is limited to about 4 KB: the body is two variables joined.
    half = len(post) // 2
    small = SMALL_BODY.decode().replace("\n", "")
    conf = (
        _common(directory, workers, "upstream", 65536)
        + f"""
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        root {www};
        client_max_body_size 100m;
        location /download {{
            default_type application/octet-stream;
            try_files /1mb.bin =404;
        }}
        location /post {{
            default_type application/json;
            set $post_a '{post[:half]}';
            set $post_b '{post[half:]}';
            return 200 "$post_a$post_b";
        }}
        location / {{
            default_type application/json;
            return 200 '{small}\\n';
        }}
    }}
}}
"""
    )
    path = directory / "upstream.conf"
    path.write_text(conf)
    return path


def write_proxy_config(
    directory: Path,
    port: int,
    workers: int,
    upstreams: dict[str, int],
    scenarios: list[Scenario],
    tls: tuple[Path, Path] | None = None,
) -> Path:
    """The reference reverse proxy: one location per scenario path to its upstream (a
    multi-target scenario's upstream lists the stub that many times, as the gateway's does).
    With ``tls`` (certificate and key files) it terminates TLS as the gateway's defaults do:
    TLS 1.2 and 1.3, the same TLS 1.2 suites, session tickets, ALPN http/1.1 (no http2)."""
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    servers = {name: [up_port] for name, up_port in upstreams.items()}
    for s in scenarios:
        if s.targets > 1:
            servers[s.upstream_name] = [upstreams[s.upstream]] * s.targets
    blocks = "".join(
        f"""
    upstream {name} {{{"".join(f"{chr(10)}        server 127.0.0.1:{p};" for p in ports)}
        keepalive 1024;
        keepalive_requests 10000;
        keepalive_timeout 60s;
    }}"""
        for name, ports in servers.items()
    )
    locations = "".join(
        f"""
        location {s.path} {{
            proxy_pass http://{s.upstream_name};{s.nginx_location}
        }}"""
        for s in scenarios
    )
    ssl = ""
    if tls is not None:
        ssl = f"""
        ssl_certificate {tls[0]};
        ssl_certificate_key {tls[1]};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {MODERN_CIPHERS};
        ssl_prefer_server_ciphers on;
        ssl_session_tickets on;"""
    conf = (
        _common(directory, workers, "proxy", PROXY_WORKER_CONNECTIONS)
        + f"""{blocks}
    server {{
        listen 127.0.0.1:{port}{" ssl" if tls else ""} backlog=2048 reuseport;{ssl}
        keepalive_requests 100000000;
        keepalive_timeout 60s;
        client_max_body_size 10m;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        proxy_set_header Via "1.1 nginx";
        proxy_set_header X-Request-Id $request_id;
        add_header X-Request-Id $request_id always;
        add_header Via "1.1 nginx" always;
        proxy_buffer_size 16k;
        proxy_buffers 8 64k;
        proxy_busy_buffers_size 128k;
        proxy_max_temp_file_size 0;{locations}
    }}
}}
"""
    )
    path = directory / "proxy.conf"
    path.write_text(conf)
    return path
