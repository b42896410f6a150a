"""The passwd-file user database: Dovecot format, argon2id, reload, atomic rewrites."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailhaven.mailbox import users as users_module
from mailhaven.mailbox.users import (
    VERIFY_CONCURRENCY,
    UserDB,
    UserDBError,
    UsersFileError,
    normalize_name,
)

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def db(tmp_path: Path) -> UserDB:
    users = UserDB(tmp_path / "passwd", hasher=FAST)
    users.add("alice", "correct horse")
    return users


async def test_verify(db: UserDB) -> None:
    assert await db.verify("alice", "correct horse")
    assert await db.verify("ALICE", "correct horse")  # names are case-insensitive
    assert not await db.verify("alice", "wrong")
    assert not await db.verify("nobody", "correct horse")
    assert not await db.verify("../etc", "x")


def test_file_is_dovecot_passwd_format(db: UserDB) -> None:
    line = db.path.read_text().strip()
    name, password, *rest = line.split(":")
    assert name == "alice" and len(rest) == 6 and not any(rest)
    assert password.startswith("{ARGON2ID}$argon2id$v=19$")
    assert stat.S_IMODE(db.path.stat().st_mode) == 0o600
    assert not db.path.with_name("passwd.tmp").exists()


def test_each_rewrite_moves_the_mtime_to_a_later_second(db: UserDB) -> None:
    """Dovecot's passwd-file re-reads on a change of mtime (whole seconds) or size: two
    password changes within one second, same hash length, must still look changed to it."""
    seconds = [db.path.stat().st_mtime_ns // 1_000_000_000]
    for password in ("second pw", "third pw"):
        db.set_password("alice", password)
        seconds.append(db.path.stat().st_mtime_ns // 1_000_000_000)
    assert seconds[0] < seconds[1] < seconds[2]
    assert db.path.read_text().count("\n") == 1


async def test_comments_and_foreign_lines_survive_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    hashed = "{ARGON2ID}" + FAST.hash("pw")
    path.write_text(f"# managed by hand\nbob:{hashed}:1000:1000::/home/bob::userdb_quota=1G\n"
                    "carol:{PLAIN}plain:::::\n\n")
    db = UserDB(path, hasher=FAST)
    db.add("dave", "pw2")
    db.set_password("bob", "new")
    text = path.read_text()
    assert text.startswith("# managed by hand\n")
    assert ":1000:1000::/home/bob::userdb_quota=1G" in text
    assert "carol:{PLAIN}plain:::::" in text
    assert await db.verify("bob", "new") and not await db.verify("bob", "pw")
    assert not await db.verify("carol", "plain")  # schemes other than argon2 are not accepted
    db.delete("dave")
    assert db.names() == {"bob", "carol"}


async def test_reload_when_another_process_changes_the_file(db: UserDB) -> None:
    other = UserDB(db.path, hasher=FAST)
    assert db.names() == {"alice"}
    other.add("bob", "pw")
    assert db.names() == {"alice", "bob"}
    assert await db.verify("bob", "pw")
    other.delete("alice")
    assert not await db.verify("alice", "correct horse")


def test_admin_errors(db: UserDB) -> None:
    with pytest.raises(UserDBError, match="exists"):
        db.add("Alice", "x")
    with pytest.raises(UserDBError, match="no such user"):
        db.set_password("zed", "x")
    with pytest.raises(UserDBError, match="no such user"):
        db.delete("zed")
    with pytest.raises(UserDBError, match="empty"):
        db.add("zed", "")
    for bad in ("a:b", "a/b", "a b", ".a", "a..b", "", "x" * 65, "é"):
        with pytest.raises(UserDBError, match="invalid"):
            db.add(bad, "pw")


def test_normalize_name() -> None:
    assert normalize_name("Alice.Smith+tag") == "alice.smith+tag"
    assert normalize_name("a/b") is None and normalize_name("..") is None


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert UserDB(tmp_path / "absent").names() == set()


async def test_verify_runs_off_the_event_loop(db: UserDB) -> None:
    slow = UserDB(db.path)  # default (RFC 9106) parameters: tens of milliseconds per verify
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    assert not await slow.verify("nobody", "x")  # the dummy hash costs as much as a real one
    elapsed = time.monotonic() - started
    task.cancel()
    assert ticks >= min(5, int(elapsed * 1000) // 4)


def test_rewrite_keeps_mode(db: UserDB) -> None:
    os.chmod(db.path, 0o640)
    db.add("bob", "pw")
    assert stat.S_IMODE(db.path.stat().st_mode) == 0o640


class _CountingHasher(PasswordHasher):
    """FAST parameters, plus a count of verifications running at this moment."""

    active = 0
    peak = 0
    threads: set[str] = set()
    lock = threading.Lock()

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        cls = _CountingHasher
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
            cls.threads.add(threading.current_thread().name)
        try:
            time.sleep(0.01)  # long enough that unbounded calls would overlap
            return super().verify(hash, password)
        finally:
            with cls.lock:
                cls.active -= 1


async def test_concurrent_verifications_are_bounded_process_wide(tmp_path: Path) -> None:
    hasher = _CountingHasher(time_cost=1, memory_cost=8, parallelism=1)
    first = UserDB(tmp_path / "passwd", hasher=hasher)
    first.add("alice", "correct horse")
    # Separate instances (SMTP AUTH's, POP3's, the one a reload builds) share the one bound.
    dbs = [first, UserDB(first.path, hasher=hasher), UserDB(first.path, hasher=hasher)]
    calls = [
        dbs[i % 3].verify(user, password)
        for i in range(30)
        for user, password in [("alice", "correct horse"), ("alice", "wrong"), ("nobody", "x")]
    ]
    results = await asyncio.gather(*calls)
    assert results == [True, False, False] * 30
    assert _CountingHasher.active == 0
    assert _CountingHasher.peak == VERIFY_CONCURRENCY  # bounded, and the bound is used
    assert all(name.startswith("mailhaven-verify") for name in _CountingHasher.threads)


async def test_waiting_logins_leave_the_default_executor_free(tmp_path: Path) -> None:
    gate = threading.Event()

    class Blocking(PasswordHasher):
        def verify(self, hash: str | bytes, password: str | bytes) -> bool:
            gate.wait(5)
            return super().verify(hash, password)

    db = UserDB(tmp_path / "passwd", hasher=Blocking(time_cost=1, memory_cost=8, parallelism=1))
    db.add("alice", "pw")
    logins = [asyncio.create_task(db.verify("alice", "pw")) for _ in range(20)]
    try:
        # Maildir I/O (asyncio.to_thread) still runs while every verify slot is taken.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 2) == 42
    finally:
        gate.set()
    assert all(await asyncio.gather(*logins))


def test_verify_pool_is_remade_in_a_forked_child(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = users_module._verify_pool()
    assert users_module._verify_pool() is parent
    monkeypatch.setattr(users_module, "_pool", parent)  # restored after the test
    monkeypatch.setattr(users_module, "_pool_pid", os.getpid())
    monkeypatch.setattr(users_module.os, "getpid", lambda: -1)  # as in a child after fork()
    child = users_module._verify_pool()
    assert child is not parent
    assert users_module._verify_pool() is child
    child.shutdown()


async def test_existing_hashes_verify_with_their_own_parameters(tmp_path: Path) -> None:
    owasp = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash("old pw")
    (tmp_path / "passwd").write_text(f"carol:{{ARGON2ID}}{owasp}::::::\n")
    db = UserDB(tmp_path / "passwd")  # default parameters for new hashes
    assert await db.verify("carol", "old pw")
    assert not await db.verify("carol", "new pw")


@pytest.mark.parametrize(
    ("content", "line", "why"),
    [
        (b"# users\nalice:{X}h:::::\nbob:\xff\xfe:::::\n", 3, "not valid UTF-8"),
        (b"alice:{X}h:::::\n\n\xc3\n", 3, "not valid UTF-8"),
        (b"alice:{X}h:::::\njust a name\n", 2, "expected user:password"),
        (b"# ok\nAlice:{X}h:::::\n", 2, "not a valid user name"),
        (b"../etc:{X}h:::::\n", 1, "not a valid user name"),
        (b"alice:{X}h:::::\nbob:{X}h\nalice:{X}i:::::\n", 3, "user alice again (first on line 1)"),
    ],
)
def test_a_malformed_file_is_refused_naming_the_line(
    tmp_path: Path, content: bytes, line: int, why: str
) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(content)
    with pytest.raises(UsersFileError) as caught:
        UserDB(path, hasher=FAST).load()
    assert f"{path}: line {line}: " in str(caught.value) and why in str(caught.value)


async def test_a_broken_rewrite_keeps_the_last_good_file_in_service(
    db: UserDB, caplog: pytest.LogCaptureFixture
) -> None:
    """Edited by hand into something unusable: logins, mailbox names and admin commands keep
    the last good content (admin commands say why they refuse), logged once per change."""
    good = db.path.read_bytes()
    db.path.write_bytes(good + b"bob:\xe9t\xe9:::::\n")
    os.utime(db.path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert db.names() == {"alice"}
    assert await db.verify("alice", "correct horse")
    assert db.names() == {"alice"}
    refusals = [r for r in caplog.records if "users file refused" in r.getMessage()]
    assert len(refusals) == 1 and "line 2: not valid UTF-8" in refusals[0].getMessage()
    with pytest.raises(UserDBError, match="line 2"):
        db.add("carol", "pw")
    db.path.write_bytes(good + b"bob:{X}h:::::\n")  # fixed: read again
    assert db.names() == {"alice", "bob"}


# --- virtual domains ------------------------------------------------------------------------


def virtual(path: Path, *domains: str) -> UserDB:
    return UserDB(path, hasher=FAST, domains=domains or ("a.example", "b.example"))


async def test_each_domain_has_its_own_users(tmp_path: Path) -> None:
    db = virtual(tmp_path / "passwd")
    assert db.add("Alice@A.Example", "pw-a") == "alice@a.example"
    assert db.add("alice@b.example", "pw-b") == "alice@b.example"
    assert db.names() == {"alice@a.example", "alice@b.example"}
    assert await db.verify("ALICE@a.example", "pw-a")
    assert not await db.verify("alice@a.example", "pw-b")
    assert await db.verify("alice@b.example", "pw-b")
    assert db.path.read_text().startswith("alice@a.example:{ARGON2ID}")


async def test_bare_login_only_with_one_local_domain(tmp_path: Path) -> None:
    many = virtual(tmp_path / "passwd")
    many.add("alice@a.example", "pw")
    assert many.resolve("alice") is None  # ambiguous: refused, like Dovecot without a realm
    assert not await many.verify("alice", "pw")
    with pytest.raises(UserDBError, match="full address"):
        many.add("bob", "pw")
    one = virtual(tmp_path / "passwd1", "a.example")
    assert one.add("bob", "pw") == "bob@a.example"
    assert one.resolve("BOB") == "bob@a.example"
    assert await one.verify("bob", "pw") and await one.verify("Bob@A.example", "pw")


def test_new_users_must_be_at_a_local_domain(tmp_path: Path) -> None:
    db = virtual(tmp_path / "passwd")
    with pytest.raises(UserDBError, match="not a local domain"):
        db.add("alice@elsewhere.example", "pw")


@pytest.mark.parametrize(
    "login", ["a/b@a.example", "../x@a.example", "a@a.example/..", "a\0@a.example", "x" * 300,
              "alice@a.example\0", "alice@..", ""],
)
async def test_bad_logins_are_no_user(tmp_path: Path, login: str) -> None:
    db = virtual(tmp_path / "passwd")
    db.add("alice@a.example", "pw")
    assert db.login_name(login) is None and db.resolve(login) is None
    assert not await db.verify(login, "pw")
    with pytest.raises(UserDBError):
        db.add(login, "pw")


async def test_bare_names_in_the_file_belong_to_the_primary_domain(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"# kept\ncarol:{{ARGON2ID}}{FAST.hash('pw')}:::::\n")
    db = virtual(path)
    assert db.names() == {"carol@a.example"}
    assert await db.verify("carol@a.example", "pw")
    assert db.qualify_bare_names() == ["carol"]
    assert path.read_text().startswith("# kept\ncarol@a.example:{ARGON2ID}")
    assert db.qualify_bare_names() == []  # idempotent
    path.write_text(path.read_text() + "carol:{ARGON2ID}x:::::\n")
    with pytest.raises(UsersFileError, match="again"):  # the same user twice
        db.load()


def test_rewrites_keep_owner_group_and_mode(tmp_path: Path) -> None:
    """Dovecot's auth reads the file through its group: `user passwd` must not take it away."""
    import grp

    db = virtual(tmp_path / "passwd")
    db.add("alice@a.example", "pw")
    group = grp.getgrnam("nogroup").gr_gid
    os.chown(db.path, -1, group)
    os.chmod(db.path, 0o640)
    db.set_password("alice@a.example", "new")
    db.add("bob@a.example", "pw")
    st = db.path.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (group, 0o640)


def test_configured_mode_and_group_apply(tmp_path: Path) -> None:
    import grp

    group = grp.getgrnam("nogroup").gr_gid
    path = tmp_path / "passwd"
    path.write_text("")
    os.chmod(path, 0o600)
    db = UserDB(path, hasher=FAST, domains=["a.example"], file_mode=0o640, file_group=group)
    db.apply_file_owner()
    assert (path.stat().st_gid, stat.S_IMODE(path.stat().st_mode)) == (group, 0o640)
    os.chmod(path, 0o600)
    db.add("alice", "pw")  # a rewrite applies them too, whatever the umask
    assert (path.stat().st_gid, stat.S_IMODE(path.stat().st_mode)) == (group, 0o640)
