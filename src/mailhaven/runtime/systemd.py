"""systemd's side doors, without libsystemd: the notify protocol and socket activation.

In: the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`/`WATCHDOG_PID`,
`LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`). Out: `Notifier.send("READY=1", ...)` datagrams
(sd_notify(3)), the watchdog pings and status lines while the loop turns (`Notifier.report`),
and the inherited listening sockets (sd_listen_fds(3)).
Both protocols are a few lines of stable, documented wire format, so a binding library would add
a C dependency for nothing.

Invariants: a notification never raises and never blocks (a full or vanished socket loses the
message, as sd_notify does); the activation variables are read once and removed from the
environment, so a child process (a worker, `sendmail` run by a filter) cannot mistake the
sockets for its own. Everything is inert when the variables are absent: the server runs the
same outside systemd.

SECURITY: `LISTEN_FDS` is honoured only when `LISTEN_PID` names this process, as sd_listen_fds
requires; the notify socket is whatever our own service manager told us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping

log = logging.getLogger("mailhaven.master")

#: sd_listen_fds(3): inherited descriptors start here.
LISTEN_FDS_START = 3
#: How often the daemon tells systemd its queue size (`systemctl status`).
STATUS_INTERVAL = 30.0


class Notifier:
    """Sends sd_notify(3) state lines to the service manager's datagram socket."""

    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        # "@name" is a socket in the abstract namespace: its first byte is NUL on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._warned = False

    @classmethod
    def from_environ(
        cls, env: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier | None:
        """The notifier systemd asked for (None outside `Type=notify`). The variables are
        removed, as sd_notify's `unset_environment` does."""
        env = os.environ if env is None else env
        address = env.pop("NOTIFY_SOCKET", "")
        usec_text = env.pop("WATCHDOG_USEC", "")
        watchdog_pid = env.pop("WATCHDOG_PID", "")
        if not address or not (address.startswith("/") or address.startswith("@")):
            return None
        usec: int | None = None
        own = str(os.getpid() if pid is None else pid)
        if usec_text.isdigit() and int(usec_text) > 0 and watchdog_pid in ("", own):
            usec = int(usec_text)
        return cls(address, usec)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between `WATCHDOG=1` pings: half the manager's timeout, as sd_watchdog_enabled
        recommends; None when the watchdog is off."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=VALUE` lines; False (logged once) if it could not be sent."""
        payload = "\n".join(field.replace("\n", " ") for field in fields).encode()
        try:
            self._sock.sendto(payload, self.address)
        except OSError as err:
            if not self._warned:
                self._warned = True
                log.warning("systemd notify socket %r: %s", self.address.lstrip("\0"), err)
            return False
        return True

    async def report(
        self, status: Callable[[], Awaitable[str]], status_interval: float = STATUS_INTERVAL
    ) -> None:
        """WATCHDOG=1 while the event loop turns (a stuck loop stops the pings and systemd
        restarts us), and a STATUS= line from `status()` every `status_interval` seconds for
        `systemctl status`. Runs until cancelled."""
        watchdog = self.watchdog_interval
        interval = min(watchdog, status_interval) if watchdog else status_interval
        next_status = asyncio.get_running_loop().time() + status_interval
        while True:
            await asyncio.sleep(interval)
            fields = ["WATCHDOG=1"] if watchdog else []
            if asyncio.get_running_loop().time() >= next_status:
                next_status += status_interval
                with contextlib.suppress(Exception):  # a busy spool skips one report
                    fields.append(f"STATUS={await status()}")
            if fields:
                self.send(*fields)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def listen_sockets(
    env: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[tuple[str, socket.socket]]:
    """The listening sockets systemd passed us, with their `FileDescriptorName=` (or "" when
    unnamed); empty when none were passed to this process. The variables are removed."""
    env = os.environ if env is None else env
    count_text = env.pop("LISTEN_FDS", "")
    listen_pid = env.pop("LISTEN_PID", "")
    names_text = env.pop("LISTEN_FDNAMES", "")
    if not count_text.isdigit() or listen_pid != str(os.getpid() if pid is None else pid):
        return []
    count = int(count_text)
    names = names_text.split(":") if names_text else []
    out = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        out.append((names[index] if index < len(names) else "", sock))
    return out
