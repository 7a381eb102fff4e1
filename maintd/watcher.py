"""inotify through watchdog, narrowed to what the upload rules need and turned into `Change`s for the daemon.

What is watched, and why it stays cheap:
- `releases/` itself, not recursively: a release appearing, renamed into place, or removed;
- the top of each release *while it is being uploaded* (or refused and waiting to be written again): the marker
  arriving, written in place or renamed into place;
- only when the quiet-period rule is in force, the whole release being uploaded, for one thing: an rsync temporary
  deleted instead of renamed, deep in the tree. That watch asks the kernel for deletes and finished writes only.
  Not for renames: rsync renames every file into place, and watchdog pairs each rename's two halves by scanning a
  queue of pending events, which cost nearly as much CPU as rsync itself on a 100,000-file upload (py-spy).
  A finished write (`IN_CLOSE_WRITE`) is what says a broken upload is being written again. It has an observer
  (so an inotify descriptor) of its own: watchdog shares one kernel watch per directory and descriptor, and the
  mask of the last watch added replaces the other's, which would blind the top watch to the marker's rename.
Events are subscribed by type (`event_filter`, which narrows the kernel mask too): no modify events, which a large
file would send by the thousand. A handler that raises would kill watchdog's dispatch thread without a word, so
the handler catches everything; and an inotify queue overflow, which watchdog only logs, is caught from its log
and delivered as an `overflow` change: "rescan", never "nothing happened".
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from .tree import is_rsync_temp

TOP_EVENTS = [DirCreatedEvent, DirMovedEvent, DirDeletedEvent, FileCreatedEvent, FileMovedEvent, FileDeletedEvent]
# Deep in an upload: deletes (a broken rsync) and finished writes (a resumed one); a created or moved filter would
# add IN_MOVE to the kernel mask. The quiet period itself is judged from ctimes, not from events.
DEEP_EVENTS = [FileDeletedEvent, DirDeletedEvent, FileClosedEvent]
# watchdog warns when its walk of a new directory and that directory's own creation event both add the watch:
# harmless, and it would reach the journal as a raw stderr line on every deep upload.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)
ACTIVITY_EVERY = 0.25  # seconds: plain activity in one release is passed on at most this often


class ChangeKind(StrEnum):
    APPEARED = "appeared"  # a release directory created or renamed into releases/
    GONE = "gone"  # removed or renamed away
    ACTIVITY = "activity"  # something under it was written
    MARKER = "marker"  # the marker arrived at its top
    TEMP_DELETED = "temp_deleted"  # an rsync temporary file was deleted, not renamed: the upload broke off
    OVERFLOW = "overflow"  # events were lost: rescan, and trust no upload until it is written again


@dataclass(frozen=True)
class Change:
    """What happened, reduced to what the daemon acts on."""

    kind: ChangeKind
    name: str = ""


Deliver = Callable[[Change], None]


class _Handler(FileSystemEventHandler):
    def __init__(self, releases: Path, marker: str, deliver: Deliver, on_error: Callable[[Exception], None]):
        self.releases = str(releases)
        self.marker = marker
        self.deliver = deliver
        self.on_error = on_error
        self.last_passed: dict[str, float] = {}  # release -> when activity in it was last passed on

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            for change in self.classify(event):
                if self._worth_passing_on(change):
                    self.deliver(change)
        except Exception as exc:
            self.on_error(exc)

    def _worth_passing_on(self, change: Change) -> bool:
        """An upload of 100,000 files makes 100,000 events that all say "still busy": one in a while is enough,
        as the quiet period is judged from the release's ctimes when its timer runs out. Every other kind of
        change goes through, and the next activity after it too (it may be the resumption of a broken upload)."""
        if change.kind is not ChangeKind.ACTIVITY:
            self.last_passed.pop(change.name, None)
            return True
        now = time.monotonic()
        if now - self.last_passed.get(change.name, -ACTIVITY_EVERY) < ACTIVITY_EVERY:
            return False
        self.last_passed[change.name] = now
        return True

    def classify(self, event: FileSystemEvent) -> list[Change]:
        src = self._parts(event.src_path)
        dest = self._parts(getattr(event, "dest_path", "") or "")
        changes = []
        if event.event_type == "moved":
            changes += self._side(src, ChangeKind.GONE) + self._side(dest, ChangeKind.APPEARED)
        elif event.event_type == "created":
            changes += self._side(src, ChangeKind.APPEARED)
        elif event.event_type == "deleted":
            if len(src) > 1 and is_rsync_temp(src[-1]):
                changes.append(Change(ChangeKind.TEMP_DELETED, src[0]))
            else:
                changes += self._side(src, ChangeKind.GONE)
        else:
            changes += self._side(src, ChangeKind.ACTIVITY)
        return changes

    def _side(self, parts: tuple[str, ...], top_kind: ChangeKind) -> list[Change]:
        if not parts:
            return []
        if len(parts) == 1:
            return [Change(top_kind, parts[0])]
        if parts[1:] == (self.marker,) and top_kind is ChangeKind.APPEARED:
            return [Change(ChangeKind.MARKER, parts[0])]
        return [Change(ChangeKind.ACTIVITY, parts[0])]

    def _parts(self, path: str | bytes) -> tuple[str, ...]:
        path = os.fsdecode(path)
        if not path.startswith(self.releases + "/"):
            return ()
        return tuple(path[len(self.releases) + 1:].split("/"))


class _OverflowSpotter(logging.Handler):
    """watchdog logs an inotify overflow and delivers nothing: hear it in the log."""

    def __init__(self, deliver: Deliver) -> None:
        super().__init__(logging.WARNING)
        self.deliver = deliver

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.deliver(Change(ChangeKind.OVERFLOW))


class ReleaseWatcher:
    """The observer on `releases/` and the uploads in it."""

    def __init__(self, releases: Path, marker: str, recursive_uploads: bool, deliver: Deliver,
                 on_error: Callable[[Exception], None]) -> None:
        self.releases = releases
        self.handler = _Handler(releases, marker, deliver, on_error)
        self.observer = InotifyObserver()
        self.deep = InotifyObserver() if recursive_uploads else None
        self.uploads: dict[str, list[tuple[InotifyObserver, ObservedWatch]]] = {}
        self.spotter = _OverflowSpotter(deliver)

    def start(self) -> None:
        logging.getLogger("watchdog").addHandler(self.spotter)
        threading.excepthook = self._thread_died
        self.observer.schedule(self.handler, str(self.releases), recursive=False, event_filter=TOP_EVENTS)
        for observer in self._observers():
            observer.start()

    def _observers(self) -> list[InotifyObserver]:
        return [self.observer] + ([self.deep] if self.deep else [])

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        """watchdog's emitter threads die without a word when adding a watch fails (a directory renamed away in
        the middle of a recursive walk): what they would have seen is lost, which is a doubt like an overflow."""
        threading.__excepthook__(args)
        self.handler.on_error(args.exc_value if isinstance(args.exc_value, Exception) else RuntimeError(args))

    def rewatch(self, name: str) -> None:
        """A fresh watch on an upload, after events may have been lost."""
        self.unwatch(name)
        self.watch(name)

    def stop(self) -> None:
        logging.getLogger("watchdog").removeHandler(self.spotter)
        for observer in self._observers():
            observer.stop()
            observer.join(timeout=5)

    def is_alive(self) -> bool:
        return all(observer.is_alive() for observer in self._observers())

    def watch(self, name: str) -> None:
        """Follow an upload into release `name` (idempotent); a release that vanished meanwhile is ignored."""
        if name in self.uploads:
            return
        path = str(self.releases / name)
        watches = self.uploads[name] = []
        try:
            watches.append((self.observer, self.observer.schedule(self.handler, path, event_filter=TOP_EVENTS)))
            if self.deep:
                watches.append((self.deep, self.deep.schedule(self.handler, path, recursive=True,
                                                              event_filter=DEEP_EVENTS)))
        except (FileNotFoundError, NotADirectoryError):
            pass

    def unwatch(self, name: str) -> None:
        for observer, watch in self.uploads.pop(name, []):
            try:
                observer.unschedule(watch)
            except KeyError:
                pass
