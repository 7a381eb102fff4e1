"""What maintd remembers across restarts, in `state.dir`: one JSON object, and the history as JSON lines.

The persisted form is the `Memory` object itself, serialised: there is no second schema to drift from it. Writes
go to a temporary file that is fsynced and renamed, then the directory is fsynced, so a crash leaves the old state
or the new one, never half of either.

Two threads use it: the event loop (uploads, commands, the cluster joiner) and the deploy thread. One lock,
`Store.lock`, guards `Store.memory`: whatever changes it or walks its releases holds the lock, and the walks are
methods here (`retired`, `releases`, `forget`) so no caller iterates a dict another thread may change. A single
field read or set (`memory.paused`, one record's `bad`) is one step under the GIL and needs no lock; a check that
must not change under it (an operator's maintenance, then the flags: see `Context`) holds the lock throughout.

What a failing disk or a hand edit leaves is read as a fault, never a traceback: a `state.json` or deploy journal
that is empty, not JSON or of the wrong shape is `Damaged` (the message names the file and the fault) and kept aside
as `<name>.bad-<time>` for inspection; history lines that do not parse are passed over and counted. The store says
so through `report` (the daemon's log), once for each state of a file; rebuild.py rebuilds a lost state from the
history and the tree.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from . import log
from .maintenance import Notice
from .steps import Fault
from .tree import name_problem, write_atomically

STATE, HISTORY, JOURNAL = "state.json", "history.jsonl", "deploy.json"  # the files of `state.dir`
Report = Callable[[str], object]  # where the store says what it found wrong: one sentence each, for the log
T = TypeVar("T")


class Damaged(Exception):
    """A file of the state directory that does not hold what it should; the message names the file and the fault."""


@dataclass
class ReleaseRecord:
    """What maintd knows of one release beyond what is on disk."""

    went_live: float | None = None  # last time it went live (seconds since the epoch)
    bad: str = ""  # why a deploy of it failed; a bad release is never deployed automatically again
    auto_considered: bool = False  # automatic deploys take a release at most once
    failed: str = ""  # why its last deploy failed through a fault of the server's, not the release's
    # In a cluster: the abandonment (the reason under `P/bad/<release>`, a key that stays) it was marked bad for here
    # already: once each, so that a release an operator took live since is not marked bad again (joiner.py)
    abandoned: str = ""

    def judge(self, fault: Fault | None, error: str) -> None:
        """The verdict after a deploy of it failed with `error` (a deploy's undo, and the history replayed). Only
        the release's own fault marks it bad, so that no upload can make maintd deploy it (or crash on it) in a
        loop; a server's is only noted (`maintctl releases` shows it) and the same release may go again; a deploy
        that could not begin changed nothing and says nothing of it."""
        if fault is Fault.RELEASE:
            self.bad = error
        elif fault is Fault.SERVER:
            self.failed = error

    def acquit(self) -> None:
        """A deploy of it went live (ended ok): whatever an earlier one said of it no longer holds. Not bad, so that
        `rollback` goes to it when it is the previous release, as `maintctl releases` says; not failed."""
        self.bad = self.failed = ""

    @classmethod
    def from_json(cls, name: str, data: Any) -> ReleaseRecord:
        """One record read back; ValueError or TypeError naming what is wrong with it."""
        where = f"releases.{name}"
        if problem := name_problem(name):
            raise ValueError(f"releases names {name!r}, which is no release name: {problem}")
        record = cls(**_typed(data, where, (dict,), "an object"))
        _typed(record.went_live, f"{where}.went_live", (int, float, type(None)), "a number or null")
        _typed(record.bad, f"{where}.bad", (str,), "a string")
        _typed(record.auto_considered, f"{where}.auto_considered", (bool,), "true or false")
        _typed(record.failed, f"{where}.failed", (str,), "a string")
        _typed(record.abandoned, f"{where}.abandoned", (str,), "a string")
        return record


@dataclass
class Memory:
    paused: bool = False
    maintenance: Notice | None = None  # an operator's maintenance, held until turned off
    previous: str | None = None
    last_deploy: dict[str, Any] | None = None
    releases: dict[str, ReleaseRecord] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Memory:
        """The persisted form read back; ValueError or TypeError naming the first key of the wrong shape."""
        data = _typed(data, "the state", (dict,), "an object")
        maintenance = _typed(data.get("maintenance"), "maintenance", (dict, type(None)), "an object or null")
        if maintenance:
            for key, value in maintenance.items():
                _typed(value, f"maintenance.{key}", (str,), "a string")
        return cls(
            paused=_typed(data.get("paused", False), "paused", (bool,), "true or false"),
            maintenance=Notice(**maintenance) if maintenance else None,
            previous=_typed(data.get("previous"), "previous", (str, type(None)), "a release name or null"),
            last_deploy=_typed(data.get("last_deploy"), "last_deploy", (dict, type(None)), "an object or null"),
            releases={name: ReleaseRecord.from_json(name, record)
                      for name, record in _typed(data.get("releases", {}), "releases", (dict,), "an object").items()},
        )

    def went_live(self, release: str, previous: str | None) -> None:
        """A deploy of `release` went live from `previous`: as it ends (`Store.finish`), and as rebuild.py replays the
        history, one definition for both, so that a rebuilt state is the one the deploys left."""
        self.releases.setdefault(release, ReleaseRecord()).acquit()
        if previous and previous != release:
            self.previous = previous

    def retired(self, keep: int, protected: set[str | None]) -> list[str]:
        """Releases that have been live, beyond the newest `keep` of them, oldest first: what cleanup removes.
        Never the live or the previous release, nor anything in `protected`, nor a release never live."""
        been_live = sorted((record.went_live, name) for name, record in self.releases.items()
                           if record.went_live is not None)
        kept = {name for _, name in been_live[-keep:]} | {self.previous} | protected
        return [name for _, name in been_live if name not in kept]


JOURNAL_RECORD = 512  # bytes: one disk sector, written whole


class MaintenanceOwner(StrEnum):
    """Whose maintenance flags a deploy wrote into releases: none yet, its own, or an operator's carried across."""

    NONE = ""
    OURS = "ours"
    CARRIED = "carried"


@dataclass
class InFlight:
    """The deploy journal: which deploy is running and the step about to run, for recovery after a crash."""

    deploy_id: str
    kind: str
    release: str
    previous: str | None
    actor: str
    started: str
    step: str
    maintenance: str = MaintenanceOwner.NONE
    switch: str = ""  # in a cluster: the switch this deploy is part of, whose recorded decision recovery obeys
    # Once the deploy failed and goes back (`step` is an `Ending`): why, and whose fault it was (a `Fault`), so
    # that recovery takes the same way back with the same verdict, never forward.
    failed: str = ""
    fault: str = ""

    @classmethod
    def from_json(cls, data: Any) -> InFlight:
        """A journal record read back; ValueError or TypeError naming what is wrong with it."""
        inflight = cls(**_typed(data, "the journal", (dict,), "an object"))
        for item in fields(inflight):
            _typed(getattr(inflight, item.name), item.name, (str, type(None)) if item.name == "previous" else (str,),
                   "a string")
        for name in filter(None, (inflight.release, inflight.previous)):
            if problem := name_problem(name):
                raise ValueError(f"names {name!r}, which is no release name: {problem}")
        MaintenanceOwner(inflight.maintenance)
        if inflight.fault:
            Fault(inflight.fault)
        return inflight


def _typed(value: Any, where: str, kinds: tuple[type, ...], what: str) -> Any:
    """`value` if it is one of `kinds` (a bool never passes for a number); else ValueError saying what it should be."""
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"{where} must be {what}, not {kind}")
    return value


def read_json(path: Path, what: str, build: Callable[[Any], T]) -> T | None:
    """The JSON file at `path` built into `what` by `build`; None when there is no such file; Damaged else."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Damaged(f"{path} cannot be read: {exc.strerror}") from None
    if not raw.strip():
        raise Damaged(f"{path} is empty")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Damaged(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise Damaged(f"{path} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    try:
        return build(data)
    except (ValueError, TypeError) as exc:
        raise Damaged(f"{path} does not hold {what}: {exc}") from None


def read_memory(path: Path) -> Memory:
    """`state.json`: the Memory it holds, a fresh one when there is none yet, or Damaged naming the fault."""
    memory = read_json(path, "maintd's state", Memory.from_json)
    return memory if memory is not None else Memory()


def read_in_flight(path: Path) -> InFlight | None:
    """The deploy journal: the deploy in flight, None when there is none, or Damaged naming the fault."""
    return read_json(path, "a deploy journal", InFlight.from_json)


FileState = tuple[int, int, int, int]  # device, inode, size, mtime (ns): which file, as it was when read


@dataclass(frozen=True)
class History:
    entries: list[dict[str, Any]]  # oldest first
    skipped: list[int]  # numbers of the lines that do not parse (a line cut by a crash, a bad sector, a hand edit)
    read_as: FileState | None = None  # the file as it was read; None when there was none

    def problem(self, path: Path) -> str | None:
        if not self.skipped:
            return None
        return (f"{path}: {len(self.skipped)} line(s) that do not parse were passed over (the first is line "
                f"{self.skipped[0]})")


def read_history(path: Path) -> History:
    """`history.jsonl`: each line that is a JSON object, and where the others were."""
    try:
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            lines = file.read().splitlines()
    except FileNotFoundError:
        return History([], [])
    entries, skipped = [], []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            skipped.append(number)
    return History(entries, skipped, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))


def faults(directory: Path) -> list[str]:
    """What `maintd check` says of a state directory: each damaged file, and what `maintd run` will do about it."""
    found = []
    try:
        read_memory(directory / STATE)
    except Damaged as exc:
        found.append(f"{exc}: maintd run will keep it aside and rebuild the state from {HISTORY} and the tree, with "
                     "automatic deploys paused until `maintctl resume`")
    try:
        read_in_flight(directory / JOURNAL)
    except Damaged as exc:
        found.append(f"{exc}: maintd run will keep it aside; no deploy can be known to have been in flight")
    try:
        if problem := read_history(directory / HISTORY).problem(directory / HISTORY):
            found.append(problem)
    except OSError as exc:
        found.append(f"{directory / HISTORY} cannot be read: {exc.strerror}")
    return found


class Store:
    """The state directory: `state.json` (a `Memory`) and `history.jsonl`, safe to use from several threads."""

    def __init__(self, directory: Path, report: Report | None = None) -> None:
        self.directory = directory
        self.path = directory / STATE
        self.history_path = directory / HISTORY
        self.lock = threading.RLock()
        self.report = report or log.get().error
        self._journal_fd: int | None = None  # the journal of the deploy in flight, open from its first record
        self._journal_size = JOURNAL_RECORD  # bytes every record of that journal is padded to
        self._history_read_as: FileState | None = None  # the history file as its last read found it
        directory.mkdir(parents=True, exist_ok=True)
        # Why state.json could not be read, and where it was kept: then the memory is blank and paused (nothing
        # deploys by itself) until rebuild.py fills it in from the history and the tree.
        self.damage = ""
        try:
            self.memory = read_memory(self.path)
        except Damaged as exc:
            self.memory = Memory(paused=True)
            self.damage = f"{exc}; {self.keep_aside(self.path)}"

    def keep_aside(self, path: Path, move: bool = False) -> str:
        """A damaged file kept for inspection as `<name>.bad-<time>` beside it; says where, or why it could not be.

        It is linked there, and stays in its place unless `move`: state.json is replaced only by the rebuilt state,
        so a crash in between finds the damage again rather than a blank state."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            # Kept by an earlier start that went no further (a restart loop): that name, not one more for it.
            aside = next((other for other in path.parent.glob(f"{path.name}.bad-*") if other.samefile(path)), None)
            attempt = 0
            while aside is None:
                candidate = path.with_name(f"{path.name}.bad-{stamp}" + (f".{attempt}" if attempt else ""))
                try:
                    os.link(path, candidate)
                    aside = candidate
                except FileExistsError:  # another fault within the same second
                    attempt += 1
            if move:
                path.unlink()
        except OSError as exc:
            return f"it could not be kept aside: {exc.strerror}"
        return f"kept as {aside.name}"

    @property
    def journal_path(self) -> Path:
        return self.directory / JOURNAL

    def journal(self, inflight: InFlight, durable: bool) -> None:
        """Record the step about to run; durable (fsynced) where recovery depends on it surviving a power cut.

        A deploy's first record creates the file durably (temporary file, fsync, rename, fsync the directory) and
        keeps it open. Later ones overwrite it in place with one write of one disk sector, padded: a single write is
        whole after a kill -9 (the page cache survives) and a sector is whole after a power cut, and it costs
        microseconds where a rename over the old file costs ext4 a flush (auto_da_alloc) inside the maintenance
        window.
        """
        record = json.dumps(asdict(inflight), sort_keys=True).encode()
        if self._journal_fd is None or len(record) > self._journal_size:
            # First record, or one too long to overwrite the file whole (long names): a fresh file, padded so
            # that every later, shorter record covers all of it.
            self._close_journal()
            self._journal_size = max(JOURNAL_RECORD, len(record))
            write_atomically(self.journal_path, record.ljust(self._journal_size).decode(), durable=True)
            self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CLOEXEC)
            return
        os.pwrite(self._journal_fd, record.ljust(self._journal_size), 0)
        if durable:
            os.fsync(self._journal_fd)

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def in_flight(self) -> InFlight | None:
        """The deploy a crash cut off, if any. A torn journal says nothing: it is reported and kept aside (once:
        it is gone from its place afterwards), and no deploy can be known to have been in flight."""
        try:
            return read_in_flight(self.journal_path)
        except Damaged as exc:
            kept = self.keep_aside(self.journal_path, move=True)
            self.report(f"{exc}: no deploy can be known to have been in flight; {kept}")
            return None

    def journal_done(self) -> str | None:
        """The deploy is over; returns why the journal could not be removed (the deploy itself stands, and
        recovery at the next start finds the release live and finishes forward)."""
        self._close_journal()
        try:
            self.journal_path.unlink(missing_ok=True)
        except OSError as exc:
            return f"could not remove the deploy journal {self.journal_path}: {exc.strerror}"
        return None

    def record(self, name: str) -> ReleaseRecord:
        with self.lock:
            return self.memory.releases.setdefault(name, ReleaseRecord())

    def releases(self) -> dict[str, ReleaseRecord]:
        """Every release maintd remembers, as a copy to walk while the other thread goes on."""
        with self.lock:
            return dict(self.memory.releases)

    def retired(self, keep: int, protected: set[str | None]) -> list[str]:
        with self.lock:
            return self.memory.retired(keep, protected)

    def forget(self, name: str) -> None:
        with self.lock:
            self.memory.releases.pop(name, None)

    def save(self) -> None:
        with self.lock:
            write_atomically(self.path, json.dumps(asdict(self.memory), indent=1, sort_keys=True), durable=True)

    def finish(self, last_deploy: dict[str, Any], entry: dict[str, Any], went_live: bool) -> str | None:
        """Record a finished deploy (state, then history); returns why it could not be, e.g. a full disk. One that
        `went_live` is recorded as `Memory.went_live` says.

        The site is already consistent when this runs, so failing to write the record must not fail the deploy.
        """
        try:
            with self.lock:
                if went_live:
                    self.memory.went_live(entry["release"], entry["previous"])
                self.memory.last_deploy = last_deploy
                self.save()
            self.append_history(entry)
        except OSError as exc:
            return f"could not record the outcome in {self.directory}: {exc.strerror}"
        return None

    def append_history(self, entry: dict[str, Any]) -> None:
        with self.lock, open(self.history_path, "a", encoding="utf-8") as history:
            history.write(json.dumps(entry, sort_keys=True) + "\n")
            history.flush()
            os.fsync(history.fileno())

    def history(self) -> list[dict[str, Any]]:
        """Past deploys, oldest first; lines that do not parse are passed over, and said once per state of the file
        (which file, its size and mtime), not once per read: `maintctl history` is open to every local user
        (contract section 5), and a line per request would let any of them write into the daemon's log at will,
        until journald's rate limit dropped the deploys' own entries. A file that changed is said again.

        It reads the whole file: callers on the event loop run it in a thread."""
        read = read_history(self.history_path)
        with self.lock:
            last_read, self._history_read_as = self._history_read_as, read.read_as
        if (problem := read.problem(self.history_path)) and read.read_as != last_read:
            self.report(problem)
        return read.entries
