"""From file events to complete uploads: the watcher's changes fed to the tracker, and its verdicts checked.

Runs on the event loop: the watcher's thread only hands changes over, and walks of a release run in worker threads,
so every decision about an upload is made here, by one writer of the inventory. A release that passes is recorded as
complete and `on_complete` is called; what deploys it, and when, is the runner's business.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable

from . import log
from .config import Upload
from .context import Context
from .events import Event, Happening
from .inventory import Inventory
from .results import UPLOAD_ACTOR
from .tasks import Tasks
from .tree import ReleaseError, name_key
from .upload import STILL_CHANGING, Verdict
from .watcher import Change, ChangeKind, ReleaseWatcher

RETRY_INTERVAL = 5.0  # seconds before a release that could not be read (out of descriptors, say) is read again
GONE = (errno.ENOENT, errno.ENOTDIR)  # what a walk of a release that was removed under it fails with


class Intake:
    def __init__(self, ctx: Context, inventory: Inventory, tasks: Tasks, on_complete: Callable[[], None]) -> None:
        self.ctx, self.inventory, self.tracker = ctx, inventory, inventory.tracker
        self.tasks = tasks
        self.on_complete = on_complete
        self.log = log.get(app=ctx.config.app)
        self.watcher: ReleaseWatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._checking: dict[str, asyncio.Event] = {}  # release -> set when its check in progress is over

    # --- life cycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.watcher = self._new_watcher(self.ctx.config.upload)
        self._startup_scan()
        self._arm_timer()

    def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self.watcher:
            self.watcher.stop()

    def is_alive(self) -> bool:
        return self.watcher is not None and self.watcher.is_alive()

    def reconfigure(self, ctx: Context) -> None:
        """A reload: the tracker and the watcher follow `upload.marker`, `require_marker` and `quiet_period`. The new
        watcher starts before the old one stops, so no event falls between them. When deep watching starts only now
        (require_marker was true), a break-off of an upload under way was not watched for: those uploads are in
        doubt, and wait to be written again (or for their marker), as after an overflow."""
        old, new = self.ctx.config.upload, ctx.config.upload
        self.ctx = ctx
        self.tracker.quiet_period, self.tracker.require_marker = new.quiet_period, new.require_marker
        if (old.marker, old.require_marker) != (new.marker, new.require_marker) and self.watcher:
            stale, self.watcher = self.watcher, self._new_watcher(new)
            for name in stale.uploads:
                self.watcher.watch(name)
            stale.stop()
            if old.require_marker and not new.require_marker:
                self.tracker.doubt(time.time())
        self.rescan()

    def _new_watcher(self, upload: Upload) -> ReleaseWatcher:
        watcher = ReleaseWatcher(self.ctx.tree.releases, upload.marker, not upload.require_marker, self._deliver,
                                 self._watcher_failed)
        watcher.start()
        return watcher

    # --- changes --------------------------------------------------------------------------------------------------

    def _deliver(self, change: Change) -> None:
        """Called from watchdog's thread: hand over to the loop."""
        assert self.loop
        self.loop.call_soon_threadsafe(self._on_change, change)

    def _watcher_failed(self, exc: Exception) -> None:
        self.log.error(f"watcher could not handle an event: {exc!r}; rescanning")
        self._deliver(Change(ChangeKind.OVERFLOW))

    def _on_change(self, change: Change) -> None:
        now, name, inventory = time.time(), change.name, self.inventory
        if change.kind is ChangeKind.OVERFLOW:
            self.log.warning("file events were lost; rescanning releases/ and treating uploads as cut off")
            self.tracker.doubt(now)
            assert self.watcher
            for upload in list(self.tracker.uploads):
                self.watcher.rewatch(upload)
            self.rescan()
        elif change.kind is ChangeKind.GONE:
            self._forget(name)
        elif change.kind is ChangeKind.APPEARED:
            self._appeared(name, now)
        elif name in inventory.complete or name not in inventory.known():
            return  # a finished upload, or the live tree changing under the app: not our business
        elif change.kind is ChangeKind.TEMP_DELETED:
            self._resume(name)
            if self.tracker.broke_off(name, now):
                self.log.warning(f"upload into release {name} broke off (an rsync temporary file was deleted); "
                                 "waiting for it to resume or for its marker", release=name)
        else:
            self._resume(name)
            (self.tracker.marker_seen if change.kind is ChangeKind.MARKER else self.tracker.activity)(name, now)
        self._arm_timer()

    def _startup_scan(self) -> None:
        """Contract §1: a release found at start goes live only if marked, newer than live, and never live."""
        live = self.inventory.seen_live()
        for name in self.ctx.tree.entries():
            if name == live or self.inventory.went_live_before(name) or not self._is_release(name):
                continue
            if self._marked(name):
                if live is not None and name_key(name) <= name_key(live):
                    self.ctx.store.record(name).auto_considered = True
                self.tasks.spawn(self._check(name))
            else:
                self.inventory.found_dormant(name)
                assert self.watcher
                self.watcher.watch(name)

    def _is_release(self, name: str) -> bool:
        """Refuses (once, with the reason) what can never be a release; hidden staging areas pass silently."""
        if problem := self.ctx.tree.entry_problem(name):
            if not name.startswith("."):
                self._refuse(name, problem)
            return False
        return True

    def _appeared(self, name: str, now: float) -> None:
        if not self._is_release(name) or self.inventory.went_live_before(name) or name == self.ctx.tree.live():
            return
        self._resume(name)
        self.tracker.activity(name, now)
        if self._marked(name):
            self.tracker.marker_seen(name, now)

    def _resume(self, name: str) -> None:
        """Start (or restart) following an upload: refused and dormant releases written to are considered afresh."""
        self.inventory.resume(name)
        assert self.watcher
        self.watcher.watch(name)

    def _forget(self, name: str) -> None:
        self.inventory.forget(name)
        if self.watcher:
            self.watcher.unwatch(name)

    def _refuse(self, name: str, reason: str) -> None:
        if self.inventory.refuse(name, reason):
            self.log.warning(f"release {name} refused: {reason}", release=name, result="refused")
            self.ctx.events.publish(Event(Happening.UPLOAD_REFUSED, name, "", UPLOAD_ACTOR, error=reason))

    def _marked(self, name: str) -> bool:
        return (self.ctx.tree.releases / name / self.ctx.config.upload.marker).exists()

    def rescan(self) -> None:
        """Every entry of releases/ against what is known of it: the safety net under inotify (the daemon runs it
        every minute), and what follows an overflow or a reload."""
        on_disk = set(self.ctx.tree.entries())
        known = self.inventory.known()
        for name in known - on_disk:
            self._forget(name)
        now = time.time()
        for name in on_disk - known:
            if not name.startswith(".") and not self.inventory.went_live_before(name):
                self._appeared(name, now)
        for name in list(self.tracker.uploads):  # a doubt re-arms nothing by itself: look again now
            self.tasks.spawn(self._check(name))
        self._arm_timer()

    # --- judging --------------------------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        assert self.loop
        if self._timer:
            self._timer.cancel()
            self._timer = None
        for name in self.tracker.take_due(time.time()):
            self.tasks.spawn(self._check(name))
        due = self.tracker.next_due()
        if due is not None:
            self._timer = self.loop.call_later(max(0.0, due - time.time()), self._arm_timer)

    async def settle(self, name: str) -> None:
        """Judge an upload whose marker is there now, without waiting for its event: an operator's (or
        Capistrano's) `deploy NAME` just after writing the marker must not be refused as still uploading."""
        if name in self.tracker and self._marked(name):
            self.tracker.marker_seen(name, time.time())
            await self._check(name)

    async def _check(self, name: str) -> None:
        """One check of a release at a time; a caller that comes while one runs waits for its end."""
        if running := self._checking.get(name):
            await running.wait()
            return
        done = self._checking[name] = asyncio.Event()
        try:
            await self._check_once(name)
        finally:
            del self._checking[name]
            done.set()
            self._arm_timer()

    async def _check_once(self, name: str) -> None:
        """A release that went away is forgotten; one that could not be read for a passing reason (out of
        descriptors, an I/O error) is read again later: the upload must not be lost, nor refused for it."""
        try:
            await self._judge(name)
        except (ReleaseError, OSError) as exc:
            if not isinstance(exc, OSError) or exc.errno in GONE:
                self._forget(name)
                return
            why = f"could not be read: {exc.strerror or exc}"
            if self.tracker.look_again(name, time.time() + RETRY_INTERVAL, why):
                self.log.warning(f"release {name} {why}; reading it again every {RETRY_INTERVAL:g}s", release=name)

    async def _judge(self, name: str) -> None:
        probe = await asyncio.to_thread(self.ctx.tree.probe, name)
        before = list(self.tracker.uploads[name].reasons) if name in self.tracker else []
        manifest = (self.ctx.tree.releases / name / self.ctx.config.upload.manifest).exists()
        if self.tracker.judge(name, probe, self._marked(name), time.time(), manifest) is Verdict.WAIT:
            reasons = self.tracker.uploads[name].reasons
            if reasons != before and reasons[:1] != [STILL_CHANGING]:
                self.log.info(f"release {name} is not complete: {'; '.join(reasons)}", release=name)
            return
        problem = await asyncio.to_thread(self.ctx.release_problem, name)
        if name not in self.tracker:  # removed or resumed while we looked
            return
        if problem:
            self._refuse(name, problem)  # the watch stays: a refused upload written to again is looked at afresh
            return
        assert self.watcher
        self.watcher.unwatch(name)
        self.inventory.completed(name, time.time(), probe.size)
        self.log.info(f"upload of release {name} is complete ({probe.files} files)", release=name,
                      files=probe.files, size=probe.size)
        self.on_complete()
