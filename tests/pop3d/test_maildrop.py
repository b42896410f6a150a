"""The POP3 view of a Maildir: snapshot, sizes, UIDL, locking and the UPDATE commit on disk."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from mailhaven.pop3d import maildrop as md

_seq = itertools.count(1)


def deliver(maildir: Path, body: bytes, *, when: int | None = None, name: str | None = None) -> Path:
    """Write a message into new/ as the delivery agent would (LF endings, `,S=` size)."""
    md.ensure_maildir(maildir)
    n = next(_seq)
    base = name or f"{when or 1700000000 + n}.M{n}P4242Q{n}.test.example"
    path = maildir / "new" / f"{base},S={len(body)}"
    path.write_bytes(body)
    return path


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_snapshot_orders_by_delivery_time_and_counts_crlf_octets(tmp_path: Path) -> None:
    deliver(tmp_path, b"B: 2\n\nsecond\n", when=1700000200)
    deliver(tmp_path, b"A: 1\r\n\r\nfirst, already CRLF\r\n", when=1700000100)
    messages = md.scan(tmp_path, md.SizeCache())
    assert [m.size for m in messages] == [len(b"A: 1\r\n\r\nfirst, already CRLF\r\n"), 16]
    assert messages[0].base.startswith("1700000100.")


def test_one_second_is_ordered_by_microseconds_as_numbers(tmp_path: Path) -> None:
    deliver(tmp_path, b"late\n", name="1700000000.M174847P1Q5.h")
    deliver(tmp_path, b"early\n", name="1700000000.M90292P1Q1.h")
    bases = [m.base for m in md.scan(tmp_path, md.SizeCache())]
    assert bases == ["1700000000.M90292P1Q1.h,S=6", "1700000000.M174847P1Q5.h,S=5"]


def test_w_field_is_trusted_and_dotfiles_skipped(tmp_path: Path) -> None:
    deliver(tmp_path, b"x\n")
    (tmp_path / "new" / "1700000000.M9P9Q9.h,S=5,W=77").write_bytes(b"abcd\n")
    (tmp_path / "new" / ".hidden").write_bytes(b"no")
    sizes = sorted(m.size for m in md.scan(tmp_path, md.SizeCache()))
    assert sizes == [3, 77]


def test_uidl_is_the_base_name_and_survives_flag_renames(tmp_path: Path) -> None:
    path = deliver(tmp_path, b"hello\n")
    before = md.scan(tmp_path, md.SizeCache())
    assert before[0].uid == path.name  # Dovecot's pop3_uidl_format=%f gives the same
    os.rename(path, tmp_path / "cur" / f"{path.name}:2,FS")
    after = md.scan(tmp_path, md.SizeCache())
    assert [m.uid for m in after] == [m.uid for m in before]
    assert after[0].subdir == "cur"


def test_uidl_stays_in_the_rfc_alphabet(tmp_path: Path) -> None:
    deliver(tmp_path, b"x\n", name="1700000000." + "h" * 80)
    deliver(tmp_path, b"y\n", name="1700000001.M1 with space")
    uids = [m.uid for m in md.scan(tmp_path, md.SizeCache())]
    assert all(1 <= len(u) <= md.MAX_UIDL and u.isprintable() and " " not in u for u in uids)
    assert len(set(uids)) == 2


def test_maildrop_bookkeeping() -> None:
    messages = [md.Message(f"u{i}", f"b{i}", "new", f"b{i}", 10 * i) for i in (1, 2, 3)]
    drop = md.Maildrop(Path("/nonexistent"), messages)
    assert drop.stat() == (3, 60)
    assert drop.delete(2) is None
    assert drop.delete(2) is md.Problem.DELETED
    assert drop.get(2) is md.Problem.DELETED
    assert drop.get(4) is md.Problem.NO_SUCH_MESSAGE and drop.get(0) is md.Problem.NO_SUCH_MESSAGE
    assert drop.stat() == (2, 40)
    drop.mark_seen(1)
    drop.mark_seen(2)
    assert [m.uid for m in drop.seen] == ["u1"]  # deleted messages are not flagged
    drop.reset()
    assert drop.stat() == (3, 60) and drop.deleted == []


def test_commit_deletes_marked_and_flags_retrieved(tmp_path: Path) -> None:
    first = deliver(tmp_path, b"one\n")
    second = deliver(tmp_path, b"two\n")
    third = deliver(tmp_path, b"three\n")
    drop = md.Maildrop(tmp_path, md.scan(tmp_path, md.SizeCache()))
    drop.delete(1)
    drop.mark_seen(2)
    late = deliver(tmp_path, b"arrived during the session\n")
    result = md.commit(drop)
    assert result == md.CommitResult(1, 5, ())
    assert names(tmp_path / "new") == sorted([third.name, late.name])
    assert names(tmp_path / "cur") == [f"{second.name}:2,S"]
    assert not first.exists()


def test_commit_finds_messages_renamed_by_another_reader(tmp_path: Path) -> None:
    a = deliver(tmp_path, b"a\n")
    b = deliver(tmp_path, b"b\n")
    drop = md.Maildrop(tmp_path, md.scan(tmp_path, md.SizeCache()))
    os.rename(a, tmp_path / "cur" / f"{a.name}:2,")  # an IMAP server saw it meanwhile
    os.rename(b, tmp_path / "cur" / f"{b.name}:2,F")
    drop.delete(1)
    drop.mark_seen(2)
    with md.open_message(tmp_path, drop.messages[1]) as f:  # type: ignore[union-attr]
        assert f.read() == b"b\n"
    md.commit(drop)
    assert names(tmp_path / "cur") == [f"{b.name}:2,FS"]


def test_commit_tolerates_already_deleted(tmp_path: Path) -> None:
    a = deliver(tmp_path, b"a\n")
    drop = md.Maildrop(tmp_path, md.scan(tmp_path, md.SizeCache()))
    drop.delete(1)
    a.unlink()
    assert md.commit(drop).deleted == 1
    assert md.open_message(tmp_path, drop.messages[0]) is None


def test_seen_name() -> None:
    assert md.seen_name("x,S=3") == "x,S=3:2,S"
    assert md.seen_name("x,S=3:2,") == "x,S=3:2,S"
    assert md.seen_name("x,S=3:2,TF") == "x,S=3:2,FST"
    assert md.seen_name("x,S=3:2,S") == "x,S=3:2,S"


def test_lock_is_exclusive_within_one_process(tmp_path: Path) -> None:
    md.ensure_maildir(tmp_path)
    first = md.MaildropLock.acquire(tmp_path)
    assert first is not None
    assert md.MaildropLock.acquire(tmp_path) is None
    first.release()
    again = md.MaildropLock.acquire(tmp_path)
    assert again is not None
    again.release()


def test_size_cache_avoids_rereading(tmp_path: Path) -> None:
    path = deliver(tmp_path, b"a\nb\n")
    cache = md.SizeCache()
    assert md.scan(tmp_path, cache)[0].size == 6
    path.write_bytes(b"a\nb\n\n\n")  # same name (same S=): the cache answers, no read
    assert md.scan(tmp_path, cache)[0].size == 6
    small = md.SizeCache(limit=2)
    for i in range(5):
        small.put(("d", str(i), 1), i)
    assert small.get(("d", "4", 1)) == 4 and small.get(("d", "0", 1)) is None


def test_commit_frees_quota(tmp_path: Path) -> None:
    from mailhaven.mailbox import quota

    deliver(tmp_path, b"one\n")
    deliver(tmp_path, b"three\n")
    limit = quota.Limit(1000, 0)
    assert quota.usage(tmp_path, limit) == quota.Usage(10, 2)
    drop = md.Maildrop(tmp_path, md.scan(tmp_path, md.SizeCache()))
    drop.delete(2)
    assert md.commit(drop).errors == ()
    assert quota.read(tmp_path, limit) == quota.Usage(4, 1)
    assert quota.measure(tmp_path) == quota.Usage(4, 1)


def test_commit_without_maildirsize_creates_none(tmp_path: Path) -> None:
    deliver(tmp_path, b"one\n")
    drop = md.Maildrop(tmp_path, md.scan(tmp_path, md.SizeCache()))
    drop.delete(1)
    md.commit(drop)
    assert not (tmp_path / "maildirsize").exists()
