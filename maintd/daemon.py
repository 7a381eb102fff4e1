"""The daemon's life cycle: start, serve, reload on SIGHUP, stop on SIGTERM. Its parts hold their own state:

- `Inventory` (inventory.py): every release and its state;
- `Intake` (intake.py): file events to complete uploads;
- `DeployRunner` (runner.py): one deploy at a time, the automatic policy, followers;
- the control socket (control.py, handlers.py): operators' commands;
- `Monitoring` (monitoring.py): the metrics, counted from `events` and shown the daemon's state by `announce`.

All of them run on one asyncio loop; only walks of a release and deploys run in worker threads, and their results
come back to the loop. So there is exactly one writer of the daemon's picture of `releases/`.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from . import leftovers, log
from .cluster import Coordinator, Membership
from .config import Config, ConfigError, changed_keys
from .config import load as load_config
from .context import Context
from .etcd import Etcd
from .events import Events, Listener
from .intake import Intake
from .inventory import Inventory
from .joiner import Joiner
from .monitoring import Monitoring
from .notify import Notifier, watchdog_interval
from .rebuild import rebuild
from .recovery import recover
from .runner import DeployRunner
from .state import Memory, Store
from .tasks import Tasks
from .tree import name_key
from .upload import UploadTracker
from .version import version
from .webhooks import Webhooks

# What a reload cannot change: the daemon's identity, its socket, its place in a cluster.
FIXED = ("app", "root", "state", "control", "cluster")
JOIN_WAIT = 5.0  # seconds a cluster member waits at start for its lease
RESCAN_INTERVAL = 60.0  # seconds between two rescans of releases/
STOP_EXTENSION = 30.0  # seconds of TimeoutStopSec each EXTEND_TIMEOUT_USEC grants a stop held by a deploy


class AlreadyRunning(Exception):
    """Another maintd holds this app's lock."""


class Closable(Protocol):
    def close(self) -> None: ...


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = version()  # the code this process runs: after a package upgrade, status tells old from new
        self.log = log.get(app=config.app)
        for warning in config.warnings:
            self.log.warning(warning)
        self.notifier = Notifier()
        self.lock_fd = acquire_lock(config.state_dir)  # held for the daemon's life: the flock is ownership
        self.store = Store(config.state_dir, self.log.error)
        self.events = Events(config.app)  # what happened, for whoever listens (events.py)
        self.webhooks = Webhooks(config.app)  # [notify]: its threads start in `run`
        self.monitoring = Monitoring(config, self.log)
        self.ctx = Context.build(config, self.store, self.events)
        if self.store.damage:  # state.json lost: carry on with what can be known again, paused
            self.log.error(rebuild(self.store, self.ctx.tree, self.ctx.flags))
        self.tasks = Tasks()
        upload = config.upload
        self.inventory = Inventory(self.ctx.tree, self.store, UploadTracker(upload.quiet_period, upload.require_marker))
        self.coordinator = (Coordinator(config.cluster, Etcd(config.cluster.etcd), self.events) if config.cluster
                            else None)
        self.runner = DeployRunner(self.ctx, self.inventory, self.tasks, self.announce, self.coordinator)
        self.intake = Intake(self.ctx, self.inventory, self.tasks, self.runner.kick)
        self.membership: Membership | None = None
        self.etcd_trouble = ""  # why etcd cannot be reached, while it cannot
        self.stopping = asyncio.Event()
        self.serving = False  # READY=1 was sent
        self.events.listen(*self._listeners())

    @property
    def memory(self) -> Memory:
        return self.store.memory

    async def run(self, servers: list[Callable[[Daemon], Awaitable[Closable]]] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)  # from the start: SIGHUP's default is to die
        self.webhooks.configure(self.config.notify)  # before recovery, which may finish a deploy
        self.events.listen(*self._listeners())
        self.ctx.tree.make_releases()
        for link in self.ctx.tree.remove_stale_links():
            self.log.warning(f"removed a temporary link left by a crash: {link}")
        if stages := leftovers.remove_staging(self.ctx):
            self.log.warning(f"removed {len(stages)} staging director{'y' if len(stages) == 1 else 'ies'} left by a "
                             f"crash: {', '.join(map(str, stages))}")
        if self.coordinator:
            self.membership = Membership(self.coordinator, self._etcd_problem, lambda: self.ctx.tree.live())
            self.membership.start()
            self.coordinator.changes.start()
            # Before anything can begin a switch: a member without its alive key is gone to the others, and a
            # switch begun meanwhile would be aborted. Bounded: with etcd away, nothing can begin anyway.
            await asyncio.to_thread(self.membership.joined.wait, JOIN_WAIT)
        inflight = self.store.in_flight()
        switch_cut_off = bool(inflight and inflight.switch and self.coordinator)
        if not switch_cut_off:
            recover(self.ctx, self.coordinator)  # quick without a switch to obey: before anything else
            if self.membership:  # it may have moved `current`
                self.membership.nudge()
        if found := self.ctx.tree.current_problem():
            self.log.error(found[0])
        started = [await server(self) for server in servers or []]
        self.intake.start()
        self.monitoring.show(self)
        self.log.info(f"maintd watching {self.ctx.tree.releases}", live=self.ctx.tree.live(),
                      paused=self.memory.paused)
        self.serving = True
        self.notifier.ready(self.status_line())
        chores = [self.tasks.spawn(self._rescan_periodically()), self.tasks.spawn(self.monitoring.keep_showing(self))]
        if switch_cut_off:  # may wait for etcd as long as it takes: after READY, shown in `status`
            self.tasks.spawn(self.runner.recover())
        else:
            self.runner.kick()
        if self.coordinator:
            chores.append(self.tasks.spawn(Joiner(self.coordinator, self.inventory, self.runner, self.tasks).run()))
        if interval := watchdog_interval():
            chores.append(self.tasks.spawn(self._keep_watchdog_fed(interval)))
        await self.stopping.wait()
        self.runner.accepting = False
        if self.coordinator:  # a switch's waits end now; recovery at the next start obeys the decision
            self.coordinator.stop()
        self.notifier.stopping()
        self.log.info("stopping" + (" after the deploy in progress" if self.runner.current else ""))
        for chore in chores:
            chore.cancel()
        # Whatever holds the runner or queues for it first (a deploy, a recovery waiting on etcd, an operator's
        # restart with a deploy behind it) finishes before we exit, and holds off the unit's TimeoutStopSec
        # meanwhile: each hook is bounded by hooks.timeout, but a deploy may run several, and a fixed TimeoutStopSec
        # long enough for all of them would let a hung maintd hold up an upgrade as long.
        holding = self.tasks.spawn(self.notifier.hold_timeout(STOP_EXTENSION))
        async with self.runner.exclusive():
            holding.cancel()
            for server in started:
                server.close()
            self.intake.stop()
            if self.membership:
                await asyncio.to_thread(self.membership.stop)
            self.monitoring.close()
        await asyncio.to_thread(self.webhooks.stop)  # after the last deploy's end: its events get their moment
        self.log.info("stopped")

    def _listeners(self) -> tuple[Listener, ...]:
        """Who hears the events (events.py), as the configuration says: set at start and on every reload."""
        return (*self.monitoring.listeners(), *self.webhooks.listeners())

    async def _rescan_periodically(self) -> None:
        """The safety net under inotify, which can overflow; it outlives a rescan that fails (releases/ unreadable
        for a moment: out of descriptors)."""
        while True:
            await asyncio.sleep(RESCAN_INTERVAL)
            try:
                self.intake.rescan()
            except OSError as exc:
                self.log.error(f"rescan of releases/ failed: {exc}; trying again in {RESCAN_INTERVAL:g}s")

    def _etcd_problem(self, problem: str) -> None:
        """From the membership thread: etcd went away (or came back)."""
        if problem:
            self.log.error(f"etcd cannot be reached: {problem}")
        else:
            self.log.info("etcd answers again")
        self.etcd_trouble = problem

    async def _keep_watchdog_fed(self, interval: float) -> None:
        """Ping systemd's watchdog from the loop itself, and only while the watcher thread lives: a hung loop or a
        dead watcher (watchdog's thread dies silently on an exception) stops the pings, and systemd restarts us."""
        while self.intake.is_alive():
            self.notifier.watchdog()
            await asyncio.sleep(interval)
        self.log.error("the file watcher thread is dead; withholding watchdog pings so systemd restarts maintd")

    def reload(self) -> None:
        """SIGHUP: read the config again and apply all of it, or refuse it whole with one line naming the key."""
        self.notifier.reloading()
        try:
            new = load_config(self.config.source or "")
            if fixed := changed_keys(self.config, new, FIXED):
                raise ConfigError(f"{', '.join(fixed)} cannot change without a restart")
            ctx = Context.build(new, self.store, self.events)
            self.monitoring.configure(new)  # the last that may refuse: nothing else has changed yet
        except ConfigError as exc:
            self.log.error(f"reload refused, keeping the running configuration: {exc}")
        else:
            self.config, self.ctx = new, ctx
            self.runner.ctx = ctx
            self.intake.reconfigure(ctx)
            self.webhooks.configure(new.notify)
            self.events.listen(*self._listeners())
            self.log.info(f"configuration reloaded from {new.source}")
            for warning in new.warnings:
                self.log.warning(warning)
            self.runner.kick()
        if self.serving:  # a SIGHUP during start-up must not announce READY early
            self.notifier.ready(self.status_line())

    # --- what the daemon says about itself ------------------------------------------------------------------------

    def status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status` shows in one line."""
        live = self.ctx.tree.live() or "none"
        if deploy := self.runner.current:
            return (f"deploying {deploy.release}: {deploy.phase.step or 'starting'}"
                    + (f", {deploy.phase.waiting}" if deploy.phase.waiting else "")
                    + f" (live {live})")
        if self.memory.maintenance:
            return f"maintenance: {self.memory.maintenance.reason} (live {live})"
        return f"{'paused' if self.memory.paused else 'idle'}; live {live}"

    def announce(self) -> None:
        """What the daemon says about itself may have changed (a step, a deploy's end): systemd's status line, and
        in a cluster the live release the others read."""
        self.notifier.status(self.status_line())
        self.monitoring.show(self)
        if self.membership:
            self.membership.nudge()

    def status(self) -> dict[str, Any]:
        operator = self.memory.maintenance
        live = self.ctx.tree.live()
        return {
            "app": self.config.app,
            "version": self.version,
            "current": live,
            "previous": self.memory.previous,
            "maintenance": {"on": self.ctx.flags.is_up(self.ctx.tree.releases / live) if live else False,
                            "reason": operator.reason if operator else None,
                            "since": operator.since if operator else None, "by": operator.by if operator else None,
                            "until": operator.until if operator and operator.until else None,
                            "operator": bool(operator)},
            "paused": self.memory.paused,
            "deploying": self.runner.describe(),
            "last_deploy": self.memory.last_deploy,
            "uploading": sorted(self.inventory.tracker.uploads, key=name_key),
            "upload": {"marker": self.config.upload.marker, "require_marker": self.config.upload.require_marker},
            "webhooks": self.webhooks.status(),
            **({"cluster": {"member": self.coordinator.me, "etcd": self.etcd_trouble or "ok"}}
               if self.coordinator else {}),
        }

    def set_paused(self, paused: bool, actor: str) -> dict[str, bool]:
        with self.store.lock:
            self.memory.paused = paused
            self.store.save()
        self.log.info("automatic deploys paused" if paused else "automatic deploys resumed", paused=paused,
                      actor=actor)
        self.announce()
        if not paused:
            self.runner.kick()
        return {"paused": paused}


def acquire_lock(state_dir: Path) -> int:
    """One maintd per app: an flock on `state.dir/lock`, holding our pid for the message of the one refused."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(
            f"another maintd (pid {holder}) already runs this app (lock {state_dir / 'lock'})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
