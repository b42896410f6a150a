"""The configuration's tables: one frozen dataclass per TOML table, each field with its
built-in default and a comment saying what it does (docs/configuration.md documents every key).

Why a module of their own: they are the schema; reading a file (`config.reading`) and the
cross-field checks (`config.validate`) are separate jobs.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from mailhaven.runtime import eventloop

#: Field metadata: words a number field also accepts in the file, each resolved by its
#: function when the file is read (so every consumer sees the number).
WORDS = "words"

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
    #: default: signing in a thread of the server measured faster (docs/benchmarks.md), since
    #: the helper must be scheduled for every signature.
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
    smtp_processes: int = field(
        default_factory=auto_processes, metadata={WORDS: {"auto": auto_processes}}
    )
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
