"""The local agent with quotas and folders: defer when full, count what is stored."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from mailhaven.delivery.base import DeliveryRequest
from mailhaven.delivery.local import LocalAgent
from mailhaven.mailbox import quota
from mailhaven.mailbox.folders import FolderRules
from mailhaven.mailbox.maildir import ensure_maildir, list_messages, mailbox_path
from mailhaven.mailbox.quota import Limit, QuotaRules, Usage
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.routing.route import Route

#: The mailbox routing names for alice@a.example (and its path: `mailbox_path`).
ALICE, BOB = "alice@a.example", "bob@a.example"
BODY = b"Subject: test\r\n\r\n" + b"x" * 1000 + b"\r\n"


def request(user: str, rcpt: str, *, extra: dict[str, str] | None = None) -> DeliveryRequest:
    env = Envelope(sender="s@remote.example", recipients=(RecipientSpec(rcpt),),
                   extra=extra or {})

    def open_message() -> BinaryIO:
        return io.BytesIO(BODY)

    return DeliveryRequest("4QID", env, (rcpt,), Route("local", user), open_message, len(BODY))


def agent(root: Path, rule: str = "3000B", delimiter: str = "+") -> LocalAgent:
    rules = QuotaRules.parse(rule, {}, {})
    return LocalAgent(root, "mx.example", quotas=lambda: rules,
                      folder_rules=lambda: FolderRules(True, delimiter, "Junk"))


async def test_deliveries_count_until_full_then_defer(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    a = agent(mail)
    codes = []
    for _ in range(4):
        result = await a.deliver(request(ALICE, "alice@a.example"))
        codes.append(result.replies["alice@a.example"].code)
    assert codes == [250, 250, 452, 452]
    full = (await a.deliver(request(ALICE, "alice@a.example"))).replies["alice@a.example"]
    assert full.enhanced == "4.2.2" and "mailbox full" in full.text
    box = mailbox_path(mail, ALICE)
    stored = list_messages(box)
    assert len(stored) == 2
    assert quota.read(box, Limit(3000, 0)) == Usage(sum(m.size for m in stored), 2)
    assert not list((box / "tmp").iterdir())


async def test_message_count_limit(tmp_path: Path) -> None:
    a = agent(tmp_path, "messages=1")
    assert (await a.deliver(request(BOB, "bob@a.example"))).replies["bob@a.example"].code == 250
    assert (await a.deliver(request(BOB, "bob@a.example"))).replies["bob@a.example"].code == 452


async def test_corrupt_maildirsize_is_recalculated_at_delivery(tmp_path: Path) -> None:
    a = agent(tmp_path, "1M")
    await a.deliver(request(ALICE, "alice@a.example"))
    box = mailbox_path(tmp_path, ALICE)
    (box / "maildirsize").write_bytes(b"\x00garbage\n-99999999 x\n")
    assert (await a.deliver(request(ALICE, "alice@a.example"))).replies["alice@a.example"].code == 250
    assert quota.read(box, Limit(1024**2, 0)) == Usage(sum(m.size for m in list_messages(box)), 2)


async def test_wrongly_full_file_is_not_believed_when_it_has_several_lines(
    tmp_path: Path,
) -> None:
    a = agent(tmp_path, "3000B")
    box = mailbox_path(tmp_path, ALICE)
    ensure_maildir(box)
    (box / "maildirsize").write_bytes(b"3000S\n2000 1\n2000 1\n")  # says 4000: over
    assert (await a.deliver(request(ALICE, "alice@a.example"))).replies["alice@a.example"].code == 250


async def test_plus_address_and_junk_folders(tmp_path: Path) -> None:
    a = agent(tmp_path, "")
    box = mailbox_path(tmp_path, ALICE)
    ensure_maildir(box / ".lists")
    await a.deliver(request(ALICE, "alice+lists@a.example"))
    await a.deliver(request(ALICE, "alice+unknown@a.example"))
    await a.deliver(request(ALICE, "alice+lists@a.example", extra={"spam": "yes"}))
    assert len(list_messages(box / ".lists")) == 1
    assert len(list_messages(box)) == 1
    assert len(list_messages(box / ".Junk")) == 1
    assert (box / ".Junk" / "maildirfolder").exists()
    assert not (box / "maildirsize").exists()  # no quota configured: no file


async def test_folders_count_towards_the_quota(tmp_path: Path) -> None:
    a = agent(tmp_path, "3000B")
    box = mailbox_path(tmp_path, ALICE)
    ensure_maildir(box / ".lists")
    assert (await a.deliver(request(ALICE, "alice+lists@a.example"))).replies[
        "alice+lists@a.example"].code == 250
    assert (await a.deliver(request(ALICE, "alice@a.example"))).replies["alice@a.example"].code == 250
    assert (await a.deliver(request(ALICE, "alice@a.example"))).replies["alice@a.example"].code == 452
