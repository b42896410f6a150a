"""Maildir++ quota: the maildirsize file as Dovecot reads and writes it, and its repair."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mailhaven.mailbox import quota
from mailhaven.mailbox.maildir import UniqueNames, deliver, ensure_maildir
from mailhaven.mailbox.quota import Limit, QuotaRules, Usage

NAMES = UniqueNames("host.example")


def store(maildir: Path, body: bytes) -> Path:
    return deliver(maildir, [body], names=NAMES)


@pytest.fixture
def box(tmp_path: Path) -> Path:
    path = tmp_path / "alice"
    ensure_maildir(path)
    return path


@pytest.mark.parametrize(
    ("limit", "header"),
    [
        (Limit(1000, 0), "1000S"),
        (Limit(1000, 50), "1000S,50C"),
        (Limit(0, 50), "50C"),
        (Limit(0, 0), "0S"),  # Dovecot writes 0S, never an empty line
    ],
)
def test_header_is_dovecots(limit: Limit, header: str) -> None:
    assert limit.header() == header
    assert quota.parse_header(header) == limit


@pytest.mark.parametrize("bad", ["", "S", "12X", "-5S", "1S,,2C", "abc"])
def test_bad_headers(bad: str) -> None:
    assert quota.parse_header(bad) is None


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("1G", Limit(1024**3, 0)),
        ("500M", Limit(500 * 1024**2, 0)),
        ("100k", Limit(102400, 0)),
        ("5120", Limit(5120 * 1024, 0)),
        ("512B", Limit(512, 0)),
        ("2kB", Limit(2048, 0)),
        ("storage=2G", Limit(2 * 1024**3, 0)),
        ("storage=1M messages=10", Limit(1024**2, 10)),
        ("messages=3", Limit(0, 3)),
        ("", Limit()),
        ("none", Limit()),
        ("0", Limit()),
    ],
)
def test_rules(text: str, limit: Limit) -> None:
    assert quota.parse_rule(text) == limit


@pytest.mark.parametrize("bad", ["1X", "storage=", "bytes=5", "-1G", "messages=many"])
def test_bad_rules(bad: str) -> None:
    with pytest.raises(ValueError):
        quota.parse_rule(bad)


def test_rules_pick_user_then_domain_then_default() -> None:
    rules = QuotaRules.parse(
        "1M", {"A.example": "2M"}, {"alice": "3M", "bob@b.example": "4M"}
    )
    assert rules.enabled
    assert rules.limit_for("alice", "x.example").bytes == 3 * 1024**2
    assert rules.limit_for("bob", "b.example").bytes == 4 * 1024**2
    assert rules.limit_for("bob@b.example").bytes == 4 * 1024**2
    assert rules.limit_for("carol", "a.example").bytes == 2 * 1024**2
    assert rules.limit_for("carol@a.example").bytes == 2 * 1024**2
    assert rules.limit_for("carol", None).bytes == 1024**2
    assert rules.limit_for("alice@b.example").bytes == 3 * 1024**2  # bare key: every domain
    assert rules.limit_for("bob@c.example").bytes == 1024**2  # bob@b.example only
    assert not QuotaRules.parse("", {}, {}).enabled


def test_fits_counts_the_new_message() -> None:
    limit = Limit(100, 2)
    assert Usage(40, 0).fits(limit, 60)
    assert not Usage(41, 0).fits(limit, 60)
    assert not Usage(0, 2).fits(limit, 1)
    assert Usage(10**12, 10**6).fits(Limit(), 10**9)


def test_recalculate_counts_inbox_and_folders(box: Path) -> None:
    store(box, b"Subject: a\r\n\r\none\r\n")
    ensure_maildir(box / ".lists")
    store(box / ".lists", b"Subject: b\r\n\r\ntwo two\r\n")
    # a file without S= in its name counts with its stat size (and cur/ counts too)
    (box / "cur" / "123.noname:2,S").write_bytes(b"x" * 7)
    limit = Limit(10_000, 0)
    used = quota.recalculate(box, limit)
    assert used == Usage(len(b"Subject: a\n\none\n") + len(b"Subject: b\n\ntwo two\n") + 7, 3)
    assert (box / "maildirsize").read_text() == f"10000S\n{used.bytes} 3\n"
    assert quota.read(box, limit) == used
    assert not [p for p in box.iterdir() if p.name.endswith(".tmp")]


def test_update_appends_deltas_and_usage_follows(box: Path) -> None:
    limit = Limit(10_000, 0)
    assert quota.usage(box, limit) == Usage(0, 0)  # creates the file
    quota.update(box, limit, 300, 1)
    quota.update(box, limit, 200, 1)
    quota.release(box, 300, 1)
    assert (box / "maildirsize").read_text() == "10000S\n0 0\n300 1\n200 1\n-300 -1\n"
    assert quota.read(box, limit) == Usage(200, 1)


def test_no_limit_no_file(box: Path) -> None:
    quota.update(box, Limit(), 300, 1)
    quota.release(box, 300, 1)
    assert not (box / "maildirsize").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"garbage\n",
        b"10000S\nnot numbers\n",
        b"10000S\n100 1\n\x00\x00\n",
        b"10000S\n100 1\n-500 -3\n",  # negative total
        b"10000S\n" + b"1 1\n" * 2000,  # 5120 bytes or more
        b"\xff\xfe\n",
        b"99S\n100 1\n",  # another limit than the configured one
        b"10000S\n",  # no usage line
        b"",
    ],
)
def test_corrupt_file_is_recalculated(box: Path, content: bytes) -> None:
    body = store(box, b"Subject: x\r\n\r\nbody\r\n")
    (box / "maildirsize").write_bytes(content)
    limit = Limit(10_000, 0)
    assert quota.read(box, limit) is None
    truth = Usage(body.stat().st_size, 1)
    assert quota.usage(box, limit) == truth
    assert (box / "maildirsize").read_text() == f"10000S\n{truth.bytes} 1\n"
    # and an update on a corrupt file recalculates instead of appending to garbage
    (box / "maildirsize").write_bytes(content)
    quota.update(box, limit, 5, 1)
    assert quota.read(box, limit) == truth  # the recalculation already saw the file


def test_unfinished_last_line_is_ignored(box: Path) -> None:
    (box / "maildirsize").write_bytes(b"10000S\n100 1\n50 ")
    assert quota.read(box, Limit(10_000, 0)) == Usage(100, 1)


def test_over_quota_is_believed_only_when_fresh_and_short(box: Path) -> None:
    limit = Limit(100, 0)
    (box / "maildirsize").write_bytes(b"100S\n500 1\n")
    assert quota.read(box, limit) == Usage(500, 1)  # fresh, one line: trusted
    (box / "maildirsize").write_bytes(b"100S\n400 1\n100 1\n")
    assert quota.read(box, limit) is None  # several lines: recalculated (Dovecot)
    (box / "maildirsize").write_bytes(b"100S\n500 1\n")
    old = time.time() - quota.STALE_AFTER - 60
    os.utime(box / "maildirsize", (old, old))
    assert quota.read(box, limit) is None  # stale: recalculated
    assert quota.usage(box, limit) == Usage(0, 0)


def test_missing_maildir_reads_as_unknown(tmp_path: Path) -> None:
    assert quota.read(tmp_path / "nobody", Limit(1, 0)) is None
    assert quota.measure(tmp_path / "nobody") == Usage(0, 0)


def test_recalculated_file_and_junk_folder_get_the_mail_owners_modes(box: Path) -> None:
    from mailhaven.mailbox import folders
    from mailhaven.mailbox.owner import MailOwner

    owner = MailOwner(file_mode=0o660, dir_mode=0o770)
    quota.recalculate(box, Limit(1000, 0), owner)
    assert (box / "maildirsize").stat().st_mode & 0o777 == 0o660
    folders.prepare_folder(box, box / ".Junk", owner)
    assert (box / ".Junk").stat().st_mode & 0o777 == 0o770
    assert (box / ".Junk" / "maildirfolder").stat().st_mode & 0o777 == 0o660
    assert (box / "subscriptions").stat().st_mode & 0o777 == 0o660
