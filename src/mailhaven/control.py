"""The control channel: how the command line asks the running daemon to act on its queue.

Daemon side: `ControlServer(path, handlers)` listens on a unix-domain socket, normally
`<state_dir>/control.sock`, created with mode 0600. Client side: `request(path, obj)` sends one
request and returns the answer, or None when no daemon listens (the caller may then work on the
spool directly, holding `DaemonLock`).

Wire format: one JSON object per line each way (UTF-8, LF-terminated, at most `MAX_LINE`
octets). A connection may carry several requests; each gets exactly one answer, in order.

    {"cmd": "flush"}                          every deferred recipient due now, scheduler woken
    {"cmd": "flush", "domain": "example.com"} recipients at that domain
    {"cmd": "flush", "ids": ["QID", ...]}     those messages
    {"cmd": "hold" | "release" | "delete" | "requeue", "ids": ["QID", ...]}
    {"cmd": "pickup"}                         collect the maildrop now
    {"cmd": "etrn", "client": IP, "node": N}  an ETRN that a worker process received
    {"cmd": "release_domains", "domains": [D]} the daemon opens ETRN release windows in a
                                              worker's shard (`mailhaven.workers`)
    {"cmd": "ping"}                           is anyone there?

Answers: `{"ok": true, "count": N}` (N: what the handler reports it changed; `etrn` adds
`"reply": [code, enhanced, text]`, the SMTP reply to give) or `{"ok": false, "error": "text"}`. This module holds no queue logic: it checks the shape of a
request and calls the injected `Handlers`; what the words mean is the composition root's wiring.

`DaemonLock`: an exclusive `flock` on `<state_dir>/spool/queue.lock`. The daemon holds it for its
lifetime; the CLI takes it (without waiting) before it opens the spool itself, so the two never
run recovery or write the queue behind each other's back.

Only the client half (`request`) is on `sendmail`'s start-up path: asyncio loads lazily.

SECURITY: the socket is bound under umask 0177 (mode 0600 from its first moment) and each
connection's peer credentials (SO_PEERCRED) must be root or the daemon's own user; the parent
directory's permissions are the first gate. Requests are bounded in size, validated before any
handler runs, and a connection idle for `IDLE_TIMEOUT` seconds is closed. A handler's exception
becomes an error answer and a log line, never a crash of the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mailhaven.proto.replies import Reply

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("mailhaven.control")

SOCKET_NAME = "control.sock"
#: One request or answer line, in octets (10,000 queue ids fit).
MAX_LINE = 1024 * 1024
#: Seconds a connection may sit without sending a request.
IDLE_TIMEOUT = 30.0
#: At most this many ids in one request.
MAX_IDS = 10_000
_ID = re.compile(r"[0-9A-Za-z]{1,64}")
_DOMAIN = re.compile(r"[0-9A-Za-z._\-\[\]:]{1,255}")
_NODE = re.compile(r"[#@]?[0-9A-Za-z._\-\[\]:]{1,255}")
_IP = re.compile(r"[0-9A-Fa-f.:]{2,45}")


class ControlError(Exception):
    """The daemon is there but the exchange failed (permission, bad answer, timeout)."""


class Handlers(Protocol):
    """What the daemon does for each command; every method returns a count for the answer."""

    async def flush(self, domain: str | None, ids: Sequence[str]) -> int: ...

    async def hold(self, ids: Sequence[str]) -> int: ...

    async def release(self, ids: Sequence[str]) -> int: ...

    async def delete(self, ids: Sequence[str]) -> int: ...

    async def requeue(self, ids: Sequence[str]) -> int: ...

    async def pickup(self) -> int: ...

    async def etrn(self, client_ip: str, node: str) -> Reply: ...

    async def release_domains(self, domains: Sequence[str]) -> int: ...

    async def status(self) -> dict[str, Any]: ...


class BadRequest(ValueError):
    pass


def _ids(request: dict[str, Any], *, required: bool) -> list[str]:
    ids = request.get("ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) and _ID.fullmatch(i) for i in ids):
        raise BadRequest("ids: expected a list of queue ids")
    if len(ids) > MAX_IDS:
        raise BadRequest(f"ids: at most {MAX_IDS} per request")
    if required and not ids:
        raise BadRequest("ids: at least one queue id is required")
    return ids


async def dispatch(handlers: Handlers, request: Any) -> dict[str, Any]:
    """Check one request and run its handler; the answer object (never raises)."""
    try:
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            raise BadRequest('expected an object with a "cmd" string')
        match request["cmd"]:
            case "ping":
                count = 0
            case "flush":
                domain = request.get("domain")
                if domain is not None and not (
                    isinstance(domain, str) and _DOMAIN.fullmatch(domain)
                ):
                    raise BadRequest("domain: expected a domain name")
                ids = _ids(request, required=False)
                if domain is not None and ids:
                    raise BadRequest("flush takes a domain or ids, not both")
                count = await handlers.flush(domain, ids)
            case "hold":
                count = await handlers.hold(_ids(request, required=True))
            case "release":
                count = await handlers.release(_ids(request, required=True))
            case "delete":
                count = await handlers.delete(_ids(request, required=True))
            case "requeue":
                count = await handlers.requeue(_ids(request, required=True))
            case "pickup":
                count = await handlers.pickup()
            case "etrn":
                client, node = request.get("client"), request.get("node")
                if not (isinstance(client, str) and _IP.fullmatch(client)):
                    raise BadRequest("client: expected an IP address")
                if not (isinstance(node, str) and _NODE.fullmatch(node)):
                    raise BadRequest("node: expected an ETRN node name")
                r = await handlers.etrn(client, node)
                return {"ok": True, "count": 0, "reply": [r.code, r.enhanced, r.text]}
            case "release_domains":
                domains = request.get("domains")
                if not (
                    isinstance(domains, list)
                    and 0 < len(domains) <= MAX_IDS
                    and all(isinstance(d, str) and _DOMAIN.fullmatch(d) for d in domains)
                ):
                    raise BadRequest("domains: expected a list of domain names")
                count = await handlers.release_domains(domains)
            case "status":
                return {"ok": True, "count": 0, "status": await handlers.status()}
            case other:
                raise BadRequest(f"unknown command {other[:40]!r}")
    except BadRequest as err:
        return {"ok": False, "error": str(err)}
    except Exception:
        log.exception("control: %s failed", request.get("cmd"))
        return {"ok": False, "error": "internal error (see the daemon's log)"}
    return {"ok": True, "count": int(count)}


def _peer_allowed(sock: socket.socket | None) -> bool:
    """Root or our own user (SO_PEERCRED, Linux); where unavailable, the socket mode decides."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


class ControlServer:
    """Serves the control socket. `await start()`, later `await close()`."""

    def __init__(self, path: Path, handlers: Handlers) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Bind (replacing a stale socket file); OSError if another daemon answers there."""
        import asyncio

        if self.path.is_socket():
            if _connectable(self.path):
                raise OSError(errno.EADDRINUSE, "a daemon is already serving", str(self.path))
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=MAX_LINE + 1
        )
        log.info("control socket %s ready", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            if not _peer_allowed(writer.get_extra_info("socket")):
                log.warning("control: connection refused: peer is neither root nor our user")
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except (TimeoutError, asyncio.LimitOverrunError, ValueError):
                    return  # idle, or a line over MAX_LINE: close without an answer
                if not line:
                    return
                try:
                    request = json.loads(line)
                except ValueError:
                    answer: dict[str, Any] = {"ok": False, "error": "not a JSON line"}
                else:
                    answer = await dispatch(self.handlers, request)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def request(path: Path, obj: dict[str, Any], timeout: float = 30.0) -> dict[str, Any] | None:
    """Send one request to the daemon (blocking). None: nobody listens at `path` (no socket
    file, or a stale one). ControlError: a daemon is there but the exchange failed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as err:
            raise ControlError(f"{path}: {err.strerror or err}") from None
        try:
            s.sendall(json.dumps(obj).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_LINE:
                    raise ControlError(f"{path}: answer too long")
        except OSError as err:
            raise ControlError(f"{path}: {err.strerror or err}") from None
    finally:
        s.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: the daemon closed without a valid answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"{path}: unexpected answer")
    return answer


class AdminSpool(Protocol):
    """The spool's administration methods (`spool.store.Spool` has them)."""

    root: Path

    async def hold(self, queue_id: str) -> int: ...

    async def release(self, queue_id: str) -> int: ...

    async def delete(self, queue_id: str) -> bool: ...

    async def requeue(self, queue_id: str | None = None) -> int: ...

    async def release_domain(self, domain: str) -> int: ...

    async def counts(self) -> dict[str, int]: ...


def _nothing() -> None:
    return None


class QueueAdmin:
    """The standard `Handlers`: the postsuper/postqueue verbs on a spool, then a scheduler wake.

    Used by the daemon (wired to its spool, `Runner.revisit`/`forget_dead` and
    `Pickup.wake`/`collect`) and by the CLI when no daemon runs (no wake, no pickup). Counts
    are messages changed, except a flush of everything, which counts recipients made due.
    A flush of any kind also calls `forget_dead` (Postfix's flush_dead), so a destination that
    was down is tried at once rather than after the dead-destination timer.
    """

    def __init__(
        self,
        spool: AdminSpool,
        *,
        wake: Callable[[], None] = _nothing,
        pickup: Callable[[], Awaitable[int]] | None = None,
        etrn: Callable[[str, str], Awaitable[Reply]] | None = None,
        release_domains: Callable[[Sequence[str]], Awaitable[int]] | None = None,
        forget_dead: Callable[[], None] = _nothing,
        about: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.spool = spool
        self.wake = wake
        self.forget_dead = forget_dead
        self._about = about
        self._pickup = pickup
        self._etrn = etrn
        self._release_domains = release_domains

    async def flush(self, domain: str | None, ids: Sequence[str]) -> int:
        if ids:
            count = await self.requeue(ids)
        elif domain is not None:
            count = await self._flush_domain(domain)
        else:
            count = await self.spool.requeue(None)
        self.forget_dead()
        self.wake()
        return count

    async def _flush_domain(self, domain: str) -> int:
        """ETRN-like: release the domain's route hold, and make every message with an
        unfinished recipient there due now (its other recipients too: a whole-message requeue)."""
        import asyncio

        from mailhaven.spool.listing import list_queue

        domain = domain.lower().rstrip(".")

        def matching() -> list[str]:
            return [
                m.queue_id
                for m in list_queue(self.spool.root)
                if any(
                    r.status.unfinished and r.address.rpartition("@")[2].lower() == domain
                    for r in m.recipients
                )
            ]

        await self.spool.release_domain(domain)
        ids = await asyncio.to_thread(matching)
        return sum([1 for qid in ids if await self.spool.requeue(qid)])

    async def hold(self, ids: Sequence[str]) -> int:
        count = sum([1 for qid in ids if await self.spool.hold(qid)])
        self.wake()  # the scheduler gives back what it holds in memory, so the hold applies
        return count

    async def release(self, ids: Sequence[str]) -> int:
        count = sum([1 for qid in ids if await self.spool.release(qid)])
        self.wake()
        return count

    async def delete(self, ids: Sequence[str]) -> int:
        count = sum([1 for qid in ids if await self.spool.delete(qid)])
        self.wake()
        return count

    async def requeue(self, ids: Sequence[str]) -> int:
        count = sum([1 for qid in ids if await self.spool.requeue(qid)])
        self.wake()
        return count

    async def pickup(self) -> int:
        return 0 if self._pickup is None else await self._pickup()

    async def etrn(self, client_ip: str, node: str) -> Reply:
        if self._etrn is None:
            return Reply(458, f"Unable to queue messages for node {node}", "4.3.0")
        return await self._etrn(client_ip, node)

    async def release_domains(self, domains: Sequence[str]) -> int:
        if self._release_domains is None:
            raise BadRequest("release_domains: no part-time hosts here")
        return await self._release_domains(domains)


    async def status(self) -> dict[str, Any]:
        """What the process says of itself (`about`), with its shard's queue counts."""
        facts = dict(self._about()) if self._about is not None else {}
        facts["queue"] = await self.spool.counts()
        return facts


def add_counts(total: dict[str, int], more: Any) -> None:
    """Add one shard's queue counts (a worker's answer: checked, it is another process's)."""
    if isinstance(more, dict):
        for key, value in more.items():
            if isinstance(key, str) and isinstance(value, int):
                total[key] = total.get(key, 0) + value


class Forwarding:
    """The daemon's `Handlers` with worker processes: each queue verb runs on the daemon's own
    shard and is passed on to every worker's control socket; the answer adds up the counts.

    A worker that does not answer (it is restarting) is logged and counts 0: the command line
    then reports fewer messages changed than asked, which is the truth. `pickup`, `etrn` and
    `release_domains` are the daemon's alone (its ETRN handler reaches the workers itself)."""

    def __init__(self, local: QueueAdmin, peers: Sequence[Path]) -> None:
        self.local = local
        self.peers = tuple(peers)

    async def _everywhere(self, request: dict[str, Any], mine: Awaitable[int]) -> int:
        return await mine + await ask_all(self.peers, request)

    async def flush(self, domain: str | None, ids: Sequence[str]) -> int:
        request: dict[str, Any] = {"cmd": "flush", "ids": list(ids)}
        if domain is not None:
            request["domain"] = domain
        return await self._everywhere(request, self.local.flush(domain, ids))

    async def hold(self, ids: Sequence[str]) -> int:
        return await self._everywhere({"cmd": "hold", "ids": list(ids)}, self.local.hold(ids))

    async def release(self, ids: Sequence[str]) -> int:
        request = {"cmd": "release", "ids": list(ids)}
        return await self._everywhere(request, self.local.release(ids))

    async def delete(self, ids: Sequence[str]) -> int:
        return await self._everywhere({"cmd": "delete", "ids": list(ids)}, self.local.delete(ids))

    async def requeue(self, ids: Sequence[str]) -> int:
        request = {"cmd": "requeue", "ids": list(ids)}
        return await self._everywhere(request, self.local.requeue(ids))

    async def pickup(self) -> int:
        return await self.local.pickup()

    async def etrn(self, client_ip: str, node: str) -> Reply:
        return await self.local.etrn(client_ip, node)

    async def release_domains(self, domains: Sequence[str]) -> int:
        return await self.local.release_domains(domains)

    async def status(self) -> dict[str, Any]:
        """The daemon's facts, its queue counts added to every worker's shard's."""
        import asyncio

        facts = await self.local.status()
        answers = await asyncio.gather(
            *(asyncio.to_thread(_ask_status, path) for path in self.peers)
        )
        facts["workers"] = sum(1 for answer in answers if answer is not None)
        for answer in answers:
            if answer is not None:
                add_counts(facts["queue"], answer.get("queue"))
        return facts


def _ask_status(path: Path) -> dict[str, Any] | None:
    try:
        answer = request(path, {"cmd": "status"}, 10.0)
    except ControlError as err:
        log.warning("control: %s: %s", path, err)
        return None
    status = answer.get("status") if answer else None
    return status if isinstance(status, dict) else None


async def ask_all(paths: Sequence[Path], obj: dict[str, Any]) -> int:
    """`ask` every worker at once (each in a thread: `request` blocks); the counts added up."""
    import asyncio

    return sum(await asyncio.gather(*(asyncio.to_thread(ask, path, obj) for path in paths)))


def ask(path: Path, obj: dict[str, Any], timeout: float = 30.0) -> int:
    """One request to a worker's control socket (blocking); its count, 0 if it failed."""
    try:
        answer = request(path, obj, timeout)
    except ControlError as err:
        log.warning("control: %s: %s", path, err)
        return 0
    if answer is None or not answer.get("ok"):
        log.warning("control: %s did not do %s: %s", path, obj.get("cmd"),
                    "no answer" if answer is None else answer.get("error"))
        return 0
    return int(answer.get("count", 0))


class DaemonLock:
    """An exclusive `flock` that says "the queue is in use" (daemon, or a CLI working offline)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, path: Path, *, wait: bool = False) -> DaemonLock | None:
        """Take the lock; None when someone else holds it and `wait` is False."""
        import fcntl

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> DaemonLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_path(spool_path: Path) -> Path:
    return spool_path / "queue.lock"
