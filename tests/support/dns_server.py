"""A tiny authoritative DNS server on loopback (UDP and TCP, one ephemeral port) for tests.

Give it the zone as a dict and point `mailhaven.net.dns.Resolver` at `server.address`::

    records = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "alias.example.test": {"CNAME": ["mx1.example.test"]},
        "nullmx.test": {"MX": [(0, ".")]},
    }
    with DNSServer(records, servfail={"broken.test"}) as server:
        resolver = Resolver(nameservers=[server.address], timeout=2)

or use the `dns_server` fixture factory (`from tests.support.dns_server import dns_server`).

Semantics: names are case-insensitive and absolute; a name with records answers NOERROR with the
matching RRset (empty: NODATA), following one CNAME; any other name is NXDOMAIN; names in
`servfail` answer SERVFAIL and names in `silent` get no answer at all (the client times out).
UDP answers larger than the client's EDNS payload (512 without EDNS) are truncated (TC), so
the client retries over TCP. It runs in a daemon thread with its own sockets and a bounded
select loop (each TCP connection in a thread of its own, closed after 2 s idle), so it works
for sync tests and for any event loop; `stop()` joins the thread.
Every query is recorded in `queries` as (name, type, transport).

SECURITY: test code only; binds 127.0.0.1 (or ::1) and nothing else.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

#: Records: {name: {"MX": [(pref, host)], "A": [ip], "AAAA": [ip], "CNAME": [name], "TXT": [s],
#: "PTR": [name]}}; a PTR record's owner is the reverse name, e.g. "1.0.0.127.in-addr.arpa".
Records = Mapping[str, Mapping[str, Sequence[Any]]]
TTL = 300
#: RFC 1035 §4.2.1: a UDP message without EDNS carries at most 512 octets.
MAX_UDP_PLAIN = 512
#: How often the serving thread checks for stop(); bounds stop() latency.
POLL_INTERVAL = 0.05
#: Bind attempts before giving up on finding a port free for both UDP and TCP.
BIND_ATTEMPTS = 50


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.lower().rstrip(".") + ".")


def _rdata_texts(rdtype: str, values: Sequence[Any]) -> list[str]:
    match rdtype:
        case "MX":
            return [f"{pref} {host if host.endswith('.') else host + '.'}" for pref, host in values]
        case "CNAME" | "NS" | "PTR":
            return [v if v.endswith(".") else v + "." for v in values]
        case "TXT":  # a long value becomes several <= 255-octet strings (RFC 1035 §3.3.14)
            return [" ".join('"' + str(v)[i : i + 255].replace('"', '\\"') + '"'
                             for i in range(0, max(len(str(v)), 1), 255)) for v in values]
        case _:
            return [str(v) for v in values]


class DNSServer:
    """See the module docstring. Not reusable: start once, stop once."""

    def __init__(
        self,
        records: Records,
        *,
        servfail: Iterable[str] = (),
        silent: Iterable[str] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.zone: dict[dns.name.Name, dict[str, Sequence[Any]]] = {
            _absolute(name): {t.upper(): v for t, v in rrs.items()} for name, rrs in records.items()
        }
        self.servfail = {_absolute(n) for n in servfail}
        self.silent = {_absolute(n) for n in silent}
        self.host = host
        self.queries: list[tuple[str, str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._udp is not None, "not started"
        return self.host, self._udp.getsockname()[1]

    def start(self) -> DNSServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(BIND_ATTEMPTS):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            self._udp, self._tcp = udp, tcp
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP on " + self.host)
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "tcp")
            while not self._stop.is_set():
                for key, _ in sel.select(POLL_INTERVAL):
                    with contextlib.suppress(OSError, dns.exception.DNSException, ValueError):
                        if key.data == "udp":
                            self._serve_udp()
                        else:
                            self._serve_tcp()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        wire, peer = self._udp.recvfrom(65535)
        query = dns.message.from_wire(wire)
        response = self.answer(query, "udp")
        if response is None:
            return
        limit = max(query.payload, MAX_UDP_PLAIN) if query.edns >= 0 else MAX_UDP_PLAIN
        try:
            out = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.TC | dns.flags.AA
            out = response.to_wire()
        self._udp.sendto(out, peer)

    def _serve_tcp(self) -> None:
        """Each connection in its own thread: a client that keeps one open and idle (rspamd's
        resolver does) must not stall the UDP answers."""
        assert self._tcp is not None
        conn, _ = self._tcp.accept()
        threading.Thread(target=self._serve_connection, args=(conn,), name="test-dns-tcp",
                         daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, dns.exception.DNSException, ValueError):
            conn.settimeout(2)
            while not self._stop.is_set():
                head = conn.recv(2, socket.MSG_WAITALL)
                if len(head) < 2:
                    return
                (length,) = struct.unpack("!H", head)
                query = dns.message.from_wire(conn.recv(length, socket.MSG_WAITALL))
                response = self.answer(query, "tcp")
                if response is None:
                    return
                out = response.to_wire(max_size=65535)  # else dnspython caps it at the EDNS size
                conn.sendall(struct.pack("!H", len(out)) + out)

    def answer(self, query: dns.message.Message, transport: str) -> dns.message.Message | None:
        """The authoritative answer to `query`, or None to stay silent."""
        question = query.question[0]
        name, rdtype = question.name, dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name.to_text(omit_final_dot=True), rdtype, transport))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if name not in self.zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        rrs = self.zone[name]
        if "CNAME" in rrs and rdtype != "CNAME":
            response.answer.append(self._rrset(name, "CNAME", rrs["CNAME"]))
            name = _absolute(rrs["CNAME"][0])
            rrs = self.zone.get(name, {})
        if rdtype in rrs:
            response.answer.append(self._rrset(name, rdtype, rrs[rdtype]))
        return response

    @staticmethod
    def _rrset(name: dns.name.Name, rdtype: str, values: Sequence[Any]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(
            name, TTL, dns.rdataclass.IN, rdtype, _rdata_texts(rdtype, values)
        )


@pytest.fixture
def dns_server() -> Iterator[Callable[..., DNSServer]]:
    """Factory fixture: `server = dns_server(records, servfail=..., silent=...)`; all stopped after."""
    started: list[DNSServer] = []

    def start(records: Records, **kwargs: Any) -> DNSServer:
        server = DNSServer(records, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
