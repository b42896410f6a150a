"""End to end: interoperability with a real MTA, Postfix, both ways, over loopback.

One private Postfix instance (`tests.support.postfix`) and one mailhaven serve the module:

    smtplib -> mailhaven:M --(MX pf.test -> mx.pf.test -> 127.0.0.1, relay port P)--> Postfix:P
               -> Maildir of bob@pf.test / carol@pf.test (virtual(8)); others 550 5.1.1
    smtplib -> Postfix:P --(relayhost [127.0.0.1]:M)--> mailhaven:M -> Maildir of dora/ed@mh.test

mailhaven finds Postfix through the tests' own DNS server (`tests.support.dns_server`); Postfix
runs with DNS off and relays everything that is not `pf.test` to mailhaven. Both sides speak
ESMTP with PIPELINING (each advertises it, each client uses it), 8BITMIME, DSN and SIZE.

Shown: bodies arrive byte for byte (dot-stuffing undone on both ends, 8-bit bytes kept) under
the sender's Received: line; one transaction for several recipients; a recipient refused with
5xx by the far side comes back as an RFC 3464 bounce (mailhaven's, read with `email`; and
Postfix's, for a user mailhaven does not know); Postfix's SIZE limit makes mailhaven bounce
with 5.3.4 before sending; a UTF-8 address goes with SMTPUTF8; NOTIFY=SUCCESS/ORCPT/ENVID
given to Postfix reach mailhaven, whose "delivered" report travels back through Postfix; each side logs the other's `250 ... queued as <id>`; STARTTLS both
ways (mailhaven with tls = "verify" against Postfix's trustme certificate; Postfix's `encrypt`
transport, trusting mailhaven's trustme certificate); and, seen on the wire through a
`tests.support.wiretap.Wiretap`, each client pipelines (RCPT TO before the reply to MAIL FROM)
and declares BODY=8BITMIME. At the end, Postfix's log must hold no complaint about the dialogue
(improper pipelining, non-SMTP command, bare LF, lost connection mid-command). Skipped, with the
reason, where Postfix cannot run (not installed, or not root).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import functools
import os
import re
import smtplib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import read_dsn, recipient_group, relay_settings, wait_attempt
from tests.support.dns_server import DNSServer
from tests.support.postfix import PostfixInstance, free_port, postfix_instance, skip_reason
from tests.support.server import MailServer, queue_id_of, to_lf
from tests.support.wiretap import Wiretap, pipelined

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]

PF_DOMAIN = "pf.test"
PF_HOST = "mx.pf.test"
PF_USERS = ("bob", "carol", "jöran", "busy")  # one needs SMTPUTF8 (RFC 6531)
MH_DOMAIN = "mh.test"
MH_TLS_DOMAIN = "tls.mh.test"  # Postfix relays this one with STARTTLS required
MH_WIRE_DOMAIN = "wire.mh.test"  # Postfix relays this one through a Wiretap
PF_BUSY = "busy@pf.test"  # Postfix answers 450 4.2.1 to RCPT TO
#: Postfix's message_size_limit (its EHLO says SIZE 100000).
PF_SIZE_LIMIT = 100_000
MH_HOST = "mail.mh.test"
MH_USERS = ("postmaster", "alice", "dora", "ed")
RECORDS: dict[str, dict[str, list[Any]]] = {
    PF_DOMAIN: {"MX": [(10, PF_HOST)]},
    PF_HOST: {"A": ["127.0.0.1"]},
}
#: Postfix's words when a client breaks SMTP's command/reply sync or sends garbage.
POSTFIX_PROTOCOL_COMPLAINTS = re.compile(
    r"improper command pipelining|non-SMTP command|bare <LF>|too many errors|lost connection"
    r" after (?!CONNECT)"
)
#: `QID: to=<a>, relay=host[ip]:port, delay=..., delays=..., dsn=X.Y.Z, status=S (text)`
POSTFIX_ATTEMPT = (
    r"(?P<qid>[0-9A-F]+): to=<{to}>, relay=(?P<relay>\S+), delay=[0-9.]+,"
    r" delays=[0-9./]+, dsn=(?P<dsn>[0-9.]+), status=(?P<status>{status}) \((?P<text>.*)\)$"
)


# ---------------------------------------------------------------------- the two servers


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    """Both ports up front: each server's config names the other's."""
    return {"postfix": free_port(), "mailhaven": free_port(), "wiretap": free_port()}


def mailhaven_settings(dns: DNSServer, postfix_port: int, **relay: object) -> dict[str, Any]:
    return relay_settings(
        dns=dns.address,
        port=postfix_port,
        local_users=MH_USERS,
        local_domains=["localhost", MH_DOMAIN, MH_TLS_DOMAIN, MH_WIRE_DOMAIN],
        relay=relay,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Path:
    """ca.pem, and cert/key pairs for both servers (pf.pem/pf.key, mh.pem/mh.key)."""
    where = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    for name, host in (("pf", PF_HOST), ("mh", MH_HOST)):
        issued = ca.issue_cert(host)
        issued.cert_chain_pems[0].write_to_path(str(where / f"{name}.pem"))
        issued.private_key_pem.write_to_path(str(where / f"{name}.key"))
        os.chmod(where / f"{name}.key", 0o600)
    where.chmod(0o755)  # Postfix's smtp(8) reads ca.pem as user postfix
    (where / "ca.pem").chmod(0o644)
    return where


@pytest.fixture(scope="module")
def mailhaven(
    module_mail_server: ServerFactory, dns: DNSServer, ports: dict[str, int], certs: Path
) -> MailServer:
    """Relays with tls = "none" (plain SMTP to Postfix); offers STARTTLS with a trustme cert."""
    settings = mailhaven_settings(dns, ports["postfix"])
    settings["tls"] = {"cert": str(certs / "mh.pem"), "key": str(certs / "mh.key")}
    return module_mail_server(
        settings=settings, ports={"smtp": ports["mailhaven"]}, hostname=MH_HOST
    )


@pytest.fixture(scope="module")
def postfix(
    tmp_path_factory: pytest.TempPathFactory,
    mailhaven: MailServer,
    ports: dict[str, int],
    certs: Path,
) -> Iterator[PostfixInstance]:
    """Relays plain to mailhaven, except: `tls.mh.test` goes by the `smtptls` transport, which
    requires STARTTLS and checks mailhaven's certificate chain against the trustme CA; and
    `wire.mh.test` goes by `smtpwire` to the port where tests put a Wiretap in front of
    mailhaven."""
    relay = f"[127.0.0.1]:{mailhaven.smtp_port}"
    with postfix_instance(
        keep=tmp_path_factory.mktemp("postfix"),
        domain=PF_DOMAIN,
        users=PF_USERS,
        port=ports["postfix"],
        hostname=PF_HOST,
        relayhost=relay,
        tls_cert=certs / "pf.pem",
        tls_key=certs / "pf.key",
        settings={
            "smtp_tls_security_level": "none",
            "transport_maps": (
                f"inline:{{ {MH_TLS_DOMAIN}=smtptls:{relay},"
                f" {MH_WIRE_DOMAIN}=smtpwire:[127.0.0.1]:{ports['wiretap']} }}"
            ),
            "message_size_limit": str(PF_SIZE_LIMIT),
            # A recipient Postfix defers at RCPT, and a message it refuses after DATA.
            "smtpd_recipient_restrictions": (
                f"check_recipient_access inline:{{ {{{PF_BUSY}=450 4.2.1 Mailbox busy, try later}} }}"
            ),
            "header_checks": "regexp:{ {/^Subject: .*refuse-me/ REJECT 5.7.1 Content refused} }",
        },
        services=(
            "smtptls unix - - n - - smtp -o smtp_tls_security_level=encrypt"
            f" -o smtp_tls_CAfile={certs / 'ca.pem'}\n"
            # one process that always caches its connection: reuse is certain, not luck
            "smtpwire unix - - n - 1 smtp"
            f" -o smtp_connection_cache_destinations=[127.0.0.1]:{ports['wiretap']}\n"
        ),
    ) as instance:
        yield instance
        complaints = [
            line for line in instance.log_lines() if POSTFIX_PROTOCOL_COMPLAINTS.search(line)
        ]
        assert not complaints, "Postfix complained about the SMTP dialogue:\n" + "\n".join(
            complaints
        )


# ---------------------------------------------------------------------- helpers


def message(mark: str, to: str, sender: str, body: bytes | None = None) -> bytes:
    """A message whose body has lines that need dot-stuffing and a near-limit line."""
    lines = [
        f"body of {mark}",
        ".a line that starts with a dot",
        "..and one with two",
        ".",  # a lone dot that is not the end of data
        "x" * 990,
        "last line",
    ]
    body = body or "".join(line + "\r\n" for line in lines).encode()
    head = (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: interop {mark}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{mark}@interop.test>\r\n"
    ).encode()
    return head + b"\r\n" + body


def submit(
    port: int,
    sender: str,
    recipients: list[str],
    data: bytes,
    *,
    mail_options: tuple[str, ...] = (),
    rcpt_options: tuple[str, ...] = (),
) -> str:
    """One SMTP transaction to 127.0.0.1:port; returns the `queued as` id of the reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.interop.test")
        code, text = s.mail(sender, list(mail_options))
        assert code == 250, text
        for rcpt in recipients:
            code, text = s.rcpt(rcpt, list(rcpt_options))
            assert code == 250, (rcpt, code, text)
        code, text = s.data(data)
        assert code == 250, text
        match = re.search(r"queued as ([A-Za-z0-9]+)", text.decode())
        assert match, text
        return match.group(1)


def with_mark(files: list[Path], mark: str) -> list[Path]:
    return [p for p in files if mark.encode() in p.read_bytes()]


def wait_marked(
    list_files: Callable[[], list[Path]], mark: str, count: int = 1, timeout: float = 15.0
) -> list[Path]:
    """Poll `list_files()` (a Maildir listing) until `count` files contain `mark`."""
    deadline = time.monotonic() + timeout
    while True:
        found = with_mark(list_files(), mark)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} file(s) with {mark}, wanted {count}")
        time.sleep(0.05)


def split_postfix_trace(data: bytes) -> tuple[list[bytes], bytes]:
    """A Postfix Maildir file -> (its own trace fields, unfolded) and the rest as received.

    virtual(8) prepends Return-Path:, X-Original-To:, Delivered-To: and smtpd's Received:."""
    fields: list[bytes] = []
    rest = data
    for name in (b"return-path", b"x-original-to", b"delivered-to", b"received"):
        end = 0
        while True:
            end = rest.index(b"\n", end) + 1
            if rest[end : end + 1] not in (b" ", b"\t"):
                break
        raw = rest[:end]
        assert raw.split(b":", 1)[0].lower() == name, (name, raw[:80])
        fields.append(b" ".join(part.strip() for part in raw.splitlines()))
        rest = rest[end:]
    return fields, rest


def first_field(data: bytes) -> tuple[bytes, bytes]:
    """(the first header field, unfolded; everything after it)."""
    end = 0
    while True:
        end = data.index(b"\n", end) + 1
        if data[end : end + 1] not in (b" ", b"\t"):
            break
    return b" ".join(p.strip() for p in data[:end].splitlines()), data[end:]


def check_relayed_to_postfix(path: Path, original: bytes, rcpt: str, qid: str) -> bytes:
    """Postfix's trace, then mailhaven's Received: for `qid`, then `original` byte for byte."""
    fields, rest = split_postfix_trace(path.read_bytes())
    assert fields[0] == b"Return-Path: <alice@localhost>"
    assert fields[2] == f"Delivered-To: {rcpt}".encode()
    postfix_line = fields[3].decode()
    assert re.match(
        rf"Received: from {re.escape(MH_HOST)} \(localhost \[127\.0\.0\.1\]\)"
        rf" by {re.escape(PF_HOST)} \(Postfix\) with ESMTPS? id [0-9A-F]+",
        postfix_line,
    ), postfix_line
    mailhaven_line, body = first_field(rest)
    assert mailhaven_line.startswith(b"Received: from client.interop.test"), mailhaven_line
    assert f"(mailhaven) with ESMTP id {qid}".encode() in mailhaven_line, mailhaven_line
    assert body == to_lf(original), "the message changed on the way"
    return fields[3]


# ---------------------------------------------------------------------- mailhaven -> Postfix


def test_mailhaven_relays_to_postfix(mailhaven: MailServer, postfix: PostfixInstance) -> None:
    mark = uuid.uuid4().hex
    data = message(mark, "bob@pf.test", "alice@localhost")
    qid = submit(mailhaven.smtp_port, "alice@localhost", ["bob@pf.test"], data)

    [path] = wait_marked(lambda: postfix.messages("bob"), mark)
    check_relayed_to_postfix(path, data, "bob@pf.test", qid)

    [sent] = wait_attempt(mailhaven, qid, "bob@pf.test", "sent")
    assert sent["relay"] == f"{PF_HOST}[127.0.0.1]:{postfix.port}"
    assert sent["dsn"] == "2.0.0"
    # mailhaven logs the remote reply whole, as Postfix's smtp(8) does: "250 2.0.0 Ok: ...".
    pf_qid = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)", sent["text"])
    assert pf_qid, sent["text"]
    # Postfix's story of that id: from mailhaven, delivered to the Maildir.
    postfix.wait_for_log(rf"{pf_qid[1]}: client=localhost\[127\.0\.0\.1\]")
    assert postfix_sent_line(postfix, pf_qid[1], "bob@pf.test")["relay"] == "virtual"


def test_one_transaction_for_several_recipients(
    mailhaven: MailServer, postfix: PostfixInstance
) -> None:
    mark = uuid.uuid4().hex
    rcpts = ["bob@pf.test", "carol@pf.test"]
    data = message(mark, rcpts[0], "alice@localhost")
    qid = submit(mailhaven.smtp_port, "alice@localhost", rcpts, data)

    for rcpt in rcpts:
        [path] = wait_marked(functools.partial(postfix.messages, rcpt.split("@")[0]), mark)
        check_relayed_to_postfix(path, data, rcpt, qid)
    texts = {wait_attempt(mailhaven, qid, r, "sent")[0]["text"] for r in rcpts}
    assert len(texts) == 1, f"two transactions: {texts}"  # one Postfix queue id for both
    pf_qid = texts.pop().rpartition(" ")[2]
    postfix.wait_for_log(rf"{pf_qid}: from=<alice@localhost>, size=\d+, nrcpt=2 \(queue active\)")


def test_8bitmime_body_arrives_unchanged(mailhaven: MailServer, postfix: PostfixInstance) -> None:
    mark = uuid.uuid4().hex
    body = f"Grüße aus Köln, {mark}\r\n€ 8-bit bytes: ÿþ\r\n".encode()
    data = message(mark, "bob@pf.test", "alice@localhost", body).replace(
        b"\r\n\r\n",
        b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n",
        1,
    )
    qid = submit(
        mailhaven.smtp_port,
        "alice@localhost",
        ["bob@pf.test"],
        data,
        mail_options=("BODY=8BITMIME",),
    )
    [path] = wait_marked(lambda: postfix.messages("bob"), mark)
    check_relayed_to_postfix(path, data, "bob@pf.test", qid)
    wait_attempt(mailhaven, qid, "bob@pf.test", "sent")


def test_recipient_refused_by_postfix_bounces(
    mailhaven: MailServer, postfix: PostfixInstance
) -> None:
    mark = uuid.uuid4().hex
    rcpts = ["bob@pf.test", "nosuch@pf.test"]
    data = message(mark, rcpts[0], "alice@localhost")
    qid = submit(mailhaven.smtp_port, "alice@localhost", rcpts, data)

    [path] = wait_marked(lambda: postfix.messages("bob"), mark)  # the good one still goes
    check_relayed_to_postfix(path, data, "bob@pf.test", qid)
    wait_attempt(mailhaven, qid, "bob@pf.test", "sent")
    [bounced] = wait_attempt(mailhaven, qid, "nosuch@pf.test", "bounced")
    assert bounced["dsn"] == "5.1.1"
    assert bounced["text"] == (  # the shape Postfix's own smtp(8) logs for this refusal
        f"host {PF_HOST}[127.0.0.1] said: 550 5.1.1 <nosuch@pf.test>: Recipient address"
        " rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)"
    )
    postfix.wait_for_log(
        r"reject: RCPT from localhost\[127\.0\.0\.1\]: 550 5\.1\.1 <nosuch@pf\.test>"
    )

    [report] = wait_marked(lambda: mailhaven.messages("alice"), mark)
    dsn = read_dsn(report)
    assert dsn.message["From"] and "MAILER-DAEMON" in dsn.message["From"].upper()
    assert [g["Final-Recipient"] for g in dsn.per_recipient] == ["rfc822; nosuch@pf.test"]
    group = recipient_group(dsn, "nosuch@pf.test")
    assert group["Action"] == "failed"
    assert group["Status"] == "5.1.1"
    assert group["Remote-MTA"].replace(" ", "") == f"dns;{PF_HOST}"
    diagnostic = " ".join(group["Diagnostic-Code"].split())
    assert diagnostic.startswith("smtp; 550 5.1.1 <nosuch@pf.test>: Recipient address rejected")
    assert dsn.original is not None and mark in str(dsn.original["Subject"])


def test_recipient_deferred_by_postfix(mailhaven: MailServer, postfix: PostfixInstance) -> None:
    """450 at RCPT for one recipient: it is deferred (and kept for retry), the other is sent in
    the same transaction."""
    mark = uuid.uuid4().hex
    data = message(mark, "bob@pf.test", "alice@localhost")
    qid = submit(mailhaven.smtp_port, "alice@localhost", ["bob@pf.test", PF_BUSY], data)
    [path] = wait_marked(lambda: postfix.messages("bob"), mark)
    check_relayed_to_postfix(path, data, "bob@pf.test", qid)
    [deferred, *_] = wait_attempt(mailhaven, qid, PF_BUSY, "deferred")
    assert deferred["dsn"] == "4.2.1", deferred.group(0)
    assert "Mailbox busy, try later" in deferred["text"]
    assert not with_mark(postfix.messages("busy"), mark)
    assert not with_mark(mailhaven.messages("alice"), mark), "no bounce for a 4xx"


def test_message_refused_after_data_bounces_every_recipient(
    mailhaven: MailServer, postfix: PostfixInstance
) -> None:
    """Postfix's header_checks REJECT: 550 5.7.1 to the end of DATA, after both RCPTs got 250;
    that one reply is every recipient's result, so both bounce in one report."""
    mark = uuid.uuid4().hex
    rcpts = ["bob@pf.test", "carol@pf.test"]
    data = message(f"refuse-me {mark}", rcpts[0], "alice@localhost")
    qid = submit(mailhaven.smtp_port, "alice@localhost", rcpts, data)
    for rcpt in rcpts:
        [bounced] = wait_attempt(mailhaven, qid, rcpt, "bounced")
        assert bounced["dsn"] == "5.7.1", bounced.group(0)
        assert "Content refused" in bounced["text"]
    [report] = wait_marked(lambda: mailhaven.messages("alice"), mark)
    dsn = read_dsn(report)
    assert sorted(g["Final-Recipient"].replace(" ", "") for g in dsn.per_recipient) == [
        f"rfc822;{r}" for r in rcpts
    ]
    assert all(g["Status"] == "5.7.1" for g in dsn.per_recipient)
    postfix.wait_for_log(r"reject: header Subject: interop refuse-me")
    assert not with_mark(postfix.messages("bob") + postfix.messages("carol"), mark)


def test_postfix_size_limit_is_respected(mailhaven: MailServer, postfix: PostfixInstance) -> None:
    """Postfix's EHLO says SIZE 100000: mailhaven bounces a bigger message (5.3.4) without
    sending it (RFC 1870), and still delivers to nobody else by mistake."""
    mark = uuid.uuid4().hex
    body = (f"{mark}\r\n" + ("y" * 78 + "\r\n") * (PF_SIZE_LIMIT // 80 + 100)).encode()
    data = message(mark, "bob@pf.test", "alice@localhost", body)
    qid = submit(mailhaven.smtp_port, "alice@localhost", ["bob@pf.test"], data)

    [bounced] = wait_attempt(mailhaven, qid, "bob@pf.test", "bounced")
    assert bounced["dsn"] == "5.3.4", bounced.group(0)
    [report] = wait_marked(lambda: mailhaven.messages("alice"), mark)
    assert recipient_group(read_dsn(report), "bob@pf.test")["Status"] == "5.3.4"
    assert not with_mark(postfix.messages("bob"), mark)


def test_smtputf8_address_to_postfix(mailhaven: MailServer, postfix: PostfixInstance) -> None:
    """A UTF-8 recipient: mailhaven says SMTPUTF8 to Postfix (which offers it; without it,
    Postfix refuses a non-ASCII address with 5.6.7) and Postfix delivers to jöran's Maildir."""
    mark = uuid.uuid4().hex
    rcpt = "jöran@pf.test"
    data = message(mark, rcpt, "alice@localhost")
    data = data.replace(b"Subject: interop", "Subject: Grüße, interop".encode(), 1)
    qid = submit(mailhaven.smtp_port, "alice@localhost", [rcpt], data, mail_options=("SMTPUTF8",))
    [path] = wait_marked(lambda: postfix.messages("jöran"), mark)
    wait_attempt(mailhaven, qid, rcpt, "sent")
    _, rest = split_postfix_trace(path.read_bytes())
    assert rest.endswith(to_lf(data))


def eight_bit_message(mark: str, to: str, sender: str) -> bytes:
    body = f"Grüße {mark}\r\nÿþ and a line\r\n.\r\n..dots\r\n".encode()
    return message(mark, to, sender, body).replace(
        b"\r\n\r\n",
        b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n",
        1,
    )


def client_bytes(tap: Wiretap, conn: int = 1) -> bytes:
    return b"".join(data for c, side, data in tap.snapshot() if c == conn and side == "c")


def test_mailhaven_pipelines_to_postfix(
    mail_server: ServerFactory, dns: DNSServer, postfix: PostfixInstance
) -> None:
    """On the wire (a Wiretap between them): mailhaven sends RCPT TO before Postfix answered
    MAIL FROM (RFC 2920), and declares BODY=8BITMIME and SIZE= because Postfix offers them."""
    with Wiretap(postfix.port) as tap:
        server = mail_server(settings=mailhaven_settings(dns, tap.port), hostname=MH_HOST)
        mark = uuid.uuid4().hex
        rcpts = ["bob@pf.test", "carol@pf.test"]
        data = eight_bit_message(mark, rcpts[0], "alice@localhost")
        qid = submit(
            server.smtp_port, "alice@localhost", rcpts, data, mail_options=("BODY=8BITMIME",)
        )
        for rcpt in rcpts:
            [path] = wait_marked(functools.partial(postfix.messages, rcpt.split("@")[0]), mark)
            check_relayed_to_postfix(path, data, rcpt, qid)
        assert pipelined(tap.snapshot(), 1), tap.snapshot()
        sent = client_bytes(tap)
        assert re.search(rb"MAIL FROM:<alice@localhost>[^\r]* BODY=8BITMIME", sent), sent[:500]
        assert re.search(rb"MAIL FROM:<alice@localhost>[^\r]* SIZE=\d+", sent), sent[:500]
        assert sent.count(b"RCPT TO:") == 2
        server.stop()  # its parked connection says QUIT through the tap, not to a cut wire


def test_postfix_pipelines_to_mailhaven(
    mailhaven: MailServer, postfix: PostfixInstance, ports: dict[str, int]
) -> None:
    """Postfix's smtp(8) pipelines to mailhaven (which advertises PIPELINING) and passes on
    BODY=8BITMIME; mailhaven answers each command in order."""
    with Wiretap(mailhaven.smtp_port, port=ports["wiretap"]) as tap:
        mark = uuid.uuid4().hex
        rcpts = [f"dora@{MH_WIRE_DOMAIN}", f"ed@{MH_WIRE_DOMAIN}"]
        data = eight_bit_message(mark, rcpts[0], "bob@pf.test")
        pf_qid = submit(postfix.port, "bob@pf.test", rcpts, data, mail_options=("BODY=8BITMIME",))
        lines = [postfix_sent_line(postfix, pf_qid, r) for r in rcpts]
        mh_qid = lines[0]["text"].rpartition(" ")[2]
        for rcpt in rcpts:
            [path] = wait_marked(functools.partial(mailhaven.messages, rcpt.split("@")[0]), mark)
            check_relayed_to_mailhaven(path, data, mh_qid)
        assert pipelined(tap.snapshot(), 1), tap.snapshot()
        sent = client_bytes(tap)
        assert re.search(rb"MAIL FROM:<bob@pf\.test>[^\r]* BODY=8BITMIME", sent), sent[:500]


def test_starttls_to_postfix_verified(
    mail_server: ServerFactory, dns: DNSServer, postfix: PostfixInstance, certs: Path
) -> None:
    """relay tls = "verify": mailhaven checks Postfix's certificate against the trustme CA."""
    env = dict(os.environ, SSL_CERT_FILE=str(certs / "ca.pem"))
    env.pop("SSL_CERT_DIR", None)
    server = mail_server(
        settings=mailhaven_settings(dns, postfix.port, tls="verify"), hostname=MH_HOST, env=env
    )
    mark = uuid.uuid4().hex
    data = message(mark, "carol@pf.test", "alice@localhost")
    qid = submit(server.smtp_port, "alice@localhost", ["carol@pf.test"], data)

    [path] = wait_marked(lambda: postfix.messages("carol"), mark)
    trace = check_relayed_to_postfix(path, data, "carol@pf.test", qid)
    assert b"with ESMTPS id" in trace, trace  # Postfix says: this arrived over TLS
    wait_attempt(server, qid, "carol@pf.test", "sent")
    postfix.wait_for_log(r"TLS connection established from localhost\[127\.0\.0\.1\]: TLSv1\.[23]")


# ---------------------------------------------------------------------- Postfix -> mailhaven


def postfix_sent_line(
    postfix: PostfixInstance, pf_qid: str, to: str, status: str = "sent"
) -> re.Match[str]:
    pattern = POSTFIX_ATTEMPT.format(to=re.escape(to), status=status).replace(
        "(?P<qid>[0-9A-F]+)", re.escape(pf_qid)
    )
    return postfix.wait_for_log(pattern, timeout=15)[0]


def check_relayed_to_mailhaven(
    path: Path, original: bytes, mh_qid: str, *, tls: bool = False
) -> None:
    """mailhaven's trace, then Postfix's Received:, then `original` byte for byte."""
    data = path.read_bytes()
    assert queue_id_of(data) == mh_qid
    head, _, rest = data.partition(b"Subject: interop ")
    assert to_lf(original).endswith(b"Subject: interop " + rest), "the message changed on the way"
    proto = b"ESMTPS" if tls else b"ESMTP"
    assert re.search(
        rb"\nReceived: from mx\.pf\.test \(unknown \[127\.0\.0\.1\]\)\n"
        + (rb"\t\(using TLSv1\.[23] with cipher [^\n]+\)\n" if tls else b"")
        + rb"\tby mail\.mh\.test"
        rb" \(mailhaven\) with " + proto + rb" id " + mh_qid.encode(),
        head,
    ), head
    assert re.search(
        rb"\nReceived: from client\.interop\.test \(localhost \[127\.0\.0\.1\]\)\n"
        rb"\tby mx\.pf\.test \(Postfix\) with ESMTP id [0-9A-F]+",
        head,
    ), head


def test_postfix_relays_to_mailhaven(mailhaven: MailServer, postfix: PostfixInstance) -> None:
    mark = uuid.uuid4().hex
    rcpts = ["dora@mh.test", "ed@mh.test"]
    data = message(mark, rcpts[0], "bob@pf.test")
    pf_qid = submit(postfix.port, "bob@pf.test", rcpts, data)

    lines = [postfix_sent_line(postfix, pf_qid, r) for r in rcpts]
    replies = {m["text"] for m in lines}
    assert len(replies) == 1, f"Postfix used two transactions: {replies}"
    reply = replies.pop()
    got = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([A-Za-z0-9]+)", reply)
    assert got, reply
    assert {m["relay"] for m in lines} == {f"127.0.0.1[127.0.0.1]:{mailhaven.smtp_port}"}
    for rcpt in rcpts:
        [path] = wait_marked(functools.partial(mailhaven.messages, rcpt.split("@")[0]), mark)
        check_relayed_to_mailhaven(path, data, got[1])
    # mailhaven's own log tells the same story under its id.
    mailhaven.wait_for_log(rf"{got[1]}: client=localhost\[127\.0\.0\.1\]|{got[1]}: client=")


def test_postfix_relays_8bitmime_to_mailhaven(
    mailhaven: MailServer, postfix: PostfixInstance
) -> None:
    mark = uuid.uuid4().hex
    data = eight_bit_message(mark, "dora@mh.test", "bob@pf.test")
    pf_qid = submit(
        postfix.port, "bob@pf.test", ["dora@mh.test"], data, mail_options=("BODY=8BITMIME",)
    )
    sent = postfix_sent_line(postfix, pf_qid, "dora@mh.test")
    mh_qid = sent["text"].rpartition(" ")[2]
    [path] = wait_marked(lambda: mailhaven.messages("dora"), mark)
    check_relayed_to_mailhaven(path, data, mh_qid)


def test_dsn_success_from_mailhaven_to_postfix(
    mailhaven: MailServer, postfix: PostfixInstance
) -> None:
    """NOTIFY=SUCCESS given to Postfix travels on to mailhaven (Postfix hands DSN duties to a
    DSN-capable next hop); mailhaven delivers and sends the "delivered" report back, through
    Postfix, to bob's Maildir."""
    mark = uuid.uuid4().hex
    data = message(mark, "dora@mh.test", "bob@pf.test")
    pf_qid = submit(
        postfix.port,
        "bob@pf.test",
        ["dora@mh.test"],
        data,
        mail_options=("RET=HDRS", f"ENVID={mark}"),
        rcpt_options=("NOTIFY=SUCCESS",),
    )
    postfix_sent_line(postfix, pf_qid, "dora@mh.test")
    wait_marked(lambda: mailhaven.messages("dora"), mark)
    [report] = wait_marked(lambda: postfix.messages("bob"), mark)
    dsn = read_dsn(report)
    assert dsn.per_message["Reporting-MTA"] == f"dns; {MH_HOST}"
    assert dsn.per_message["Original-Envelope-Id"] == mark
    group = recipient_group(dsn, "dora@mh.test")
    assert group["Action"] == "delivered"
    assert group["Status"].startswith("2.")
    assert group["Original-Recipient"].replace(" ", "") == "rfc822;dora@mh.test"  # Postfix's ORCPT


def test_dsn_success_passed_on_to_postfix_gets_one_notice(
    mailhaven: MailServer, postfix: PostfixInstance
) -> None:
    """Issue 16 #4: Postfix advertises DSN, so mailhaven passes NOTIFY=SUCCESS on and sends no
    "relayed" notice of its own (RFC 3461 §4.1): dora gets Postfix's "delivered" report only."""
    mark = uuid.uuid4().hex
    data = message(mark, "bob@pf.test", "dora@mh.test")
    qid = submit(
        mailhaven.smtp_port,
        "dora@mh.test",
        ["bob@pf.test"],
        data,
        mail_options=("RET=HDRS", f"ENVID={mark}"),
        rcpt_options=("NOTIFY=SUCCESS",),
    )
    wait_marked(lambda: postfix.messages("bob"), mark)
    [report] = wait_marked(lambda: mailhaven.messages("dora"), mark)
    dsn = read_dsn(report)
    assert dsn.per_message["Reporting-MTA"] == f"dns; {PF_HOST}"  # Postfix's, not ours
    assert recipient_group(dsn, "bob@pf.test")["Action"] == "delivered"
    mailhaven.wait_for_log(rf"\b{qid}: removed$")  # notices are queued before the removal
    assert not re.search(rf"\b{qid}: sender delivery notification", mailhaven.log())


def test_starttls_from_postfix(mailhaven: MailServer, postfix: PostfixInstance) -> None:
    """Postfix's `smtptls` transport (security level encrypt, trustme CA) to mailhaven."""
    mark = uuid.uuid4().hex
    rcpt = f"ed@{MH_TLS_DOMAIN}"
    data = message(mark, rcpt, "bob@pf.test")
    pf_qid = submit(postfix.port, "bob@pf.test", [rcpt], data)
    sent = postfix_sent_line(postfix, pf_qid, rcpt)
    [path] = wait_marked(lambda: mailhaven.messages("ed"), mark)
    check_relayed_to_mailhaven(path, data, sent["text"].rpartition(" ")[2], tls=True)
    postfix.wait_for_log(
        rf"Trusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{mailhaven.smtp_port}:"
        r" TLSv1\.[23]"
    )


def submit_many(port: int, sender: str, rcpt: str, marks: list[str]) -> list[str]:
    """Several messages in one SMTP session; their queue ids."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.interop.test")
        for mark in marks:
            code, text = s.mail(sender)
            assert code == 250, text
            code, text = s.rcpt(rcpt)
            assert code == 250, text
            code, text = s.data(message(mark, rcpt, sender))
            assert code == 250, text
            ids.append(text.decode().rpartition(" ")[2])
    return ids


BURST = 8


def mails_per_connection(tap: Wiretap) -> list[int]:
    counts: Counter[int] = Counter()
    for conn, side, data in tap.snapshot():
        if side == "c":
            counts[conn] += data.upper().count(b"MAIL FROM:")
    return [counts[c] for c in sorted(counts)]


def test_bursts_reuse_connections_both_ways(
    mail_server: ServerFactory,
    dns: DNSServer,
    mailhaven: MailServer,
    postfix: PostfixInstance,
    ports: dict[str, int],
) -> None:
    """A burst each way, through Wiretaps: every message arrives once, and each sender carries
    several transactions on one connection (mailhaven parks its session to Postfix; Postfix's
    connection cache, with RSET between uses, to mailhaven)."""
    out = [f"out-{uuid.uuid4().hex}" for _ in range(BURST)]
    back = [f"back-{uuid.uuid4().hex}" for _ in range(BURST)]
    with (
        Wiretap(postfix.port) as tap_out,
        Wiretap(mailhaven.smtp_port, port=ports["wiretap"]) as tap_back,
    ):
        # One delivery at a time to Postfix (as Postfix's smtpwire above): with more, a burst
        # fans out over parallel connections, and reuse would be luck.
        settings = mailhaven_settings(dns, tap_out.port)
        settings["queue"]["destination_concurrency"] = 1
        server = mail_server(settings=settings, hostname=MH_HOST)
        submit_many(server.smtp_port, "alice@localhost", "carol@pf.test", out)
        submit_many(postfix.port, "bob@pf.test", f"ed@{MH_WIRE_DOMAIN}", back)
        for mark in out:
            assert len(wait_marked(lambda: postfix.messages("carol"), mark)) == 1
        for mark in back:
            assert len(wait_marked(lambda: mailhaven.messages("ed"), mark)) == 1
        server.stop()
        sent_out, sent_back = mails_per_connection(tap_out), mails_per_connection(tap_back)
    assert sum(sent_out) == BURST and max(sent_out) > 1, sent_out
    assert sum(sent_back) == BURST and max(sent_back) > 1, sent_back
    assert b"RSET\r\n" in b"".join(d for _, side, d in tap_back.snapshot() if side == "c")


def test_unknown_mailhaven_user_bounces_in_postfix(
    mailhaven: MailServer, postfix: PostfixInstance
) -> None:
    """mailhaven refuses the RCPT with 550 5.1.1; Postfix bounces to its own local sender."""
    mark = uuid.uuid4().hex
    data = message(mark, "nosuch@mh.test", "bob@pf.test")
    pf_qid = submit(postfix.port, "bob@pf.test", ["nosuch@mh.test", "dora@mh.test"], data)
    bounced = postfix_sent_line(postfix, pf_qid, "nosuch@mh.test", status="bounced")
    assert bounced["dsn"] == "5.1.1", bounced.group(0)
    assert bounced["text"].startswith("host 127.0.0.1[127.0.0.1] said: 550 5.1.1"), bounced["text"]
    postfix_sent_line(postfix, pf_qid, "dora@mh.test")

    [report] = wait_marked(lambda: postfix.messages("bob"), mark)
    dsn = read_dsn(report)  # the same RFC 3464 checks as for mailhaven's own reports
    assert dsn.per_message["Reporting-MTA"] == f"dns; {PF_HOST}"
    [group] = dsn.per_recipient
    assert group["Final-Recipient"] == "rfc822; nosuch@mh.test"
    assert group["Action"] == "failed"
    assert group["Status"] == "5.1.1"
    assert group["Remote-MTA"] == "dns; 127.0.0.1"
    assert "User unknown" in group["Diagnostic-Code"]
