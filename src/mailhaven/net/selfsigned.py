"""A self-signed certificate for trying mailhaven out (`mailhaven tls selfsigned`, or automatic
at first start when no certificate is configured, clearly logged).

Real deployments configure `tls.cert`/`tls.key` (e.g. from an ACME client). Clients will not
verify this certificate; it only gives encryption for AUTH on the submission listeners.
ECDSA P-256, valid for one year, with the hostname and `localhost` as subject alternative names.
`made_for` reads back the name a certificate was made for, so the daemon makes its automatic
one again when `hostname` changed; `toml_hint` is the `[tls]` table that uses the files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def made_for(cert_file: Path) -> str | None:
    """The subject CN of a certificate file; None when it cannot be read or has none."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _toml_string(text: str) -> str:
    """A TOML basic string: quote and backslash escaped, control characters as \\uXXXX."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_hint(cert_file: Path, key_file: Path) -> str:
    """The `[tls]` table to paste into mailhaven.toml (absolute paths: valid from anywhere)."""
    cert, key = os.path.abspath(cert_file), os.path.abspath(key_file)
    return f"[tls]\ncert = {_toml_string(cert)}\nkey = {_toml_string(key)}\n"


def self_signed(
    common_name: str,
    names: list[Any],
    *,
    days: int,
    extensions: Sequence[tuple[Any, bool]] = (),
) -> tuple[Any, Any]:
    """A new ECDSA P-256 key and a self-signed certificate for it: `common_name` as subject and
    issuer, `names` as subject alternative names, valid from five minutes ago for `days`, plus
    `extensions` as (extension, critical). Shared by this module and ACME's TLS-ALPN-01
    challenge certificate, which differ only in names, lifetime and one extension."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return key, builder.sign(key, hashes.SHA256())


def create(cert_file: Path, key_file: Path, hostname: str) -> None:
    """Write a new key (mode 0600) and certificate; overwrites existing files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    key, cert = self_signed(
        hostname,
        names,
        days=365,
        extensions=[(x509.BasicConstraints(ca=False, path_length=None), True)],
    )
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
