"""Server TLS contexts: TLS 1.2+ with forward-secret AEAD ciphers, and certificate reload.

In: a certificate chain file and a private key file (PEM). Out: an `ssl.SSLContext` for
listeners (implicit TLS) and for STARTTLS/STLS upgrades.

Policy (Mozilla's "intermediate" profile, RFC 9325 §4): TLS 1.2 and 1.3 only; for TLS 1.2 only
ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305; no compression, no renegotiation.
TLS 1.3 suites are OpenSSL's defaults, which are all AEAD.

Reload story: `ReloadableTLS.context` is a *front* context handed to listeners once. Its SNI
callback, which OpenSSL runs on every ClientHello (with or without a server name), switches the
connection to the newest *backend* context. `reload()` builds a new backend from the files and
swaps it in (`use()` swaps in one built from other files, named by a reloaded configuration);
if the new files are broken it raises and the old certificate stays in service
(`postfix reload` semantics). Handshakes in progress and established sessions are untouched.

Session tickets: OpenSSL encrypts and decrypts them with the keys of the connection's *initial*
context (the front one), not of the backend the SNI callback switches to. Every context built
here gets the process's shared ticket key (`tls_tickets`), the front as the source of truth
and the backends alike, so a ticket outlives a reload and is accepted by every process.

SECURITY: the key file is read once per (re)load and never logged; a failed load never leaves a
listener without a working certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from mailhaven.net.tls_tickets import process_keys

#: RFC 9325 §4.1: TLS 1.2 is the floor; SSLv3, TLS 1.0 and 1.1 are off (RFC 8996).
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
#: Mozilla intermediate TLS 1.2 suites (RFC 9325 §4.2: forward secrecy and AEAD only).
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
])


def build_server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A fresh server context with our policy and the given certificate; raises if unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    ctx.load_cert_chain(cert_file, key_file)
    process_keys.apply(ctx)  # the same tickets in every process (else OpenSSL's own key)
    return ctx


class ReloadableTLS:
    """A listener-facing context whose certificate can be replaced while serving."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._backend = build_server_context(cert_file, key_file)
        self.context = build_server_context(cert_file, key_file)
        self.context.sni_callback = self._select

    def reload(self) -> None:
        """Rebuild from the files; on error raise and keep serving the old certificate."""
        self._backend = build_server_context(self.cert_file, self.key_file)

    def use(self, backend: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
        """Serve `backend` (built by the caller from `cert_file` and `key_file`, which may be
        other files than before: a renewal under a new name) to new connections from now on."""
        self._backend, self.cert_file, self.key_file = backend, cert_file, key_file

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        conn.context = self._backend


def certificate_facts(cert_file: Path) -> dict[str, object]:
    """Subject, issuer and expiry of the first certificate in `cert_file`, for status reports
    (an error text instead when it cannot be read)."""
    import datetime

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as err:
        return {"file": str(cert_file), "error": str(err)}
    expires = cert.not_valid_after_utc
    left = expires - datetime.datetime.now(datetime.UTC)
    return {
        "file": str(cert_file),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_left": left.days,
    }
