"""Maildir writer and reader: naming, durability order, CRLF handling, readability by others."""

from __future__ import annotations

import errno
import mailbox
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailhaven.mailbox import maildir as md
from mailhaven.mailbox.maildir import (
    UniqueNames,
    deliver,
    escape_hostname,
    list_messages,
    mailbox_path,
    parse_name,
)

MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nline 1\r\nline 2\r\n"
EXPECTED = b"From: a@example.org\nTo: b@example.org\nSubject: hi\n\nline 1\nline 2\n"


@pytest.fixture(params=["unnamed", "named"])
def tmp_file(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a copy starts in `tmp/`: an unnamed `O_TMPFILE` file (where this system has
    one) linked into `new/`, and a named file renamed there."""
    if request.param == "unnamed" and not md._unnamed.usable:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(md._unnamed, "usable", request.param == "unnamed")
    return str(request.param)


def names(host: str = "mx.example.org") -> UniqueNames:
    return UniqueNames(host)


def only_file(directory: Path) -> Path:
    (entry,) = list(directory.iterdir())
    return entry


# --- names ----------------------------------------------------------------------------------


def test_escape_hostname_like_dovecot() -> None:
    assert escape_hostname("a/b:c.example") == "a\\057b\\072c.example"


def test_name_shape_and_suffix(tmp_path: Path) -> None:
    clock = iter([1_700_000_000_123_456_789]).__next__
    path = deliver(tmp_path / "u", [MESSAGE], names=UniqueNames("h:1", clock=clock))
    pid = os.getpid()
    assert path.parent == tmp_path / "u" / "new"
    size, vsize = len(EXPECTED), len(MESSAGE)
    assert path.name == f"1700000000.M123456P{pid}Q1.h\\0721,S={size},W={vsize}"


def test_names_unique_under_many_quick_deliveries(tmp_path: Path, tmp_file: str) -> None:
    frozen = UniqueNames("h", clock=lambda: 1_700_000_000_000_000_000)  # same microsecond
    paths = {deliver(tmp_path / "u", [b"x\n"], names=frozen) for _ in range(300)}
    assert len(paths) == 300
    assert len(os.listdir(tmp_path / "u" / "new")) == 300
    assert os.listdir(tmp_path / "u" / "tmp") == []


def test_name_collision_is_retried(tmp_path: Path, tmp_file: str) -> None:
    clock = lambda: 1_700_000_000_000_000_000  # noqa: E731
    first = UniqueNames("h", clock=clock)
    box = tmp_path / "u"
    md.ensure_maildir(box)
    if tmp_file == "named":  # taken in tmp/ (a crashed delivery's file)
        (box / "tmp" / first.next()).write_bytes(b"stale")  # takes Q1
    else:  # taken in new/, where the unnamed file gets its name
        (box / "new" / (first.next() + ",S=2,W=3")).write_bytes(b"y\n")
    again = UniqueNames("h", clock=clock)  # restarts at Q1
    path = deliver(box, [b"x\n"], names=again)
    assert "Q2." in path.name


# --- content --------------------------------------------------------------------------------


def test_size_field_is_file_size_and_content_is_lf(tmp_path: Path) -> None:
    path = deliver(tmp_path / "u", [MESSAGE], prepend=b"Return-Path: <a@b>\r\n", names=names())
    data = path.read_bytes()
    assert data == b"Return-Path: <a@b>\n" + EXPECTED
    _, size, vsize, _ = parse_name(path.name)
    assert size == path.stat().st_size == len(data)
    assert vsize == len(data.replace(b"\n", b"\r\n"))


@pytest.mark.parametrize(
    "chunks",
    [
        [MESSAGE],
        [MESSAGE[i : i + 1] for i in range(len(MESSAGE))],
        [b"From: a\r", b"\nSubject: x\r", b"\n\r", b"\nbody\r", b"\n"],
        [b"", b"From: a\r", b"", b"\n\r\n", b"", b"body\r\n"],
    ],
    ids=["whole", "bytewise", "cr-split", "empty-chunks"],
)
def test_crlf_to_lf_independent_of_chunking(tmp_path: Path, chunks: list[bytes]) -> None:
    path = deliver(tmp_path / "u", chunks, names=names())
    assert path.read_bytes() == b"".join(chunks).replace(b"\r\n", b"\n")


def test_bare_cr_and_trailing_cr_are_kept(tmp_path: Path) -> None:
    chunks = [b"a\rb\r", b"\r", b"\nc\r"]
    path = deliver(tmp_path / "u", chunks, names=names())
    assert path.read_bytes() == b"a\rb\r\nc\r"
    assert parse_name(path.name)[1] == len(b"a\rb\r\nc\r")


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "chunks"])
def test_a_message_known_free_of_bare_crs_is_stored_the_same(tmp_path: Path, whole: bool) -> None:
    """`no_bare_cr` changes how, not what: the caller's promise covers the message; the
    prepended lines are still checked (here one carries a bare CR, which stays)."""
    prepend = b"X-Odd: a\rb\r\n"
    chunks = [MESSAGE[:7], MESSAGE[7:8], MESSAGE[8:]]
    stored = [
        deliver(tmp_path / f"u{clean}", MESSAGE if whole else iter(chunks), prepend=prepend,
                names=names(), no_bare_cr=clean).read_bytes()
        for clean in (False, True)
    ]
    assert stored[0] == stored[1] == b"X-Odd: a\rb\n" + EXPECTED


def test_whole_message_with_only_crlf_pairs_is_stored_with_lf(tmp_path: Path) -> None:
    path = deliver(tmp_path / "u", b"From: a\r\n\r\nbody\r\n", prepend=b"X: y\n", names=names())
    assert path.read_bytes() == b"X: y\nFrom: a\n\nbody\n"
    assert parse_name(path.name)[1:3] == (19, 19 + 4)


def test_stream_is_not_joined_in_memory(tmp_path: Path) -> None:
    """A generator is consumed lazily: 64 MiB never exists as one bytes object."""
    block = b"x" * 1023 + b"\n"

    def body() -> Iterator[bytes]:
        for _ in range(64 * 1024):
            yield block

    path = deliver(tmp_path / "u", body(), names=names())
    assert path.stat().st_size == 64 * 1024 * 1024


# --- durability -----------------------------------------------------------------------------


def test_fsync_of_file_before_its_name_in_new_and_of_new_dir_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_file: str
) -> None:
    events: list[str] = []
    real_fsync, real_rename, real_link = os.fsync, os.rename, os.link

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        events.append("fsync-dir" if stat.S_ISDIR(mode) else "fsync-file")
        real_fsync(fd)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("name")
        real_rename(src, dst)

    def link(*args: Any, **kwargs: Any) -> None:
        events.append("name")
        real_link(*args, **kwargs)

    box = tmp_path / "u"
    md.ensure_maildir(box)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    deliver(box, [MESSAGE], names=names())
    deliver(box, MESSAGE, names=names())
    assert events == ["fsync-file", "name", "fsync-dir"] * 2
    assert [p.read_bytes() for p in (box / "new").iterdir()] == [EXPECTED] * 2
    assert os.listdir(box / "tmp") == []


@pytest.mark.parametrize("whole", [True, False], ids=["bytes", "chunks"])
def test_failure_between_fsync_and_naming_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: bool, tmp_file: str
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "rename", broken)
    monkeypatch.setattr(os, "link", broken)
    box = tmp_path / "u"
    with pytest.raises(OSError):
        deliver(box, MESSAGE if whole else [MESSAGE], names=names())
    assert os.listdir(box / "new") == []
    assert os.listdir(box / "tmp") == []


@pytest.mark.parametrize("whole", [True, False], ids=["bytes", "chunks"])
def test_failed_file_fsync_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: bool, tmp_file: str
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    box = tmp_path / "u"
    md.ensure_maildir(box)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        deliver(box, MESSAGE if whole else [MESSAGE], names=names())
    assert os.listdir(box / "new") == []
    assert os.listdir(box / "tmp") == []


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data[:7]))  # as a signal or a full quota can make it

    monkeypatch.setattr(os, "write", short_write)
    path = deliver(tmp_path / "u", MESSAGE, names=names())
    assert path.read_bytes() == EXPECTED
    path = deliver(tmp_path / "u", [MESSAGE[:20], MESSAGE[20:]], names=names())
    assert path.read_bytes() == EXPECTED


def test_whole_message_and_chunks_store_the_same(tmp_path: Path) -> None:
    body = b"a\rb\r\n" * 10 + b"c\r"
    whole = deliver(tmp_path / "u", body, prepend=b"Delivered-To: x\r", names=names())
    chunked = deliver(tmp_path / "u", [body[:5], body[5:]], prepend=b"Delivered-To: x\r",
                      names=names())
    assert whole.read_bytes() == chunked.read_bytes()
    assert parse_name(whole.name)[1:3] == parse_name(chunked.name)[1:3]


def test_name_in_a_forked_child_has_its_pid(tmp_path: Path) -> None:
    unique = names()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its name and leave at once
        try:
            os.write(write, unique.next().encode())
        finally:
            os._exit(0)
    os.close(write)
    child_name = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert f"P{pid}Q" in child_name
    assert f"P{os.getpid()}Q" in unique.next()


def test_without_o_tmpfile_the_copy_takes_a_name_in_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel or file system without O_TMPFILE answers EOPNOTSUPP (or EISDIR, on old
    kernels): that copy and every later one are written under a name in `tmp/` instead."""
    real_open = os.open
    seen: list[str] = []

    def open_(path: str, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if flags & md._O_TMPFILE == md._O_TMPFILE:
            seen.append("unnamed")
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        if flags & os.O_CREAT:
            seen.append("named")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(md._unnamed, "usable", True)
    monkeypatch.setattr(os, "open", open_)
    box = tmp_path / "u"
    first = deliver(box, MESSAGE, names=names())
    second = deliver(box, MESSAGE, names=names())
    assert seen == ["unnamed", "named", "named"] and not md._unnamed.usable
    assert first.read_bytes() == second.read_bytes() == EXPECTED
    assert os.listdir(box / "tmp") == []


def test_when_proc_cannot_name_an_unnamed_copy_it_fails_and_the_next_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not md._unnamed.usable:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(md._unnamed, "usable", True)  # (restored after the test)

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    box = tmp_path / "u"
    with monkeypatch.context() as patched:
        patched.setattr(os, "link", refused)
        with pytest.raises(PermissionError):
            deliver(box, MESSAGE, names=names())
    assert not md._unnamed.usable and os.listdir(box / "new") == []
    assert deliver(box, MESSAGE, names=names()).read_bytes() == EXPECTED
    assert os.listdir(box / "tmp") == []


def test_failure_while_streaming_leaves_nothing(tmp_path: Path, tmp_file: str) -> None:
    def body() -> Iterator[bytes]:
        yield b"Subject: x\r\n\r\n"
        raise RuntimeError("spool read failed")

    box = tmp_path / "u"
    with pytest.raises(RuntimeError):
        deliver(box, body(), names=names())
    assert os.listdir(box / "new") == []
    assert os.listdir(box / "tmp") == []


def test_failed_dir_fsync_withdraws_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_file: str
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "I/O error")
        real_fsync(fd)

    box = tmp_path / "u"
    md.ensure_maildir(box)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        deliver(box, [MESSAGE], names=names())
    assert os.listdir(box / "new") == []
    assert os.listdir(box / "tmp") == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o277])
def test_default_owner_file_mode_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """The owner check is skipped only when the umask keeps 0600 whole; one that takes the
    owner's write bit (0277) is repaired by the owner's fchmod, as before."""
    from mailhaven.mailbox.owner import MailOwner

    old = os.umask(umask)
    md._umask_keeps_mode.cache_clear()
    try:
        path = deliver(tmp_path / "u", MESSAGE, names=names(), owner=MailOwner())
    finally:
        os.umask(old)
        md._umask_keeps_mode.cache_clear()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_directories_created_private(tmp_path: Path) -> None:
    box = mailbox_path(tmp_path / "mail", "alice@example.org")
    deliver(box, [MESSAGE], names=names())
    for d in (box.parent, box, box / "tmp", box / "new", box / "cur"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (path,) = (box / "new").iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- interoperability and reading -----------------------------------------------------------


def test_python_mailbox_reads_it(tmp_path: Path) -> None:
    box = tmp_path / "u"
    deliver(box, [MESSAGE[:10], MESSAGE[10:]], prepend=b"Delivered-To: b@x\n", names=names())
    mb = mailbox.Maildir(box, create=False)
    (key,) = mb.keys()
    assert mb.get_bytes(key) == b"Delivered-To: b@x\n" + EXPECTED
    assert mb[key]["Subject"] == "hi"


@pytest.mark.parametrize(
    "user",
    ["", ".", "..", ".hidden", "a/b", "Alice", "a b", "a\0b", "a%b", "a!b", "alice",
     "a@b/c", "a@..", "a@.b", "a/../b@x", "a@B", "Alice@b", "a@b@c", "a\0@b", "@b", "a@",
     "a" * 65 + "@b", "a@" + "b" * 64, "a@b..c", "..@b"],
)
def test_mailbox_path_refuses_unsafe_names(tmp_path: Path, user: str) -> None:
    with pytest.raises(ValueError):
        mailbox_path(tmp_path, user)


def test_mailbox_path(tmp_path: Path) -> None:
    assert mailbox_path(tmp_path, "alice.smith@a.example") == tmp_path / "a.example" / "alice.smith"
    # names that are directory names inside a Maildir are users one level further down
    assert mailbox_path(tmp_path, "new@a.example") == tmp_path / "a.example" / "new"


def test_parse_name() -> None:
    assert parse_name("1.M2P3Q4.h,S=10,W=12:2,RS") == ("1.M2P3Q4.h,S=10,W=12", 10, 12, "RS")
    assert parse_name("1.M2P3.h") == ("1.M2P3.h", None, None, "")


def test_list_messages_new_and_cur(tmp_path: Path) -> None:
    box = tmp_path / "u"
    assert list_messages(box) == []
    n = UniqueNames("h", clock=iter([1_000_000_000 * 10**9, 2_000_000_000 * 10**9]).__next__)
    first = deliver(box, [b"one\r\n"], names=n)
    second = deliver(box, [b"two two\r\n"], names=n)
    seen = second.parent.parent / "cur" / (second.name + ":2,S")
    os.rename(second, seen)  # a reader marked it seen
    (box / "new" / ".dotfile").write_bytes(b"")
    (box / "cur" / "foreign-name").write_bytes(b"abc")
    got = list_messages(box)
    assert [m.key for m in got] == [first.name, second.name, "foreign-name"]
    assert [m.subdir for m in got] == ["new", "cur", "cur"]
    assert [m.size for m in got] == [4, 8, 3]
    assert [m.vsize for m in got] == [5, 9, None]
    assert got[1].flags == "S"
    assert got[1].path.read_bytes() == b"two two\n"


def test_a_maildir_removed_after_a_delivery_is_made_again(tmp_path: Path) -> None:
    """Deliveries skip the mkdir attempts for a Maildir this process made sure of; if it was
    removed meanwhile, the next delivery makes it again instead of failing."""
    import shutil

    from mailhaven.mailbox.maildir import UniqueNames, deliver

    box = tmp_path / "example.org" / "alice"
    names = UniqueNames("mx.test")
    first = deliver(box, [b"Subject: 1\r\n\r\nx\r\n"], names=names)
    assert first.parent == box / "new"
    shutil.rmtree(box)
    second = deliver(box, [b"Subject: 2\r\n\r\nx\r\n"], names=names)
    assert second.exists() and (box / "cur").is_dir()


def test_concurrent_deliveries_share_the_directory_fsync(tmp_path: Path) -> None:
    """Group commit: each caller returns only after an fsync that began after its own call,
    and callers arriving during an fsync share the next one instead of one each."""
    import threading
    import time as _time

    from mailhaven.mailbox.maildir import DirectorySync

    started: list[float] = []
    lock = threading.Lock()

    def slow_fsync(path: Path) -> None:
        with lock:
            started.append(_time.monotonic())
        _time.sleep(0.05)

    sync = DirectorySync(slow_fsync)
    calls: list[tuple[float, float]] = []

    def one() -> None:
        t0 = _time.monotonic()
        sync.sync(tmp_path)
        calls.append((t0, _time.monotonic()))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 8
    assert len(started) < 8  # shared
    for t0, t1 in calls:  # some fsync began after the call and had finished before it returned
        assert any(t0 <= s and s + 0.05 <= t1 + 0.001 for s in started)


def test_a_failed_directory_fsync_fails_its_runner_and_the_next_caller_tries_again(
    tmp_path: Path,
) -> None:
    from mailhaven.mailbox.maildir import DirectorySync

    attempts: list[int] = []

    def flaky(path: Path) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(5, "I/O error")

    sync = DirectorySync(flaky)
    with pytest.raises(OSError):
        sync.sync(tmp_path)
    sync.sync(tmp_path)  # not covered by the failed one: a fsync of its own
    assert len(attempts) == 2
