"""TLS: listener contexts (SNI, RSA and ECDSA side by side, client certificates), upstream
client contexts, and the certificate checks behind clear config errors.

Theory of operation
-------------------
Everything here runs when a config is compiled (``gateway check``, start, reload), except
``sni_callback``, ``ClientCertPolicy.identify`` and ``HttpsRedirect``, which run per handshake,
per connection and per request.

*Checks first.* Every certificate and key is read and checked with ``cryptography`` before
OpenSSL sees it: the file is readable, holds PEM, the key decrypts with the configured
password, the key belongs to the certificate, the certificate is within its validity dates
(outside them: a warning, not an error). A problem is a ``TLSFileError`` naming the config key
(``cert``, ``key``, ``password``, ``ca``) so the compiler reports it with the key's path. A
key is never loaded without a password callback: OpenSSL's default one would prompt on the
terminal and hang a server.

*Listener certificates.* Each certificate serves names: its DNS subjectAltNames, or the
configured ``names``. Names served by the same set of certificates share one ``SSLContext``
holding all of them: OpenSSL keeps one certificate per key type in a context, so an RSA and an
ECDSA certificate for one name are both loaded and the handshake picks the one the client's
signature algorithms allow. The first certificate's context (with its same-name siblings of
other key types) is the default: used when the client sends no SNI or an unknown name.
``sni_callback``, set on the default context, moves the connection to the context of its
name: an exact name first, else the ``*.`` wildcard of the name minus its first label (one
label only, RFC 6125 6.4.3).

All of a listener's contexts are configured alike (versions, ciphers, ALPN, client CAs):
after a switch OpenSSL reads some settings from the new context and some from the first.
Session tickets are sealed with the default context's keys (OpenSSL keeps the session
context of the first), which are made when the context is created: contexts created before
the worker processes fork share them, so a ticket resumes on any worker of that generation.

*Client certificates.* ``required`` + ``handshake`` is OpenSSL's ``CERT_REQUIRED``;
``optional`` is ``CERT_OPTIONAL``; ``required`` + ``403`` is ``CERT_OPTIONAL`` plus a 403 for
every request on a connection without a certificate. A certificate that fails verification
always fails the handshake: Python's ``ssl`` has no verify callback with which to let it
through and refuse later. A verified certificate becomes a ``ClientCert`` once per
connection (cached by its DER bytes): subject (RFC 4514), subjectAltNames, SHA-256
fingerprint, the header lines sent upstream and the exchange variables
(``tls.client_subject``, ``tls.client_sans``, ``tls.client_fingerprint``) that plugins, such
as a rate limiter keyed by client, read.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway import metrics
from gateway.plugin import Reply

if TYPE_CHECKING:
    import asyncio

    from gateway.proxy.exchange import Exchange
    from gateway.proxy.protocol import ClientConnection

TLS_CONNECTIONS = metrics.counter(
    "tls_connections_total",
    "TLS connections established on listeners, by listener and protocol version.",
    ("listener", "version"),
)
UPSTREAM_TLS_FAILURES = metrics.counter(
    "upstream_tls_failures_total",
    "Failed TLS handshakes with upstream targets, by target.",
    ("target",),
)

#: TLS 1.2 suites: forward secrecy and AEAD only (Mozilla's "intermediate" list without DHE).
#: TLS 1.3 suites are OpenSSL's defaults (all AEAD); Python cannot change them.
MODERN_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
ALPN = ["http/1.1"]

_IDENTITY_CACHE_MAX = 1024
_HOST_RE = re.compile(rb"^(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])$")


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used; ``key`` is the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# -- checking files --------------------------------------------------------------------------
def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFileError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def read_certificates(path: Path, key: str = "cert") -> list[x509.Certificate]:
    """The PEM certificates in ``path`` (at least one)."""
    data = _read(path, key)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSFileError(key, f"{path} holds no PEM certificate")
    return certs


def key_type(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "Ed448"
    return type(key).__name__


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def validity_warnings(cert: x509.Certificate, what: str, now: datetime | None = None) -> list[str]:
    now = now or datetime.now(UTC)
    out = []
    if cert.not_valid_after_utc < now:
        out.append(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "clients will refuse it"
        )
    elif cert.not_valid_before_utc > now:
        out.append(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return out


@dataclass(frozen=True, slots=True)
class CertKeyPair:
    """A checked certificate chain and its key, ready for ``load_cert_chain``."""

    cert_path: str
    key_path: str
    password: bytes | None
    key_type: str
    names: tuple[str, ...]
    subject: str
    warnings: tuple[str, ...]

    def load_into(self, ctx: ssl.SSLContext) -> None:
        password = self.password

        def give_password() -> bytes:
            if password is None:  # checked already; never let OpenSSL prompt on a terminal
                raise TLSFileError("password", "the key is encrypted: set password")
            return password

        try:
            ctx.load_cert_chain(self.cert_path, self.key_path, password=give_password)
        except ssl.SSLError as exc:
            raise TLSFileError("cert", f"OpenSSL refused the pair: {exc.reason or exc}") from None
        except OSError as exc:  # the files changed since the check
            raise TLSFileError("cert", f"cannot load: {exc.strerror or exc}") from None


def load_pair(
    cert_path: Path, key_path: Path, password: str | None, names: Sequence[str] = ()
) -> CertKeyPair:
    """Check a certificate chain and its private key; raises ``TLSFileError``."""
    chain = read_certificates(cert_path)
    leaf = chain[0]
    data = _read(key_path, "key")
    pw = password.encode() if password is not None else None
    try:
        key = serialization.load_pem_private_key(data, pw)
    except TypeError as exc:  # encrypted without a password, or a password for a plain key
        if pw is None:
            raise TLSFileError("password", f"{key_path} is encrypted: set password") from None
        raise TLSFileError("password", f"{key_path}: {exc}") from None
    except ValueError:
        if pw is not None and b"ENCRYPTED" in data:
            raise TLSFileError("password", f"wrong password for {key_path}") from None
        raise TLSFileError("key", f"{key_path} holds no usable PEM private key") from None
    except Exception as exc:  # an unsupported algorithm, say
        raise TLSFileError("key", f"{key_path}: {exc}") from None
    ktype = key_type(key)
    if ktype not in ("RSA", "ECDSA", "Ed25519", "Ed448"):
        raise TLSFileError("key", f"{key_path}: unsupported key type {ktype}")
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TLSFileError(
            "key",
            f"{key_path} does not match the certificate in {cert_path} "
            f"(subject {leaf.subject.rfc4514_string() or '(empty)'})",
        )
    served = tuple(names) if names else tuple(dns_names(leaf))
    return CertKeyPair(
        str(cert_path),
        str(key_path),
        pw,
        ktype,
        served,
        leaf.subject.rfc4514_string(),
        tuple(validity_warnings(leaf, f"certificate {cert_path}")),
    )


def check_ca_file(path: Path, key: str = "ca") -> list[str]:
    """Check a CA bundle; returns validity warnings, raises ``TLSFileError``."""
    certs = read_certificates(path, key)
    out: list[str] = []
    for cert in certs:
        out += validity_warnings(cert, f"CA certificate {cert.subject.rfc4514_string()} in {path}")
    return out


def normalise_name(name: str) -> str:
    """A configured server name as SNI carries it: lower-case A-labels; ``*.`` kept."""
    h = name.strip().lower()
    wildcard = h.startswith("*.")
    rest = h[2:] if wildcard else h
    if not rest or "*" in rest:
        raise ValueError(f"{name!r} is not a host name or *.domain")
    try:
        encoded = rest.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{name!r} is not a valid host name") from None
    return "*." + encoded if wildcard else encoded


# -- listener contexts -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServerOptions:
    min_version: ssl.TLSVersion
    ciphers: str
    session_tickets: bool
    client_ca: str | None  # PEM bundle path, or None: no client certificates asked for
    client_cert_required: bool  # CERT_REQUIRED (the handshake fails without one)


def new_server_context(opts: ServerOptions) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = opts.min_version
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    try:
        ctx.set_ciphers(opts.ciphers)
    except ssl.SSLError:
        raise TLSFileError("ciphers", f"OpenSSL accepts no cipher of {opts.ciphers!r}") from None
    # Server preference (Python's default too), no client-initiated renegotiation (a CPU DoS).
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    if opts.session_tickets:
        ctx.options &= ~ssl.OP_NO_TICKET
    else:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    ctx.set_alpn_protocols(ALPN)
    if opts.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=opts.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TLSFileError("ca", f"cannot load {opts.client_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if opts.client_cert_required else ssl.CERT_OPTIONAL
    return ctx


class ServerCertificates:
    """A listener's certificates: the default context and the contexts by SNI name."""

    __slots__ = ("contexts", "default", "exact", "wildcard")

    def __init__(self, pairs: Sequence[CertKeyPair], opts: ServerOptions) -> None:
        """Raises ``CertificateConflict`` (naming the certificate at fault) or ``TLSFileError``
        (a listener-wide setting: ``ciphers``, the client ``ca``)."""
        if not pairs:
            raise ValueError("at least one certificate is needed")
        by_name: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            for name in pair.names:
                holders = by_name.setdefault(name, [])
                for j in holders:
                    if pairs[j].key_type == pair.key_type:
                        raise CertificateConflict(
                            i,
                            f"certificates[{j}] already serves {name} with a {pair.key_type} "
                            "key: one certificate per key type and name",
                        )
                if i not in holders:
                    holders.append(i)
        groups: dict[tuple[int, ...], ssl.SSLContext] = {}

        def context_for(group: tuple[int, ...]) -> ssl.SSLContext:
            ctx = groups.get(group)
            if ctx is None:
                ctx = new_server_context(opts)
                for i in group:
                    try:
                        pairs[i].load_into(ctx)
                    except TLSFileError as exc:
                        raise CertificateConflict(i, str(exc)) from None
                groups[group] = ctx
            return ctx

        first = pairs[0]
        default_group = tuple(by_name[first.names[0]]) if first.names else (0,)
        self.default = context_for(default_group)
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        for name, holders in by_name.items():
            ctx = context_for(tuple(holders))
            if name.startswith("*."):
                self.wildcard[name[2:]] = ctx
            else:
                self.exact[name] = ctx
        for i in range(len(pairs)):  # a certificate serving no name still has to load
            if not pairs[i].names and i != 0:
                context_for((i,))
        self.contexts = tuple(groups.values())
        if len(self.contexts) > 1:
            self.default.sni_callback = self.sni_callback

    def sni_callback(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext
    ) -> int | None:
        if not name:
            return None
        name = name.lower()
        found = self.exact.get(name)
        if found is None:
            dot = name.find(".")
            if dot > 0:
                found = self.wildcard.get(name[dot + 1 :])
        if found is not None and found is not ctx:
            sslobj.context = found
        return None

    def context_for_name(self, name: str) -> ssl.SSLContext:
        """The context a handshake for ``name`` ends up with (for tests and status)."""
        name = name.lower()
        found = self.exact.get(name)
        if found is None and "." in name:
            found = self.wildcard.get(name.split(".", 1)[1])
        return found or self.default


class CertificateConflict(ValueError):
    """A problem with ``certificates[index]`` found while building the contexts."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


# -- client certificates -----------------------------------------------------------------------
def _header_value(text: str) -> bytes:
    """A header-safe value: control characters escaped as ``\\xHH``, UTF-8 otherwise."""
    if text.isprintable():
        return text.encode("utf-8")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02X}" for c in text).encode("utf-8")


def _san_text(name: x509.GeneralName) -> str | None:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    return None


class ClientCert:
    """A verified client certificate, digested once per connection."""

    __slots__ = ("fingerprint", "header_block", "sans", "subject", "vars")

    def __init__(self, der: bytes, subject_header: bytes, sans_header: bytes) -> None:
        cert = x509.load_der_x509_certificate(der)
        self.subject = cert.subject.rfc4514_string()
        sans: list[str] = []
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            pass
        else:
            sans = [t for t in (_san_text(n) for n in ext) if t is not None]
        self.sans = tuple(sans)
        self.fingerprint = hashlib.sha256(der).hexdigest()
        parts: list[bytes] = []
        if subject_header:
            parts += (subject_header, b": ", _header_value(self.subject), b"\r\n")
        if sans_header and sans:
            parts += (sans_header, b": ", _header_value(", ".join(sans)), b"\r\n")
        self.header_block = b"".join(parts)
        self.vars: dict[str, Any] = {
            "tls.client_subject": self.subject,
            "tls.client_sans": self.sans,
            "tls.client_fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return f"<ClientCert {self.subject} {list(self.sans)}>"


Gate = Callable[["Exchange"], Reply]


def _refuse_without_cert(ex: Exchange) -> Reply:
    return Reply.error("client_cert_required")


class ClientCertPolicy:
    """What a listener does with client certificates once the handshake is done."""

    __slots__ = ("_cache", "missing", "sans_header", "subject_header")

    def __init__(self, subject_header: str | None, sans_header: str | None, refuse: bool) -> None:
        self.subject_header = subject_header.encode("latin-1") if subject_header else b""
        self.sans_header = sans_header.encode("latin-1") if sans_header else b""
        #: the gate for connections without a certificate (``required`` + ``403``)
        self.missing: Gate | None = _refuse_without_cert if refuse else None
        self._cache: dict[bytes, ClientCert] = {}

    def identify(self, sslobj: ssl.SSLObject | None) -> ClientCert | None:
        """The connection's verified client certificate, or None when it sent none."""
        der = sslobj.getpeercert(True) if sslobj is not None else None
        if not der:
            return None
        found = self._cache.get(der)
        if found is None:
            found = ClientCert(der, self.subject_header, self.sans_header)
            if len(self._cache) >= _IDENTITY_CACHE_MAX:
                self._cache.clear()
            self._cache[der] = found
        return found


class ListenerTLS:
    """A TLS listener's per-connection work, once its handshake is done: count it, and take
    the client certificate (or set the 403 gate) when the listener asks for one."""

    __slots__ = ("_by_version", "certificates", "client_certs", "name")

    def __init__(
        self, name: str, certificates: ServerCertificates, client_certs: ClientCertPolicy | None
    ) -> None:
        self.name = name
        self.certificates = certificates
        self.client_certs = client_certs
        self._by_version: dict[str | None, Any] = {}

    def accept(self, conn: ClientConnection, transport: asyncio.BaseTransport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        version = sslobj.version() if sslobj is not None else None
        counter = self._by_version.get(version)
        if counter is None:
            counter = TLS_CONNECTIONS.labels(self.name, version or "unknown")
            self._by_version[version] = counter
        counter.inc()
        policy = self.client_certs
        if policy is not None:
            conn.tls_client = policy.identify(sslobj)
            if conn.tls_client is None:
                conn.gate = policy.missing


def upstream_tls_failed(label: str) -> None:
    UPSTREAM_TLS_FAILURES.labels(label).inc()


# -- plain-listener redirect and HSTS --------------------------------------------------------------
class HttpsRedirect:
    """Answers every request on a plain listener with a redirect to the same URL over https."""

    __slots__ = ("port_suffix", "status")

    def __init__(self, port: int, status: int) -> None:
        self.status = status
        self.port_suffix = b"" if port == 443 else b":%d" % port

    def __call__(self, ex: Exchange) -> Reply:
        host = ex.host
        if host.startswith(b"["):
            end = host.find(b"]")
            name = host[: end + 1] if end > 0 else b""
        else:
            name = host.split(b":", 1)[0]
        if not name or _HOST_RE.match(name) is None:
            return Reply.error("bad_request", "a valid Host header is needed to redirect to https")
        url = ex.url
        if url[:1] != b"/":  # absolute-form: the parsed path and query
            url = ex.path + (b"?" + ex.query if ex.query else b"")
        location = b"https://" + name + self.port_suffix + url
        return Reply(self.status, b"", [(b"location", location)])


def hsts_header(max_age: int, include_subdomains: bool, preload: bool) -> bytes:
    value = f"max-age={max_age}"
    if include_subdomains:
        value += "; includeSubDomains"
    if preload:
        value += "; preload"
    return b"strict-transport-security: " + value.encode() + b"\r\n"


# -- upstream contexts --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UpstreamTLSOptions:
    verify: bool
    ca: Path | None
    cert: CertKeyPair | None
    min_version: ssl.TLSVersion


def upstream_context(opts: UpstreamTLSOptions) -> ssl.SSLContext:
    """A client context for https targets; raises ``TLSFileError``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = opts.min_version
    if not opts.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif opts.ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(opts.ca))
        except (ssl.SSLError, OSError) as exc:
            raise TLSFileError("ca", f"cannot load {opts.ca}: {exc}") from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if opts.cert is not None:
        opts.cert.load_into(ctx)
    ctx.set_alpn_protocols(ALPN)
    return ctx


def is_handshake_failure(exc: OSError) -> bool:
    """Whether an error connecting to an https target came from the TLS handshake: an
    ``SSLError``, or a reset after the TCP connect (a refused TCP connect is
    ``ConnectionRefusedError``), e.g. a plain-http server closing on the ClientHello."""
    return isinstance(exc, ssl.SSLError | ConnectionResetError)


def describe_ssl_error(exc: BaseException) -> str:
    """The useful part of an OpenSSL error, for logs."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, ConnectionResetError) and not str(exc):
        return "the connection was closed during the handshake"
    return str(exc) or type(exc).__name__
