"""Test certificates on disk: a ``trustme`` CA and the leaf certificates tests issue from it."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization


@dataclass(frozen=True)
class Issued:
    cert: str  # PEM chain path
    key: str  # PEM key path
    leaf: trustme.LeafCert


class CertDir:
    """A CA (``ca_path``: its PEM) issuing certificates into ``directory``."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name=f"test {name}")
        self.ca_path = str(directory / f"{name}.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        self._n = 0

    def issue(
        self,
        *hosts: str,
        rsa: bool = False,
        password: str | None = None,
        common_name: str | None = None,
        not_after: datetime.datetime | None = None,
        stem: str | None = None,
    ) -> Issued:
        """Issue a certificate for ``hosts`` (an RSA key with ``rsa``, else ECDSA), written
        as ``<stem>.pem`` and ``<stem>.key`` (the key encrypted with ``password``)."""
        self._n += 1
        stem = stem or f"leaf{self._n}"
        not_before = None
        if not_after is not None:
            not_before = not_after - datetime.timedelta(days=30)
        leaf = self.ca.issue_cert(
            *hosts,
            common_name=common_name,
            not_before=not_before,
            not_after=not_after,
            key_type=trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA,
        )
        cert_path = self.dir / f"{stem}.pem"
        key_path = self.dir / f"{stem}.key"
        cert_path.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        key_pem = leaf.private_key_pem.bytes()
        if password is not None:
            key = serialization.load_pem_private_key(key_pem, None)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password.encode()),
            )
        key_path.write_bytes(key_pem)
        return Issued(str(cert_path), str(key_path), leaf)
