"""The `[metrics]` table applied (contract §11): the tally counting, the endpoint listening, the textfile and the
kept counters written; turned on, moved and off by a reload, and the daemon's state shown to the gauges.

Off (both keys "") nothing of it exists: no thread, no socket, no listener on the daemon's events. A deploy finished
while metrics are off is not counted; the counters kept in state.dir go on from where they were when it comes on.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest

from . import config as config_module
from .config import Config, ConfigError
from .events import Listener
from .exposition import Endpoint, Writer
from .metrics import By, Gauges, Metrics
from .tree import write_atomically

if TYPE_CHECKING:
    from .daemon import Daemon

REFRESH = 5.0  # seconds between two looks at what changes without a word (uploads, members' leases, etcd)
# Seconds from a change the daemon announces (a step, a deploy's end, a command) to the gauges' look at it: a burst
# of steps is looked at once, after it. A lone server's window (milliseconds) is over by then, so the look (a walk of
# releases/, the flags' stat) and the textfile it may rewrite never share the GIL and the disk with the window's own
# steps (measured: 1.7× the window when every step was looked at at once); a long deploy is shown 4 times a second.
SETTLE = 0.25
STOP_WAIT = 2.0  # seconds a writer may take to finish at a reload or stop; one that hangs is left behind


@dataclass
class Running:
    """What exists while metrics are on."""

    metrics: Metrics
    registry: CollectorRegistry
    saver: Writer  # the tally into state.dir
    endpoint: Endpoint | None = None
    textfile: Writer | None = None
    listen: str = ""
    textfile_path: str = ""
    rendered: tuple[int, bytes] = (-1, b"")  # the last exposition, and the `Metrics.version` it shows
    render_lock: threading.Lock = field(default_factory=threading.Lock)

    def render(self) -> bytes:
        """The exposition, rendered again only when something changed since the last: between deploys a scrape
        (or a second scraper) costs a copy, not a walk of every series under the GIL that a deploy needs too."""
        with self.render_lock:
            version = self.metrics.version  # read first: a change during the rendering makes the next one render
            if self.rendered[0] != version:
                self.rendered = (version, generate_latest(self.registry))
            return self.rendered[1]

    def changed(self, counted: bool) -> None:
        """From any thread, the deploy's too: wakes the writers, and returns."""
        if counted:
            self.saver.wake()
        if self.textfile:
            self.textfile.wake()


class Monitoring:
    def __init__(self, config: Config, logger: Any) -> None:
        self.log = logger
        self.unobserved = ""  # why the gauges' last look failed, while it fails
        self.running: Running | None = None
        self.pending: asyncio.TimerHandle | None = None  # the look `show` asked for
        self.configure(config)

    def listeners(self) -> tuple[Listener, ...]:
        """For `Events.listen`: the counting, while metrics are on."""
        return (self.running.metrics.hear,) if self.running else ()

    def configure(self, config: Config) -> None:
        """Apply `config.metrics`; ConfigError (naming the key and its line) when `listen` cannot be bound, and then
        the endpoint that was listening still is."""
        wanted = config.metrics
        if not wanted.on:
            self.close(remove_textfile=True)
            return
        run = self.running or self._start(config)
        run.metrics.expect(config.memcached.servers)
        if wanted.listen != run.listen:
            self._move(run, config)
        if wanted.textfile != run.textfile_path:
            self._stop_textfile(run, remove=True)
            if wanted.textfile:
                path = Path(wanted.textfile)
                run.textfile = Writer("maintd-metrics-textfile", lambda: write_atomically(path, run.render().decode(),
                                                                                          False),
                                      lambda said: self.log.error(f"metrics.textfile not written: {said}"))
                run.textfile.start()
                run.textfile.wake()
            run.textfile_path = wanted.textfile
        self.running = run

    def _start(self, config: Config) -> Running:
        strategy = str(config.cluster.strategy) if config.cluster else None
        metrics = Metrics(config.app, strategy, config.state_dir, self.log.error)
        registry = CollectorRegistry(auto_describe=False)  # maintd's own only: no process or platform collectors
        registry.register(metrics)
        saver = Writer("maintd-metrics-save", metrics.save,
                       lambda said: self.log.error(f"the metrics' counters could not be kept: {said}"))
        saver.start()
        run = Running(metrics, registry, saver)
        metrics.on_change = run.changed
        return run

    def _move(self, run: Running, config: Config) -> None:
        """The endpoint to `metrics.listen`: the new address bound before the old one is let go, or, where only one
        of them can be bound at a time (the same port on another address), after it; never none while it fails."""
        wanted = config.metrics
        old = run.endpoint
        try:
            try:
                run.endpoint = Endpoint(wanted.address, run.render) if wanted.listen else None
            except OSError:
                if not old:
                    raise
                old.close()
                old = None
                try:
                    run.endpoint = Endpoint(wanted.address, run.render)
                except OSError:
                    run.endpoint = Endpoint(_address(run.listen), run.render)  # back where it was
                    raise
        except OSError as exc:
            if not self.running:  # started for this configuration: nothing of it stays
                run.saver.stop(STOP_WAIT)
            raise ConfigError(f"{config_module.located(config, 'metrics', 'listen')} {wanted.listen} cannot be "
                              f"listened on: {exc.strerror or exc}") from None
        if old:
            old.close()
        run.listen = wanted.listen

    def _stop_textfile(self, run: Running, remove: bool) -> None:
        """The writer ends; with `remove`, its file goes too (moved or off): a file left behind would have
        node_exporter export values that never change again as if they were current."""
        if run.textfile:
            path = Path(run.textfile_path)
            run.textfile.write = (lambda: path.unlink(missing_ok=True)) if remove else run.textfile.write
            run.textfile.stop(STOP_WAIT)
            run.textfile = None

    def show(self, daemon: Daemon) -> None:
        """The daemon's state to the gauges, `SETTLE` seconds from now, once for every change until then; on its
        loop."""
        if self.running and not self.pending:
            self.pending = asyncio.get_running_loop().call_later(SETTLE, self._look, daemon)

    def _look(self, daemon: Daemon) -> None:
        """The gauges' picture, taken now; one that cannot be taken (releases/ unreadable for a moment: out of
        descriptors) leaves the last picture up, said once per reason, and the next look is another chance."""
        self.pending = None
        if not self.running:
            return
        try:
            picture = observe(daemon)
        except Exception as exc:  # a loop callback's error would only reach asyncio's traceback on stderr
            said = f"{type(exc).__name__}: {exc}"
            if said != self.unobserved:
                self.log.error(f"the metrics' gauges could not be brought up to date: {said}")
            self.unobserved = said
            return
        self.unobserved = ""
        self.running.metrics.show(picture)

    async def keep_showing(self, daemon: Daemon) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            self.show(daemon)

    def close(self, remove_textfile: bool = False) -> None:
        """Off (a reload) or the daemon's stop: nothing listens any more, the counters are written a last time."""
        run, self.running = self.running, None
        if run:
            if run.endpoint:
                run.endpoint.close()
            self._stop_textfile(run, remove_textfile)
            run.saver.stop(STOP_WAIT)


def _address(listen: str) -> tuple[str, int]:
    return config_module.Metrics(listen=listen).address


def observe(daemon: Daemon) -> Gauges:
    """The gauges' picture of the daemon, taken on its loop (the only writer of what it reads, but for the
    membership thread's `alive` and `etcd_trouble`, each replaced whole): `status`'s view, in numbers."""
    ctx, live = daemon.ctx, daemon.ctx.tree.live()
    flags_up = ctx.flags.is_up(ctx.tree.releases / live) if live else False
    by = By.OPERATOR if daemon.memory.maintenance else By.DEPLOY if flags_up else None
    states = Counter(row.state for row in daemon.inventory.rows())
    members: tuple[tuple[str, bool], ...] = ()
    if daemon.coordinator and daemon.membership and (alive := daemon.membership.alive) is not None:
        members = tuple((member, member in alive) for member in daemon.coordinator.cluster.members)
    return Gauges(by, live, tuple(sorted(states.items())), daemon.memory.paused, members,
                  not daemon.etcd_trouble if daemon.coordinator else None)
