"""`mailhaven queue list|show|flush|hold|release|delete|requeue|salvage` and `mailhaven mailq`.

In: argv (without the `queue` word) and the `Config`. Out: text on stdout, an exit status:
0 done, 1 something failed (no such message, daemon error, queue busy), 2 usage.

Reading (`list`, `show`, `mailq`) opens the queue database read-only (`spool.listing`), which is
safe while the daemon writes (WAL snapshot), and never touches body files. With worker processes
(`smtp_processes` > 1) every queue shard is read and the listings merged (`spool.shards`).

Changing (`flush`, `hold`, `release`, `delete`, `requeue`): through the control socket when the
daemon runs (it owns the spool and wakes its scheduler). When no daemon answers, the CLI takes
the queue lock (`DaemonLock`, also held by the daemon) of each shard, opens the `Spool` itself (its
recovery is safe then: no one else writes) and applies the same `QueueAdmin` verbs; a
flush then only makes mail due, and it goes out when the daemon starts.

`mailq` prints Postfix's `postqueue -p` format with long queue ids (ours are 15 characters):
`----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------`, one block per message
(`*` after the id: being delivered; `!`: held), a `(reason)` line before each run of recipients
with the same last error, unfinished recipients only, `-- N Kbytes in M Requests.` at the end,
or `Mail queue is empty`. `queue list --json` prints one object per message, with
`postqueue -j`'s keys (queue_name, queue_id, arrival_time, message_size, forced_expire, sender,
recipients[].address/delay_reason) plus our per-recipient details. As Postfix's showq, the
listing starts with what waits in the maildrop (queue_name "maildrop", its file name as id),
and when no daemon answers it says "Mail system is down -- accessing queue directly" on stderr.

`hold`, `release`, `delete` and `requeue` take `ALL` (every queued message) and `-` (ids read
from stdin, one or more per line), as `postsuper` does.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, TextIO

from mailhaven.config import Config
from mailhaven.control import channel as control
from mailhaven.control.queue_admin import QueueAdmin
from mailhaven.proto.replies import Reply
from mailhaven.spool.ids import is_queue_id
from mailhaven.spool.lock import DaemonLock, lock_path
from mailhaven.spool.records import Hold, MessageSummary, RecipientState, Status
from mailhaven.spool.shards import existing_shards, list_all

L_STRING_FORMAT = "{:<17} {:>8} {:<19} {}"
HEADINGS = L_STRING_FORMAT.format(
    "----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------"
)
MAILER_DAEMON = "MAILER-DAEMON"
#: postqueue right-aligns `(reason)` lines to this column.
REASON_COLUMN = 76


# ---------------------------------------------------------------------------- reading


def reason(rcpt: RecipientState) -> str:
    """The last error of a recipient, as mailq shows it ("" if none)."""
    reply = rcpt.last_reply
    if reply is None or rcpt.status is not Status.DEFERRED:
        return ""
    return format_reply(reply, rcpt.last_relay)


def format_reply(reply: Reply, relay: str | None = None) -> str:
    text = " ".join(line for line in reply.lines if line)
    said = f"{reply.code} {reply.enhanced + ' ' if reply.enhanced else ''}{text}".strip()
    # only a host that said the reply is named ("none": our own words, e.g. connect to ...)
    return f"host {relay} said: {said}" if relay and "[" in relay else said


#: holds that make mailq show "!" (a route hold waits for ETRN and shows as deferred)
_SHOWN_HOLDS = Hold.ADMIN | Hold.QUARANTINE
#: lines written per `write` call: one call per line cost a third of listing 100k messages
_LINES_PER_WRITE = 2048


def status_mark(msg: MessageSummary) -> str:
    pending = [r for r in msg.recipients if r.status.unfinished]
    if msg.quarantined or any(r.hold & _SHOWN_HOLDS for r in pending):
        return "!"
    if any(r.active for r in pending):
        return "*"
    return " "


def queue_name(msg: MessageSummary) -> str:
    match status_mark(msg):
        case "!":
            return "hold"
        case "*":
            return "active"
    if any(r.status is Status.DEFERRED for r in msg.recipients):
        return "deferred"
    return "active"


def mailq_lines(messages: Iterator[MessageSummary]) -> Iterator[str]:
    """Postfix's showq_compat output, line by line (streams: one message in memory)."""
    count = total = 0
    for msg in messages:
        yield HEADINGS if count == 0 else ""
        count += 1
        total += msg.size
        arrival = time.asctime(time.localtime(msg.arrival))[:19]
        yield f"{msg.queue_id + status_mark(msg):<17} {msg.size:>8} {arrival:>19.19} {msg.sender or MAILER_DAEMON}"
        saved = ""
        for rcpt in msg.recipients:
            if not rcpt.status.unfinished:
                continue
            why = reason(rcpt)
            if why != saved:
                saved = why
                shown = why or "reason unavailable"
                yield " " * max(0, REASON_COLUMN - len(shown)) + f"({shown})"
            yield L_STRING_FORMAT.format("", "", "", rcpt.address)
    if count == 0:
        yield "Mail queue is empty"
    else:
        yield ""
        yield f"-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}."


def _shown(text: str) -> str:
    """A local user's text made safe for a terminal (no escape sequences from a drop file)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def maildrop_entries(state_path: Path) -> list[MessageSummary]:
    """What waits in the maildrop, not yet picked up (Postfix's showq lists that queue too).
    Files this user cannot read, or that are not well-formed drop files, are left out."""
    from mailhaven.pickup.dropfile import NAME_PATTERN, CorruptDrop, DropDirs, open_drop

    new = DropDirs(state_path / "maildrop").new
    try:
        names = sorted(os.listdir(new))
    except OSError:
        return []
    entries = []
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            continue
        try:
            drop = open_drop(new / name)
        except (OSError, CorruptDrop):
            continue
        drop.close()
        sender = drop.meta.get("sender")
        raw = drop.meta.get("recipients")
        addresses = [
            _shown(r["address"])
            for r in (raw if isinstance(raw, list) else [])
            if isinstance(r, dict) and isinstance(r.get("address"), str)
        ]
        recipients = tuple(
            RecipientState(i, a, a, (), None, Status.PENDING, Hold.NONE, False, 0,
                           drop.arrived, None, None, None)
            for i, a in enumerate(addresses)
        )
        entries.append(MessageSummary(
            name, drop.arrived, drop.body_size,
            _shown(sender) if isinstance(sender, str) else "", False, recipients,
        ))
    return entries


def daemon_down(config: Config) -> bool:
    """No daemon answers on the control socket (one that refuses us still runs)."""
    try:
        return control.request(config.state_path / control.SOCKET_NAME, {"cmd": "ping"}) is None
    except control.ControlError:
        return False


def warn_if_down(config: Config, prog: str, err: TextIO) -> None:
    """Postfix's postqueue warning before it reads the queue files itself."""
    if daemon_down(config):
        print(f"{prog}: warning: Mail system is down -- accessing queue directly", file=err)


def print_mailq(spool_path: Path, out: TextIO, maildrop: Iterable[MessageSummary] = ()) -> int:
    chunk: list[str] = []
    for line in mailq_lines(itertools.chain(maildrop, list_all(spool_path))):
        chunk.append(line)
        if len(chunk) >= _LINES_PER_WRITE:
            out.write("\n".join(chunk) + "\n")
            chunk.clear()
    if chunk:
        out.write("\n".join(chunk) + "\n")
    return 0


def _time(value: float | None) -> int | None:
    return None if value is None else int(value)


def recipient_json(r: RecipientState) -> dict[str, Any]:
    return {
        "address": r.address,
        "delay_reason": reason(r),
        "original": r.original,
        "status": r.status.value,
        "hold": [h.name.lower() for h in Hold if h and h.name and r.hold & h],
        "active": r.active,
        "attempts": r.attempts,
        "last_attempt": _time(r.last_attempt),
        "next_attempt": _time(r.next_attempt) if r.status.unfinished else None,
        "last_reply": None if r.last_reply is None else format_reply(r.last_reply),
        "last_relay": r.last_relay,
        "notify": list(r.notify),
    }


def message_json(msg: MessageSummary) -> dict[str, Any]:
    return {
        "queue_name": queue_name(msg),
        "queue_id": msg.queue_id,
        "arrival_time": int(msg.arrival),
        "message_size": msg.size,
        "forced_expire": False,
        "sender": msg.sender,
        "quarantined": msg.quarantined,
        "recipients": [recipient_json(r) for r in msg.recipients],
    }


def find(spool_path: Path, queue_id: str) -> MessageSummary | None:
    return next((m for m in list_all(spool_path) if m.queue_id == queue_id), None)


def load_envelope(spool_path: Path, queue_id: str) -> dict[str, Any] | None:
    """The stored envelope (read-only connection); None if absent or quarantined."""
    from mailhaven.spool import queries
    from mailhaven.spool.schema import connect

    for shard in existing_shards(spool_path):
        db = shard / "queue.db"
        if not db.exists():
            continue
        with closing(connect(db, read_only=True)) as conn:
            msg = queries.load_message(conn, queue_id, shard / "bodies")
        if msg is not None:
            return msg.envelope.to_dict()
    return None


def _when(value: float | None, now: float) -> str:
    if value is None:
        return "-"
    delta = int(value - now)
    rel = f"in {_span(delta)}" if delta > 0 else f"{_span(-delta)} ago" if delta < 0 else "now"
    return f"{time.asctime(time.localtime(value))} ({rel})"


def _span(seconds: int) -> str:
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60}s"
    return f"{seconds}s"


def show_text(msg: MessageSummary, envelope: dict[str, Any] | None, now: float) -> list[str]:
    lines = [
        f"queue id:     {msg.queue_id}{'  (QUARANTINED)' if msg.quarantined else ''}",
        f"arrival:      {_when(msg.arrival, now)}",
        f"size:         {msg.size}",
        f"sender:       <{msg.sender}>",
    ]
    if envelope is not None:
        opts = [f"BODY={envelope.get('body_type')}"]
        if envelope.get("smtputf8"):
            opts.append("SMTPUTF8")
        if envelope.get("dsn_ret"):
            opts.append(f"RET={envelope['dsn_ret']}")
        if envelope.get("dsn_envid"):
            opts.append(f"ENVID={envelope['dsn_envid']}")
        lines.append(f"options:      {' '.join(opts)}")
        client = envelope.get("client_address") or envelope.get("extra", {}).get("origin") or ""
        lines.append(
            f"from client:  {envelope.get('client_name') or 'unknown'}[{client}]"
            f" helo={envelope.get('helo') or '-'} protocol={envelope.get('protocol')}"
            + (f" auth={envelope['auth_user']}" if envelope.get("auth_user") else "")
        )
    pending = [r.next_attempt for r in msg.recipients if r.status.unfinished and not r.hold]
    lines.append(f"next attempt: {_when(min(pending), now) if pending else '-'}")
    lines.append("recipients:")
    for r in msg.recipients:
        holds = [h.name.lower() for h in Hold if h and h.name and r.hold & h]
        state = r.status.value + (" (in delivery)" if r.active else "")
        state += f" (held: {', '.join(holds)})" if holds else ""
        lines.append(f"  <{r.address}>" + (f" (for <{r.original}>)" if r.original != r.address else ""))
        lines.append(f"    status:       {state}")
        lines.append(f"    attempts:     {r.attempts}")
        lines.append(f"    last attempt: {_when(r.last_attempt, now)}")
        if r.last_reply is not None:
            lines.append(f"    last reply:   {format_reply(r.last_reply, r.last_relay)}")
        if r.status.unfinished:
            lines.append(f"    next attempt: {_when(r.next_attempt, now)}")
    return lines


# ---------------------------------------------------------------------------- changing


def apply_offline(config: Config, command: str, ids: Sequence[str], domain: str | None) -> int:
    """Run one verb on the spool directly (no daemon), on every shard of it. Returns the
    handlers' count added up, or -1 when a shard is locked by someone else."""
    total = 0
    for shard in existing_shards(config.spool_path):
        count = _apply_offline_to(shard, command, ids, domain)
        if count < 0:
            return -1
        total += count
    return total


def _apply_offline_to(root: Path, command: str, ids: Sequence[str], domain: str | None) -> int:
    from mailhaven.spool.store import Spool

    lock = DaemonLock.acquire(lock_path(root))
    if lock is None:
        return -1
    with lock:
        if not (root / "queue.db").exists():
            return 0
        spool = Spool(root)
        spool.open()
        try:
            admin = QueueAdmin(spool)
            request: dict[str, Any] = {"cmd": command, "ids": list(ids)}
            if domain is not None:
                request["domain"] = domain
            answer = asyncio.run(control.dispatch(admin, request))
        finally:
            spool.close()
    if not answer.get("ok"):
        raise RuntimeError(str(answer.get("error")))
    return int(answer["count"])


#: the id that means every queued message (postsuper's ALL)
ALL = "ALL"
#: the id that means "read ids from stdin" (postsuper's -)
STDIN = "-"


def expand_ids(config: Config, ids: Sequence[str], stdin: TextIO) -> list[str]:
    """`ALL` becomes every queued message's id, `-` the ids on stdin; others stay as given."""
    out: list[str] = []
    for i in ids:
        match i:
            case "ALL":
                out.extend(m.queue_id for m in list_all(config.spool_path))
            case "-":
                out.extend(word for line in stdin for word in line.split())
            case _:
                out.append(i)
    return list(dict.fromkeys(out))  # once each, in order


def change(
    config: Config,
    command: str,
    ids: Sequence[str],
    domain: str | None,
    out: TextIO,
    err: TextIO,
    *,
    every: bool = False,
) -> int:
    """One verb, through the daemon or offline; ids go in requests of at most
    `control.MAX_IDS` (the control channel's bound), their counts added up. `every` (ALL):
    a message that left the queue meanwhile is not a failure."""
    bad = [i for i in ids if not is_queue_id(i)]
    for i in bad:
        print(f"mailhaven queue: {i}: not a queue id", file=err)
    ids = [i for i in ids if is_queue_id(i)]
    if bad and not ids:
        return 1
    batches = [ids[n : n + control.MAX_IDS] for n in range(0, len(ids), control.MAX_IDS)]
    count = 0
    for batch in batches or [ids]:
        found = _change_batch(config, command, batch, domain, err)
        if found is None:
            return 1
        count += found[0]
        where = found[1]
    print(f"{command}: {count} {_noun(command, domain, ids)}{where}", file=out)
    return 1 if bad or (ids and count < len(ids) and command != "flush" and not every) else 0


def _change_batch(
    config: Config, command: str, ids: Sequence[str], domain: str | None, err: TextIO
) -> tuple[int, str] | None:
    """One request; (count, note) or None after an error was printed."""
    request: dict[str, Any] = {"cmd": command, "ids": list(ids)}
    if domain is not None:
        request["domain"] = domain
    try:
        answer = control.request(config.state_path / control.SOCKET_NAME, request)
    except control.ControlError as exc:
        print(f"mailhaven queue: cannot reach the daemon: {exc}", file=err)
        return None
    if answer is None:
        try:
            count = apply_offline(config, command, ids, domain)
        except (OSError, RuntimeError) as exc:
            print(f"mailhaven queue: {command} failed: {exc}", file=err)
            return None
        if count < 0:
            print("mailhaven queue: the queue is locked (is the daemon starting?); try again",
                  file=err)
            return None
        where = " (daemon not running: delivery happens when it starts)" if command == "flush" else ""
        return count, where
    if not answer.get("ok"):
        print(f"mailhaven queue: {command} failed: {answer.get('error')}", file=err)
        return None
    return int(answer.get("count", 0)), ""


def _noun(command: str, domain: str | None, ids: Sequence[str]) -> str:
    if command == "flush" and domain is None and not ids:
        return "recipient(s) made due now"
    return "message(s)"


# ---------------------------------------------------------------------------- entry points


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailhaven queue", description="inspect and manage the queue")
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="list queued messages (mailq format)")
    lst.add_argument("--json", action="store_true", help="one JSON object per message")
    show = sub.add_parser("show", help="envelope, recipients and attempt history of one message")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    flush = sub.add_parser("flush", help="deliver now: everything, one domain, or messages")
    flush.add_argument("--domain")
    flush.add_argument("ids", nargs="*")
    for verb, text in (
        ("hold", "stop delivering these messages"),
        ("release", "undo hold"),
        ("delete", "remove these messages without a bounce"),
        ("requeue", "make these messages due now"),
    ):
        sub.add_parser(verb, help=text).add_argument(
            "ids", nargs="+", help="queue ids; ALL: every message; -: ids from stdin"
        )
    salvage = sub.add_parser("salvage", help="check queue.db; rebuild a damaged one from the"
                             " spool files (postsuper -s; daemon stopped)")
    salvage.add_argument("--force", action="store_true", help="rebuild even a sound one")
    return parser


def main(
    argv: list[str],
    *,
    config: Config,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    now: float | None = None,
    stdin: TextIO | None = None,
) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    match args.command:
        case "list":
            warn_if_down(config, "mailhaven queue", err)
            dropped = maildrop_entries(config.state_path)
            if args.json:
                for entry in dropped:
                    out.write(json.dumps({**message_json(entry), "queue_name": "maildrop"}) + "\n")
                for entry in list_all(config.spool_path):
                    out.write(json.dumps(message_json(entry)) + "\n")
                return 0
            return print_mailq(config.spool_path, out, dropped)
        case "show":
            msg = find(config.spool_path, args.id)
            if msg is None:
                print(f"mailhaven queue: {args.id}: no such message", file=err)
                return 1
            envelope = load_envelope(config.spool_path, args.id)
            if args.json:
                out.write(json.dumps({**message_json(msg), "envelope": envelope}) + "\n")
            else:
                for line in show_text(msg, envelope, time.time() if now is None else now):
                    out.write(line + "\n")
            return 0
        case "flush":
            if args.domain and args.ids:
                print("mailhaven queue: flush takes --domain or ids, not both", file=err)
                return 2
            return change(config, "flush", args.ids, args.domain, out, err)
        case "salvage":
            from mailhaven.cli import salvage

            return salvage.run(config, force=args.force, out=out, err=err)
        case verb:
            ids = expand_ids(config, args.ids, stdin or sys.stdin)
            if not ids and (ALL in args.ids or STDIN in args.ids):
                print(f"{verb}: 0 message(s)", file=out)  # ALL of an empty queue: nothing to do
                return 0
            return change(config, verb, ids, None, out, err, every=ALL in args.ids)


def mailq_main(
    argv: list[str], *, config: Config, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """`mailhaven mailq` (takes no arguments, like Postfix's mailq)."""
    err = stderr or sys.stderr
    if argv:
        print("mailq: takes no arguments", file=err)
        return 2
    warn_if_down(config, "mailq", err)
    return print_mailq(config.spool_path, stdout or sys.stdout, maildrop_entries(config.state_path))
