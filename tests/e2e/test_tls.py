"""TLS termination end to end: real gateway processes, clients with the ``ssl`` module and
``openssl s_client``, certificates from a ``trustme`` CA.

One gateway (module-scoped) has a listener per TLS behaviour; tests of startup, rotation and
upstream TLS start their own.
"""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
from cryptography import x509

from gateway.tls import key_type
from tests.conftest import proxy_config
from tests.e2e.test_operations import Load
from tests.e2e.test_operations import _metrics as metrics
from tests.e2e.test_operations import _wait as wait_until
from tests.support.certs import CertDir, Issued
from tests.support.client import Conn, Response
from tests.support.procs import GatewayProcess, UpstreamProcess, free_port, run_cli, wait_for_port

SUBJECT = "x-client-cert-subject"
SAN = "x-client-cert-san"


class PKI:
    def __init__(self, root: Path) -> None:
        self.servers = CertDir(root / "servers", "server-ca")
        self.clients = CertDir(root / "clients", "client-ca")
        self.rogue = CertDir(root / "rogue", "rogue-ca")
        self.default = self.servers.issue("default.example", stem="default")
        self.a_rsa = self.servers.issue("a.example", rsa=True, stem="a-rsa")
        self.a_ecdsa = self.servers.issue("a.example", stem="a-ecdsa")
        self.wild = self.servers.issue("*.b.example", stem="wild-b")
        self.client = self.clients.issue(
            "client1.example", "client1@example.com", common_name="client1", stem="client1"
        )
        self.rogue_client = self.rogue.issue("client1.example", common_name="client1")

    def client_context(self, cert: Issued | None = None, verify: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.servers.ca_path)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        if cert is not None:
            ctx.load_cert_chain(cert.cert, cert.key)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def tls_conn(port: int, ctx: ssl.SSLContext, name: str | None = "a.example") -> Conn:
    conn = Conn(port)
    conn.sock = ctx.wrap_socket(conn.sock, server_hostname=name)
    return conn


def tls_get(
    port: int,
    ctx: ssl.SSLContext,
    path: str = "/echo",
    headers: list[tuple[str, str]] | None = None,
    name: str = "a.example",
) -> Response:
    with tls_conn(port, ctx, name) as c:
        return c.request("GET", path, headers, host=name)


def s_client(port: int, *args: str) -> str:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
    )
    return done.stdout + done.stderr


def peer_sans(sock: ssl.SSLSocket) -> list[str]:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return list(
        cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    )


def peer_key_type(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return key_type(x509.load_der_x509_certificate(der).public_key())


def upstream_headers(upstream: UpstreamProcess, name: str) -> list[str]:
    """The values of header ``name`` in the last request the upstream received."""
    last = upstream.received()[-1]
    return [v for n, v in last["headers"] if n.lower() == name]


class Listeners:
    def __init__(self) -> None:
        self.ports = {
            n: free_port()
            for n in ("secure", "tls13", "required", "optional", "refuse", "plain", "redirect")
        }

    def __getattr__(self, name: str) -> int:
        return self.ports[name]


@pytest.fixture(scope="module")
def gw(
    pki: PKI, upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Listeners]]:
    ports = Listeners()
    certificates = [
        {"cert": c.cert, "key": c.key} for c in (pki.default, pki.a_rsa, pki.a_ecdsa, pki.wild)
    ]
    ca = pki.clients.ca_path

    def tls(**extra: Any) -> dict[str, Any]:
        return {"certificates": certificates, **extra}

    def lst(name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "bind": f"127.0.0.1:{ports.ports[name]}", **extra}

    config = proxy_config(upstream.url)
    config["listeners"] = [
        lst("secure", tls=tls(hsts={"max_age": 600})),
        lst("tls13", tls=tls(min_version="1.3")),
        lst("required", tls=tls(client_cert={"ca": ca})),
        lst("optional", tls=tls(client_cert={"ca": ca, "mode": "optional"})),
        lst("refuse", tls=tls(client_cert={"ca": ca, "on_failure": 403})),
        lst("plain"),
        lst("redirect", redirect_https={"port": ports.secure, "status": 308}),
    ]
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("gw"), port=ports.secure)
    for port in ports.ports.values():
        wait_for_port(port, gateway.proc)
    yield gateway, ports
    gateway.stop()


# -- certificates by SNI ---------------------------------------------------------------------------
def test_sni_picks_the_certificate(pki: PKI, gw: tuple[GatewayProcess, Listeners]) -> None:
    _, ports = gw
    for name, verify, expected in [
        ("a.example", True, ["a.example"]),
        ("x.b.example", True, ["*.b.example"]),
        ("A.Example", True, ["a.example"]),
        ("unknown.example", False, ["default.example"]),
        (None, False, ["default.example"]),
    ]:
        with tls_conn(ports.secure, pki.client_context(verify=verify), name) as c:
            assert isinstance(c.sock, ssl.SSLSocket)
            assert peer_sans(c.sock) == expected, name
            resp = c.request("GET", "/echo", host=name or "default.example")
            assert resp.status == 200


def test_rsa_and_ecdsa_certificates_for_one_name(
    pki: PKI, gw: tuple[GatewayProcess, Listeners]
) -> None:
    _, ports = gw
    # TLS 1.2: the cipher suite fixes the certificate type.
    for cipher, key in [
        ("ECDHE-RSA-AES128-GCM-SHA256", "RSA"),
        ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDSA"),
    ]:
        ctx = pki.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(cipher)
        with tls_conn(ports.secure, ctx) as c:
            assert isinstance(c.sock, ssl.SSLSocket)
            assert (c.sock.version(), peer_key_type(c.sock)) == ("TLSv1.2", key)
            assert c.request("GET", "/echo", host="a.example").status == 200
    # TLS 1.3: the client's signature algorithms do.
    ca = pki.servers.ca_path
    common = ("-servername", "a.example", "-CAfile", ca, "-tls1_3")
    out = s_client(ports.secure, *common, "-sigalgs", "rsa_pss_rsae_sha256")
    assert "Peer signature type: RSA-PSS" in out and "Verify return code: 0 (ok)" in out, out
    out = s_client(ports.secure, *common, "-sigalgs", "ecdsa_secp256r1_sha256")
    assert "Peer signature type: ECDSA" in out and "Verify return code: 0 (ok)" in out, out


def test_tls_1_0_and_1_1_are_refused(
    pki: PKI, gw: tuple[GatewayProcess, Listeners], tmp_path: Path
) -> None:
    _, ports = gw
    old = ("-cipher", "DEFAULT:@SECLEVEL=0")
    # Control: this client does speak TLS 1.1 to a server that allows it.
    control = free_port()
    cert = pki.default
    args = ["openssl", "s_server", "-accept", str(control), "-www", "-tls1_1", *old]
    server = subprocess.Popen(
        [*args, "-cert", cert.cert, "-key", cert.key],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(control, server)
        assert "Protocol  : TLSv1.1" in s_client(control, "-tls1_1", *old)
    finally:
        server.terminate()
        server.wait()
    for flag in ("-tls1", "-tls1_1"):
        out = s_client(ports.secure, flag, *old, "-servername", "a.example")
        assert "no peer certificate available" in out and "Cipher is (NONE)" in out, out
    out = s_client(ports.secure, "-tls1_2", "-servername", "a.example")
    assert "Protocol  : TLSv1.2" in out
    # a listener with min_version: 1.3 refuses TLS 1.2
    assert "Cipher is (NONE)" in s_client(ports.tls13, "-tls1_2", "-servername", "a.example")
    assert "New, TLSv1.3, Cipher is TLS_" in s_client(ports.tls13, "-servername", "a.example")


def test_alpn_and_tls13_by_default(pki: PKI, gw: tuple[GatewayProcess, Listeners]) -> None:
    _, ports = gw
    with tls_conn(ports.secure, pki.client_context()) as c:  # offers h2 and http/1.1
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.selected_alpn_protocol() == "http/1.1"
        assert c.sock.version() == "TLSv1.3"
    out = s_client(ports.secure, "-servername", "a.example", "-alpn", "http/1.1")
    assert "ALPN protocol: http/1.1" in out


def test_tls_connections_are_counted(pki: PKI, gw: tuple[GatewayProcess, Listeners]) -> None:
    g, ports = gw
    ctx = pki.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    for _ in range(2):
        assert tls_get(ports.tls13, pki.client_context()).status == 200
        assert tls_get(ports.secure, ctx).status == 200

    def counted() -> dict[tuple[str, str], float]:
        samples = metrics(g).get("gateway_tls_connections_total", {})
        return {(dict(k)["listener"], dict(k)["version"]): v for k, v in samples.items()}

    wait_until(
        lambda: (
            counted().get(("tls13", "TLSv1.3"), 0) >= 2
            and counted().get(("secure", "TLSv1.2"), 0) >= 2
        ),
        what="TLS connection counts",
    )
    assert ("tls13", "TLSv1.2") not in counted()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sessions_resume(
    pki: PKI, gw: tuple[GatewayProcess, Listeners], version: ssl.TLSVersion
) -> None:
    _, ports = gw
    ctx = pki.client_context()
    ctx.minimum_version = ctx.maximum_version = version
    with tls_conn(ports.secure, ctx) as c:
        assert c.request("GET", "/echo", host="a.example").status == 200  # tickets arrive
        assert isinstance(c.sock, ssl.SSLSocket)
        session = c.sock.session
        assert not c.sock.session_reused
    conn = Conn(ports.secure)
    conn.sock = ctx.wrap_socket(conn.sock, server_hostname="a.example", session=session)
    with conn:
        assert conn.request("GET", "/echo", host="a.example").status == 200
        assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.session_reused


# -- proxying over TLS -----------------------------------------------------------------------------
def test_https_proxying_and_hsts(
    pki: PKI, gw: tuple[GatewayProcess, Listeners], upstream: UpstreamProcess
) -> None:
    _, ports = gw
    resp = tls_get(ports.secure, pki.client_context(), "/echo")
    assert resp.status == 200
    assert resp.header_all("strict-transport-security") == ["max-age=600"]
    assert upstream_headers(upstream, "x-forwarded-proto") == ["https"]
    # the upstream's own HSTS header is replaced by the listener's
    resp = tls_get(ports.secure, pki.client_context(), "/hsts")
    assert (resp.status, resp.body) == (200, b"ok")
    assert resp.header_all("strict-transport-security") == ["max-age=600"]
    # gateway-made responses carry it too
    resp = tls_get(ports.secure, pki.client_context(), "/reset")
    assert resp.status == 502 and resp.json()["error"]["code"] == "upstream_reset"
    assert resp.header_all("strict-transport-security") == ["max-age=600"]
    resp = tls_get(ports.tls13, pki.client_context(), "/echo")
    assert resp.header("strict-transport-security") is None  # not configured there
    with Conn(ports.plain) as c:
        resp = c.request("GET", "/echo")
    assert resp.status == 200 and resp.header("strict-transport-security") is None
    assert upstream_headers(upstream, "x-forwarded-proto") == ["http"]


def test_plain_listener_redirects_to_https(gw: tuple[GatewayProcess, Listeners]) -> None:
    _, ports = gw
    with Conn(ports.redirect) as c:
        resp = c.request("POST", "/a/b?c=1", body=b"x", host="a.example:8080")
        assert resp.status == 308
        assert resp.header("location") == f"https://a.example:{ports.secure}/a/b?c=1"
        assert resp.body == b""
        resp = c.request("GET", "/", host="bad host")
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"


# -- client certificates ---------------------------------------------------------------------------
SPOOF = [(SUBJECT, "CN=admin"), (SAN, "DNS:admin.example"), ("X-Client-Cert-Subject", "CN=root")]


def expect_identity(upstream: UpstreamProcess, pki: PKI) -> None:
    subject = x509.load_pem_x509_certificate(
        pki.client.leaf.cert_chain_pems[0].bytes()
    ).subject.rfc4514_string()
    assert subject.startswith("CN=client1,")
    assert upstream_headers(upstream, SUBJECT) == [subject]
    assert upstream_headers(upstream, SAN) == ["DNS:client1.example, email:client1@example.com"]


def handshake_refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the handshake, or the first exchange after it (TLS 1.3 reports a refused
    client certificate after the client's side of the handshake), fails."""
    try:
        tls_get(port, ctx)
    except (OSError, h11.RemoteProtocolError):  # ssl.SSLError, resets, or a plain close
        return True
    return False


def test_required_client_certificate(
    pki: PKI, gw: tuple[GatewayProcess, Listeners], upstream: UpstreamProcess
) -> None:
    _, ports = gw
    assert handshake_refused(ports.required, pki.client_context())
    assert handshake_refused(ports.required, pki.client_context(pki.rogue_client))
    resp = tls_get(ports.required, pki.client_context(pki.client), headers=SPOOF)
    assert resp.status == 200
    expect_identity(upstream, pki)


def test_optional_client_certificate(
    pki: PKI, gw: tuple[GatewayProcess, Listeners], upstream: UpstreamProcess
) -> None:
    _, ports = gw
    resp = tls_get(ports.optional, pki.client_context(), headers=SPOOF)
    assert resp.status == 200
    assert upstream_headers(upstream, SUBJECT) == upstream_headers(upstream, SAN) == []
    assert handshake_refused(ports.optional, pki.client_context(pki.rogue_client))
    resp = tls_get(ports.optional, pki.client_context(pki.client), headers=SPOOF)
    assert resp.status == 200
    expect_identity(upstream, pki)


def test_missing_client_certificate_answered_403(
    pki: PKI, gw: tuple[GatewayProcess, Listeners], upstream: UpstreamProcess
) -> None:
    _, ports = gw
    upstream.reset()
    with tls_conn(ports.refuse, pki.client_context()) as c:
        for _ in range(2):  # on every request of the connection, which stays open
            resp = c.request("GET", "/echo", host="a.example")
            assert resp.status == 403
            error = resp.json()["error"]
            assert error["code"] == "client_cert_required"
            assert error["request_id"] == resp.header("x-request-id")
    assert upstream.received() == []
    resp = tls_get(ports.refuse, pki.client_context(pki.client), headers=SPOOF)
    assert resp.status == 200
    expect_identity(upstream, pki)


def test_identity_headers_cannot_be_sent_by_clients_on_plain_listeners(
    gw: tuple[GatewayProcess, Listeners], upstream: UpstreamProcess
) -> None:
    _, ports = gw
    with Conn(ports.plain) as c:
        resp = c.request("GET", "/echo", headers=[*SPOOF, ("Connection", SUBJECT)])
    assert resp.status == 200
    assert upstream_headers(upstream, SUBJECT) == upstream_headers(upstream, SAN) == []


# -- startup errors, check, rotation ---------------------------------------------------------------
def tls_listener_config(port: int, cert: str, key: str, **extra: Any) -> dict[str, Any]:
    config = proxy_config("builtin:echo")
    config["listeners"] = [
        {
            "name": "secure",
            "bind": f"127.0.0.1:{port}",
            "tls": {"certificates": [{"cert": cert, "key": key, **extra}]},
        }
    ]
    return config


def write_config(path: Path, config: dict[str, Any]) -> str:
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def test_startup_and_check_report_certificate_problems(pki: PKI, tmp_path: Path) -> None:
    good = pki.servers.issue("good.example")
    enc = pki.servers.issue("enc.example", password="pw")
    missing = str(tmp_path / "missing.pem")
    entries = [
        {"cert": missing, "key": good.key},
        {"cert": good.cert, "key": pki.a_rsa.key},
        {"cert": enc.cert, "key": enc.key},
        {"cert": enc.cert, "key": enc.key, "password": "nope"},
    ]
    config = tls_listener_config(1, good.cert, good.key)
    config["listeners"] = [
        {"name": f"l{i}", "bind": f"127.0.0.1:{i + 1}", "tls": {"certificates": [entry]}}
        for i, entry in enumerate(entries)
    ]
    path = write_config(tmp_path / "broken.yaml", config)
    expected = [
        f"listeners[0].tls.certificates[0].cert: cannot read {missing}: No such file or directory",
        f"listeners[1].tls.certificates[0].key: {pki.a_rsa.key} does not match the certificate "
        f"in {good.cert} (subject {subject_of(good)})",
        f"listeners[2].tls.certificates[0].password: {enc.key} is encrypted: set password",
        f"listeners[3].tls.certificates[0].password: wrong password for {enc.key}",
    ]
    done = run_cli("check", "-c", path)
    assert done.returncode == 2
    assert [line.split(" (line ")[0] for line in done.stderr.splitlines()] == [
        *(f"{path}: {e}" for e in expected),
        f"{path}: 4 error(s); config rejected",
    ]
    done = run_cli("run", "-c", path)
    assert done.returncode == 2
    assert all(e in done.stderr for e in expected), done.stderr
    # an encrypted key with its password from the environment, and an expired certificate:
    # accepted, the expiry as a warning
    expired = pki.servers.issue(
        "expired.example", not_after=datetime.datetime(2021, 3, 4, 5, 6, tzinfo=datetime.UTC)
    )
    config["listeners"] = [
        {
            "name": "a",
            "bind": "127.0.0.1:1",
            "tls": {
                "certificates": [
                    {"cert": enc.cert, "key": enc.key, "password": "${KEY_PW}"},
                    {"cert": expired.cert, "key": expired.key},
                ]
            },
        }
    ]
    path = write_config(tmp_path / "ok.yaml", config)
    done = run_cli("check", "-c", path, env={"KEY_PW": "pw"})
    assert done.returncode == 0, done.stderr
    assert (
        f"{path}: warning: listeners[0].tls.certificates[1].cert: certificate {expired.cert} "
        "expired on 2021-03-04 05:06 UTC; clients will refuse it"
    ) in done.stderr


# -- upstream TLS ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_upstreams(pki: PKI) -> Iterator[tuple[UpstreamProcess, UpstreamProcess]]:
    server = pki.servers.issue("127.0.0.1", "localhost", stem="upstream")
    plain_tls = UpstreamProcess(tls={"cert": server.cert, "key": server.key})
    mutual = UpstreamProcess(
        tls={"cert": server.cert, "key": server.key, "client_ca": pki.clients.ca_path}
    )
    yield plain_tls, mutual
    plain_tls.stop()
    mutual.stop()


def test_upstream_tls(
    pki: PKI,
    tls_upstreams: tuple[UpstreamProcess, UpstreamProcess],
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    up, mutual = tls_upstreams
    ca = pki.servers.ca_path
    url = f"https://127.0.0.1:{up.tls_port}"
    mutual_url = f"https://localhost:{mutual.tls_port}"
    upstreams = {
        "good": {"targets": [{"url": url}], "tls": {"ca": ca}},
        "untrusted": {"targets": [{"url": url}]},
        "wrong_name": {
            "targets": [{"url": url}],
            "tls": {"ca": ca, "server_name": "wrong.example"},
        },
        "no_verify": {"targets": [{"url": url}], "tls": {"verify": False}},
        "mutual": {
            "targets": [{"url": mutual_url}],
            "tls": {"ca": ca, "cert": pki.client.cert, "key": pki.client.key},
        },
        "mutual_no_cert": {"targets": [{"url": mutual_url}], "tls": {"ca": ca}},
        "plain_http": {"targets": [{"url": f"https://127.0.0.1:{up.port}"}], "tls": {"ca": ca}},
    }
    routes = [
        {"name": n, "match": {"path_prefix": f"/{n}"}, "upstream": n, "strip_prefix": True}
        for n in upstreams
    ]
    gw = start_gateway({"upstreams": upstreams, "routes": routes, "log": {"level": "info"}})
    assert "certificate verification is OFF for upstream 'no_verify'" in gw.logs()

    def get(path: str) -> Response:
        with Conn(gw.port) as c:
            return c.request("GET", path)

    for name in ("good", "no_verify"):
        resp = get(f"/{name}/echo")
        assert resp.status == 200, (name, resp.body)
        assert resp.json()["target"] == "/echo"
        assert ["host", f"127.0.0.1:{up.tls_port}"] in resp.json()["headers"]
    resp = get("/mutual/echo")
    assert resp.status == 200 and resp.json()["tls_client_subject"], resp.body
    for name, reason in [
        ("untrusted", "certificate verify failed: unable to get local issuer certificate"),
        ("wrong_name", "certificate verify failed: Hostname mismatch"),
        ("plain_http", "the connection was closed during the handshake"),
    ]:
        resp = get(f"/{name}/echo")
        assert resp.status == 502, (name, resp.body)
        assert resp.json()["error"]["code"] == "upstream_tls_failed"
        assert f"failed: {reason}" in gw.logs(), name
    expected = {
        (("target", f"127.0.0.1:{up.tls_port}"),): 2,
        (("target", f"127.0.0.1:{up.port}"),): 1,
    }
    wait_until(
        lambda: metrics(gw).get("gateway_upstream_tls_failures_total") == expected,
        what="upstream TLS failure counts",
    )
    # a refused client certificate shows when the response is read (TLS 1.3)
    resp = get("/mutual_no_cert/echo")
    assert resp.status == 502, resp.body
    assert resp.json()["error"]["code"] in ("upstream_tls_failed", "upstream_reset")


# -- reload ------------------------------------------------------------------------------------
def test_certificate_rotation_by_reload_under_load(
    pki: PKI,
    upstream: UpstreamProcess,
    tmp_path: Path,
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    old = pki.servers.issue("a.example", stem="rot-old")
    new = pki.servers.issue("a.example", rsa=True, stem="rot-new")
    shutil.copy(old.cert, cert)
    shutil.copy(old.key, key)
    port = free_port()
    config = proxy_config(upstream.url)
    config["workers"] = 2
    config["listeners"] = [
        {
            "name": "secure",
            "bind": f"127.0.0.1:{port}",
            "tls": {"certificates": [{"cert": str(cert), "key": str(key)}]},
        }
    ]
    g = start_gateway(config, port=port)
    ctx = pki.client_context()

    def served_key_type() -> str:
        with tls_conn(port, ctx) as c:
            assert isinstance(c.sock, ssl.SSLSocket)
            return peer_key_type(c.sock)

    assert served_key_type() == "ECDSA"
    with Load(port, threads=4, connect=lambda p: tls_conn(p, ctx)) as load:
        wait_until(lambda: load.ok > 30, what="load to start")
        shutil.copy(new.cert, cert)
        shutil.copy(new.key, key)
        resp = g.admin("POST", "/reload")
        assert resp.status == 200 and resp.json()["result"] == "success", resp.body
        wait_until(lambda: served_key_type() == "RSA", what="the new certificate")
        # a broken pair is refused; the running config keeps serving the last good one
        shutil.copy(old.key, key)
        resp = g.admin("POST", "/reload")
        assert resp.status == 422, resp.body
        errors = resp.json()["errors"]
        assert errors == [
            f"listeners[0].tls.certificates[0].key: {key} does not match the certificate in "
            f"{cert} (subject {subject_of(new)}) (line {line_of(g, 'key:')})"
        ], errors
        before = load.ok
        wait_until(lambda: load.ok > before + 30, what="load after the reloads")
        assert served_key_type() == "RSA"
    assert load.failures == [], load.failures[:5]


def subject_of(issued: Issued) -> str:
    cert = x509.load_pem_x509_certificate(issued.leaf.cert_chain_pems[0].bytes())
    return cert.subject.rfc4514_string()


def line_of(g: GatewayProcess, needle: str) -> int:
    for i, text in enumerate(g.config_path.read_text().splitlines(), 1):
        if needle in text:
            return i
    raise AssertionError(needle)


def test_reload_finishes_a_handshake_in_progress(
    pki: PKI, upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """A worker told to drain while a client is half-way through its TLS handshake waits for
    that handshake and answers the request (with ``Connection: close``): before the
    handshake completes, the connection is not yet an HTTP connection the drain could see,
    and a worker that exited at once left the client with a cut handshake."""
    port = free_port()
    config = tls_listener_config(port, str(pki.a_ecdsa.cert), str(pki.a_ecdsa.key))
    config["upstreams"] = proxy_config(upstream.url)["upstreams"]
    g = start_gateway(config, port=port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="a.example")

    def step() -> bool:
        """One handshake step: whether the handshake is done."""
        try:
            tls.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False
        finally:
            if outgoing.pending:
                sock.sendall(outgoing.read())

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert not step()  # the ClientHello is sent
        first = sock.recv(65536)  # the server's first flight: a worker holds the connection
        assert first, "the gateway closed the connection before its ServerHello"
        incoming.write(first)
        before = wait_until(
            lambda: (
                (st := g.admin("GET", "/status").json())["workers"][0]["tls_handshakes"] == 1 and st
            ),
            what="the handshake in the worker's status",
        )
        resp = g.admin("POST", "/reload")
        assert resp.status == 200 and resp.json()["result"] == "success", resp.body
        # The old worker has been told to drain; it has no HTTP connection, only this
        # handshake. Give it time to (wrongly) exit before the handshake goes on.
        time.sleep(1.5)
        while not step():
            data = sock.recv(65536)
            assert data, "the handshake was cut"
            incoming.write(data)
        tls.write(b"GET /echo HTTP/1.1\r\nhost: a.example\r\n\r\n")
        sock.sendall(outgoing.read())
        received = b""
        closed = False  # the gateway's close_notify (it closes after "Connection: close")
        while not closed:
            data = sock.recv(65536)
            assert data, received
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    received += chunk
                closed = True
            except ssl.SSLWantReadError:
                pass
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200 "), received[:300]
    assert b"\r\nconnection: close" in head, head
    old = {w["pid"] for w in before["workers"]}
    wait_until(
        lambda: not old & {w["pid"] for w in g.admin("GET", "/status").json()["draining_workers"]},
        what="the old worker to finish draining",
    )


def test_failed_handshakes_are_not_kept(
    pki: PKI, upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """Handshakes that fail (garbage, a client that hangs up, one that rejects the
    certificate) leave the worker's count of handshakes under way: it is what a draining
    worker waits for."""
    port = free_port()
    config = tls_listener_config(port, str(pki.a_ecdsa.cert), str(pki.a_ecdsa.key))
    config["upstreams"] = proxy_config(upstream.url)["upstreams"]
    g = start_gateway(config, port=port)

    def under_way() -> int:
        return int(g.admin("GET", "/status").json()["workers"][0]["tls_handshakes"])

    pending = socket.create_connection(("127.0.0.1", port), timeout=10)  # says nothing yet
    wait_until(lambda: under_way() == 1, what="the silent connection to be counted")
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")  # plain HTTP on a TLS port
            s.recv(100)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            pass  # hangs up before its ClientHello
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_conn(port, ssl.create_default_context(), "a.example")  # untrusted CA
    pending.close()
    # Zero in a status written after the failures: none of them is still held.
    wait_until(lambda: under_way() == 0, what="the count to reach zero")
    assert tls_get(port, pki.client_context()).status == 200
    assert under_way() == 0
