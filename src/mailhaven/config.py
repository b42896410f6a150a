"""Typed configuration with built-in defaults; an optional TOML file overrides them.

The defaults are a safe "try it" setup: every listener on 127.0.0.1 only, on unprivileged ports
(SMTP 2525, submission 2587, submissions 2465, POP3 2110, POP3S 2995), state in
`./mailhaven-data`, local domain `localhost` with a `postmaster` mailbox, relaying only for
loopback clients. `docs/configuration.md` documents every key.

Loading never half-applies: `load()` either returns a complete, validated `Config` or raises
`ConfigError` with a message naming the file, the key and what is wrong (used by
`mailhaven config check` and by SIGHUP reload, which keeps the old config on error).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailhaven.net import hostport
from mailhaven.runtime import eventloop, logtargets

#: "auto" stops here: each process holds its own engine, caches and connections, and past a
#: handful of cores the shared disk (fsync) is the limit, not the CPU.
MAX_AUTO_PROCESSES = 8


def auto_processes() -> int:
    """One engine process per core we may run on (the affinity mask, as `nproc` counts, so a
    container limited by cpuset gets its share, not the host's), capped."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_PROCESSES))


class ConfigError(ValueError):
    """A configuration file is unreadable or invalid; the message says where and why.

    `key` (dotted, e.g. "limits.recipients") lets `load` add the line it is on; without it
    the key is read from the message's "key: ..." prefix. `hint` follows the line number."""

    def __init__(self, message: str, *, key: str | None = None, hint: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.hint = hint


@dataclass(frozen=True)
class Listen:
    """Listen addresses per service, `host:port` (IPv6 as `[::1]:2525`). Empty list: off."""

    smtp: tuple[str, ...] = ("127.0.0.1:2525",)
    submission: tuple[str, ...] = ("127.0.0.1:2587",)
    submissions: tuple[str, ...] = ("127.0.0.1:2465",)
    pop3: tuple[str, ...] = ("127.0.0.1:2110",)
    pop3s: tuple[str, ...] = ("127.0.0.1:2995",)
    #: LMTP (RFC 2033) into the local Maildirs, for other MTAs; no authentication: keep it on
    #: loopback or a private address. Off by default.
    lmtp: tuple[str, ...] = ()


#: The back-off reaches 7.5 times auth_failure_delay; capped so it stays below the 5 minutes a
#: client waits for a reply (RFC 5321 4.5.3.2.7).
MAX_AUTH_FAILURE_DELAY = 30.0


@dataclass(frozen=True)
class Limits:
    """Named limits; RFC 5321 §4.5.3.1 minimums are enforced at load time."""

    #: RFC 1870 SIZE; Postfix's message_size_limit is 10240000, OpenSMTPD's 35 MiB.
    message_size: int = 36_700_160
    #: RFC 5321 §4.5.3.1.8 requires at least 100; Postfix smtpd_recipient_limit = 1000.
    recipients: int = 1000
    #: RFC 5321 §4.5.3.1.4: 512 octets including CRLF.
    command_line: int = 512
    #: Simultaneous SMTP sessions over all listeners (421 beyond).
    connections: int = 2000
    #: Postfix smtpd_client_connection_count_limit = 50.
    connections_per_ip: int = 50
    #: Postfix smtpd_hard_error_limit = 20: then 421 and disconnect.
    hard_error_limit: int = 20
    #: Postfix smtpd_soft_error_limit = 10: from then on each error reply is delayed.
    soft_error_limit: int = 10
    error_sleep: float = 1.0
    #: Forbid pipelining before the greeting or past a group-ending command (Postfix 3.9).
    forbid_unauth_pipelining: bool = True
    #: Commands in one session before 421 and disconnect.
    commands_per_session: int = 10_000
    #: New connections per client address per minute (0: off; Postfix
    #: smtpd_client_connection_rate_limit, also off by default). Beyond: 421 4.7.0.
    connection_rate: int = 0
    #: Messages per client address per minute (0: off; smtpd_client_message_rate_limit).
    message_rate: int = 0
    #: Seconds to wait before the greeting, to catch early talkers (0: off, no delay).
    greet_pause: float = 0.0
    #: Failed logins (SMTP AUTH and POP3) of one user from one client address in 10 minutes
    #: before that pair is refused; other addresses are not affected (`auth_limiter`).
    auth_failures: int = 10
    #: Failed logins from one client address, any users, in 10 minutes before it is refused.
    auth_address_failures: int = 30
    #: Dovecot auth_failure_delay: every failure is answered after this many seconds, and an
    #: address with recent failures waits it, doubled per failure up to 7.5 times, before its
    #: next attempt is looked at (Dovecot's auth penalty: 2, 4, 8, 15 s).
    auth_failure_delay: float = 2.0


@dataclass(frozen=True)
class Timeouts:
    """Seconds. RFC 5321 §4.5.3.2.7: the server waits at least 5 minutes for a command."""

    command: float = 300.0
    #: RFC 5321 §4.5.3.2.5/.6: a data block within 3 minutes.
    data: float = 180.0
    #: A whole command line, from when the server is ready for it: a client trickling one byte
    #: at a time within `command` is still cut here (Postfix smtpd_per_record_deadline with
    #: smtpd_timeout = 300 s). 0: off.
    command_deadline: float = 300.0
    #: A whole message body (DATA, or BDAT chunks up to LAST), from its first chunk: at 10 KB/s
    #: a maximal 36 MiB message takes an hour. 0: off.
    message_deadline: float = 3600.0
    #: On SIGTERM: how long in-flight transactions may finish before they are cut.
    shutdown_grace: float = 10.0
    #: A TLS handshake (STARTTLS or implicit TLS) must finish within this (Postfix's
    #: smtpd_starttls_timeout); a client that stalls in it holds a connection slot.
    tls_handshake: float = 60.0
    #: POP3 inactivity autologout (RFC 1939 §3: at least 10 minutes; Dovecot's is 10 minutes).
    pop3_idle: float = 600.0
    #: The client name lookup before the greeting (`reverse_lookup`), PTR and forward lookups
    #: together; past it the client is `unknown` (Postfix's resolver: 5 s per try).
    client_lookup: float = 5.0


@dataclass(frozen=True)
class Queue:
    """Retry policy (Postfix defaults) and delivery concurrency."""

    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    #: Postfix maximal_queue_lifetime = 5d.
    lifetime: float = 5 * 86400.0
    #: 0: off (Postfix delay_warning_time = 0h).
    delay_warning: float = 0.0
    concurrency: int = 100
    destination_concurrency: int = 20
    recipients_per_transaction: int = 50
    #: Bytes the queue's file system must keep free: less, and new mail is refused with
    #: `452 4.3.1` at MAIL FROM (SIZE=) or DATA (Postfix queue_minfree; 64 MiB exceeds 1.5 x
    #: the default message size, as Postfix wants).
    minfree: int = 64 * 1024 * 1024
    #: Backscatter limit: at most this many notices (bounces, delay warnings, success reports)
    #: to one address per `notice_rate_window` seconds; the rest are logged and dropped. 0: off.
    notice_rate_limit: int = 20
    notice_rate_window: float = 3600.0


@dataclass(frozen=True)
class Acme:
    """Certificates from an ACME CA (RFC 8555, `mailhaven.net.acme`); no domains: off."""

    domains: tuple[str, ...] = ()
    #: The CA's directory URL (e.g. Let's Encrypt's).
    directory: str = ""
    #: Contact for the account (expiry notices); empty: none.
    email: str = ""
    #: Where the HTTP-01 responder listens while an order is in progress (the CA connects to
    #: port 80 of each domain: forward it here, or listen there).
    http01_listen: str = "0.0.0.0:80"
    #: Where the TLS-ALPN-01 responder (RFC 8737) listens while an order is in progress (the
    #: CA connects to port 443); empty: off. With both: HTTP-01 when the CA offers it.
    tls_alpn01_listen: str = ""
    #: CA bundle (PEM) to verify the directory's HTTPS with; empty: the system's.
    directory_ca: str = ""
    #: Renew when fewer days than this are left (certbot's default).
    renew_before_days: float = 30.0
    #: Seconds between checks (certbot's timer runs twice a day).
    check_interval: float = 43200.0


@dataclass(frozen=True)
class TLS:
    """Server certificate; empty: STARTTLS not offered and the implicit-TLS listeners stay off."""

    cert: str = ""
    key: str = ""
    acme: Acme = field(default_factory=Acme)


@dataclass(frozen=True)
class Relay:
    """Outbound delivery: DNS, the remote port, TLS, smarthost credentials, per-domain routes."""

    #: DNS servers as "host:port"; empty: the system's resolver (/etc/resolv.conf).
    nameservers: tuple[str, ...] = ()
    #: The SMTP port of remote hosts (25; tests use a loopback port).
    port: int = 25
    #: Outbound STARTTLS: none | may (opportunistic, Postfix's default) | encrypt | verify.
    tls: str = "may"
    #: At most this many MX hosts per attempt (Postfix smtp_mx_address_limit is 5).
    max_hosts: int = 5
    relayhost_username: str = ""
    relayhost_password: str = ""
    relayhost_tls: str = "may"
    #: Per-domain next hops, e.g. { "example.net" = "[10.1.2.3]:2525" } (Postfix transport_maps).
    transport: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Etrn:
    """Part-time hosts (RFC 1985): their domains' mail waits until ETRN or the schedule."""

    held_domains: tuple[str, ...] = ()
    #: Clients allowed to say ETRN (others get 459).
    clients: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    #: Seconds between automatic releases of all held domains (0: only on ETRN).
    release_interval: float = 0.0


# ------------------------------------------------------------------ checks (docs/filtering.md)


@dataclass(frozen=True)
class Access:
    """Allow and block lists, applied before the expensive checks (`checks.access_lists`).

    Clients: addresses or networks (`192.0.2.0/24`). Senders and recipients: `user@domain`,
    `domain` or `@domain`, `.domain` (its subdomains), `user@` (any domain), `<>` (null sender).
    A block entry refuses (554/550 5.7.1); an allow entry skips client checks, DNS lists and
    greylisting. Block wins over allow."""

    client_allow: tuple[str, ...] = ()
    client_block: tuple[str, ...] = ()
    sender_allow: tuple[str, ...] = ()
    sender_block: tuple[str, ...] = ()
    recipient_allow: tuple[str, ...] = ()
    recipient_block: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dnsbl:
    """DNS block and allow lists on the MX (postscreen's weighted scoring); empty: off."""

    #: `zone[=filter][*weight]`, e.g. "zen.example=127.0.0.[2..11]*3" (negative: allow list).
    sites: tuple[str, ...] = ()
    #: Refuse at RCPT TO when the weights of the sites listing the client add up to this.
    threshold: int = 1
    #: Right-hand-side lists asked about the sender's domain (Postfix reject_rhsbl_sender):
    #: one listing refuses, whatever `threshold` says.
    sender_domain_sites: tuple[str, ...] = ()
    #: Seconds from connect that RCPT TO waits for the answers; later ones count as unlisted.
    wait: float = 5.0


@dataclass(frozen=True)
class ClientChecks:
    """Checks on the client's name and HELO (MX only; trusted/authenticated clients exempt)."""

    #: Postfix reject_unknown_client_hostname (450 4.7.25): no verified reverse name.
    reject_unknown_client: bool = False
    #: Postfix reject_non_fqdn_helo_hostname (504 5.5.2).
    reject_non_fqdn_helo: bool = False
    #: HELO with our host name, a local domain or our address (554 5.7.1).
    reject_own_helo: bool = True


@dataclass(frozen=True)
class Greylisting:
    """RFC 6647 greylisting on the MX, in `<state_dir>/greylist.sqlite`; opt-in."""

    enabled: bool = False
    #: Seconds a new (client /24, sender, recipient) triplet must wait before its retry passes.
    delay: float = 300.0
    #: Seconds an unretried triplet is remembered.
    retry_window: float = 172800.0
    #: Seconds a passed triplet, or an auto-allowed client, stays allowed after its last use.
    allow_lifetime: float = 3024000.0
    #: Correct retries after which a client network skips greylisting (0: never).
    auto_allow_after: int = 1
    #: Client networks never greylisted.
    allow_networks: tuple[str, ...] = ()
    #: Sender domains, or verified client name domains, never greylisted (with subdomains).
    allow_domains: tuple[str, ...] = ()
    #: The most triplets kept; the least recently seen go first.
    max_entries: int = 200_000


@dataclass(frozen=True)
class SenderLimits:
    """Per authenticated user rates on submission (a stolen password's damage); 0: off."""

    messages: int = 200
    recipients: int = 1000
    #: Seconds the rates are counted over (a sliding window).
    window: float = 3600.0
    #: Mail a notice to postmaster the first time a user hits a limit in a window.
    notify_postmaster: bool = True


@dataclass(frozen=True)
class Milter:
    """Milters (docs/filtering.md "Milters"): Postfix's smtpd_milters, non_smtpd_milters and
    milter_* settings, one table. Addresses: "inet:host:port", "inet:[v6]:port", "unix:/path"."""

    #: Postfix smtpd_milters: the MX listener (smtp), asked in order.
    smtpd: tuple[str, ...] = ()
    #: The submission listeners (Postfix: smtpd_milters in master.cf's submission entry).
    submission: tuple[str, ...] = ()
    #: Postfix non_smtpd_milters: mail submitted locally (`sendmail`, the pickup).
    non_smtpd: tuple[str, ...] = ()
    #: Postfix milter_default_action: a milter down or broken: "tempfail", "accept", "reject".
    default_action: str = "tempfail"
    #: Seconds to connect and negotiate (milter_connect_timeout).
    connect_timeout: float = 30.0
    #: Seconds per CONNECT, HELO, MAIL, RCPT reply (milter_command_timeout).
    command_timeout: float = 30.0
    #: Seconds for the message content (milter_content_timeout).
    content_timeout: float = 300.0
    #: Addresses whose connection serves session after session (SMFIC_QUIT_NC; rspamd).
    reuse: tuple[str, ...] = ()
    #: SMFIR_QUARANTINE on the MX: "junk" (delivered into the recipients' junk folder) or
    #: "hold" (kept on hold in the queue, as Postfix does; outbound mail: always hold).
    quarantine: str = "junk"
    #: "Name: value" header fields that mark a message as spam when a milter added or set them
    #: (never when the sender wrote them); value "*" matches anything, a trailing "*" a prefix.
    spam_headers: tuple[str, ...] = ("X-Spam: Yes", "X-Spam-Flag: YES")


#: The old top-level milter keys (before [checks.milter]) and where they live now; still read.
DEPRECATED_MILTER_KEYS = {
    "milters": "smtpd",
    "submission_milters": "submission",
    "milter_default_action": "default_action",
    "milter_connect_timeout": "connect_timeout",
    "milter_command_timeout": "command_timeout",
    "milter_content_timeout": "content_timeout",
    "milter_reuse": "reuse",
}


@dataclass(frozen=True)
class Checks:
    access: Access = field(default_factory=Access)
    dnsbl: Dnsbl = field(default_factory=Dnsbl)
    client: ClientChecks = field(default_factory=ClientChecks)
    greylist: Greylisting = field(default_factory=Greylisting)
    sender_limits: SenderLimits = field(default_factory=SenderLimits)
    milter: Milter = field(default_factory=Milter)


def _validate_checks(checks: Checks) -> None:
    from mailhaven.net.dnslist import SiteError, parse_site

    nets = [("access.client_allow", checks.access.client_allow),
            ("access.client_block", checks.access.client_block),
            ("greylist.allow_networks", checks.greylist.allow_networks)]
    for key, values in nets:
        for net in values:
            try:
                ipaddress.ip_network(net.strip(), strict=False)
            except ValueError as err:
                raise ConfigError(f"checks.{key}: {err}") from None
    for name in ("sender_allow", "sender_block", "recipient_allow", "recipient_block"):
        for entry in getattr(checks.access, name):
            text = entry.strip()
            if not text or any(c.isspace() for c in text) or text.count("@") > 1:
                raise ConfigError(
                    f"checks.access.{name}: {entry!r}: expected user@domain, domain, @domain, "
                    ".domain, user@ or <>"
                )
    for key, sites in (("sites", checks.dnsbl.sites),
                       ("sender_domain_sites", checks.dnsbl.sender_domain_sites)):
        for site in sites:
            try:
                parse_site(site)
            except SiteError as err:
                raise ConfigError(f"checks.dnsbl.{key}: {err}") from None
    if checks.dnsbl.threshold < 1:
        raise ConfigError("checks.dnsbl.threshold: at least 1")
    if not 0 < checks.dnsbl.wait <= 60:
        raise ConfigError("checks.dnsbl.wait: more than 0 and at most 60 seconds")
    grey = checks.greylist
    if grey.retry_window <= grey.delay:
        raise ConfigError("checks.greylist.retry_window: must be longer than delay")
    if grey.max_entries < 1 or grey.allow_lifetime <= 0:
        raise ConfigError("checks.greylist: max_entries and allow_lifetime must be positive")
    if checks.sender_limits.window <= 0:
        raise ConfigError("checks.sender_limits.window: must be positive")
# ---- [inbound_auth]: SPF/DKIM/DMARC/ARC checks on the MX port (checks.inbound) --------------
#: What `temperror` may say: accept the message (with temperror in its header) or defer it.
TEMPERROR_ACTIONS = ("accept", "defer")


@dataclass(frozen=True)
class InboundAuthDomain:
    """Per-recipient-domain overrides of `[inbound_auth]`; a key left out keeps the global."""

    checks: bool | None = None
    dmarc_reject: bool | None = None
    spf_reject: bool | None = None
    temperror: str = ""
    quarantine_header: str | None = None


@dataclass(frozen=True)
class InboundAuth:
    """Mail authentication of messages from untrusted clients on the MX port
    (docs/mail-authentication.md). Trusted networks and authenticated clients are not checked."""

    #: Run SPF, DKIM, DMARC and ARC and add `Authentication-Results:`.
    checks: bool = True
    #: DMARC p=reject failure -> 550 5.7.1 at end of DATA (off: delivered as quarantined).
    dmarc_reject: bool = True
    #: An SPF fail alone -> 550 5.7.23 (off by default: DMARC decides).
    spf_reject: bool = False
    #: A DNS failure that could change the decision: "accept" or "defer" (451 4.7.5).
    temperror: str = "accept"
    #: Added to DMARC p=quarantine failures ("Name: value"; empty: none).
    quarantine_header: str = "X-Mailhaven-Quarantine: dmarc"
    #: Larger messages get no DKIM/ARC verification (and no DMARC refusal).
    max_verify_size: int = 10 * 2**20
    domains: dict[str, InboundAuthDomain] = field(default_factory=dict)


# --- outbound mail authentication (mailhaven.signing, mailhaven.srs) -------------------------


@dataclass(frozen=True)
class Dkim:
    """DKIM signing of mail that originates here and ARC sealing of mail we forward
    (docs/mail-authentication.md). Nothing is signed until a domain has a key."""

    #: Sign mail that originates here (submission after AUTH, trusted networks, sendmail,
    #: our bounces) when its From: domain, or a parent domain, has keys.
    sign: bool = True
    #: Keys live in <key_dir>/<domain>/<selector>.key (`mailhaven dkim keygen`); empty:
    #: <state_dir>/dkim.
    key_dir: str = ""
    #: Per domain, the selectors to sign with (rotation: generate and publish a new one, then
    #: list it); a domain not named here signs with every key it has.
    selectors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Add an ARC set (RFC 8617) to mail an alias forwards to another domain.
    arc: bool = True
    #: The domain whose RSA key seals; empty: the first local domain that has one.
    arc_domain: str = ""
    #: Make DKIM's private-key operations in a helper process (started on first use, like
    #: OpenDKIM beside Postfix), so they run on another core than the event loop. Off by
    #: default: on the shared 2-core benchmark machine it relayed less than signing in the
    #: server (docs/benchmarks.md); the helper must be scheduled for every signature.
    helper: bool = False


@dataclass(frozen=True)
class Srs:
    """Sender Rewriting Scheme for mail an alias forwards to another domain (postsrsd's
    format, so either can reverse the other's addresses with the same secret)."""

    enabled: bool = True
    #: The domain of rewritten senders; must be local. Empty: the first local domain.
    domain: str = ""
    #: One secret a line, the first signs (postsrsd's file); empty: <state_dir>/srs.secret,
    #: made at the first start (mode 0600).
    secret_file: str = ""
    #: Days a rewritten address can be bounced to (libsrs2's default).
    max_age: int = 21
    #: Characters of the HMAC kept in the address (libsrs2's default).
    hash_length: int = 4


#: A DKIM selector: DNS labels (RFC 6376 §3.1), the usual letters, digits and hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DKIM_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _validate_outbound(config: Config) -> None:
    for domain, selectors in config.dkim.selectors.items():
        for selector in selectors:
            if not DKIM_SELECTOR.fullmatch(selector):
                raise ConfigError(f"dkim.selectors.{domain}: {selector!r} is not a selector")
    if not 1 <= config.srs.hash_length <= 27:  # 27: all of HMAC-SHA1's 160 bits in base64
        raise ConfigError("srs.hash_length: between 1 and 27")
    if config.srs.max_age < 1:
        raise ConfigError("srs.max_age: at least 1 day")
    domain = config.srs.domain.lower().rstrip(".")
    if domain and domain not in {d.lower().rstrip(".") for d in config.local_domains}:
        raise ConfigError(
            f"srs.domain: {config.srs.domain!r} is not one of local_domains (bounces to "
            "rewritten senders must come back here)"
        )


# --- end outbound mail authentication -------------------------------------------------------


# --- mailboxes: quotas, folders on delivery, LMTP (issue 20, items 3-5) -------------------------


@dataclass(frozen=True)
class Quota:
    """Maildir++ quotas (`maildirsize`, what Dovecot's `quota = maildir` reads): "1G",
    "storage=1G messages=5000" (Dovecot quota_rule words) or "" for none."""

    #: Every mailbox's quota unless its domain or the user has one of its own.
    default: str = ""
    #: Per-domain default, e.g. { "a.example" = "2G" }.
    domains: dict[str, str] = field(default_factory=dict)
    #: Per user (a mailbox name, or user@domain), e.g. { "alice" = "10G" }.
    users: dict[str, str] = field(default_factory=dict)
    #: Refuse RCPT with 452 4.2.2 when the mailbox is known to be full (Dovecot's
    #: lmtp_rcpt_check_quota); delivery defers such mail in any case.
    check_at_rcpt: bool = True


@dataclass(frozen=True)
class Folders:
    """Maildir++ subfolders chosen at delivery."""

    #: `user+ext@` goes to the folder `.ext` when it exists (needs recipient_delimiter).
    plus_address: bool = True
    #: Folder for messages the checks marked as spam, created when missing; "" = INBOX.
    junk: str = "Junk"


#: `[mailbox] delivery`: final delivery at commit time, or through the queue.
MAILBOX_DELIVERY = ("direct", "queued")


@dataclass(frozen=True)
class Mailbox:
    """Mailboxes shared with Dovecot: where they live, who owns them, POP3's announced policy."""

    #: The Maildirs' root, `<mail_dir>/<domain>/<user>/` (empty: `<state_dir>/mail`).
    mail_dir: str = ""
    #: Owner and group of Maildir files and directories (e.g. Dovecot's `vmail`; empty: the
    #: daemon's own). Applied as root; an unprivileged daemon can only set a group it is in.
    mail_user: str = ""
    mail_group: str = ""
    #: Modes of Maildir directories and message files (0o770 / 0o660 share them with the group).
    dir_mode: int = 0o700
    file_mode: int = 0o600
    #: Mode and group of the users file at start-up and on every rewrite (0 / "": keep the
    #: file's own; a new file is 0600). 0o640 with Dovecot's group lets its auth read it.
    users_file_mode: int = 0
    users_file_group: str = ""
    #: POP3 LOGIN-DELAY (RFC 2449 §6.5): seconds a user must wait between logins (0: off).
    pop3_login_delay: int = 0
    #: POP3 EXPIRE (RFC 2449 §6.7) as announced: "" (not announced), "NEVER", or days.
    pop3_expire: str = ""
    #: How mail for local mailboxes only is delivered: "direct" writes each copy into its
    #: Maildir before the 250 (LMTP-like final delivery; no queue write); "queued" commits it
    #: to the queue first, as all other mail (`mailhaven.scheduler.direct`).
    delivery: str = "direct"


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=socket.gethostname)
    state_dir: str = "mailhaven-data"
    #: Started as root: the account to run as once the listeners are bound (empty: stay who
    #: we are; see `mailhaven.runtime.privileges`). `group` defaults to the user's own group.
    user: str = ""
    group: str = ""
    local_domains: tuple[str, ...] = ("localhost",)
    #: Mailboxes that receive mail (more come from the users file).
    local_users: tuple[str, ...] = ("postmaster",)
    #: Dovecot-style passwd-file; empty: `<state_dir>/users.passwd`.
    users_file: str = ""
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    catch_all: str = ""
    recipient_delimiter: str = ""
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    relay_domains: tuple[str, ...] = ()
    relayhost: str = ""
    log_level: str = "info"
    #: "stderr", "file:PATH" (reopened on SIGUSR1), "syslog" (/dev/log) or "syslog:SOCKET".
    log: str = "stderr"
    #: "text" (Postfix's maillog shape) or "json" (one object per line, for log shippers).
    log_format: str = "text"
    #: Engine processes (default: one per usable core, `auto_processes`; "auto" in the file
    #: too). 1: one process does everything. N > 1: the daemon
    #: starts N - 1 worker processes that share the `smtp` listening sockets, each running the
    #: whole engine (receive, queue, deliver, bounce) on a queue shard of its own
    #: (`mailhaven.runtime.workers`), so mail uses more than one core. The daemon alone keeps
    #: submission, POP3, the pickup and the control socket; queue limits are divided among the
    #: processes, per-client limits (connections per IP, rates, AUTH failures) count per process.
    smtp_processes: int = field(default_factory=auto_processes)
    #: The asyncio event loop: "uvloop" (libuv's, the default; the standard library's loop when
    #: it cannot be imported, logged) or "asyncio" (see `mailhaven.runtime.eventloop`).
    event_loop: str = eventloop.DEFAULT
    #: Name SMTP clients as Postfix does, `name[address]` in the log and `Received:`, from a
    #: PTR lookup their name's A/AAAA records confirm (FCrDNS), through `[relay] nameservers`.
    #: Off by default: the defaults serve loopback, and a host without working DNS would make
    #: each new client wait `timeouts.client_lookup` for nothing.
    reverse_lookup: bool = False
    listen: Listen = field(default_factory=Listen)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    queue: Queue = field(default_factory=Queue)
    tls: TLS = field(default_factory=TLS)
    relay: Relay = field(default_factory=Relay)
    etrn: Etrn = field(default_factory=Etrn)
    #: What a session asks before it says yes (`[checks.*]`, docs/filtering.md).
    checks: Checks = field(default_factory=Checks)
    dkim: Dkim = field(default_factory=Dkim)
    srs: Srs = field(default_factory=Srs)
    mailbox: Mailbox = field(default_factory=Mailbox)
    quota: Quota = field(default_factory=Quota)
    folders: Folders = field(default_factory=Folders)
    inbound_auth: InboundAuth = field(default_factory=InboundAuth)
    #: Where this config came from (None: built-in defaults).
    source: str | None = None
    #: Keys the file spells the old way (still read; logged at start and reload).
    deprecated: tuple[str, ...] = ()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).absolute()

    @property
    def spool_path(self) -> Path:
        return self.state_path / "spool"

    @property
    def mail_root(self) -> Path:
        if self.mailbox.mail_dir:
            return Path(self.mailbox.mail_dir).absolute()
        return self.state_path / "mail"

    @property
    def dkim_key_path(self) -> Path:
        return Path(self.dkim.key_dir).absolute() if self.dkim.key_dir else self.state_path / "dkim"

    @property
    def srs_secret_path(self) -> Path:
        return (
            Path(self.srs.secret_file).absolute()
            if self.srs.secret_file
            else self.state_path / "srs.secret"
        )

    @property
    def users_path(self) -> Path:
        return (
            Path(self.users_file).absolute()
            if self.users_file
            else self.state_path / "users.passwd"
        )


def parse_hostport(text: str) -> tuple[str, int]:
    """`127.0.0.1:2525`, `[::1]:2525` or `localhost:25` -> (host, port); ConfigError if not."""
    try:
        return hostport.parse_hostport(text)
    except hostport.BadHostPort as err:
        raise ConfigError(str(err)) from None


def parse_milter(text: str) -> tuple[str, int]:
    """A milter address (Postfix's syntax) -> (host, port), or (path, 0) for a UNIX socket:
    `inet:127.0.0.1:11332`, `inet:[::1]:11332`, `inet:localhost:8891`, `unix:/run/x.sock`."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "unix" and rest.startswith("/"):
        return rest, 0
    if sep and kind in ("inet", "inet6"):
        if rest.startswith("["):
            host, sep2, port = rest[1:].partition("]:")
        else:
            host, sep2, port = rest.rpartition(":")
        if sep2 and host and port.isdigit() and 0 < int(port) <= MAX_PORT:
            return host, int(port)
    raise ConfigError(f"bad milter address {text!r}: expected inet:host:port or unix:/path")


def _check_milters(config: Config) -> None:
    milter = config.checks.milter
    for key in ("smtpd", "submission", "non_smtpd", "reuse"):
        for spec in getattr(milter, key):
            try:
                parse_milter(spec)
            except ConfigError as err:
                raise ConfigError(f"checks.milter.{key}: {err}") from None
    if milter.default_action not in ("tempfail", "accept", "reject"):
        raise ConfigError('checks.milter.default_action: "tempfail", "accept" or "reject"')
    for key in ("connect_timeout", "command_timeout", "content_timeout"):
        if getattr(milter, key) <= 0:
            raise ConfigError(f"checks.milter.{key}: must be positive")
    if milter.quarantine not in ("junk", "hold"):
        raise ConfigError('checks.milter.quarantine: "junk" or "hold"')
    for entry in milter.spam_headers:
        name, sep, value = entry.partition(":")
        if not sep or not FIELD_NAME.fullmatch(name.strip()) or not value.strip():
            raise ConfigError(
                f"checks.milter.spam_headers: {entry!r}: expected \"Header-Name: value\""
            )


#: RFC 5322 3.6.8: a field name is printable US-ASCII but colon.
FIELD_NAME = re.compile(r"[!-9;-~]+")


def _move_deprecated_milter_keys(data: dict[str, Any]) -> list[str]:
    """Old top-level milter keys go to [checks.milter] (one log line each, at start and
    reload); giving a key in both places is an error, not a guess."""
    moved = {old: data.pop(old) for old in list(data) if old in DEPRECATED_MILTER_KEYS}
    if not moved:
        return []
    checks = data.setdefault("checks", {})
    table = checks.setdefault("milter", {}) if isinstance(checks, dict) else None
    if not isinstance(table, dict):
        raise ConfigError("checks.milter: expected a table")
    notes = []
    for old, value in moved.items():
        new = DEPRECATED_MILTER_KEYS[old]
        if new in table:
            raise ConfigError(
                f"{old}: given twice, here and as [checks.milter] {new}; keep the latter", key=old
            )
        table[new] = value
        notes.append(f"{old} is deprecated: write it as {new} in [checks.milter]")
    return notes


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one TOML value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in ("source", "deprecated")}
    unknown = [k for k in data if k not in names]  # file order: the first typo first
    if unknown:
        key = unknown[0]
        table = f" in [{where}]" if where else ""
        close = difflib.get_close_matches(key, sorted(names), n=1)
        raise ConfigError(
            f'unknown key "{key}"{table}',
            key=f"{where}.{key}" if where else key,
            hint=f'did you mean "{close[0]}"?' if close else "",
        )
    if cls is Config and isinstance(data.get("smtp_processes"), str):
        if data["smtp_processes"] != "auto":
            raise ConfigError('smtp_processes: a number from 1 to 64, or "auto"')
        data = {**data, "smtp_processes": auto_processes()}
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def validate(config: Config) -> Config:
    """Cross-field checks that types alone cannot express."""
    if not config.hostname:
        raise ConfigError("hostname: must not be empty")
    if config.limits.recipients < 100:
        raise ConfigError("limits.recipients: RFC 5321 4.5.3.1.8 requires at least 100")
    if config.limits.command_line < 512:
        raise ConfigError("limits.command_line: RFC 5321 4.5.3.1.4 requires at least 512")
    if config.limits.message_size < 1024:
        raise ConfigError("limits.message_size: must be at least 1024")
    if config.limits.auth_failures < 1 or config.limits.auth_address_failures < 1:
        raise ConfigError("limits.auth_failures, limits.auth_address_failures: at least 1")
    if not 0 <= config.limits.auth_failure_delay <= MAX_AUTH_FAILURE_DELAY:
        raise ConfigError(
            f"limits.auth_failure_delay: between 0 and {MAX_AUTH_FAILURE_DELAY:g} seconds"
        )
    if config.timeouts.pop3_idle <= 0:
        raise ConfigError("timeouts.pop3_idle: must be positive")
    if config.timeouts.client_lookup <= 0:
        raise ConfigError("timeouts.client_lookup: must be positive")
    if not 1 <= config.smtp_processes <= 64:
        raise ConfigError('smtp_processes: between 1 and 64, or "auto"')
    if config.queue.notice_rate_limit < 0 or config.queue.notice_rate_window <= 0:
        raise ConfigError("queue.notice_rate_limit: 0 or more, per a positive notice_rate_window")
    for net in config.trusted_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as err:
            raise ConfigError(f"trusted_networks: {err}") from None
    for service in dataclasses.fields(Listen):
        for addr in getattr(config.listen, service.name):
            try:
                parse_hostport(addr)
            except ConfigError as err:
                raise ConfigError(f"listen.{service.name}: {err}") from None
    if bool(config.tls.cert) != bool(config.tls.key):
        raise ConfigError("tls: give both cert and key, or neither")
    _validate_acme(config.tls)
    for name, policy in (("tls", config.relay.tls), ("relayhost_tls", config.relay.relayhost_tls)):
        if policy not in ("none", "may", "encrypt", "verify"):
            raise ConfigError(
                f"relay.{name}: TLS policy {policy!r} is not none, may, encrypt or verify"
            )
    for server in config.relay.nameservers:
        parse_hostport(server)
    for net in config.etrn.clients:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as err:
            raise ConfigError(f"etrn.clients: {err}") from None
    if config.event_loop not in eventloop.CHOICES:
        raise ConfigError("event_loop: one of " + ", ".join(eventloop.CHOICES))
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level: one of debug, info, warning, error")
    try:
        logtargets.parse(config.log)
    except logtargets.TargetError as err:
        raise ConfigError(str(err)) from None
    if config.log_format not in ("text", "json"):
        raise ConfigError('log_format: "text" or "json"')
    if not config.local_domains:
        raise ConfigError("local_domains: at least one domain is needed")
    _check_numbers(config)
    _check_milters(config)
    _check_next_hops(config)
    _check_aliases(config)
    _validate_checks(config.checks)
    _validate_outbound(config)
    _check_mailbox(config)
    _check_mailboxes(config)
    _check_inbound_auth(config.inbound_auth)
    if config.group and not config.user:
        raise ConfigError("group: only with user")
    if config.user:
        from mailhaven.runtime import privileges

        try:
            privileges.resolve(config.user, config.group)
        except LookupError as err:
            raise ConfigError(str(err)) from None
    return config


#: Numbers that must be above zero (elsewhere 0 means "off" or "at once"); no number in the
#: configuration may be negative.
POSITIVE = frozenset({
    "limits.connections", "limits.connections_per_ip", "limits.hard_error_limit",
    "limits.commands_per_session", "timeouts.command", "timeouts.data",
    "timeouts.tls_handshake", "queue.minimal_backoff", "queue.maximal_backoff",
    "queue.concurrency", "queue.destination_concurrency", "queue.recipients_per_transaction",
    "relay.max_hosts",
})
#: TCP ports (RFC 793: 16 bits; port 0 cannot be connected to).
MAX_PORT = 65535


def _check_numbers(config: Config) -> None:
    """Negative times and limits, and zeros where zero makes no sense, found from the
    dataclasses themselves so a key added later is covered too."""
    _check_table(config, "")
    if config.queue.maximal_backoff < config.queue.minimal_backoff:
        raise ConfigError("queue.maximal_backoff: must not be less than minimal_backoff")
    if not 1 <= config.relay.port <= MAX_PORT:
        raise ConfigError(f"relay.port: between 1 and {MAX_PORT}, got {config.relay.port}")


def _check_inbound_auth(auth: InboundAuth) -> None:
    """`[inbound_auth]` and its per-domain tables (their optional keys are typed here)."""
    tables = [("inbound_auth", auth)] + [
        (f'inbound_auth.domains."{name}"', d) for name, d in auth.domains.items()
    ]
    for where, table in tables:
        for key in ("checks", "dmarc_reject", "spf_reject"):
            value = getattr(table, key)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
        if table.temperror not in (*TEMPERROR_ACTIONS, *(("",) if table is not auth else ())):
            raise ConfigError(f'{where}.temperror: "accept" or "defer", got {table.temperror!r}')
        header = table.quarantine_header
        if header is not None and not isinstance(header, str):
            raise ConfigError(f"{where}.quarantine_header: expected a string")
        if header and not re.fullmatch(r"[!-9;-~]+:[ \t]*[ -~]*", header):
            raise ConfigError(f'{where}.quarantine_header: expected "Name: value", got {header!r}')


def _check_table(table: Any, prefix: str) -> None:
    for item in dataclasses.fields(table):
        value, key = getattr(table, item.name), prefix + item.name
        if dataclasses.is_dataclass(value):
            _check_table(value, key + ".")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(f"{key}: must not be negative, got {value}")
            if value == 0 and key in POSITIVE:
                raise ConfigError(f"{key}: must be more than 0")


def check_next_hop(text: str) -> str | None:
    """Why `text` is not a next hop (`domain`, `domain:port`, `[host]` or `[host]:port`, the
    forms `mailhaven.delivery.relay.split_nexthop` reads), or None when it is one."""
    from mailhaven.proto.address import is_valid_domain

    bracketed = text.startswith("[")
    if bracketed:
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return "expected [host] or [host]:port"
        port = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        host, port = (host, port_text) if sep else (text, None)
    if port is not None and not (port.isdigit() and 1 <= int(port) <= MAX_PORT):
        return f"bad port {port!r}: a number from 1 to {MAX_PORT}"
    if bracketed and _is_ip(host):
        return None
    if not is_valid_domain(host.rstrip(".")) or host.startswith("["):
        return f"bad host {host!r}: a domain name, or an IP address in brackets"
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_lmtp_hop(text: str) -> str | None:
    """Why `text` (after `lmtp:`) is not an LMTP server: `unix:/absolute/path`, or a next hop
    as for relay (`[host]:port`, `host:port`; the port defaults to 24, RFC 2033 §5)."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/") or "\0" in path:
            return "expected unix:/absolute/path/to/socket"
        return None
    return check_next_hop(text)


def _check_next_hops(config: Config) -> None:
    hops = [("relayhost", config.relayhost)] if config.relayhost else []
    hops += [(f"relay.transport.{d}", hop) for d, hop in config.relay.transport.items()]
    for key, hop in hops:
        if key != "relayhost" and hop.lower().startswith("lmtp:"):
            if (why := check_lmtp_hop(hop[5:])) is not None:
                raise ConfigError(f"{key}: {hop!r}: {why}")
            continue
        if (why := check_next_hop(hop)) is not None:
            raise ConfigError(f"{key}: {hop!r}: {why}")


def _check_mailbox(config: Config) -> None:
    """Modes that give nothing to others, owners that exist, domains that can name a directory,
    an EXPIRE that RFC 2449 allows."""
    from mailhaven.mailbox.layout import normalize_domain
    from mailhaven.mailbox.owner import group_id, resolve_owner

    box = config.mailbox
    for key in ("dir_mode", "file_mode", "users_file_mode"):
        mode = getattr(box, key)
        if mode & ~0o770:
            raise ConfigError(f"mailbox.{key}: {mode:#o} gives access to others; at most 0o770"
                              " (write it as an octal number: 0o660)")
    if box.dir_mode and box.dir_mode & 0o700 != 0o700:
        raise ConfigError("mailbox.dir_mode: the owner needs 0o700")
    if box.file_mode & 0o600 != 0o600:
        raise ConfigError("mailbox.file_mode: the owner needs 0o600")
    if box.pop3_expire and box.pop3_expire != "NEVER" and not box.pop3_expire.isdigit():
        raise ConfigError('mailbox.pop3_expire: "", "NEVER" or a number of days')
    if box.delivery not in MAILBOX_DELIVERY:
        raise ConfigError('mailbox.delivery: "direct" or "queued"')
    try:
        resolve_owner(box.mail_user, box.mail_group, box.dir_mode, box.file_mode)
        group_id(box.users_file_group)
    except LookupError as err:
        raise ConfigError(f"mailbox.{err}") from None
    for domain in config.local_domains:
        if not domain.startswith("[") and normalize_domain(domain) is None:
            raise ConfigError(f"local_domains: {domain!r} cannot name a mail directory")


def _check_aliases(config: Config) -> None:
    """Alias targets are local names or addresses; anything else would be dropped silently
    when the alias is expanded (a list written as one string: "alice, bob")."""
    from mailhaven.proto.address import is_valid_domain, is_valid_local_part, split_mailbox

    for name, targets in config.aliases.items():
        for target in targets:
            try:
                local, domain = split_mailbox(target) if "@" in target else (target, "x")
            except ValueError:
                local, domain = "", ""
            if not (is_valid_local_part(local, utf8=True) and is_valid_domain(domain, utf8=True)):
                raise ConfigError(
                    f"aliases.{name}: {target!r} is not a local name or an address"
                    " (give several targets as a list: [\"alice\", \"bob@example.net\"])"
                )


def mail_owner_warning(config: Config) -> str | None:
    """A warning when `[mailbox] mail_user` cannot take effect: only root may give files to
    another user, and a daemon with `user` set drops root before it delivers."""
    box = config.mailbox
    if box.mail_user and config.user and box.mail_user != config.user:
        return (
            f"mailbox.mail_user {box.mail_user!r} differs from user {config.user!r}: the daemon"
            " delivers as its user, so new files are that user's; set user = mail_user, or share"
            " through mail_group with group modes (0o770/0o660)"
        )
    return None


def _check_mailboxes(config: Config) -> None:
    """Quota rules parse, the junk folder is a usable Maildir++ name."""
    from mailhaven.mailbox import folders, quota

    rules = [("quota.default", config.quota.default)]
    rules += [(f"quota.domains.{k}", v) for k, v in config.quota.domains.items()]
    rules += [(f"quota.users.{k}", v) for k, v in config.quota.users.items()]
    for key, text in rules:
        try:
            quota.parse_rule(text)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    if config.folders.junk and not folders.valid_folder_name(config.folders.junk):
        raise ConfigError(f"folders.junk: {config.folders.junk!r} is not a folder name")


def hostname_warning(config: Config) -> str | None:
    """A warning when `hostname` is not a fully qualified domain name: remote servers check
    the HELO name (Postfix reject_non_fqdn_helo_hostname) and bounces name it. Not an error:
    the try-it default is the machine's own name, often without a domain."""
    name = config.hostname.rstrip(".")
    if "." in name and name.lower() != "localhost" and not name.lower().endswith(".localhost"):
        return None
    return (
        f"hostname {config.hostname!r} is not a fully qualified domain name: other mail "
        f"servers may refuse our HELO; set hostname = \"mail.example.org\""
    )


def check_files(config: Config) -> None:
    """The files the configuration names, as `serve` will need them: the TLS certificate and
    key must be readable and load as a pair (otherwise the server would fail only when it
    starts its listeners, or a reload later)."""
    if not config.tls.cert:
        return
    import ssl

    from mailhaven.net.tls import build_server_context

    for name in ("cert", "key"):
        path = getattr(config.tls, name)
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise _with_line(
                ConfigError(f"tls.{name}: cannot read {path}: {err.strerror}"), config.source
            ) from None
    try:
        build_server_context(Path(config.tls.cert), Path(config.tls.key))
    except (ssl.SSLError, OSError) as err:
        raise _with_line(
            ConfigError(
                f"tls.cert: {config.tls.cert} and {config.tls.key} are not a PEM certificate "
                f"and its private key: {err}"
            ),
            config.source,
        ) from None


#: "limits.recipients: ..." or "trusted_networks[2]: ...": the key a message is about.
_KEY_PREFIX = re.compile(r"([A-Za-z_][\w.-]*)(?:\[\d+\])?:")
_TABLE = re.compile(r"\s*\[+\s*([^\]]+?)\s*\]+\s*(?:#.*)?$")
_KEY_LINE = re.compile(r"\s*([\w\-.\"' ]+?)\s*=")


def _dotted(text: str) -> list[str]:
    return [part.strip().strip("\"'") for part in text.split(".")]


def key_line(text: str, key: str) -> int | None:
    """The 1-based line where the dotted `key` is set in TOML `text` (its table header when the
    key itself is not on a line of its own, e.g. inside an inline table); None if absent."""
    path = _dotted(key)
    while path:
        table: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if header := _TABLE.match(line):
                table = _dotted(header.group(1))
                if table == path:
                    return number
            elif (assignment := _KEY_LINE.match(line)) and table + _dotted(
                assignment.group(1)
            ) == path:
                return number
        path = path[:-1]
    return None


def _with_line(err: ConfigError, source: str | None, text: str | None = None) -> ConfigError:
    """`err` with the line of its key in the file added: `... (line N)`."""
    message = str(err)
    key = err.key
    if key is None and (prefix := _KEY_PREFIX.match(message)):
        key = prefix.group(1)
    if source is not None and text is None:
        try:
            text = Path(source).read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = None
    line = key_line(text, key) if key and text is not None else None
    if line is not None:
        message += f" (line {line})"
    if err.hint:
        message += f"; {err.hint}"
    return ConfigError(f"{source}: {message}" if source else message)


#: Like Postfix's /etc/postfix/main.cf: what every command reads when told nothing else.
SYSTEM_CONFIG = Path("/etc/mailhaven/mailhaven.toml")
#: The environment variable that names the configuration (a file, or a directory holding one).
CONFIG_ENV = "MAILHAVEN_CONFIG"


def locate(path: str | Path | None, env: Mapping[str, str] | None = None) -> str | None:
    """The configuration file every command uses: `-c` > $MAILHAVEN_CONFIG > SYSTEM_CONFIG when
    it exists > None (the built-in defaults). A directory means its `mailhaven.toml`."""
    env = os.environ if env is None else env
    chosen = str(path) if path else env.get(CONFIG_ENV) or None
    if chosen is None:
        return str(SYSTEM_CONFIG) if SYSTEM_CONFIG.is_file() else None
    return os.path.join(chosen, "mailhaven.toml") if os.path.isdir(chosen) else chosen


def require_state(config: Config) -> None:
    """Refuse to work on a state directory that does not exist when only the built-in defaults
    name it: their `./mailhaven-data` is relative to the caller's directory, and a command run
    from cron or a web application elsewhere would make a second, unseen queue there."""
    if config.source is None and not config.state_path.is_dir():
        raise ConfigError(
            f"no mailhaven state directory at {config.state_path}: with the built-in defaults it "
            f"is ./{config.state_dir} of the directory the server runs in; name the server's "
            f"configuration file (-c FILE; sendmail: -C FILE), set ${CONFIG_ENV}, or install "
            f"it as {SYSTEM_CONFIG}"
        )


def _anchor(config: Config, base: Path) -> Config:
    """Relative paths in a file are relative to the file's directory, never the caller's."""

    def anchored(value: str) -> str:
        return value if not value or os.path.isabs(value) else str(base / value)

    tls = dataclasses.replace(config.tls, cert=anchored(config.tls.cert), key=anchored(config.tls.key))
    mailbox = dataclasses.replace(config.mailbox, mail_dir=anchored(config.mailbox.mail_dir))
    return dataclasses.replace(
        config,
        state_dir=anchored(config.state_dir),
        users_file=anchored(config.users_file),
        tls=tls,
        dkim=dataclasses.replace(config.dkim, key_dir=anchored(config.dkim.key_dir)),
        srs=dataclasses.replace(config.srs, secret_file=anchored(config.srs.secret_file)),
        mailbox=mailbox,
    )


def _validate_acme(tls: TLS) -> None:
    acme = tls.acme
    if not acme.domains:
        return
    if tls.cert:
        raise ConfigError("tls: give cert and key, or acme, not both")
    if not acme.directory.startswith("https://"):
        raise ConfigError("tls.acme.directory: an https:// URL of the CA's directory is needed")
    for domain in acme.domains:
        if not domain or "*" in domain:
            raise ConfigError(f"tls.acme.domains: {domain!r}: HTTP-01 validates plain host names")
    if not (acme.http01_listen or acme.tls_alpn01_listen):
        raise ConfigError("tls.acme: http01_listen or tls_alpn01_listen is needed")
    for listen in (acme.http01_listen, acme.tls_alpn01_listen):
        if listen:
            parse_hostport(listen)
    if acme.renew_before_days <= 0 or acme.check_interval <= 0:
        raise ConfigError("tls.acme: renew_before_days and check_interval must be positive")


def load(path: str | Path | None) -> Config:
    """Built-in defaults, overridden by the TOML file at `path` when given."""
    if path is None:
        return validate(Config())
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
        data = tomllib.loads(text)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8 (TOML 1.0 "Spec")
        raise ConfigError(f"{path}: not UTF-8 (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: TOML syntax error: {err}") from None
    try:
        deprecated = tuple(_move_deprecated_milter_keys(data))
        config = _anchor(_build(Config, data, ""), Path(path).absolute().parent)
        return validate(dataclasses.replace(config, source=str(path), deprecated=deprecated))
    except ConfigError as err:
        raise _with_line(err, str(path), text) from None
