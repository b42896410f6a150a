"""Events the sans-I/O POP3 server core (`proto.pop3`) hands to the application.

Each is a request the application must answer (through `Connection.accept_login`, `ok`, `err`,
`listing`, `message_*`...) before the core parses the next command; `ConnectionClosed` is the one
notice. When no event is ready, `next_event` returns `proto.sansio.NEED_DATA`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Login:
    """USER/PASS or AUTH PLAIN completed: check the credentials, then accept or reject."""

    user: str
    password: str
    mechanism: str  # "USER" or "PLAIN"
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class Stat:
    pass


@dataclass(frozen=True, slots=True)
class ListMessages:
    number: int | None


@dataclass(frozen=True, slots=True)
class Uidl:
    number: int | None


@dataclass(frozen=True, slots=True)
class Retr:
    number: int


@dataclass(frozen=True, slots=True)
class Top:
    number: int
    lines: int


@dataclass(frozen=True, slots=True)
class Dele:
    number: int


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT in TRANSACTION: the state is now UPDATE; commit deletions, then answer."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """`+OK` is already queued; flush it, call `tls_started()`, then run the handshake."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The session is over (EOF, QUIT in AUTHORIZATION, too many errors): close the transport."""


Event = (
    Login
    | Stat
    | ListMessages
    | Uidl
    | Retr
    | Top
    | Dele
    | Rset
    | Quit
    | StartTls
    | ConnectionClosed
)
