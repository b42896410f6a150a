"""A STARTTLS load client: `sessions` processes, each sending its share of `count` messages,
a new connection per message, STARTTLS on every one.

    .venv/bin/python bench/tls_load.py -s 10 -m 2000 -l 1024 [--resume] 127.0.0.1:PORT

Why this exists: smtp-source (load.py's client) speaks no TLS, and Debian has no STARTTLS
load generator. Why processes with blocking sockets: each session is strictly sequential, so a
blocking socket per process is the cheapest Python can do (no event loop per byte), the
handshake's cryptography runs in OpenSSL, and the processes use both cores. bench/tls_bench.py
measures the client's ceiling against bench/tls_sink.py and reports its CPU per message; it
uses tls_load.c, the same client in C at about half the CPU, where a C compiler is present.

Per message, as an MTA delivering to an MX does: banner, EHLO, STARTTLS, handshake, EHLO,
then MAIL, RCPT and DATA pipelined (RFC 2920), the message, QUIT. The certificate is not
verified (opportunistic TLS, as on port 25), but the handshake still checks the server's
signature. `--resume`: each process offers the session (TLS 1.3 ticket, or TLS 1.2 ticket or
id) of its previous connection, as senders with a session cache do; the report counts how many
handshakes the server resumed.

Exit status 0 when every message got a 250; `--report FILE` receives a JSON summary. Every
socket operation has a timeout and the whole run a deadline (`--timeout`), so it always ends.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import socket
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field

FINAL = re.compile(rb"(?m)^\d{3} [^\r\n]*\r\n")


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    reused: int = 0
    errors: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)


class Smtp:
    """Replies off a (TLS or plain) socket; `expect(n)` reads n complete replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def expect(self, n: int, code: bytes) -> None:
        while len(FINAL.findall(self.buf)) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by the server after {self.buf[-200:]!r}")
            self.buf += chunk
        finals = FINAL.findall(self.buf)
        if finals[-1][:3] != code or any(f[:1] not in b"23" for f in finals):
            raise ValueError(f"unexpected reply {self.buf[-200:]!r}")
        self.buf = b""

    def send(self, data: bytes, n: int, code: bytes) -> None:
        self.sock.sendall(data)
        self.expect(n, code)


def message(size: int, sender: str, rcpt: str, seq: int) -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: tls load {seq}\r\n"
            f"Message-ID: <{seq}.{time.time_ns()}@client.bench.test>\r\n\r\n").encode()
    line = b"La de da de da 1.2.3.4.5.6.7.8.9.0 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ\r\n"
    body = (line * (size // len(line) + 1))[:max(size - len(head) - 2, 0)]
    return head + body.rstrip(b"\r\n") + b"\r\n"


def one(addr: tuple[str, int], ctx: ssl.SSLContext | None, session: ssl.SSLSession | None,
        helo: str, envelope: bytes, data: bytes, timeout: float,
        keep: bool) -> tuple[bool, str, ssl.SSLSession | None]:
    """One message over one connection: (resumed?, TLS version, the session to offer next)."""
    raw = socket.create_connection(addr, timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        plain = Smtp(raw)
        plain.expect(1, b"220")
        plain.send(f"EHLO {helo}\r\n".encode(), 1, b"250")
        if ctx is None:  # --plain: the same dialogue without TLS, for the difference
            tls = raw
        else:
            plain.send(b"STARTTLS\r\n", 1, b"220")
            tls = ctx.wrap_socket(raw, session=session)
    except BaseException:
        raw.close()
        raise
    try:
        s = Smtp(tls)
        s.send(f"EHLO {helo}\r\n".encode(), 1, b"250")
        s.send(envelope, 3, b"354")
        s.send(data, 1, b"250")
        s.send(b"QUIT\r\n", 1, b"221")
        if not isinstance(tls, ssl.SSLSocket):
            return False, "none", None
        return bool(tls.session_reused), tls.version() or "?", tls.session if keep else None
    finally:
        tls.close()


def _die_with_parent() -> None:
    """Linux PR_SET_PDEATHSIG: when the harness kills this client on its timeout, the
    workers go too (they are not in its sight)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def worker(addr: tuple[str, int], n: int, first: int, a: argparse.Namespace,
           out: mp.SimpleQueue[Tally]) -> None:
    _die_with_parent()
    t = Tally()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if a.tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    envelope = f"MAIL FROM:<{a.f}>\r\nRCPT TO:<{a.t}>\r\nDATA\r\n".encode()
    deadline = time.monotonic() + a.timeout
    try:
        run_share(addr, n, first, a, t, None if a.plain else ctx, envelope, deadline)
    finally:  # main() waits for exactly one tally per worker
        out.put(t)


def run_share(addr: tuple[str, int], n: int, first: int, a: argparse.Namespace, t: Tally,
              ctx: ssl.SSLContext | None, envelope: bytes, deadline: float) -> None:
    session: ssl.SSLSession | None = None
    for i in range(n):
        if time.monotonic() > deadline:
            t.failed += n - i
            t.errors.append("deadline reached")
            break
        data = message(a.l, a.f, a.t, first + i) + b".\r\n"
        try:
            reused, version, offered = one(addr, ctx, session, a.M, envelope, data, 30.0,
                                           a.resume)
        except (OSError, ValueError) as err:
            t.failed += 1
            if len(t.errors) < 5:
                t.errors.append(f"{type(err).__name__}: {err}")
            session = None
            continue
        t.sent += 1
        t.reused += reused
        t.versions[version] = t.versions.get(version, 0) + 1
        if a.resume:
            session = offered


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-s", type=int, default=10, help="concurrent sessions (processes)")
    ap.add_argument("-m", type=int, default=1000, help="messages in all")
    ap.add_argument("-l", type=int, default=1024, help="message size in octets")
    ap.add_argument("-f", default="sender@bench.test", help="MAIL FROM")
    ap.add_argument("-t", default="rcpt@bench.test", help="RCPT TO")
    ap.add_argument("-M", default="client.bench.test", help="EHLO name")
    ap.add_argument("--resume", action="store_true", help="offer the previous session")
    ap.add_argument("--tls12", action="store_true", help="TLS 1.2 at most")
    ap.add_argument("--plain", action="store_true", help="no STARTTLS (the baseline)")
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline of the whole run")
    ap.add_argument("--report", help="write the JSON summary here")
    ap.add_argument("target", help="HOST:PORT")
    a = ap.parse_args()
    host, _, port = a.target.rpartition(":")
    addr = (host, int(port))
    ctx = mp.get_context("fork")
    out: mp.SimpleQueue[Tally] = ctx.SimpleQueue()
    shares = [a.m // a.s + (1 if k < a.m % a.s else 0) for k in range(a.s)]
    procs = [ctx.Process(target=worker, args=(addr, n, sum(shares[:k]), a, out))
             for k, n in enumerate(shares)]
    for p in procs:
        p.start()
    total = Tally()
    for _ in procs:  # each worker puts exactly one tally, also after errors
        t = out.get()
        total.sent += t.sent
        total.failed += t.failed
        total.reused += t.reused
        total.errors += t.errors[: 5 - len(total.errors)]
        for v, k in t.versions.items():
            total.versions[v] = total.versions.get(v, 0) + k
    for p in procs:
        p.join(30)
    text = json.dumps(asdict(total))
    if a.report:
        with open(a.report, "w") as f:
            f.write(text)
    if total.failed:
        print(text, file=sys.stderr)
    return 0 if total.failed == 0 and total.sent == a.m else 1


if __name__ == "__main__":
    sys.exit(main())
