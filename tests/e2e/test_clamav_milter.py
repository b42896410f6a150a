"""End to end: ClamAV (clamd + clamav-milter, Debian's) as a milter, with real SMTP clients.

ClamAV's signature databases come from the network (freshclam), which tests never reach, so
clamd loads one signature the test writes itself: the EICAR test file's MD5 hash
(`tests.support.clamav`). clamav-milter is configured as a sysadmin would: `OnInfected Reject`
with a `RejectMsg`, `OnFail Defer`, `AddHeader Replace`.

Shown: a message with the EICAR file attached (base64, as mail clients send it; plain or in a
zip) is refused at end of data with clamav-milter's `550 5.7.1 Virus found: <name>` and a
Postfix-shaped `milter-reject` log line, nothing is delivered, the session goes on, and swaks
sees the same; a clean message (and a 3 MiB clean attachment: many body chunks, each answered)
is delivered with clamav-milter's `X-Virus-Scanned` and `X-Virus-Status: Clean`, which replace
fields the sender forged; with clamd down clamav-milter's own OnFail (Defer) answers the first
header and the client gets `451` at once; with clamav-milter down `[checks.milter] default_action`
applies (tempfail: `451 4.7.1`, accept: delivered unscanned).

One scanner serves the module; the tests that stop clamd or clamav-milter start their own pair
(each starts in ~0.2 s with a one-signature database).
"""

from __future__ import annotations

import io
import random
import smtplib
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support import clamav
from tests.support.server import MailServer, behind_milter, merge

pytestmark = pytest.mark.e2e

REJECTED = f"5.7.1 Virus found: {clamav.VIRUS_NAME}"


def _skip_unless_installed() -> None:
    reason = clamav.skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def scanner() -> Iterator[clamav.ClamAV]:
    _skip_unless_installed()
    with clamav.ClamAV() as running:
        yield running


def message(mark: str, attachment: bytes | None = None, filename: str = "eicar.com") -> bytes:
    msg = EmailMessage()
    msg["From"] = "bob@example.com"
    msg["To"] = "alice@example.org"
    msg["Subject"] = f"report {mark}"
    msg["Date"] = "Fri, 04 Dec 2026 12:00:00 +0000"
    msg["Message-ID"] = f"<{uuid.uuid4()}@example.com>"
    msg.set_content(f"see attached\n{mark}\n")
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename=filename
        )
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def header_fields(data: bytes) -> dict[str, str]:
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    fields: dict[str, str] = {}
    for line in head.split("\n"):
        if line[:1] in (" ", "\t"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, value.strip())
    return fields


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


@pytest.mark.parametrize(
    ("attachment", "filename"),
    [(clamav.EICAR, "eicar.com"), (zipped("eicar.com", clamav.EICAR), "invoice.zip")],
    ids=["plain", "zipped"],
)
def test_eicar_attachment_is_rejected(
    milter_mx: MailServer, scanner: clamav.ClamAV, attachment: bytes, filename: str
) -> None:
    mark = uuid.uuid4().hex
    with smtplib.SMTP(milter_mx.host, milter_mx.smtp_port, timeout=60) as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(
                "bob@example.com", ["alice@example.org"], message(mark, attachment, filename)
            )
        assert (err.value.smtp_code, err.value.smtp_error.decode()) == (550, REJECTED)
        # the session goes on: the next (clean) message over it is accepted
        client.sendmail("bob@example.com", ["alice@example.org"], message(mark + "-clean"))
    milter_mx.wait_for_log(
        rf"\w+: milter-reject: END-OF-MESSAGE from \S+: {REJECTED.replace('.', chr(92) + '.')}; "
        r"from=<bob@example.com> to=<alice@example.org> proto=ESMTP"
    )
    milter_mx.wait_for_mark("alice", mark + "-clean", timeout=30)
    assert not any(mark.encode() + b"\n" in p.read_bytes() for p in milter_mx.messages("alice"))
    assert clamav.VIRUS_NAME in scanner.milter_log.read_text()


def test_clean_message_gets_the_scan_headers(milter_mx: MailServer) -> None:
    mark = uuid.uuid4().hex
    harmless = b"just a text file, not a virus\n" * 10
    with smtplib.SMTP(milter_mx.host, milter_mx.smtp_port, timeout=60) as client:
        client.sendmail(
            "bob@example.com", ["alice@example.org"], message(mark, harmless, "notes.txt")
        )
    fields = header_fields(milter_mx.wait_for_mark("alice", mark, timeout=30))
    assert fields["X-Virus-Scanned"].startswith("clamav-milter ")
    assert fields["X-Virus-Scanned"].endswith(f" at {clamav.REPORT_HOSTNAME}")
    assert fields["X-Virus-Status"] == "Clean"


def test_sender_written_scan_headers_are_replaced(milter_mx: MailServer) -> None:
    # AddHeader Replace: clamav-milter changes the first such field (SMFIR_CHGHEADER index 1)
    mark = uuid.uuid4().hex
    forged = message(mark).replace(
        b"\r\n\r\n", b"\r\nX-Virus-Scanned: forged\r\nX-Virus-Status: Infected (forged)\r\n\r\n", 1
    )
    with smtplib.SMTP(milter_mx.host, milter_mx.smtp_port, timeout=60) as client:
        client.sendmail("bob@example.com", ["alice@example.org"], forged)
    data = milter_mx.wait_for_mark("alice", mark, timeout=30)
    assert b"forged" not in data
    assert data.count(b"X-Virus-Status:") == 1 and data.count(b"X-Virus-Scanned:") == 1
    assert header_fields(data)["X-Virus-Status"] == "Clean"


def test_large_clean_message_is_scanned_whole(milter_mx: MailServer, scanner: clamav.ClamAV) -> None:
    # ~4 MiB of base64: dozens of body chunks, each answered by clamav-milter (libmilter)
    mark = uuid.uuid4().hex
    payload = random.Random(mark).randbytes(3 * 1024 * 1024)
    started = time.monotonic()
    with smtplib.SMTP(milter_mx.host, milter_mx.smtp_port, timeout=60) as client:
        client.sendmail(
            "bob@example.com", ["alice@example.org"], message(mark, payload, "photo.bin")
        )
    took = time.monotonic() - started
    data = milter_mx.wait_for_mark("alice", mark, timeout=30)
    assert header_fields(data)["X-Virus-Status"] == "Clean"
    assert len(data) > 4 * 1024 * 1024
    assert took < 30, took


def test_swaks_attachment_is_rejected(milter_mx: MailServer, swaks: str, tmp_path: Path) -> None:
    sample = tmp_path / "eicar.com"
    sample.write_bytes(clamav.EICAR)
    out = subprocess.run(
        [swaks, "--server", f"{milter_mx.host}:{milter_mx.smtp_port}", "--from", "bob@example.com",
         "--to", "alice@example.org", "--attach", f"@{sample}", "--timeout", "30"],
        capture_output=True, text=True, timeout=90, check=False,
    )
    assert f"<** 550 {REJECTED}" in out.stdout, out.stdout


def test_signature_is_what_sigtool_makes(tmp_path: Path) -> None:
    if not clamav.SIGTOOL.exists():
        pytest.skip(f"{clamav.SIGTOOL} is missing (clamav: scripts/install-test-deps)")
    sample = tmp_path / "eicar.com"
    sample.write_bytes(clamav.EICAR)
    out = subprocess.run(
        [str(clamav.SIGTOOL), "--md5", str(sample)],
        capture_output=True, text=True, timeout=30, check=True,
    )
    made = out.stdout.strip().rsplit(":", 1)[0]
    assert clamav.hdb_line(clamav.EICAR, "x").rsplit(":", 1)[0] == made


def test_clamd_down_is_clamav_milters_on_fail(mail_server: ServerFactory) -> None:
    _skip_unless_installed()
    with clamav.ClamAV() as scanner:
        server = mail_server(settings=behind_milter(scanner.spec))
        scanner.stop_clamd()
        started = time.monotonic()
        with smtplib.SMTP(server.host, server.smtp_port, timeout=60) as client, pytest.raises(
            smtplib.SMTPDataError
        ) as err:
            client.sendmail("bob@example.com", ["alice@example.org"], message("x", clamav.EICAR))
        took = time.monotonic() - started
        # clamav-milter answers the first header with SMFIS_TEMPFAIL and ignores the rest of
        # the message: the reply must come at once, not after the content timeout (300 s)
        assert (err.value.smtp_code, err.value.smtp_error) == (
            451, b"4.7.1 Service unavailable - try again later"
        )
        assert took < 20, took
        # logged before it answers (its "No clamd server appears to be available" comes later,
        # from another thread)
        assert "Failed to initiate streaming" in scanner.milter_log.read_text()
    server.wait_for_log(r"milter-reject: END-OF-MESSAGE from \S+: 4\.7\.1 Service unavailable")


@pytest.mark.parametrize("action", ["tempfail", "accept"])
def test_milter_down_gets_the_default_action(mail_server: ServerFactory, action: str) -> None:
    _skip_unless_installed()
    with clamav.ClamAV() as scanner:
        server = mail_server(
            settings=merge(behind_milter(scanner.spec), {"checks": {"milter": {"default_action": action}}})
        )
        mark = uuid.uuid4().hex
        with smtplib.SMTP(server.host, server.smtp_port, timeout=60) as client:
            client.sendmail("bob@example.com", ["alice@example.org"], message(mark))
        assert "X-Virus-Scanned" in header_fields(server.wait_for_mark("alice", mark, timeout=30))
        scanner.stop_milter()
        with smtplib.SMTP(server.host, server.smtp_port, timeout=60) as client:
            client.ehlo()
            code, text = client.mail("bob@example.com")
            if action == "tempfail":
                assert (code, text) == (451, b"4.7.1 Service unavailable - try again later")
            else:
                assert code == 250, text
                client.rcpt("alice@example.org")
                code, text = client.data(message(mark + "-unscanned"))
                assert code == 250, text
    server.wait_for_log(rf"milter {scanner.spec}: connect failed")
    if action == "accept":
        data = server.wait_for_mark("alice", mark + "-unscanned", timeout=30)
        assert "X-Virus-Scanned" not in header_fields(data)
