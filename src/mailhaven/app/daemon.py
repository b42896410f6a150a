"""One running mailhaven process: start, serve until told to stop, reload on SIGHUP, stop.

The daemon (shard 0) binds the listeners, drops privileges, runs the engine (`engine`), the
local submission (pickup and the control socket), POP3, the worker processes
(`smtp_processes` > 1) and ACME. A worker process (`App(config, worker=role)`) runs the same
engine on a queue shard of its own (`runtime.workers`, `spool.shards`) on the daemon's `smtp`
sockets. Every task the process starts (the queue runner, the pickup, timers, ACME, worker
watchers, postmaster notices) lives in one `asyncio.TaskGroup` (`_spawn`): none outlives
`run()`, and one that dies of an unexpected error stops the process (systemd restarts it)
instead of failing silently. Tasks a role makes for its own work (a session, a delivery, a DNS
lookup) belong to that role, which ends them when it stops.

Local submission (`sendmail`) and the control socket (`mailhaven queue`): `local_submission`.
Each process holds its shard's queue lock (`DaemonLock`) for its lifetime, so an offline CLI
never opens the spool behind it.

Signals: SIGTERM/SIGINT stop gracefully (see `SMTPService.shutdown`); SIGHUP re-reads the
config file and applies every setting except `reload.RESTART_ONLY` ones (domains, users,
aliases, trusted networks, ETRN's held domains and clients, limits and timeouts for new
sessions, the TLS certificate, relay and queue settings, the log level). Reload validates
everything first (`reload.prepare_reload`) and then applies all of it or, when anything is
wrong, none of it; the log says which and why. The daemon forwards SIGHUP to its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from mailhaven import maillog
from mailhaven.app.alerts import PostmasterAlerts
from mailhaven.app.engine import Engine, build_engine, release_local
from mailhaven.app.front import Front
from mailhaven.app.listeners import (
    LISTENER_NAMES,
    bind_listeners,
    load_tls,
)
from mailhaven.app.live import Live, prepare_mailboxes
from mailhaven.app.local_submission import (
    about,
    collect_then_watch,
    daemon_control,
    open_pickup,
    worker_control,
    worker_sockets,
)
from mailhaven.app.mail_auth import inbound_gate
from mailhaven.app.reload import PreparedReload, announce, apply_reload, prepare_or_refuse
from mailhaven.checks.services import CheckServices
from mailhaven.config import Config
from mailhaven.control import channel as control
from mailhaven.control.forwarding import forward_etrn, release_in_workers
from mailhaven.faults import arm as arm_crash_points
from mailhaven.faults import crash_point
from mailhaven.net import acme, tls_tickets
from mailhaven.pickup.collector import Pickup
from mailhaven.runtime import privileges, systemd
from mailhaven.runtime.workers import (
    WorkerPool,
    WorkerRole,
    take_message,
    watch_lifeline,
)
from mailhaven.spool import shards
from mailhaven.spool.lock import DaemonLock, lock_queue
from mailhaven.spool.store import Spool

__all__ = ["LISTENER_NAMES", "App"]

log = logging.getLogger("mailhaven.master")


class App:
    """One running mailhaven: call `await App(config).run()`; `stop()` from elsewhere."""

    def __init__(self, config: Config, *, worker: WorkerRole | None = None) -> None:
        self.live = Live(config)
        #: set in a worker process (see `mailhaven.runtime.workers`): the engine on a shard of
        #: its own
        self.worker = worker
        self.spool = Spool(
            shards.shard_path(config.spool_path, worker.shard if worker else 0),
            checkpoint=crash_point,
            minfree=config.queue.minfree,
        )
        self.engine: Engine | None = None
        #: notices to the postmaster (sender limits), queued in tasks of their own
        self.alerts = PostmasterAlerts(
            lambda: self.config, lambda: self.engine.smtp.sink if self.engine else None,
            self._spawn)
        #: access lists, DNS lists, greylisting, sender limits (`checks.services`)
        self.checks = CheckServices(config, alert=self.alerts)
        #: what the listeners share: login limits, authenticator, certificate, profiles
        self.front = Front(self.live, self.checks)
        self.workers: WorkerPool | None = None
        self.pickup: Pickup | None = None
        self.control: control.ControlServer | None = None
        self.ready = asyncio.Event()
        #: SIGHUP waits until start-up is done (`_reload_signalled`)
        self._up = False
        self._reload_pending = False
        #: systemd's notify socket, when it started us (`Type=notify`)
        self.manager: systemd.Notifier | None = None
        self._stop = asyncio.Event()
        self._queue_lock: DaemonLock | None = None
        #: every task of the process (entered by `run`; `create_task` before that raises)
        self._tasks = asyncio.TaskGroup()
        #: the tasks `shutdown` cancels (the runner and the worker watchers stop themselves)
        self._background: set[asyncio.Task[Any]] = set()
        self._release_task: asyncio.Task[None] | None = None
        self._runner_task: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    @property
    def config(self) -> Config:
        return self.live.config

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, stop_cancels: bool = True
               ) -> asyncio.Task[Any]:
        """A task in the process's TaskGroup: an unexpected error in it stops the process."""
        task = self._tasks.create_task(coro)
        if stop_cancels:
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ wiring

    def _build_engine(self) -> Engine:
        daemon_with_workers = self.worker is None and self.config.smtp_processes > 1
        peers = worker_sockets(self.config)

        async def elsewhere(domains: Sequence[str]) -> int:
            return await release_in_workers(peers, domains)

        self.engine = build_engine(
            self.live, self.spool, release_elsewhere=elsewhere if daemon_with_workers else None
        )
        engine = self.engine
        self.front.profiles.inbound = lambda: inbound_gate(
            self.live.config, engine.relay_agent.resolver, self.spool
        )
        state = self.config.state_path
        self.front.profiles.etrn = (  # a worker's goes to the daemon, which releases every shard
            (lambda facts, arg: engine.part_time.etrn(facts.client_ip, arg)) if self.worker is None
            else (lambda facts, arg: forward_etrn(state, facts.client_ip, arg)))
        return self.engine

    def _schedule_releases(self) -> None:
        """(Re)start the periodic release of held domains (the daemon releases every shard)."""
        if self._release_task is not None:
            self._release_task.cancel()
            self._release_task = None
        interval = self.config.etrn.release_interval
        if interval > 0 and self.worker is None and self.engine is not None:
            self._release_task = self._spawn(self.engine.part_time.release_periodically(interval))

    async def start(self) -> None:
        """One start-up for both roles: the process takes its ground (the daemon: sockets,
        user, mail directories; a worker: the daemon's sockets and ticket key), opens its
        queue shard and engine, then serves its part."""
        role = self.worker
        if role is None:
            await self._prepare_daemon()
        else:
            self._prepare_worker(role)
        config = self.config
        self.front.tls = load_tls(config)  # a worker's: the daemon made any self-signed one already
        self._queue_lock = lock_queue(self.spool.root)
        if role is None:  # shards no process serves any more (`smtp_processes` lowered)
            await asyncio.to_thread(shards.adopt_orphans, config.spool_path,
                                    config.smtp_processes)
        await asyncio.to_thread(self.spool.open)
        engine = self._build_engine()
        await self.checks.open()
        if role is None:
            await self._serve_daemon(engine)
        else:
            await self._serve_worker(engine, role)
        task = acme.service(config.tls.acme, config.state_path, self.front.tls,
                            orders=role is None)
        if task is not None:  # `[tls] acme`: the daemon orders, a worker follows its file
            self._spawn(task)
        self.ready.set()
        if role is None:
            arm_crash_points()  # tests only: start-up's own commits are not crash points

    async def _prepare_daemon(self) -> None:
        config = self.config
        log.info(
            "starting mailhaven: hostname=%s state_dir=%s config=%s event_loop=%s",
            config.hostname,
            config.state_path,
            config.source or "(built-in defaults)",
            # the loop that really runs (its package: "asyncio" or "uvloop"), not the setting
            type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        self.front.bound = bind_listeners(config, systemd.listen_sockets())
        privileges.become(config.user, config.group, config.state_path, config.log)
        # private: queued mail and mailboxes (spool/ itself is made 0700 by the spool)
        config.state_path.mkdir(mode=0o750, parents=True, exist_ok=True)
        config.mail_root.mkdir(mode=0o700, exist_ok=True)
        self.live.users.load()
        await asyncio.to_thread(prepare_mailboxes, self.live)
        # one session-ticket key for us and our workers (`net.tls_tickets`), before any context
        tls_tickets.process_keys.install(tls_tickets.new_key())

    def _prepare_worker(self, role: WorkerRole) -> None:
        self.front.bound = {"smtp": [(f"fd {fd} (from the daemon)", socket.socket(fileno=fd))
                                     for fd in role.fds]}
        self.live.users.load()
        key = None  # the daemon's ticket key, in the lifeline before we started
        if role.lifeline is not None:
            key = take_message(role.lifeline, tls_tickets.KEY_LENGTH)
        tls_tickets.process_keys.adopt(key, f"worker {role.shard}")

    async def _serve_daemon(self, engine: Engine) -> None:
        """Held mail of local domains, the release timer, local submission, the listeners, the
        queue runner, the worker processes and their ticket keys."""
        await release_local(engine, self.live.users.domains)
        self._schedule_releases()
        # The control socket is up before any listener: once a client can connect, a
        # `sendmail` poke is answered too (else its mail waits for the pickup's next poll).
        await self._start_local_submission(engine)
        await self.front.serve(engine.smtp)
        self._runner_task = self._spawn(engine.runner.run(), stop_cancels=False)
        extra = self.config.smtp_processes - 1
        if extra > 0:  # worker processes on our `smtp` listening sockets
            self.workers = WorkerPool(extra, self.config.source,
                                      [s.fileno() for s in self.front.smtp_sockets],
                                      ticket_key=tls_tickets.process_keys.key,
                                      spawn=lambda c: self._spawn(c, stop_cancels=False))
            await self.workers.start()
        workers = self.workers
        self._spawn(tls_tickets.rotate(
            tls_tickets.process_keys, workers.send_ticket_key if workers else lambda key: None))

    async def _serve_worker(self, engine: Engine, role: WorkerRole) -> None:
        """The shard's control socket (for the daemon), the daemon's `smtp` sockets, the queue
        runner, and the lifeline: the daemon's later ticket keys, and its end."""
        self.control = worker_control(self.spool, engine, self.config.state_path, role.shard)
        await self.control.start()
        await self.front.serve(engine.smtp)
        self._runner_task = self._spawn(engine.runner.run(), stop_cancels=False)
        if role.lifeline is not None:
            watch_lifeline(role.lifeline, self.stop, tls_tickets.process_keys.install,
                           tls_tickets.KEY_LENGTH)
        log.info("worker %d ready on %d smtp socket(s), queue %s", role.shard, len(role.fds),
                 self.spool.root)

    async def _start_local_submission(self, engine: Engine) -> None:
        """The pickup (collects what `sendmail` dropped, also while we were down) and the
        control socket that `sendmail` pokes and `mailhaven queue` drives."""
        self.pickup = await open_pickup(self.spool, engine, lambda: self.config)
        self._spawn(collect_then_watch(self.pickup))
        self.control = daemon_control(
            self.spool, engine, self.pickup, self.config,
            lambda: about(self.config, self._started, self.front.tls),
        )
        await self.control.start()

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> int:
        try:
            async with self._tasks:
                await self._serve()
        except BaseExceptionGroup as group:
            # one failure (a listen address in use...) surfaces as itself, for the CLI
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        return 0

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        # Read (and unset) before any worker is spawned: only the daemon talks to systemd.
        self.manager = systemd.Notifier.from_environ() if self.worker is None else None
        # Handlers before the listeners open: a signal that arrives while we start (a client
        # may already connect) must not meet the default action, which ends the process.
        # A SIGHUP then is remembered and applied once everything it reloads exists.
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_signalled)
            loop.add_signal_handler(signal.SIGUSR1, self._reopen_log)
        await self.start()
        self._up = True
        if self._reload_pending:
            self._reload_pending = False
            self._reload_signalled()
        if self.manager is not None:
            self.manager.send("READY=1", f"STATUS={await self._status()}")
            self._spawn(self.manager.report(self._status))
        await self._stop.wait()
        if self.manager is not None:
            self.manager.send("STOPPING=1", "STATUS=finishing transactions in flight")
        await self.shutdown()

    def _reopen_log(self) -> None:
        """SIGUSR1 (logrotate's postrotate): reopen a log file here and in every worker."""
        if self.workers is not None:
            self.workers.signal(signal.SIGUSR1)
        maillog.reopen()

    def _reload_signalled(self) -> None:
        """SIGHUP, bracketed for systemd (`Type=notify-reload` wants RELOADING=1 with the
        monotonic time, then READY=1 once the new configuration is in force)."""
        if not self._up:
            self._reload_pending = True
            return
        if self.manager is not None:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.manager.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
        self.reload()
        if self.manager is not None:
            self.manager.send("READY=1")

    async def _status(self) -> str:
        queued = await self.spool.count()
        return f"serving; {queued} message(s) in the queue"

    def stop(self) -> None:
        log.info("stopping: finishing transactions in flight")
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: validate the whole new configuration, then apply all of it or none."""
        if self.workers is not None:
            self.workers.signal(signal.SIGHUP)  # each re-reads the same file itself
        prepared = prepare_or_refuse(
            self.config, has_tls=self.front.tls is not None, reverse_srs=self.live.reverse_srs
        )
        if prepared is not None:
            self._apply_reload(prepared)
            announce(prepared)

    def _apply_reload(self, prepared: PreparedReload) -> None:
        applied = apply_reload(prepared, self.live, self.front, self.engine, self.checks)
        if applied.old_outbound is not None:  # its signing helper: the new hook has its own
            self._spawn(applied.old_outbound.close())
        if applied.releases_changed:
            self._schedule_releases()
        if applied.open_greylist:
            self._spawn(self._open_greylist())
        if applied.returned and self.worker is None and self.engine is not None:
            self._spawn(release_local(self.engine, applied.returned))

    async def _open_greylist(self) -> None:
        """Greylisting turned on by a reload: its database opens in a thread, then the MX
        profile is built afresh so new sessions use it."""
        await self.checks.open()
        self.front.profiles.forget()

    async def shutdown(self) -> None:
        for task in list(self._background):
            task.cancel()
        grace = self.config.timeouts.shutdown_grace
        stopping = self.front.close_pop3(grace)
        engine = self.engine
        # Our sessions and the workers' finish their transactions side by side; the control
        # socket stays up meanwhile (a worker may still forward an ETRN).
        if engine is not None:
            stopping.append(engine.smtp.shutdown())
        if self.workers is not None:
            stopping.append(self.workers.stop(grace))
        await asyncio.gather(*stopping)
        if self.control is not None:
            await self.control.close()
        if engine is not None:
            await engine.runner.stop(grace=grace)
            if self._runner_task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._runner_task
            await engine.relay_agent.close()
            if engine.intake.outbound is not None:
                await engine.intake.outbound.close()
        await self.checks.close()
        await asyncio.to_thread(self.spool.close)
        if self._queue_lock is not None:
            self._queue_lock.release()
        log.info("stopped")
