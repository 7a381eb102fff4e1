"""The daemon: one asyncio loop that turns watcher changes into upload checks and deploys, one at a time.

The loop never blocks on the file system or the network: walks of a release and whole deploys run in worker
threads, and their results come back to the loop. All decisions (is it complete? which release goes next?) are made
on the loop, so there is exactly one writer of the daemon's picture of `releases/`.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from . import log
from .config import Config, ConfigError
from .config import load as load_config
from .maintenance import Notice, default_template
from .notify import Notifier, watchdog_interval
from .pipeline import Context, Deploy, OnStep, Outcome, StepRecord, now_iso
from .recovery import recover
from .state import Memory, OperatorMaintenance, Store
from .tree import ReleaseError, Tree, name_key, name_problem
from .upload import UploadTracker, Verdict
from .watcher import Change, ReleaseWatcher

RESCAN_INTERVAL = 60.0  # seconds; a safety net under inotify, which can overflow


class Refused(Exception):
    """A request the daemon will not carry out; the message is for the operator."""


class AlreadyRunning(Exception):
    """Another maintd holds this app's lock."""


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = log.get(app=config.app)
        self.notifier = Notifier()
        self.lock_fd = acquire_lock(config.state_dir)  # held for the daemon's life: the flock is ownership
        self.store = Store(config.state_dir)
        self.ctx = Context.build(config, self.store, _template(config))
        self.tree: Tree = self.ctx.tree
        self.tracker = UploadTracker(config.upload.quiet_period, config.upload.require_marker)
        self.complete: dict[str, float] = {}  # uploads complete and not yet deployed -> when they completed
        self.refused: dict[str, str] = {}
        self.sizes: dict[str, int] = {}  # bytes per release, measured once
        self.dormant: set[str] = set()  # unmarked releases found at start: maybe cut off while maintd was down
        self.deploy_lock = asyncio.Lock()
        self.current_deploy: Deploy | None = None
        self.steps_done: list[StepRecord] = []  # of the deploy in progress, for followers who join late
        self.followers: set[OnStep] = set()
        self.outcome: asyncio.Future[Outcome] | None = None
        self.watcher: ReleaseWatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = asyncio.Event()
        self.serving = False  # READY=1 was sent
        self._timer: asyncio.TimerHandle | None = None
        self._checking: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- life cycle -----------------------------------------------------------------------------------------------

    async def run(self, servers: list[Callable[[Daemon], Any]] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)  # from the start: SIGHUP's default is to die
        self.tree.releases.mkdir(parents=True, exist_ok=True)
        for link in self.tree.remove_stale_links():
            self.log.warning(f"removed a temporary link left by a crash: {link}")
        recover(self.ctx)
        self._report_current()
        started = [await server(self) for server in servers or []]
        self.watcher = ReleaseWatcher(self.tree.releases, self.config.upload.marker,
                                      not self.config.upload.require_marker, self._deliver, self._watcher_failed)
        self.watcher.start()
        self._startup_scan()
        self.log.info(f"maintd watching {self.tree.releases}", live=self.tree.live(), paused=self.memory.paused)
        self.serving = True
        self.notifier.ready(self.status_line())
        self._kick()
        chores = [self._spawn(self._rescan_periodically())]
        if interval := watchdog_interval():
            chores.append(self._spawn(self._keep_watchdog_fed(interval)))
        await self.stopping.wait()
        self.notifier.stopping()
        self.log.info("stopping" + (" after the deploy in progress" if self.current_deploy else ""))
        for chore in chores:
            chore.cancel()
        async with self.deploy_lock:  # a deploy in progress finishes (or rolls back) before we exit
            for server in started:
                server.close()
            self.watcher.stop()
        self.log.info("stopped")

    async def _keep_watchdog_fed(self, interval: float) -> None:
        """Ping systemd's watchdog from the loop itself, and only while the watcher thread lives: a hung loop or a
        dead watcher (watchdog's thread dies silently on an exception) stops the pings, and systemd restarts us."""
        while True:
            if self.watcher and self.watcher.is_alive():
                self.notifier.watchdog()
            else:
                self.log.error("the file watcher thread is dead; withholding watchdog pings so systemd restarts maintd")
                return
            await asyncio.sleep(interval)

    def reload(self) -> None:
        """SIGHUP: read the config again. A bad one is refused with one log line and the running one stays."""
        self.notifier.reloading()
        try:
            new = load_config(self.config.source or "")
            fixed = [key for key in ("app", "root", "state", "control")
                     if getattr(new, key) != getattr(self.config, key)]
            if fixed:
                raise ConfigError(f"{', '.join(fixed)} cannot change without a restart")
            ctx = Context.build(new, self.store, _template(new))
        except (ConfigError, OSError) as exc:
            self.log.error(f"reload refused, keeping the running configuration: {exc}")
        else:
            self.config, self.ctx = new, ctx
            self.tracker.quiet_period = new.upload.quiet_period
            self.tracker.require_marker = new.upload.require_marker
            self.log.info(f"configuration reloaded from {new.source}")
        if self.serving:  # a SIGHUP during start-up must not announce READY early
            self.notifier.ready(self.status_line())

    def status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status` shows in one line."""
        live = self.tree.live() or "none"
        if self.current_deploy:
            return f"deploying {self.current_deploy.release}: {self.current_deploy.step or 'starting'} (live {live})"
        if self.memory.maintenance:
            return f"maintenance: {self.memory.maintenance.reason} (live {live})"
        return f"{'paused' if self.memory.paused else 'idle'}; live {live}"

    def _announce(self) -> None:
        self.notifier.status(self.status_line())

    def _report_current(self) -> None:
        """A `current` that is missing or dangling is reported, not guessed at: `maintctl deploy NAME` repairs it."""
        if not self.tree.current.is_symlink():
            if self.tree.current.exists():
                self.log.error(f"{self.tree.current} is not a symlink; maintd cannot swap it")
            elif self.tree.entries():
                self.log.error(f"{self.tree.current} is missing; `maintctl deploy NAME` repairs it")
        elif not (live := self.tree.live()) or not (self.tree.releases / live).is_dir():
            self.log.error(f"{self.tree.current} points at no release ({os.readlink(self.tree.current)}); "
                           "`maintctl deploy NAME` repairs it")

    @property
    def memory(self) -> Memory:
        return self.store.memory

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _watcher_failed(self, exc: Exception) -> None:
        self.log.error(f"watcher could not handle an event: {exc!r}; rescanning")
        self._deliver(Change("overflow"))

    # --- what is in releases/ -------------------------------------------------------------------------------------

    def _startup_scan(self) -> None:
        """Contract §1: a release found at start goes live only if marked, newer than live, and never live."""
        live = self.tree.live()
        if live:
            record = self.store.record(live)
            record.went_live = record.went_live or time.time()
        for name in self.tree.entries():
            if name_problem(name) or name == live or self.store.record(name).went_live:
                if name_problem(name):
                    self._refuse(name, name_problem(name) or "")
                continue
            if not (self.tree.releases / name).is_dir() or (self.tree.releases / name).is_symlink():
                self._refuse(name, "not a directory")
                continue
            if (self.tree.releases / name / self.config.upload.marker).exists():
                newer = live is None or name_key(name) > name_key(live)
                if not newer:
                    self.store.record(name).auto_considered = True
                self._spawn(self._check(name))
            else:
                self.dormant.add(name)
                assert self.watcher
                self.watcher.watch(name)

    def _deliver(self, change: Change) -> None:
        """Called from watchdog's thread: hand over to the loop."""
        assert self.loop
        self.loop.call_soon_threadsafe(self._on_change, change)

    def _on_change(self, change: Change) -> None:
        now = time.time()
        name = change.name
        if change.kind == "overflow":
            self.log.warning("file events were lost; rescanning releases/ and treating uploads as cut off")
            self.tracker.doubt(now)
            assert self.watcher
            for upload in list(self.tracker.uploads):
                self.watcher.rewatch(upload)
            self._rescan()
        elif change.kind == "gone":
            self._forget(name)
        elif change.kind == "appeared":
            self._appeared(name, now)
        elif name in self.complete or (name not in self.tracker and name not in self.refused
                                       and name not in self.dormant):
            return  # a finished upload, or the live tree changing under the app: not our business
        elif change.kind == "temp_deleted":
            self._resume(name)
            if self.tracker.broke_off(name, now):
                self.log.warning(f"upload into release {name} broke off (an rsync temporary file was deleted); "
                                 "waiting for it to resume or for its marker", release=name)
        else:
            self._resume(name)
            (self.tracker.marker_seen if change.kind == "marker" else self.tracker.activity)(name, now)
        self._arm_timer()

    def _appeared(self, name: str, now: float) -> None:
        if problem := name_problem(name):
            if not name.startswith("."):  # hidden entries are uploaders' staging areas: no news
                self._refuse(name, problem)
            return
        path = self.tree.releases / name
        if path.is_symlink() or not path.is_dir():
            self._refuse(name, "not a directory" if not path.is_symlink() else "a symlink, not a directory")
            return
        if self.store.record(name).went_live or name == self.tree.live():
            return
        self._resume(name)
        self.tracker.activity(name, now)
        if (path / self.config.upload.marker).exists():
            self.tracker.marker_seen(name, now)

    def _resume(self, name: str) -> None:
        """Start (or restart) following an upload: refused and dormant releases written to are considered afresh."""
        self.refused.pop(name, None)
        self.dormant.discard(name)
        self.complete.pop(name, None)
        assert self.watcher
        self.watcher.watch(name)

    def _forget(self, name: str) -> None:
        self.tracker.forget(name)
        self.sizes.pop(name, None)
        self.complete.pop(name, None)
        self.refused.pop(name, None)
        self.dormant.discard(name)
        if self.watcher:
            self.watcher.unwatch(name)

    def _refuse(self, name: str, reason: str) -> None:
        if self.refused.get(name) != reason:
            self.refused[name] = reason
            self.log.warning(f"release {name} refused: {reason}", release=name, result="refused")

    def _rescan(self) -> None:
        on_disk = set(self.tree.entries())
        known = set(self.tracker.uploads) | set(self.complete) | set(self.refused) | self.dormant
        for name in known - on_disk:
            self._forget(name)
        now = time.time()
        for name in on_disk - known:
            if not name.startswith(".") and not self.store.record(name).went_live:
                self._appeared(name, now)
        for name in list(self.tracker.uploads):  # a doubt re-arms nothing by itself: look again now
            self._spawn(self._check(name))

    async def _rescan_periodically(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_INTERVAL)
            self._rescan()
            self._arm_timer()

    # --- deciding when an upload is complete ----------------------------------------------------------------------

    def _arm_timer(self) -> None:
        assert self.loop
        if self._timer:
            self._timer.cancel()
            self._timer = None
        for name in self.tracker.take_due(time.time()):
            self._spawn(self._check(name))
        due = self.tracker.next_due()
        if due is not None:
            self._timer = self.loop.call_later(max(0.0, due - time.time()), self._arm_timer)

    async def _check(self, name: str) -> None:
        if name in self._checking:
            return
        self._checking.add(name)
        try:
            await self._check_once(name)
        finally:
            self._checking.discard(name)
            self._arm_timer()

    async def _check_once(self, name: str) -> None:
        marker = self.tree.releases / name / self.config.upload.marker
        try:
            probe = await asyncio.to_thread(self.tree.probe, name)
        except (ReleaseError, OSError):
            self._forget(name)
            return
        before = list(self.tracker.uploads[name].reasons) if name in self.tracker else []
        if self.tracker.judge(name, probe, marker.exists(), time.time()) is Verdict.WAIT:
            reasons = self.tracker.uploads[name].reasons
            if reasons != before and reasons != ["still changing"]:
                self.log.info(f"release {name} is not complete: {'; '.join(reasons)}", release=name)
            return
        problem = await asyncio.to_thread(self._vet, name)
        if name not in self.tracker:  # removed or resumed while we looked
            return
        self.tracker.forget(name)
        if problem:
            self._refuse(name, problem)  # the watch stays: a refused upload written to again is looked at afresh
            return
        assert self.watcher
        self.watcher.unwatch(name)
        self.complete[name] = time.time()
        self.sizes[name] = probe.size
        self.log.info(f"upload of release {name} is complete ({probe.files} files)", release=name,
                      files=probe.files, size=probe.size)
        self._kick()

    def _vet(self, name: str) -> str | None:
        """The refusals of contract §1 that need a look inside: required paths and the manifest."""
        upload = self.config.upload
        try:
            if missing := self.tree.missing(name, upload.required):
                return f"required path missing: {', '.join(missing)}"
            if (self.tree.releases / name / upload.manifest).is_file():
                ignore = (upload.marker, upload.manifest)
                if problem := self.tree.verify_manifest(name, upload.manifest, ignore):
                    return f"manifest does not verify: {problem}"
        except (ReleaseError, OSError) as exc:
            return str(exc)
        return None

    # --- deploys --------------------------------------------------------------------------------------------------

    def _kick(self) -> None:
        """Start an automatic deploy of the newest complete upload, if any and if allowed now."""
        if self.memory.paused or self.deploy_lock.locked() or self.stopping.is_set():
            return
        candidates = [name for name in self.complete
                      if not self.store.record(name).auto_considered and not self.store.record(name).bad]
        if not candidates:
            return
        newest = max(candidates, key=name_key)
        for name in candidates:
            self.store.record(name).auto_considered = True
            if name != newest:
                self.log.info(f"release {name} left alone: newer release {newest} is complete too", release=name)
        self._spawn(self.deploy(newest, actor="upload"))

    async def deploy(self, name: str, actor: str, kind: str = "deploy", wait: bool = True,
                     on_step: OnStep | None = None) -> Outcome:
        """Run one deploy; refuses at once when another runs and `wait` is false."""
        self.tree.path(name)  # a bad name is refused before anything else
        if self.deploy_lock.locked() and not wait:
            running = self.current_deploy
            raise Refused(f"a {running.kind} of release {running.release} is running (use --wait)" if running
                          else "a deploy is running (use --wait)")
        async with self.deploy_lock:
            if name in self.tracker:
                raise Refused(f"release {name} is still being uploaded")
            if name in self.refused:
                raise Refused(f"release {name} was refused: {self.refused[name]}")
            assert self.loop
            loop = self.loop
            deploy = Deploy(self.ctx, name, actor, kind,
                            lambda record: loop.call_soon_threadsafe(self._step_done, record))
            self.current_deploy, self.steps_done = deploy, []
            self.followers = {on_step} if on_step else set()
            self.outcome = loop.create_future()
            try:
                outcome = await asyncio.to_thread(deploy.run)
            except Exception as exc:
                self.outcome.set_exception(exc)  # followers get the error, not a wait without end
                raise
            finally:
                self.current_deploy = None
                self._announce()
            self.outcome.set_result(outcome)
            self.complete.pop(name, None)
        self._kick()
        return outcome

    def _step_done(self, record: StepRecord) -> None:
        self.steps_done.append(record)
        self._announce()
        for follower in list(self.followers):
            follower(record)

    async def follow(self, on_step: OnStep) -> Outcome | None:
        """Watch the deploy in progress (whoever started it) from its first step to its outcome; None if idle."""
        if not self.current_deploy:
            return None
        for record in self.steps_done:
            on_step(record)
        self.followers.add(on_step)
        assert self.outcome
        try:
            return await asyncio.shield(self.outcome)
        finally:
            self.followers.discard(on_step)

    # --- operator actions (the control socket calls these) --------------------------------------------------------

    def rollback_target(self) -> str:
        """The previous release, or else the one live most recently before it; never a bad one."""
        live = self.tree.live()
        candidates = sorted(((r.went_live, n) for n, r in self.memory.releases.items()
                             if r.went_live and not r.bad and n != live and (self.tree.releases / n).is_dir()),
                            reverse=True)
        names = [n for _, n in candidates]
        if self.memory.previous in names:
            return self.memory.previous
        if not names:
            raise Refused("no earlier release to roll back to")
        return names[0]

    def set_paused(self, paused: bool, actor: str) -> None:
        with self.store.lock:
            self.memory.paused = paused
            self.store.save()
        self.log.info("automatic deploys paused" if paused else "automatic deploys resumed", paused=paused,
                      actor=actor)
        self._announce()
        if not paused:
            self._kick()

    def maintenance_on(self, reason: str, until: str, actor: str) -> OperatorMaintenance:
        """Operator maintenance, at once: on the live release and on any release a deploy is taking live."""
        live = self.tree.live()
        if not live:
            raise Refused("no live release: `current` is missing")
        operator = OperatorMaintenance(reason or "maintenance", now_iso(), actor, until)
        notice = Notice(operator.reason, operator.since, actor, until)
        for name in {live, *([self.current_deploy.release] if self.current_deploy else [])}:
            self.ctx.flags.raise_in(self.tree.path(name), notice)
        with self.store.lock:
            self.memory.maintenance = operator
            self.store.save()
        self.log.info(f"maintenance on: {operator.reason}", actor=actor, until=until or None)
        self._announce()
        return operator

    async def maintenance_off(self, actor: str) -> None:
        """Operator maintenance off; waits for a deploy in progress, whose own maintenance must not be lifted."""
        async with self.deploy_lock:
            with self.store.lock:
                self.memory.maintenance = None
                self.store.save()
            if live := self.tree.live():
                self.ctx.flags.lower_in(self.tree.path(live))
        self.log.info("maintenance off", actor=actor)
        self._announce()

    async def measure(self) -> None:
        """Sizes of releases not yet measured, walked in a thread; a release's files do not change once complete."""
        names = [n for n in self.tree.entries() if n not in self.sizes and not name_problem(n)
                 and n not in self.tracker]

        def walk() -> dict[str, int]:
            sizes = {}
            for name in names:
                try:
                    sizes[name] = self.tree.probe(name).size
                except (ReleaseError, OSError):
                    continue
            return sizes

        self.sizes.update(await asyncio.to_thread(walk))

    def release_rows(self) -> list[dict[str, Any]]:
        live, previous = self.tree.live(), self.memory.previous
        rows = []
        for name in self.tree.entries():
            if name.startswith("."):
                continue
            path = self.tree.releases / name
            record = self.memory.releases.get(name)
            if name == live:
                state = "live"
            elif name == previous:
                state = "previous"
            elif name in self.refused:
                state = "refused"
            elif record and record.bad:
                state = "bad"
            elif name in self.tracker:
                state = "uploading"
            elif name in self.dormant:
                state = "incomplete"
            else:
                state = "complete"
            try:
                info = path.lstat()
                uploaded = info.st_mtime
            except OSError:
                continue
            rows.append({
                "name": name, "state": state,
                "size": self.sizes.get(name),
                "uploaded_at": self.complete.get(name, uploaded),
                "went_live": record.went_live if record else None,
                "reason": self.refused.get(name) or (record.bad if record else "")
                or "; ".join(self.tracker.uploads[name].reasons if name in self.tracker else []),
            })
        return sorted(rows, key=lambda row: name_key(row["name"]))

    def status(self) -> dict[str, Any]:
        deploy = self.current_deploy
        operator = self.memory.maintenance
        live = self.tree.live()
        flag_up = self.ctx.flags.is_up(self.tree.releases / live) if live else False
        return {
            "app": self.config.app,
            "current": live,
            "previous": self.memory.previous,
            "maintenance": {"on": flag_up, "reason": operator.reason if operator else None,
                            "since": operator.since if operator else None, "by": operator.by if operator else None,
                            "until": operator.until if operator and operator.until else None,
                            "operator": bool(operator)},
            "paused": self.memory.paused,
            "deploying": {"release": deploy.release, "step": deploy.step, "kind": deploy.kind,
                          "deploy_id": deploy.id, "actor": deploy.actor} if deploy else None,
            "last_deploy": self.memory.last_deploy,
            "uploading": sorted(self.tracker.uploads, key=name_key),
        }


def _template(config: Config) -> str:
    if config.maintenance.template:
        return Path(config.maintenance.template).read_text(encoding="utf-8")
    return default_template()


def acquire_lock(state_dir: Path) -> int:
    """One maintd per app: an flock on `state.dir/lock`, holding our pid for the message of the one refused."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(f"another maintd (pid {holder}) already runs this app (lock {state_dir / 'lock'})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
