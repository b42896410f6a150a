"""ACME (RFC 8555): obtain and renew the server certificate, swap it in without a restart.

In: `[tls] acme` (domains, directory URL, contact email, the HTTP-01 listen address). Out:
`<state_dir>/acme/cert.pem` (full chain) and `key.pem`, which `ReloadableTLS` serves.

Roles, pure decisions apart from the I/O:
- `decide` (pure): renew when there is no certificate, when it is our self-signed placeholder,
  when it does not cover the configured domains, or when less than `renew_before_days` are
  left; otherwise look again after `check_interval`.
- `obtain` (blocking, run in a daemon thread): one order with certbot's `acme` library (the
  maintained RFC 8555 client; it is synchronous, on `requests`, so a thread keeps the event
  loop free). Account key: `<state_dir>/acme/account.key`, made once; the CA finds the account
  again from the key (RFC 8555 §7.3.1), so no account URL is stored.
- `Http01Responder`: answers `GET /.well-known/acme-challenge/<token>` (RFC 8555 §8.3). It
  listens only while an order is in progress, so the port is free (and closed) otherwise.
- `AcmeManager.run`: the loop in the daemon. A new certificate is written beside the old one
  and renamed over it, then `ReloadableTLS.reload()` swaps it in for new handshakes. Any
  failure (CA down, refused order, failed validation) is logged and the old certificate stays
  in service; the next attempt comes after `RETRY_AFTER_FAILURE` (or `check_interval`).
- `follow`: worker processes (`smtp_processes` > 1) reload when the daemon replaced the file.

Until the first certificate is issued the listeners serve a self-signed placeholder at the same
paths (made at start, logged), so TLS works from the first second and the swap is one rename.
TLS-ALPN-01 (RFC 8737, `mailhaven.net.acme_alpn`) is the alternative when port 80 cannot be
used: its responder is a separate listener (`tls_alpn01_listen`), also only during an order.

SECURITY: keys are written mode 0600 and never logged; the responder serves only the key
authorizations of pending challenges, reads at most `MAX_REQUEST_HEAD` bytes per request within
`REQUEST_TIMEOUT`, and answers everything else 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from mailhaven.config import Acme
    from mailhaven.net import acme_alpn
    from mailhaven.net.tls import ReloadableTLS

log = logging.getLogger("mailhaven.acme")
T = TypeVar("T")

#: After a failed attempt, try again this much later (Let's Encrypt's rate limits allow
#: 5 failed validations per hour per account and name).
RETRY_AFTER_FAILURE = 3600.0
#: One order (authorizations validated, certificate issued) must finish within this.
ORDER_TIMEOUT = 90.0
#: HTTP requests to the ACME server time out after this (seconds).
NETWORK_TIMEOUT = 30
#: The HTTP-01 responder reads at most this much request head (RFC 9112 leaves it to us).
MAX_REQUEST_HEAD = 8192
#: A validation request must arrive complete within this (seconds).
REQUEST_TIMEOUT = 10.0
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
USER_AGENT = "mailhaven"
#: How often a worker process looks whether the daemon installed a new certificate.
FOLLOW_INTERVAL = 60.0


class AcmeError(Exception):
    """A failure of ours around an order; its text is the whole log message."""


# ------------------------------------------------------------------ decisions (pure)


@dataclass(frozen=True)
class CertInfo:
    """What the renewal decision needs from a certificate."""

    names: frozenset[str]
    not_after: datetime.datetime
    self_signed: bool


@dataclass(frozen=True)
class Decision:
    renew: bool
    reason: str
    #: Seconds until the next look when not renewing now.
    next_check: float


def decide(
    info: CertInfo | None,
    domains: tuple[str, ...],
    now: datetime.datetime,
    *,
    renew_before_days: float,
    check_interval: float,
) -> Decision:
    """Renew now, or when to look again (never later than the renewal date)."""
    if info is None:
        return Decision(True, "no certificate yet", 0.0)
    if info.self_signed:
        return Decision(True, "the certificate is the self-signed placeholder", 0.0)
    missing = {d.lower() for d in domains} - info.names
    if missing:
        return Decision(True, "not valid for " + ", ".join(sorted(missing)), 0.0)
    due = info.not_after - datetime.timedelta(days=renew_before_days)
    if due <= now:
        left = (info.not_after - now).total_seconds() / 86400
        return Decision(True, f"expires in {left:.1f} days", 0.0)
    wait = min(check_interval, (due - now).total_seconds())
    return Decision(False, f"valid until {info.not_after:%Y-%m-%d %H:%M} UTC", wait)


def read_cert(path: Path) -> CertInfo | None:
    """The first certificate of a PEM file; None when missing or unreadable."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = frozenset(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = frozenset()
    return CertInfo(names, cert.not_valid_after_utc, cert.issuer == cert.subject)


# ------------------------------------------------------------------ files


def write_private(path: Path, data: bytes) -> None:
    """Write beside `path` (mode 0600) and rename over it: readers see old or new, whole."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Paths:
    """The files under `<state_dir>/acme/`."""

    root: Path

    @property
    def cert(self) -> Path:
        return self.root / "cert.pem"

    @property
    def key(self) -> Path:
        return self.root / "key.pem"

    @property
    def account_key(self) -> Path:
        return self.root / "account.key"


# ------------------------------------------------------------------ HTTP-01 responder


class Http01Responder:
    """`GET /.well-known/acme-challenge/<token>` -> the key authorization (RFC 8555 §8.3)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        #: token -> key authorization; filled by the order thread (single dict operations).
        self.tokens: dict[str, str] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, body = self.answer(head[:MAX_REQUEST_HEAD])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            status, body = "400 Bad Request", b""
        response = (
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        with contextlib.suppress(ConnectionError):
            writer.write(response)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    def answer(self, head: bytes) -> tuple[str, bytes]:
        """The status line and body for one request head."""
        method, _, rest = head.partition(b"\r\n")[0].decode("latin-1").partition(" ")
        target = rest.partition(" ")[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b""
        if target.startswith(CHALLENGE_PREFIX):
            validation = self.tokens.get(target[len(CHALLENGE_PREFIX):])
            if validation is not None:
                return "200 OK", b"" if method == "HEAD" else validation.encode()
        return "404 Not Found", b""


# ------------------------------------------------------------------ one order (blocking)


def _account_key(path: Path) -> bytes:
    """The account key (RSA 2048, the one every ACME CA accepts), made on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)
    return pem


def _certificate_key() -> bytes:
    """A fresh ECDSA P-256 key for each certificate (PKCS#8 PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Responders:
    """What can answer challenges during one order: per name, HTTP-01 when the CA offers it
    and it is configured, else TLS-ALPN-01."""

    http01: Http01Responder | None = None
    alpn: acme_alpn.Responder | None = None


def _answer(authz: Any, account_key: Any, responders: Responders) -> tuple[Any, Any]:
    """The challenge of `authz` we take and our response, with its responder armed."""
    from acme import challenges, errors

    from mailhaven.net import acme_alpn

    name = authz.body.identifier.value
    for c in authz.body.challenges:
        if responders.http01 is not None and isinstance(c.chall, challenges.HTTP01):
            response, validation = c.chall.response_and_validation(account_key)
            responders.http01.tokens[c.chall.encode("token")] = validation
            return c, response
        if responders.alpn is not None and isinstance(c.chall, acme_alpn.TLSALPN01):
            response, validation = c.chall.response_and_validation(account_key)
            responders.alpn.add(name, validation)
            return c, response
    offered = ", ".join(c.chall.typ for c in authz.body.challenges)
    raise errors.Error(f"{name}: none of the CA's challenges ({offered}) is configured")


def obtain(settings: Acme, paths: Paths, responders: Responders) -> tuple[bytes, bytes]:
    """One ACME order: (key PEM, full chain PEM). Blocking; raises on failure."""
    from acme import client, crypto_util, errors, messages
    from cryptography.hazmat.primitives import serialization
    from josepy.jwk import JWKRSA

    from mailhaven.net import acme_alpn  # noqa: F401  # registers the tls-alpn-01 type

    paths.root.mkdir(parents=True, exist_ok=True)
    account_pem = _account_key(paths.account_key)
    private = serialization.load_pem_private_key(account_pem, password=None)
    account_key = JWKRSA(key=private)
    net = client.ClientNetwork(account_key, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
    if settings.directory_ca:
        # requests takes a CA bundle path where `acme` declares a bool
        net.verify_ssl = settings.directory_ca  # type: ignore[assignment]
    try:
        directory = client.ClientV2.get_directory(settings.directory, net)
        acme = client.ClientV2(directory, net)
        contact = (f"mailto:{settings.email}",) if settings.email else ()
        registration = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
        except errors.ConflictError as known:  # this key has an account already
            net.account = messages.RegistrationResource(
                uri=known.location, body=messages.Registration()
            )
        key_pem = _certificate_key()
        order = acme.new_order(crypto_util.make_csr(key_pem, list(settings.domains)))
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA reuses an earlier validation
            challenge, response = _answer(authz, account_key, responders)
            acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        order = acme.poll_and_finalize(order, deadline)
        return key_pem, order.fullchain_pem.encode()
    finally:
        net.session.close()


def describe(err: BaseException) -> str:
    """One log line for a failed order: the CA's problem details when it sent them."""
    import requests
    from acme import errors, messages

    if isinstance(err, AcmeError):
        return str(err)
    if isinstance(err, requests.ConnectionError):
        return f"cannot reach the ACME server: {err}"
    if isinstance(err, errors.ValidationError):
        problems = []
        for authzr in err.failed_authzrs:
            for challenge in authzr.body.challenges:
                if challenge.error is not None:
                    name = authzr.body.identifier.value
                    problems.append(f"{name}: {challenge.error.detail or challenge.error}")
        return "validation failed: " + "; ".join(problems)
    if isinstance(err, messages.Error):  # an RFC 7807 problem document from the CA
        return f"the ACME server refused the request: {err}"
    if isinstance(err, errors.TimeoutError):
        return f"the order did not finish within {ORDER_TIMEOUT:.0f} s"
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}"


# ------------------------------------------------------------------ the loop (daemon)


class AcmeManager:
    """Keeps `tls` on a current ACME certificate; `run()` until cancelled."""

    def __init__(
        self,
        settings: Acme,
        paths: Paths,
        tls: ReloadableTLS,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.tls = tls

    async def run(self) -> None:
        while True:
            await asyncio.sleep(await self.check())

    async def check(self) -> float:
        """Renew when due; the seconds until the next check."""
        s = self.settings
        now = datetime.datetime.now(datetime.UTC)
        decision = decide(
            read_cert(self.paths.cert),
            s.domains,
            now,
            renew_before_days=s.renew_before_days,
            check_interval=s.check_interval,
        )
        if not decision.renew:
            log.info("acme: certificate for %s %s", ", ".join(s.domains), decision.reason)
            return decision.next_check
        log.info("acme: ordering a certificate for %s from %s (%s)",
                 ", ".join(s.domains), s.directory, decision.reason)
        try:
            await self.renew()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # any failure: the old certificate must stay in service
            log.error("acme: order for %s failed, keeping the current certificate: %s",
                      ", ".join(s.domains), describe(err))
            return min(RETRY_AFTER_FAILURE, s.check_interval)
        info = read_cert(self.paths.cert)
        log.info("acme: new certificate for %s in service, valid until %s",
                 ", ".join(s.domains), f"{info.not_after:%Y-%m-%d %H:%M} UTC" if info else "?")
        return s.check_interval

    async def renew(self) -> None:
        """One order; the new certificate is in service when this returns."""
        from mailhaven.net import acme_alpn

        s = self.settings
        http01 = Http01Responder(*_hostport(s.http01_listen)) if s.http01_listen else None
        alpn = acme_alpn.Responder(*_hostport(s.tls_alpn01_listen)) if s.tls_alpn01_listen else None
        started: list[Http01Responder | acme_alpn.Responder] = []
        try:
            for responder, kind, listen in ((http01, "HTTP-01", s.http01_listen),
                                            (alpn, "TLS-ALPN-01", s.tls_alpn01_listen)):
                if responder is None:
                    continue
                try:
                    await responder.start()
                except OSError as err:
                    raise AcmeError(f"the {kind} responder cannot listen on {listen}: "
                                    f"{err.strerror or err}") from err
                started.append(responder)
            responders = Responders(http01, alpn)
            key_pem, chain_pem = await in_daemon_thread(
                lambda: obtain(self.settings, self.paths, responders)
            )
        finally:
            for responder in started:
                await responder.close()
        await asyncio.to_thread(self._install, key_pem, chain_pem)

    def _install(self, key_pem: bytes, chain_pem: bytes) -> None:
        """Check the pair loads, keep the old files as `.old`, then swap both in."""
        from mailhaven.net.tls import build_server_context

        staged_key = self.paths.root / "key.pem.staged"
        staged_cert = self.paths.root / "cert.pem.staged"
        write_private(staged_key, key_pem)
        write_private(staged_cert, chain_pem)
        build_server_context(staged_cert, staged_key)  # raises: the old pair stays
        for path in (self.paths.cert, self.paths.key):
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, path.with_name(path.name + ".old"))
        os.replace(staged_key, self.paths.key)
        os.replace(staged_cert, self.paths.cert)
        self.tls.reload()


async def in_daemon_thread(work: Callable[[], T]) -> T:
    """`work()` in a daemon thread of its own. Not `asyncio.to_thread`: the loop's executor is
    joined at exit, so a stop during an order would wait for its network timeouts."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(T, result))

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as err:  # handed to the awaiting task
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="acme-order", daemon=True).start()
    return await future


def _hostport(text: str) -> tuple[str, int]:
    from mailhaven.net.hostport import parse_hostport

    return parse_hostport(text)


# ------------------------------------------------------------------ workers


def service(
    settings: Acme, state_dir: Path, tls: ReloadableTLS | None, *, orders: bool
) -> Coroutine[Any, Any, None] | None:
    """`[tls] acme`: the task of a process, None when ACME is off (or there is no TLS). The
    daemon (`orders`) orders and renews into `<state_dir>/acme`; a worker reloads what the
    daemon installed there."""
    if not settings.domains or tls is None:
        return None
    if not orders:
        return follow(tls, FOLLOW_INTERVAL)
    return AcmeManager(settings, Paths(state_dir / "acme"), tls).run()


async def follow(tls: ReloadableTLS, interval: float) -> None:
    """Reload `tls` when its certificate file changed (a worker following the daemon)."""
    def stamp() -> tuple[int, int] | None:
        try:
            st = tls.cert_file.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    # None: the first look reloads, so a change between `tls`'s load and now is not missed
    seen: tuple[int, int] | None = None
    while True:
        now = stamp()
        if now != seen:
            try:
                tls.reload()
            except (OSError, ssl.SSLError) as err:  # logged once per version of the file
                log.error("acme: %s: keeping the current certificate: %s", tls.cert_file, err)
            else:
                if seen is not None:
                    log.info("acme: certificate %s reloaded", tls.cert_file)
            seen = now
        await asyncio.sleep(interval)


def placeholder(paths: Paths, hostname: str, make: Callable[[Path, Path, str], None]) -> None:
    """A self-signed certificate at the ACME paths until the first order succeeds."""
    if paths.cert.exists() and paths.key.exists():
        return
    make(paths.cert, paths.key, hostname)
    log.warning("acme: no certificate yet: serving a self-signed one until the order for "
                "it succeeds (%s)", paths.cert)

