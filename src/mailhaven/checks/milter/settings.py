"""What the configuration says about milters, checked once at load time.

In: `[checks.milter]`: the `smtpd`/`submission`/`non_smtpd` lists (`inet:host:port`,
`inet:[v6]:port`, `unix:/path`, Postfix's syntax), `default_action`, the three timeouts and what
marks a message as spam. Out: a frozen `MilterSettings` per kind of entry ("smtp",
"submission", "non_smtpd"), or `ValueError` naming the bad entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailhaven.config import Config, parse_milter

#: Postfix's milter_default_action values we support (quarantine is not offered: a broken
#: scanner should not silently hold all mail).
DEFAULT_ACTIONS = ("tempfail", "accept", "reject")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one milter listens: a TCP host and port, or a UNIX socket path (port 0)."""

    spec: str
    host: str
    port: int = 0

    @property
    def is_unix(self) -> bool:
        return self.port == 0


@dataclass(frozen=True, slots=True)
class MilterSettings:
    endpoints: tuple[Endpoint, ...] = ()
    default_action: str = "tempfail"
    #: Postfix milter_connect_timeout: connect and option negotiation
    connect_timeout: float = 30.0
    #: Postfix milter_command_timeout: each envelope stage (CONNECT ... RCPT, DATA)
    command_timeout: float = 30.0
    #: Postfix milter_content_timeout: header, body and end of message
    content_timeout: float = 300.0
    #: the message size limit: a milter's replacement body may not exceed it
    max_body: int = 36_700_160
    #: the listener's name for the {daemon_name} macro ("smtp", "submission")
    daemon_name: str = "smtp"
    hostname: str = "localhost"
    #: milter addresses whose connections are kept for the next SMTP session (`pool`)
    reuse: frozenset[str] = frozenset()
    #: SMFIR_QUARANTINE: "junk" (flag the message as spam) or "hold" (Postfix's hold queue)
    quarantine: str = "junk"
    #: (field name lowercased, value pattern) pairs that mark spam when a milter set them
    spam_headers: tuple[tuple[str, str], ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.endpoints)


def parse_endpoint(spec: str) -> Endpoint:
    """`inet:127.0.0.1:11332`, `inet:[::1]:11332`, `inet:localhost:8891` or `unix:/path`;
    `ConfigError` (a ValueError) when it is none of them."""
    host, port = parse_milter(spec)
    return Endpoint(spec, host, port)


def spam_header_rules(entries: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """"X-Spam: Yes" -> ("x-spam", "Yes"); checked at load time by `config`."""
    rules = []
    for entry in entries:
        name, _sep, value = entry.partition(":")
        rules.append((name.strip().lower(), value.strip()))
    return tuple(rules)


def milter_settings(config: Config, listener: str) -> MilterSettings | None:
    """The milters of one kind of entry: "smtp" (the MX), "submission"/"submissions", or
    "non_smtpd" (sendmail, the pickup); None: it has none."""
    milter = config.checks.milter
    if listener == "smtp":
        specs = milter.smtpd
    elif listener == "non_smtpd":
        specs = milter.non_smtpd
    else:
        specs = milter.submission
    if not specs:
        return None
    return MilterSettings(
        endpoints=tuple(parse_endpoint(s) for s in specs),
        default_action=milter.default_action,
        connect_timeout=milter.connect_timeout,
        command_timeout=milter.command_timeout,
        content_timeout=milter.content_timeout,
        max_body=config.limits.message_size,
        daemon_name=listener,
        hostname=config.hostname,
        reuse=frozenset(milter.reuse),
        quarantine=milter.quarantine,
        spam_headers=spam_header_rules(milter.spam_headers),
    )
