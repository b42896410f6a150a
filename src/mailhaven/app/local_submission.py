"""How local programs reach a running mailhaven: the pickup and the control socket.

The daemon: `mailhaven sendmail` writes into `<state_dir>/maildrop/`; the pickup collects it at
start-up (mail dropped while we were down), when poked over the control socket and when the
directory changes, through the `non_smtpd` milters (read per message, so a reload applies). The
control socket (`<state_dir>/control.sock`) answers `mailhaven queue`, `mailhaven status` and
`sendmail -q`; with worker processes its queue verbs reach every shard (`control.forwarding`).
A worker: a control socket of its own (`control-<k>.sock`) over which the daemon drives its
shard. In: the shard's spool and engine. Out: the `Pickup` and an unstarted `ControlServer`.

SECURITY: the control sockets are the control package's (mode 0600, peer credentials checked).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailhaven import __version__
from mailhaven.app.engine import Engine
from mailhaven.app.listeners import LISTENER_NAMES
from mailhaven.checks.milter.non_smtpd import MilteredDoor
from mailhaven.checks.milter.settings import milter_settings
from mailhaven.config import Config
from mailhaven.control import channel as control
from mailhaven.control.forwarding import Forwarding
from mailhaven.control.queue_admin import QueueAdmin
from mailhaven.net.tls import ReloadableTLS, certificate_facts
from mailhaven.pickup.collector import IntakeDoor, Pickup
from mailhaven.runtime.workers import control_socket
from mailhaven.spool.store import Spool


async def open_pickup(spool: Spool, engine: Engine, config: Callable[[], Config]) -> Pickup:
    """The daemon's pickup on `<state_dir>/maildrop` (made if missing); `collect` then `run`."""
    door = MilteredDoor(IntakeDoor(spool, engine.intake),
                        lambda: milter_settings(config(), "non_smtpd"))
    pickup = Pickup(config().state_path / "maildrop", door)
    await asyncio.to_thread(pickup.prepare)
    return pickup


async def collect_then_watch(pickup: Pickup) -> None:
    """What `sendmail` dropped while we were down, then each new drop."""
    await pickup.collect()
    await pickup.run()


def daemon_control(
    spool: Spool,
    engine: Engine,
    pickup: Pickup,
    config: Config,
    about: Callable[[], dict[str, Any]],
) -> control.ControlServer:
    """The daemon's control socket: queue verbs on its shard (and, with workers, theirs), the
    pickup poke, ETRN and `status`."""
    admin = QueueAdmin(
        spool,
        wake=engine.runner.revisit,
        pickup=pickup.collect,
        etrn=engine.part_time.etrn,
        release_domains=engine.part_time.release,
        forget_dead=engine.runner.forget_dead,
        about=about,
    )
    handlers: control.Handlers = admin
    if config.smtp_processes > 1:  # queue verbs reach the workers' shards too
        handlers = Forwarding(admin, worker_sockets(config))
    return control.ControlServer(config.state_path / control.SOCKET_NAME, handlers)


def worker_control(spool: Spool, engine: Engine, state_dir: Path, shard: int
                   ) -> control.ControlServer:
    """A worker's control socket: the daemon's queue verbs and releases on this shard."""
    return control.ControlServer(
        control_socket(state_dir, shard),
        QueueAdmin(
            spool,
            wake=engine.runner.revisit,
            release_domains=engine.part_time.release,
            forget_dead=engine.runner.forget_dead,
        ),
    )


def worker_sockets(config: Config) -> list[Path]:
    """The control sockets of the daemon's workers."""
    return [control_socket(config.state_path, k) for k in range(1, config.smtp_processes)]


def about(config: Config, started: float, tls: ReloadableTLS | None) -> dict[str, Any]:
    """What `mailhaven status` shows besides the queue: who, since when (`started`, monotonic
    seconds), where, which certificate (and how long it has left)."""
    listen = config.listen
    return {
        "pid": os.getpid(),
        "version": __version__,
        "hostname": config.hostname,
        "config": config.source or "(built-in defaults)",
        "state_dir": str(config.state_path),
        "uptime": round(time.monotonic() - started, 1),
        "listeners": {
            name: list(getattr(listen, name)) for name in LISTENER_NAMES if getattr(listen, name)
        },
        "processes": config.smtp_processes,
        "certificate": certificate_facts(tls.cert_file) if tls else None,
    }
