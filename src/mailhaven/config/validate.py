"""Cross-field checks that types alone cannot express, and the checks of what a setting points
at (files, next hops, owners). Every failure is a `ConfigError` naming its key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Any

from mailhaven.config.reading import _with_line
from mailhaven.config.tables import (
    DKIM_SELECTOR,
    MAILBOX_DELIVERY,
    MAX_AUTH_FAILURE_DELAY,
    TEMPERROR_ACTIONS,
    TLS,
    Checks,
    Config,
    ConfigError,
    InboundAuth,
    Listen,
)
from mailhaven.net import hostport
from mailhaven.runtime import eventloop, logtargets


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
