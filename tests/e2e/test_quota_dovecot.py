"""Dovecot's quota plugin and mailhaven agree on the same maildirsize (Maildir++ quota).

mailhaven's local agent delivers into a Maildir that a private Dovecot also serves; `doveadm
quota get` must report what mailhaven wrote, Dovecot's recalculation must give the numbers
mailhaven reads, and a corrupt file is recalculated to the same truth by either side.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import BinaryIO

from tests.support.dovecot_lmtp import dovecot_store

from mailhaven.delivery.base import DeliveryRequest
from mailhaven.delivery.local import LocalAgent
from mailhaven.mailbox import quota
from mailhaven.mailbox.quota import Limit, QuotaRules, Usage
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.routing.route import Route

RULE = "20"  # kilobytes, in both configurations: the same words mean the same limit
LIMIT = Limit(20 * 1024, 0)


def kib(size: int) -> int:
    """`doveadm quota get` shows kilobytes rounded up; `DovecotStore.quota` multiplies back."""
    return -(-size // 1024) * 1024


def request(body: bytes) -> DeliveryRequest:
    env = Envelope(sender="s@remote.example", recipients=(RecipientSpec("alice@store.example"),))

    def open_message() -> BinaryIO:
        return io.BytesIO(body)

    return DeliveryRequest("4QID", env, ("alice@store.example",), Route("local", "alice@store.example"),
                           open_message, len(body))


async def test_dovecot_reads_our_maildirsize_and_we_read_its(tmp_path: Path) -> None:
    with dovecot_store(tmp_path, quota_rule=RULE) as store:
        rules = QuotaRules.parse(RULE, {}, {})
        agent = LocalAgent(store.mail, "mx.example", quotas=lambda: rules)
        codes = []
        for n in range(8):
            body = b"Subject: %d\r\n\r\n" % n + b"y" * 4000 + b"\r\n"
            codes.append((await agent.deliver(request(body))).replies["alice@store.example"].code)
        assert codes == [250] * 5 + [452] * 3  # 5 x ~4 KB fit in 20 KB, the 6th does not
        box = store.maildir("alice")
        ours = quota.read(box, LIMIT)
        assert ours is not None and ours.messages == 5
        assert (box / "maildirsize").read_text().splitlines()[0] == "20480S"
        store.give_to_mail_user(store.mail)
        # Dovecot reports kilobytes, rounded up
        assert store.quota("alice") == (kib(ours.bytes), 5)
        # Dovecot's own recalculation comes to the same numbers we read
        store.doveadm("quota", "recalc", "-u", "alice")
        assert quota.read(box, LIMIT) == ours
        assert quota.measure(box) == ours


async def test_corrupt_file_recalculated_to_what_dovecot_counts(tmp_path: Path) -> None:
    with dovecot_store(tmp_path, quota_rule=RULE) as store:
        rules = QuotaRules.parse(RULE, {}, {})
        agent = LocalAgent(store.mail, "mx.example", quotas=lambda: rules)
        for n in range(3):
            await agent.deliver(request(b"Subject: %d\r\n\r\nhello\r\n" % n))
        box = store.maildir("alice")
        (box / "maildirsize").write_bytes(b"20480S\n\x00\x00garbage -1\n")
        truth = quota.usage(box, LIMIT)  # we recalculate
        assert truth.messages == 3
        (box / "maildirsize").write_bytes(b"20480S\n999999 x\n")
        store.give_to_mail_user(store.mail)
        assert store.quota("alice") == (kib(truth.bytes), 3)  # Dovecot too
        assert quota.read(box, LIMIT) == truth  # and the file it rewrote reads the same


async def test_dovecot_deletions_free_quota_for_us(tmp_path: Path) -> None:
    with dovecot_store(tmp_path, quota_rule=RULE) as store:
        rules = QuotaRules.parse(RULE, {}, {})
        agent = LocalAgent(store.mail, "mx.example", quotas=lambda: rules)
        for n in range(5):
            body = b"Subject: %d\r\n\r\n" % n + b"y" * 4000 + b"\r\n"
            await agent.deliver(request(body))
        box = store.maildir("alice")
        assert (await agent.deliver(request(b"Subject: x\r\n\r\n" + b"z" * 4000))).replies[
            "alice@store.example"].code == 452
        store.give_to_mail_user(store.mail)
        store.doveadm("expunge", "-u", "alice", "mailbox", "INBOX", "header", "Subject", "0")
        shutil.chown(box / "maildirsize", "root", "root")
        used = quota.read(box, LIMIT)
        assert used is not None and used.messages == 4  # Dovecot appended its delta
        assert used == quota.measure(box) == Usage(used.bytes, 4)
        assert (await agent.deliver(request(b"Subject: x\r\n\r\n" + b"z" * 4000))).replies[
            "alice@store.example"].code == 250
