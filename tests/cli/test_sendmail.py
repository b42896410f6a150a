"""`mailhaven sendmail`: what lands in the drop directory, and the exit codes callers rely on."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailhaven.cli.sendmail import (
    HEADER_LIMIT,
    HeaderBlock,
    LineNormalizer,
    from_field,
    rfc5322_date,
    sendmail_main,
)
from mailhaven.pickup.dropfile import Drop, DropDirs, open_drop

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"


# ---------------------------------------------------------------------------- line endings


def normalize(data: bytes, *, dot_ends: bool, byte_at_a_time: bool = False) -> tuple[bytes, bool]:
    n = LineNormalizer(dot_ends=dot_ends)
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    out = b""
    for c in chunks:
        out += n.feed(c)
        if n.done:
            break
    out += n.finish()
    return out, n.done


@pytest.mark.parametrize("byte_at_a_time", [False, True])
@pytest.mark.parametrize(
    ("data", "dot_ends", "expected", "done"),
    [
        (b"a\nb\n", False, b"a\r\nb\r\n", False),
        (b"a\r\nb\r\n", False, b"a\r\nb\r\n", False),
        (b"a\rb\r", False, b"a\r\nb\r\n", False),
        (b"a\r\n\nb", False, b"a\r\n\r\nb\r\n", False),
        (b"last line", False, b"last line\r\n", False),
        (b"x\n.\ny\n", True, b"x\r\n", True),
        (b".\ny\n", True, b"", True),
        (b"x\n.", True, b"x\r\n", True),
        (b"x\n.\ny\n", False, b"x\r\n.\r\ny\r\n", False),
        (b"x\n..\ny\n", True, b"x\r\n..\r\ny\r\n", False),
        (b"x\n.y\n", True, b"x\r\n.y\r\n", False),
    ],
)
def test_line_endings_and_lone_dot(
    data: bytes, dot_ends: bool, expected: bytes, done: bool, byte_at_a_time: bool
) -> None:
    assert normalize(data, dot_ends=dot_ends, byte_at_a_time=byte_at_a_time) == (expected, done)


def test_a_huge_line_is_passed_on_in_pieces() -> None:
    n = LineNormalizer(dot_ends=True)
    out = n.feed(b"x" * 200_000 + b"\r")
    assert len(out) == 200_000  # the CR is held back: it may pair with a LF
    out += n.feed(b"\n.\n")
    assert out == b"x" * 200_000 + b"\r\n" and n.done


# ---------------------------------------------------------------------------- header block


def test_header_block_splits_at_the_blank_line() -> None:
    h = HeaderBlock()
    assert not h.feed(b"From alice Mon Jan  1 00:00:00 2024\r\nSubject: a\r\n")
    assert h.feed(b" folded\r\nTo: b@x\r\n\r\nbody\r\n")
    assert h.fields == [b"Subject: a\r\n folded\r\n", b"To: b@x\r\n"]
    assert h.rest == b"body\r\n"
    assert h.values("subject") == [" a folded"]
    assert h.render(["Date: now"], frozenset({"to"})) == (
        b"Subject: a\r\n folded\r\nDate: now\r\n\r\nbody\r\n"
    )


def test_a_non_header_line_starts_the_body_and_gets_a_separator() -> None:
    h = HeaderBlock()
    h.feed(b"Subject: a\r\nthis is body\r\n\r\nmore\r\n")
    assert h.complete
    assert h.render([], frozenset()) == b"Subject: a\r\n\r\nthis is body\r\n\r\nmore\r\n"


def test_no_header_at_all() -> None:
    h = HeaderBlock()
    h.feed(b"\r\nbody\r\n")
    assert h.fields == [] and h.rest == b"body\r\n"


def test_header_limit_bounds_the_buffer() -> None:
    h = HeaderBlock()
    line = b"X-Long: " + b"a" * 90 + b"\r\n"
    done = False
    while not done:
        done = h.feed(line)
    assert sum(map(len, h.fields)) <= HEADER_LIMIT + len(line)


def test_dates_and_from_fields() -> None:
    date = rfc5322_date(0.0)
    assert date.split(",")[0] in ("Thu", "Wed", "Fri")
    assert from_field("a@b", "") == "From: a@b"
    assert from_field("a@b", "Alice Liddell") == "From: Alice Liddell <a@b>"
    assert from_field("a@b", 'Dr. "A"') == 'From: "Dr. \\"A\\"" <a@b>'
    assert from_field("a@b", "Zoë").startswith("From: =?utf-8?")


# ---------------------------------------------------------------------------- the command


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    conf = tmp_path / "mailhaven.toml"
    conf.write_text(
        f'state_dir = "{state}"\nhostname = "mx.test"\nlocal_domains = ["example.org"]\n'
    )
    monkeypatch.setenv("MAILHAVEN_CONFIG", str(conf))
    monkeypatch.delenv("NAME", raising=False)
    return state


def run(argv: list[str], data: bytes = b"") -> tuple[int, str]:
    err = io.StringIO()
    status = sendmail_main(argv, stdin=io.BufferedReader(io.BytesIO(data)), stderr=err)
    return status, err.getvalue()


def drops(state: Path) -> list[tuple[Drop, bytes]]:
    new = DropDirs(state / "maildrop").new
    out = []
    for name in sorted(os.listdir(new)):
        drop = open_drop(new / name)
        out.append((drop, drop.body.read()))
        drop.close()
    return out


def only_drop(state: Path) -> tuple[Drop, bytes]:
    found = drops(state)
    assert len(found) == 1
    return found[0]


def addresses(drop: Drop) -> list[str]:
    return [r["address"] for r in drop.meta["recipients"]]


def test_t_takes_recipients_from_the_header_and_strips_bcc(state: Path) -> None:
    msg = (
        b"Subject: hi\nTo: Ann <ann@a.example>, bob\nCc: carl@c.example\n"
        b"Bcc: secret@d.example\n\nbody\n.\nmore\n"
    )
    status, err = run(["-t", "-i", "argv@e.example"], msg)
    assert (status, err) == (0, "")
    drop, body = only_drop(state)
    assert addresses(drop) == [
        "argv@e.example", "ann@a.example", "bob@example.org", "carl@c.example", "secret@d.example"
    ]
    head, _, rest = body.partition(b"\r\n\r\n")
    assert b"Bcc" not in head and b"secret" not in body
    assert head.startswith(b"Subject: hi\r\nTo: Ann <ann@a.example>, bob\r\nCc: carl@c.example\r\n")
    login = __import__("pwd").getpwuid(os.getuid()).pw_name
    assert drop.meta["sender"] == f"{login}@example.org"
    assert b"\r\nFrom: " in head and f"<{login}@example.org>".encode() in head
    assert b"\r\nDate: " in head
    assert b"\r\nMessage-ID: <" in head and b"@mx.test>" in head
    assert rest == b"body\r\n.\r\nmore\r\n"
    assert drop.uid == os.getuid()


def test_existing_fields_are_kept_and_resent_headers_win(state: Path) -> None:
    msg = (
        b"From: Boss <boss@x.example>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
        b"Message-ID: <1@x>\nTo: old@x.example\nResent-To: new@y.example\n\nhi\n"
    )
    assert run(["-t"], msg)[0] == 0
    drop, body = only_drop(state)
    assert addresses(drop) == ["new@y.example"]
    assert body.count(b"From:") == 1 and body.count(b"Date:") == 1
    assert body.count(b"Message-ID:") == 1


def test_lone_dot_ends_input_without_i(state: Path) -> None:
    assert run(["bob"], b"Subject: x\n\nline1\n.\nafter\n")[0] == 0
    _, body = only_drop(state)
    assert body.endswith(b"\r\n\r\nline1\r\n")


def test_envelope_options_and_sender_forms(state: Path) -> None:
    argv = ["-f<>", "-F", "Robot", "-N", "failure,delay", "-R", "hdrs", "-V", "env1",
            "-B", "8BITMIME", "-oem", "-v", "x@y.example"]
    assert run(argv, b"Subject: x\n\nhi\n")[0] == 0
    drop, body = only_drop(state)
    assert drop.meta["sender"] == ""
    assert drop.meta["recipients"] == [
        {"address": "x@y.example", "notify": ["DELAY", "FAILURE"], "orcpt": None}
    ]
    assert (drop.meta["dsn_ret"], drop.meta["dsn_envid"], drop.meta["body_type"]) == (
        "HDRS", "env1", "8BITMIME"
    )
    assert b"From: Robot <" in body


def test_f_sender_becomes_the_from_field(state: Path) -> None:
    assert run(["-f", "Web <www@site.example>", "-F", "Web Site", "x@y.example"], b"hi\n")[0] == 0
    drop, body = only_drop(state)
    assert drop.meta["sender"] == "www@site.example"
    assert b"From: Web Site <www@site.example>\r\n" in body
    assert body.endswith(b"\r\n\r\nhi\r\n")


def test_usage_errors_exit_64(state: Path) -> None:
    assert run(["-Z", "x@y"])[0] == 64
    assert run([])[0] == 64
    status, err = run(["-t"], b"Subject: nobody\n\nhi\n")
    assert status == 64 and "No recipient" in err
    assert run(["bad address@x"], b"hi\n")[0] == 64
    assert drops(state) == [] if (state / "maildrop" / "new").exists() else True


def test_unwritable_drop_directory_exits_75(state: Path) -> None:
    state.mkdir(parents=True)
    (state / "maildrop").write_text("not a directory")
    status, err = run(["x@y.example"], b"hi\n")
    assert status == 75 and "cannot write" in err


def test_a_bad_config_exits_78(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("limits = 3\n")
    monkeypatch.setenv("MAILHAVEN_CONFIG", str(bad))
    assert run(["x@y.example"], b"hi\n")[0] == 78
    assert run(["-C", str(tmp_path / "missing.toml"), "x@y.example"], b"hi\n")[0] == 78


def test_too_big_exits_65_and_leaves_nothing(tmp_path: Path, state: Path) -> None:
    conf = Path(os.environ["MAILHAVEN_CONFIG"])
    conf.write_text(conf.read_text() + "[limits]\nmessage_size = 2048\n")
    status, err = run(["x@y.example"], b"Subject: x\n\n" + b"y" * 80 * 100 + b"\n")
    assert status == 65 and "too big" in err
    assert drops(state) == []
    assert os.listdir(state / "maildrop" / "tmp") == []


def test_mailq_flush_and_other_modes_without_a_daemon(
    state: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    out = io.BytesIO()
    assert sendmail_main(["-bp"], stdout=out, stderr=io.StringIO()) == 0
    assert out.getvalue() == b"Mail queue is empty\n"
    assert sendmail_main([], prog="mailq", stdout=out, stderr=io.StringIO()) == 0
    status, err = run(["-q"])
    assert status == 0 and "not running" in err
    assert run(["-bi"])[0] == 0
    assert run(["-bv", "x@y"])[0] == 69


def test_bs_speaks_smtp_on_stdin_and_stdout(state: Path) -> None:
    session = (
        b"EHLO client\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example> NOTIFY=NEVER\r\n"
        b"RCPT TO:<postmaster>\r\nDATA\r\nSubject: one\r\n\r\n..dot\r\n.\r\n"
        b"MAIL FROM:<>\r\nRCPT TO:<c@z.example>\r\nDATA\r\nSubject: two\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    out = io.BytesIO()
    status = sendmail_main(
        ["-bs"], stdin=io.BufferedReader(io.BytesIO(session)), stdout=out, stderr=io.StringIO()
    )
    assert status == 0
    replies = out.getvalue().decode()
    assert replies.startswith("220 mx.test")
    assert replies.count("250 2.0.0 Ok: queued as ") == 2 and replies.endswith("221 2.0.0 Bye\r\n")
    (one, body1), (two, _body2) = sorted(drops(state), key=lambda d: d[0].meta["sender"], reverse=True)
    assert one.meta["sender"] == "a@x.example"
    assert one.meta["recipients"] == [
        {"address": "b@y.example", "notify": ["NEVER"], "orcpt": None},
        {"address": "postmaster@example.org", "notify": [], "orcpt": None},
    ]
    assert body1.startswith(b"Subject: one\r\n") and body1.endswith(b"\r\n\r\n.dot\r\n")
    assert b"From: a@x.example\r\n" in body1
    assert two.meta["sender"] == "" and addresses(two) == ["c@z.example"]
    assert one.name in replies and two.name in replies


def test_bs_accepts_bare_lf_lines_from_a_local_program(state: Path) -> None:
    """`printf 'HELO x\\n...' | sendmail -bs`: Postfix takes LF-only lines from a local
    program; the message is queued (stored with CRLF) and the session ends with 221."""
    session = (
        b"HELO client\nMAIL FROM:<a@x.example>\nRCPT TO:<b@y.example>\nDATA\n"
        b"Subject: lf\n\nline one\r\n..dot\n.\nQUIT\n"
    )
    done = subprocess.run(
        [str(PYTHON), "-m", "mailhaven.cli.sendmail", "-bs"], input=session,
        capture_output=True, timeout=60, check=False, env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    assert b"250 2.0.0 Ok: queued as " in done.stdout
    assert done.stdout.endswith(b"221 2.0.0 Bye\r\n")
    drop, body = only_drop(state)
    assert addresses(drop) == ["b@y.example"]
    assert body.startswith(b"Subject: lf\r\n") and body.endswith(b"\r\nline one\r\n.dot\r\n")


def test_bs_line_ends_keep_a_crlf_split_across_reads() -> None:
    from mailhaven.cli.sendmail import _LocalLineEnds

    convert = _LocalLineEnds()
    chunks = [b"HELO a\r", b"\nNOOP\n", b"\n", b"x\r\n"]
    assert b"".join(convert(c) for c in chunks) == b"HELO a\r\nNOOP\r\n\r\nx\r\n"


def test_bs_input_ending_inside_data_is_an_error_not_silence(state: Path) -> None:
    """EOF before the final "." queues nothing: say so on stderr and exit non-zero."""
    session = b"HELO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nhi\r\n"
    done = subprocess.run(
        [str(PYTHON), "-m", "mailhaven.cli.sendmail", "-bs"], input=session,
        capture_output=True, timeout=60, check=False, env=dict(os.environ),
    )
    assert done.returncode == 65
    assert b"not queued" in done.stderr
    assert not (state / "maildrop" / "new").exists() or drops(state) == []


def test_subprocess_exit_codes(state: Path, tmp_path: Path) -> None:
    cmd = [str(PYTHON), "-m", "mailhaven.cli.sendmail"]
    env = dict(os.environ)
    done = subprocess.run(
        [*cmd, "-t", "-i"], input=b"To: p@q.example\nSubject: hi\n\nbody\n", env=env,
        capture_output=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert addresses(only_drop(state)[0]) == ["p@q.example"]
    usage = subprocess.run([*cmd, "-X"], env=env, capture_output=True, timeout=60, check=False)
    assert usage.returncode == 64


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_bs_with_swaks_pipe(state: Path) -> None:
    command = f"{PYTHON} -m mailhaven.cli.sendmail -bs"
    done = subprocess.run(
        ["swaks", "--pipe", command, "--to", "bob@example.org", "--from", "alice@example.org",
         "--header", "Subject: via swaks"],
        capture_output=True, timeout=60, check=False, env=dict(os.environ),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"250 2.0.0 Ok: queued as" in done.stdout
    drop, body = only_drop(state)
    assert (drop.meta["sender"], addresses(drop)) == ("alice@example.org", ["bob@example.org"])
    assert b"Subject: via swaks\r\n" in body
    assert sys.executable  # keep the interpreter import used
