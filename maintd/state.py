"""What maintd remembers across restarts, in `state.dir`: one JSON object, and the history as JSON lines.

The persisted form is the `Memory` object itself, serialised: there is no second schema to drift from it. Writes
go to a temporary file that is fsynced and renamed, then the directory is fsynced, so a crash leaves the old state
or the new one, never half of either.

Two threads use it: the event loop (uploads, commands, the cluster joiner) and the deploy thread. One lock,
`Store.lock`, guards `Store.memory`: whatever changes it or walks its releases holds the lock, and the walks are
methods here (`retired`, `releases`, `forget`) so no caller iterates a dict another thread may change. A single
field read or set (`memory.paused`, one record's `bad`) is one step under the GIL and needs no lock; a check that
must not change under it (an operator's maintenance, then the flags: see `Context`) holds the lock throughout.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .maintenance import Notice
from .tree import write_atomically


@dataclass
class ReleaseRecord:
    """What maintd knows of one release beyond what is on disk."""

    went_live: float | None = None  # last time it went live (seconds since the epoch)
    bad: str = ""  # why a deploy of it failed; a bad release is never deployed automatically again
    auto_considered: bool = False  # automatic deploys take a release at most once
    failed: str = ""  # why its last deploy failed through a fault of the server's, not the release's


@dataclass
class Memory:
    paused: bool = False
    maintenance: Notice | None = None  # an operator's maintenance, held until turned off
    previous: str | None = None
    last_deploy: dict[str, Any] | None = None
    releases: dict[str, ReleaseRecord] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Memory:
        maintenance = data.get("maintenance")
        return cls(
            paused=bool(data.get("paused", False)),
            maintenance=Notice(**maintenance) if maintenance else None,
            previous=data.get("previous"),
            last_deploy=data.get("last_deploy"),
            releases={name: ReleaseRecord(**record) for name, record in data.get("releases", {}).items()},
        )

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


class Store:
    """The state directory: `state.json` (a `Memory`) and `history.jsonl`, safe to use from several threads."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"
        self.history_path = directory / "history.jsonl"
        self.lock = threading.RLock()
        self._journal_fd: int | None = None  # the journal of the deploy in flight, open from its first record
        self._journal_size = JOURNAL_RECORD  # bytes every record of that journal is padded to
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.memory = Memory.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            self.memory = Memory()

    @property
    def journal_path(self) -> Path:
        return self.directory / "deploy.json"

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
        try:
            return InFlight(**json.loads(self.journal_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError):  # a torn journal: no deploy can be known to be in flight
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

    def finish(self, last_deploy: dict[str, Any], entry: dict[str, Any], previous: str | None) -> str | None:
        """Record a finished deploy (state, then history); returns why it could not be, e.g. a full disk.

        The site is already consistent when this runs, so failing to write the record must not fail the deploy.
        """
        try:
            with self.lock:
                if previous:
                    self.memory.previous = previous
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

    def history(self) -> Iterator[dict[str, Any]]:
        """Past deploys, oldest first; a line cut by a crash is passed over."""
        try:
            lines = self.history_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
