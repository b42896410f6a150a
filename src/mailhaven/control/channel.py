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
                                              worker's shard (`mailhaven.runtime.workers`)
    {"cmd": "ping"}                           is anyone there?

Answers: `{"ok": true, "count": N}` (N: what the handler reports it changed; `etrn` adds
`"reply": [code, enhanced, text]`, the SMTP reply to give) or `{"ok": false, "error": "text"}`. This module holds no queue logic: it checks the shape of a
request and calls the injected `Handlers`; what the words mean is `control.queue_admin` (one
process) or `control.forwarding` (the daemon with worker processes).

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
from collections.abc import Sequence
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
