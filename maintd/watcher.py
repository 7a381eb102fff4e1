"""inotify, read in batches by one thread and narrowed to what the upload rules need, turned into `Change`s.

What is watched, and why it stays cheap:
- `releases/` itself, not recursively: a release appearing, renamed into place, or removed;
- the top of each release *while it is being uploaded* (or refused and waiting to be written again): the marker
  arriving, written in place or renamed into place;
- only when the quiet-period rule is in force, every directory of the release being uploaded, for creations and
  deletions only. A deleted rsync temporary file says the upload broke off; a file created says it is being written
  (again). Not renames, not writes, not attributes: rsync renames every file into place and sets its times, and the
  quiet period itself is judged from ctimes when it runs out, not from events.

Costs, measured with py-spy: watchdog's observer hands every event through four threads (reader, move grouper,
emitter, dispatcher) with a wake-up at each, which cost 40-90 µs of CPU per uploaded file, about half of rsync's own.
Here one thread uses watchdog's inotify bindings (`inotify_c`) directly: it wakes, reads everything queued in one
`read`, lets events gather for `BATCH_PAUSE` before the next, and handles a plain file creation (one per uploaded
file) with a header unpack and a set insertion. Plain activity in a release is passed on at most every
`ACTIVITY_EVERY`. A queue overflow is delivered as an `overflow` change: "rescan", never "nothing happened".
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from watchdog.observers.inotify_c import InotifyConstants as IN
from watchdog.observers.inotify_c import WatchDescriptor, inotify_add_watch, inotify_init, inotify_rm_watch

from .tree import is_rsync_temp

ROOT_MASK = IN.IN_CREATE | IN.IN_MOVED_TO | IN.IN_MOVED_FROM | IN.IN_DELETE | IN.IN_ONLYDIR
TOP_MASK = IN.IN_CREATE | IN.IN_MOVED_TO | IN.IN_ONLYDIR  # the marker, written in place or renamed into place
DEEP_MASK = IN.IN_CREATE | IN.IN_DELETE | IN.IN_ONLYDIR  # added to the top's mask too, when deep watching is on
PLAIN_CREATE = IN.IN_CREATE  # a file (not a directory) created: the one event per uploaded file
ACTIVITY_EVERY = 0.25  # seconds: plain activity in one release is passed on at most this often
BATCH_PAUSE = 0.01  # seconds between reads: one wake-up per batch of events instead of one per file
READ_SIZE = 1 << 18  # bytes per read: thousands of events
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (the name follows, NUL-padded)


class ChangeKind(StrEnum):
    APPEARED = "appeared"  # a release directory created or renamed into releases/
    GONE = "gone"  # removed or renamed away
    ACTIVITY = "activity"  # something under it was created or deleted
    MARKER = "marker"  # the marker arrived at its top
    TEMP_DELETED = "temp_deleted"  # an rsync temporary file was deleted, not renamed: the upload broke off
    OVERFLOW = "overflow"  # events were lost: rescan, and trust no upload until it is written again


@dataclass(frozen=True)
class Change:
    """What happened, reduced to what the daemon acts on."""

    kind: ChangeKind
    name: str = ""


Deliver = Callable[[Change], None]


@dataclass(frozen=True)
class _Dir:
    """A watched directory: the release it belongs to ("" for `releases/`) and its path."""

    release: str
    path: bytes
    top: bool  # releases/ or the top of a release


class ReleaseWatcher:
    """The inotify instance on `releases/` and the uploads in it, and the thread that reads it.

    `read_batch` is the whole of the event handling and runs without the thread too, which is how it is tested.
    Watches are added from two threads (the event loop following an upload, the reader following the directories
    it creates), so their bookkeeping is under a lock; the per-file path reads `_whole` without it (a set lookup)."""

    def __init__(self, releases: Path, marker: str, recursive_uploads: bool, deliver: Deliver,
                 on_error: Callable[[Exception], None]) -> None:
        self.releases = releases
        self.marker = os.fsencode(marker)
        self.deep = recursive_uploads
        self.deliver = deliver
        self.on_error = on_error
        self.uploads: dict[str, set[int]] = {}  # release -> its watch descriptors
        self._dirs: dict[int, _Dir] = {}
        self._whole: set[int] = set()  # releases/ and the tops of releases: every event there is looked at
        self._lock = threading.Lock()
        self._last_passed: dict[str, float] = {}  # release -> when activity in it was last passed on
        self._fd = inotify_init()
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify: {os.strerror(ctypes.get_errno())}")
        os.set_inheritable(self._fd, False)
        os.set_blocking(self._fd, False)
        self._stop_r, self._stop_w = os.pipe()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintd-inotify", daemon=True)
        self._add(os.fsencode(releases), ROOT_MASK, _Dir("", os.fsencode(releases), top=True))

    # --- life cycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        os.write(self._stop_w, b"!")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            if self._stopping.is_set():
                return
            try:
                for change in self.read_batch():
                    self.deliver(change)
            except Exception as exc:  # a dead reader would be blindness: say so, and go on reading
                self.on_error(exc)
            self._stopping.wait(BATCH_PAUSE)

    # --- following uploads ----------------------------------------------------------------------------------------

    def watch(self, name: str) -> None:
        """Follow an upload into release `name` (idempotent); a release that vanished meanwhile is ignored."""
        with self._lock:
            if name in self.uploads:
                return
            self.uploads[name] = set()
        path = os.fsencode(self.releases / name)
        try:
            self._add(path, TOP_MASK | (DEEP_MASK if self.deep else 0), _Dir(name, path, top=True))
            if self.deep:
                self._add_tree(name, path)
        except (FileNotFoundError, NotADirectoryError):
            pass

    def unwatch(self, name: str) -> None:
        with self._lock:
            wds = self.uploads.pop(name, set())
            for wd in wds:
                self._forget(wd)
                inotify_rm_watch(self._fd, WatchDescriptor(wd))  # EINVAL if the directory is gone: nothing to undo
        self._last_passed.pop(name, None)

    def rewatch(self, name: str) -> None:
        """A fresh watch on an upload, after events may have been lost."""
        self.unwatch(name)
        self.watch(name)

    def _add(self, path: bytes, mask: int, entry: _Dir) -> None:
        with self._lock:
            if entry.release and entry.release not in self.uploads:
                return  # unwatched meanwhile (the reader following a directory of a release just completed)
            wd = inotify_add_watch(self._fd, path, mask)
            if wd < 0:
                code = ctypes.get_errno()
                raise {errno.ENOENT: FileNotFoundError, errno.ENOTDIR: NotADirectoryError}.get(code, OSError)(
                    code, os.strerror(code), os.fsdecode(path))
            self._dirs[wd] = entry
            if entry.top:
                self._whole.add(wd)
            if entry.release:
                self.uploads[entry.release].add(wd)

    def _add_tree(self, release: str, path: bytes) -> None:
        """Watch the directories under `path`: ones made before the watch on their parent was there included."""
        try:
            with os.scandir(path) as entries:
                subdirs = [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return
        for subdir in subdirs:
            try:
                self._add(subdir, DEEP_MASK, _Dir(release, subdir, top=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
            self._add_tree(release, subdir)

    def _forget(self, wd: int) -> None:
        entry = self._dirs.pop(wd, None)
        self._whole.discard(wd)
        if entry and entry.release in self.uploads:
            self.uploads[entry.release].discard(wd)

    # --- events ---------------------------------------------------------------------------------------------------

    def read_batch(self) -> list[Change]:
        """Read what is queued (without waiting) and reduce it to changes, in the order that matters.

        The loop is the per-file cost, so a plain file creation below the top of a release costs a header unpack and
        a set insertion; the releases it touched are turned into activity before the next event of another kind, so
        that an activity and a break-off keep their order."""
        try:
            buffer = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return []
        changes: list[Change] = []
        busy: set[int] = set()
        unpack, whole, end, offset = _HEADER.unpack_from, self._whole, len(buffer), 0
        while offset < end:
            wd, mask, _cookie, length = unpack(buffer, offset)
            start, offset = offset + 16, offset + 16 + length
            if mask == PLAIN_CREATE and wd not in whole:
                busy.add(wd)
                continue
            if busy:
                changes += self._busy(busy)
                busy = set()
            changes += self._event(wd, mask, buffer[start:offset].rstrip(b"\0"))
        return changes + self._busy(busy)

    def _busy(self, wds: set[int]) -> list[Change]:
        return self._activity({entry.release for wd in wds if (entry := self._dirs.get(wd))})

    def _activity(self, releases: Iterable[str]) -> list[Change]:
        """Plain activity, at most once per `ACTIVITY_EVERY` and release: the quiet period is judged from ctimes when
        its timer runs out, so "still busy" once in a while is all the daemon needs."""
        now, changes = time.monotonic(), []
        for release in releases:
            if now - self._last_passed.get(release, -ACTIVITY_EVERY) >= ACTIVITY_EVERY:
                self._last_passed[release] = now
                changes.append(Change(ChangeKind.ACTIVITY, release))
        return changes

    def _event(self, wd: int, mask: int, raw_name: bytes) -> list[Change]:
        if mask & IN.IN_Q_OVERFLOW:
            return [Change(ChangeKind.OVERFLOW)]
        if mask & IN.IN_IGNORED:  # the directory went, or its watch was removed
            with self._lock:
                self._forget(wd)
            return []
        entry = self._dirs.get(wd)
        if entry is None:
            return []  # an event queued before its watch was removed
        name = os.fsdecode(raw_name)
        if not entry.release:  # releases/ itself
            gone = mask & (IN.IN_MOVED_FROM | IN.IN_DELETE)
            return [Change(ChangeKind.GONE if gone else ChangeKind.APPEARED, name)]
        return self._inside(entry, mask, raw_name, name)

    def _inside(self, entry: _Dir, mask: int, raw_name: bytes, name: str) -> list[Change]:
        """An event in a release being uploaded: anything but the marker and a broken-off rsync is activity. After
        those two, the next activity is passed on at once (it may be the resumption of a broken upload).

        Only a temporary *file* deleted is a break: the `.~tmp~` directory of `--delay-updates` is removed, empty,
        at the end of a transfer that went well; cut, rsync leaves it (and its contents), which holds the release."""
        if entry.top and raw_name == self.marker and mask & (IN.IN_CREATE | IN.IN_MOVED_TO):
            self._last_passed.pop(entry.release, None)
            return [Change(ChangeKind.MARKER, entry.release)]
        if mask & IN.IN_DELETE and not mask & IN.IN_ISDIR and is_rsync_temp(name):
            self._last_passed.pop(entry.release, None)
            return [Change(ChangeKind.TEMP_DELETED, entry.release)]
        if self.deep and mask & IN.IN_CREATE and mask & IN.IN_ISDIR:
            path = entry.path + b"/" + raw_name
            try:
                self._add(path, DEEP_MASK, _Dir(entry.release, path, top=False))
                self._add_tree(entry.release, path)
            except (FileNotFoundError, NotADirectoryError):
                pass  # made and removed again before we looked
        return self._activity([entry.release])
