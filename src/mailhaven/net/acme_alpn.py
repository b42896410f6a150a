"""TLS-ALPN-01 (RFC 8737) for `mailhaven.net.acme`: the CA proves control of a name by a TLS
handshake to port 443 that negotiates ALPN `acme-tls/1` and shows a self-signed certificate for
the name carrying the key authorization's SHA-256 in the critical `acmeIdentifier` extension.

`Responder` listens only while an order is in progress (like the HTTP-01 one), picks the
challenge certificate by SNI and offers only `acme-tls/1`; it completes handshakes and sends
nothing else (RFC 8737 §3: the CA closes the connection after the handshake). certbot's `acme`
library no longer ships this challenge type, so it is declared here (`TLSALPN01`).

SECURITY: a challenge certificate proves nothing to anyone but the CA; its key is throwaway and
never written to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import tempfile
from pathlib import Path
from typing import Any

from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailhaven.net import selfsigned

#: RFC 8737 §6.2: the ALPN protocol name of the validation handshake.
ALPN_PROTOCOL = "acme-tls/1"
#: RFC 8737 §6.1: id-pe-acmeIdentifier.
ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
#: A handshake must complete within this (seconds).
HANDSHAKE_TIMEOUT = 10.0


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The (empty, RFC 8555 §7.5.1) answer that tells the CA to validate."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737 §3; `validation` is the key authorization the certificate must carry."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: Any, **kwargs: Any) -> str:
        return self.key_authorization(account_key)


def challenge_context(domain: str, key_authorization: str) -> ssl.SSLContext:
    """A server context with the RFC 8737 §3 certificate for `domain`, offering acme-tls/1."""
    digest = hashlib.sha256(key_authorization.encode()).digest()
    # the extension's value is a DER OCTET STRING holding the 32-byte digest
    identifier = x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest)
    key, cert = selfsigned.self_signed(
        domain, [x509.DNSName(domain)], days=7, extensions=[(identifier, True)]
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8737 §4
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    # ssl loads certificates from files only: a private temporary file, removed at once
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "challenge.pem"
        path.write_bytes(pem)
        ctx.load_cert_chain(path)
    return ctx


class Responder:
    """TLS-ALPN-01 responder: `add(domain, key_authorization)` while it listens."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._front.set_alpn_protocols([ALPN_PROTOCOL])
        self._front.sni_callback = self._select
        self._server: asyncio.Server | None = None

    def add(self, domain: str, key_authorization: str) -> None:
        """Called from the order thread: one dict store, read by the SNI callback."""
        self._contexts[domain.lower()] = challenge_context(domain, key_authorization)

    def _select(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _: ssl.SSLContext) -> int | None:
        ctx = self._contexts.get((server_name or "").lower())
        if ctx is None:  # no pending challenge for this name: refuse the handshake
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        conn.context = ctx
        return None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self._front,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # the handshake was the whole answer
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
