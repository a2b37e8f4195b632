"""TLS config compiling without sockets: certificates checked with their config paths, SNI
contexts, client-certificate policy, redirects, HSTS, upstream contexts."""

from __future__ import annotations

import datetime
import logging
import ssl
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config.compile import Listener, Runtime, compile_config
from gateway.config.load import load_text
from gateway.http.headers import Headers
from gateway.proxy.exchange import Exchange
from gateway.tls import ClientCert, HttpsRedirect, hsts_header
from tests.support.certs import CertDir, Issued
from tests.unit.test_config import REGISTRY, errors, line, load


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertDir:
    return CertDir(tmp_path_factory.mktemp("certs"))


def tls_config(certificates: str, extra: str = "") -> str:
    return (
        textwrap.dedent(
            """\
        listeners:
          - name: secure
            bind: "127.0.0.1:8443"
            tls:
              certificates:
        """
        )
        + textwrap.indent(textwrap.dedent(certificates), " " * 8)
        + textwrap.indent(textwrap.dedent(extra), " " * 6)
    )


def cert_entry(issued: Issued, **extra: str) -> str:
    more = "".join(f"\n  {k}: {v}" for k, v in extra.items())
    return f"- cert: {issued.cert}\n  key: {issued.key}{more}\n"


def listener(rt: Runtime) -> Listener:
    return rt.listeners[0]


# -- SNI contexts ------------------------------------------------------------------------------
def test_names_come_from_the_sans_and_same_name_certificates_share_a_context(
    certs: CertDir,
) -> None:
    rsa = certs.issue("a.example", "www.a.example", rsa=True)
    ecdsa = certs.issue("a.example", "www.a.example")
    wild = certs.issue("*.b.example")
    other = certs.issue("c.example")
    rt = load(
        tls_config(cert_entry(rsa) + cert_entry(ecdsa) + cert_entry(wild) + cert_entry(other))
    )
    lst = listener(rt)
    assert lst.tls is not None
    tls = lst.tls.certificates
    assert lst.ssl is tls.default
    assert sorted(tls.exact) == ["a.example", "c.example", "www.a.example"]
    assert sorted(tls.wildcard) == ["b.example"]
    # RSA + ECDSA for a.example: one context, which is the default (the first certificate's)
    assert tls.exact["a.example"] is tls.default is tls.exact["www.a.example"]
    assert len(tls.contexts) == 3
    assert tls.context_for_name("x.b.example") is tls.wildcard["b.example"]
    assert tls.context_for_name("y.x.b.example") is tls.default  # one label only
    assert tls.context_for_name("b.example") is tls.default  # not the bare domain
    assert tls.context_for_name("C.EXAMPLE") is tls.exact["c.example"]
    assert tls.default.sni_callback is not None
    assert lst.ssl_handshake_timeout == rt.limits.header_timeout
    ctx = tls.default
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.verify_mode == ssl.CERT_NONE
    ciphers = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert ciphers and all(c.startswith("ECDHE-") for c in ciphers), ciphers


def test_configured_names_replace_the_sans(certs: CertDir) -> None:
    first = certs.issue("a.example")
    second = certs.issue("ignored.example")
    rt = load(
        tls_config(cert_entry(first) + cert_entry(second, names="[Other.Example, '*.w.example']"))
    )
    lst = listener(rt)
    assert lst.tls is not None
    tls = lst.tls.certificates
    assert sorted(tls.exact) == ["a.example", "other.example"]
    assert sorted(tls.wildcard) == ["w.example"]


def test_two_certificates_of_one_key_type_for_one_name_is_an_error(certs: CertDir) -> None:
    a1 = certs.issue("a.example", rsa=True)
    a2 = certs.issue("z.example", "a.example", rsa=True)
    text = tls_config(cert_entry(a1) + cert_entry(a2))
    assert errors(text) == [
        "listeners[0].tls.certificates[1]: certificates[0] already serves a.example with a "
        f"RSA key: one certificate per key type and name (line {line(text, a2.cert)})"
    ]


def test_options_min_version_ciphers_tickets(certs: CertDir) -> None:
    a = certs.issue("a.example")
    rt = load(
        tls_config(
            cert_entry(a),
            """\
            min_version: 1.3
            ciphers: "ECDHE-ECDSA-AES256-GCM-SHA384"
            session_tickets: false
            hsts: {max_age: 1h, include_subdomains: true}
            """,
        )
    )
    lst = listener(rt)
    assert lst.ssl is not None
    assert lst.ssl.minimum_version == ssl.TLSVersion.TLSv1_3
    assert lst.ssl.options & ssl.OP_NO_TICKET and lst.ssl.num_tickets == 0
    assert lst.hsts == b"strict-transport-security: max-age=3600; includeSubDomains\r\n"


def test_bad_options_are_reported_with_their_paths(certs: CertDir) -> None:
    a = certs.issue("a.example")
    text = tls_config(cert_entry(a, names="['*']"), 'min_version: "1.1"\n')
    assert errors(text) == [
        f"listeners[0].tls.min_version: Input should be '1.2' or '1.3' (line {line(text, 'min_v')})"
    ]
    text = tls_config(cert_entry(a, names="['*', 'a.*.example']"))
    assert errors(text) == [
        f"listeners[0].tls.certificates[0].names[0]: '*' is not a host name or *.domain "
        f"(line {line(text, 'names')})",
        f"listeners[0].tls.certificates[0].names[1]: 'a.*.example' is not a host name or "
        f"*.domain (line {line(text, 'names')})",
    ]
    text = tls_config(cert_entry(a), "ciphers: NOPE-NOTHING\n")
    assert errors(text) == [
        "listeners[0].tls.ciphers: OpenSSL accepts no cipher of 'NOPE-NOTHING' "
        f"(line {line(text, 'ciphers')})"
    ]


# -- certificate and key problems ------------------------------------------------------------
def test_unreadable_files_are_errors_with_the_key_path(certs: CertDir, tmp_path: Path) -> None:
    a = certs.issue("a.example")
    missing = tmp_path / "nope.pem"
    text = tls_config(f"- cert: {missing}\n  key: {a.key}\n- cert: {a.cert}\n  key: {missing}\n")
    assert errors(text) == [
        f"listeners[0].tls.certificates[0].cert: cannot read {missing}: No such file or "
        f"directory (line {line(text, 'nope.pem')})",
        f"listeners[0].tls.certificates[1].key: cannot read {missing}: No such file or "
        f"directory (line {line(text, 'nope.pem', 2)})",
    ]
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    text = tls_config(f"- cert: {junk}\n  key: {a.key}\n- cert: {a.cert}\n  key: {junk}\n")
    assert errors(text) == [
        f"listeners[0].tls.certificates[0].cert: {junk} holds no PEM certificate "
        f"(line {line(text, 'junk.pem')})",
        f"listeners[0].tls.certificates[1].key: {junk} holds no usable PEM private key "
        f"(line {line(text, 'junk.pem', 2)})",
    ]


def test_key_that_does_not_match_the_certificate(certs: CertDir) -> None:
    a = certs.issue("a.example")
    b = certs.issue("b.example", common_name="b")
    text = tls_config(f"- cert: {b.cert}\n  key: {a.key}\n")
    subject = x509.load_pem_x509_certificate(b.leaf.cert_chain_pems[0].bytes()).subject
    assert subject.rfc4514_string().startswith("CN=b,")
    assert errors(text) == [
        f"listeners[0].tls.certificates[0].key: {a.key} does not match the certificate in "
        f"{b.cert} (subject {subject.rfc4514_string()}) (line {line(text, 'key:')})"
    ]


def test_encrypted_keys_need_the_right_password(certs: CertDir) -> None:
    enc = certs.issue("a.example", password="s3cret")
    text = tls_config(cert_entry(enc))
    assert errors(text) == [
        f"listeners[0].tls.certificates[0].password: {enc.key} is encrypted: set password "
        f"(line {line(text, 'cert:')})"
    ]
    text = tls_config(cert_entry(enc, password="wrong"))
    assert errors(text) == [
        f"listeners[0].tls.certificates[0].password: wrong password for {enc.key} "
        f"(line {line(text, 'password')})"
    ]
    rt = load(
        tls_config(cert_entry(enc, password="${KEY_PASSWORD}")), env={"KEY_PASSWORD": "s3cret"}
    )
    assert listener(rt).ssl is not None


def test_expired_certificate_is_a_warning_not_an_error(
    certs: CertDir, caplog: pytest.LogCaptureFixture
) -> None:
    old = certs.issue("old.example", not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    text = tls_config(cert_entry(old))
    with caplog.at_level(logging.WARNING, "gateway.config"):
        rt = load(text)
    assert listener(rt).ssl is not None
    expected = (
        f"listeners[0].tls.certificates[0].cert: certificate {old.cert} expired on "
        f"2020-01-01 00:00 UTC; clients will refuse it (line {line(text, 'cert:')})"
    )
    assert [str(w) for w in rt.warnings] == [expected]
    assert f"test.yaml: warning: {expected}" in caplog.messages


def test_relative_paths_are_relative_to_the_config_file(certs: CertDir) -> None:
    a = certs.issue("a.example", stem="rel")
    text = tls_config("- {cert: rel.pem, key: rel.key}\n")
    config, source = load_text(text, REGISTRY, str(Path(certs.dir) / "gw.yaml"), env={})
    assert compile_config(config, source).listeners[0].ssl is not None
    assert Path(a.cert).parent == certs.dir


# -- client certificates ----------------------------------------------------------------------
def test_client_cert_modes(certs: CertDir) -> None:
    a = certs.issue("a.example")
    ca = certs.ca_path
    for conf, verify, refuse in [
        ("{ca: %s}", ssl.CERT_REQUIRED, False),
        ("{ca: %s, mode: optional}", ssl.CERT_OPTIONAL, False),
        ("{ca: %s, mode: required, on_failure: 403}", ssl.CERT_OPTIONAL, True),
    ]:
        rt = load(tls_config(cert_entry(a), "client_cert: " + conf % ca + "\n"))
        lst = listener(rt)
        assert lst.ssl is not None and lst.ssl.verify_mode == verify, conf
        assert lst.tls is not None and lst.tls.client_certs is not None
        assert (lst.tls.client_certs.missing is not None) == refuse, conf
        # the identity headers are never taken from clients, on any listener
        assert {b"x-client-cert-subject", b"x-client-cert-san"} <= rt.forwarding.request_own


def test_client_cert_config_errors(certs: CertDir, tmp_path: Path) -> None:
    a = certs.issue("a.example")
    text = tls_config(
        cert_entry(a),
        f"""\
        client_cert:
          mode: optional
          on_failure: 403
          ca: {tmp_path / "missing-ca.pem"}
          headers: {{subject: "bad header"}}
        """,
    )
    assert errors(text) == [
        "listeners[0].tls.client_cert.on_failure: 403 applies to mode: required (with mode: "
        "optional a missing certificate is allowed, and one that fails verification fails the "
        f"handshake) (line {line(text, 'on_failure')})",
        f"listeners[0].tls.client_cert.ca: cannot read {tmp_path / 'missing-ca.pem'}: No such "
        f"file or directory (line {line(text, 'ca:')})",
        "listeners[0].tls.client_cert.headers.subject: not a valid header name "
        f"(line {line(text, 'subject')})",
    ]


def test_client_identity_headers_escape_control_characters(certs: CertDir) -> None:
    evil = certs.issue("c.example", common_name="evil\r\nx-injected: 1")
    pem = evil.leaf.cert_chain_pems[0].bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    cert = ClientCert(der, b"x-client-cert-subject", b"x-client-cert-san")
    assert cert.subject.startswith("CN=evil\r\nx-injected: 1,")
    subject_line, san_line, end = cert.header_block.split(b"\r\n")
    assert subject_line.startswith(b"x-client-cert-subject: CN=evil\\x0D\\x0Ax-injected: 1,")
    assert (san_line, end) == (b"x-client-cert-san: DNS:c.example", b"")
    assert cert.sans == ("DNS:c.example",)
    assert cert.vars["tls.client_subject"] == cert.subject


# -- redirect and HSTS ---------------------------------------------------------------------------
class _Conn:
    tls_client = None
    client_ip = "192.0.2.1"


def _exchange(host: bytes, url: bytes, path: bytes = b"", query: bytes = b"") -> Exchange:
    ex = Exchange(_Conn())  # type: ignore[arg-type]
    ex.host, ex.url, ex.path, ex.query, ex.headers = host, url, path, query, Headers()
    return ex


@pytest.mark.parametrize(
    ("port", "host", "url", "location"),
    [
        (443, b"a.example", b"/x?y=1", b"https://a.example/x?y=1"),
        (443, b"a.example:8080", b"/", b"https://a.example/"),
        (8443, b"a.example:8080", b"/p", b"https://a.example:8443/p"),
        (443, b"[::1]:8080", b"/p", b"https://[::1]/p"),
        (443, b"192.0.2.7", b"/p", b"https://192.0.2.7/p"),
    ],
)
def test_https_redirect_location(port: int, host: bytes, url: bytes, location: bytes) -> None:
    reply = HttpsRedirect(port, 308)(_exchange(host, url))
    assert reply.status == 308 and reply.headers == [(b"location", location)]


def test_https_redirect_absolute_form_and_bad_hosts() -> None:
    reply = HttpsRedirect(443, 301)(_exchange(b"h.example", b"http://h.example/a?b", b"/a", b"b"))
    assert reply.headers == [(b"location", b"https://h.example/a?b")]
    for host in (b"", b"evil/path", b"a b", b"[::1"):
        reply = HttpsRedirect(443, 301)(_exchange(host, b"/"))
        assert reply.status == 400 and reply.code == "bad_request", host


def test_redirect_config(certs: CertDir) -> None:
    rt = load(
        "listeners:\n"
        "  - {name: plain, bind: '127.0.0.1:80', redirect_https: {port: 8443, status: 308}}\n"
    )
    redirect = listener(rt).redirect
    assert redirect is not None and redirect.status == 308 and redirect.port_suffix == b":8443"
    a = certs.issue("a.example")
    text = tls_config(cert_entry(a)).replace("    tls:", "    redirect_https: {}\n    tls:")
    assert errors(text) == [
        "listeners[0].redirect_https: only a plain (non-TLS) listener redirects "
        f"(line {line(text, 'redirect_https')})"
    ]


def test_hsts_header_value() -> None:
    assert hsts_header(31536000, True, True) == (
        b"strict-transport-security: max-age=31536000; includeSubDomains; preload\r\n"
    )


# -- upstream TLS ---------------------------------------------------------------------------------
def upstream_config(url: str, tls: str = "") -> str:
    return (
        "listeners: [{name: a, bind: '127.0.0.1:8080'}]\n"
        "upstreams:\n"
        "  api:\n"
        f"    targets: [{{url: '{url}'}}]\n" + (f"    tls: {tls}\n" if tls else "")
    )


def api_target(rt: Any) -> Any:
    """The "api" upstream's one target; a host name resolves when a worker starts (every
    address a target), so here its target is built for an address as the resolver would."""
    api = rt.upstreams["api"]
    if api.targets:
        (target,) = api.targets
        return target
    assert api.make_target is not None
    return api.make_target(api.specs[0], "192.0.2.7")


def test_https_targets(certs: CertDir) -> None:
    rt = load(upstream_config("https://api.example"))
    target = api_target(rt)
    assert target.ssl is not None and target.ssl.verify_mode == ssl.CERT_REQUIRED
    assert target.ssl.check_hostname
    assert (target.port, target.server_hostname, target.host_header) == (
        443,
        "api.example",
        b"api.example",
    )
    client = certs.issue("client.example")
    rt = load(
        upstream_config(
            "https://10.0.0.1:8443",
            f"{{ca: {certs.ca_path}, server_name: api.internal, cert: {client.cert}, "
            f"key: {client.key}}}",
        )
    )
    target = api_target(rt)
    assert target.server_hostname == "api.internal" and target.host_header == b"10.0.0.1:8443"
    assert target.ssl is not None and target.ssl.get_ca_certs()


def test_verify_off_is_allowed_only_explicitly_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    text = upstream_config("https://api.example", "{verify: false}")
    with caplog.at_level(logging.WARNING, "gateway.config"):
        rt = load(text)
    target = api_target(rt)
    assert target.ssl is not None and target.ssl.verify_mode == ssl.CERT_NONE
    assert [str(w) for w in rt.warnings] == [
        "upstreams.api.tls.verify: certificate verification is OFF for upstream 'api': its "
        "identity is not checked and anyone on the path can read and change its traffic "
        f"(line {line(text, 'verify')})"
    ]
    assert any("verification is OFF" in m for m in caplog.messages)


def test_upstream_tls_errors(certs: CertDir, tmp_path: Path) -> None:
    text = upstream_config("http://api.example", "{verify: true}")
    assert errors(text) == [
        f"upstreams.api.tls: applies to https:// targets; none here (line {line(text, 'tls')})"
    ]
    client = certs.issue("client.example")
    text = upstream_config(
        "https://api.example",
        f"{{ca: {tmp_path / 'none.pem'}, cert: {client.cert}, server_name: '*.x'}}",
    )
    assert errors(text) == [
        f"upstreams.api.tls.ca: cannot read {tmp_path / 'none.pem'}: No such file or directory "
        f"(line {line(text, 'tls')})",
        "upstreams.api.tls: a client certificate needs both cert and key "
        f"(line {line(text, 'tls')})",
        "upstreams.api.tls.server_name: a server name cannot be a wildcard "
        f"(line {line(text, 'tls')})",
    ]
