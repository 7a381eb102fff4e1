"""Every release maintd knows of, and the one place its state is decided.

A release's state comes from three sources: the upload tracker (still being written), what the daemon learned at run
time (complete, refused, found unmarked at start-up, its size) and what it remembers across restarts (went live,
bad). `Inventory.judge` combines them, in one order of precedence, into a `ReleaseState`; the automatic deploy
policy, `maintctl releases`, `status`, `deploy` and `rollback` all ask it. No threads and no clock: tests drive it
by making directories and calling methods.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from .results import DeployKind, Refused
from .state import Store
from .tree import ReleaseError, Tree, name_key, name_problem
from .upload import UploadTracker


class ReleaseState(StrEnum):
    LIVE = "live"
    PREVIOUS = "previous"  # live before the live one: where `rollback` goes, never cleaned up
    REFUSED = "refused"  # failed a check of contract §1; considered afresh when written to again
    BAD = "bad"  # a deploy of it failed: never deployed automatically again, `deploy NAME` still may
    UPLOADING = "uploading"  # being written, or waiting for its marker or its quiet period
    INCOMPLETE = "incomplete"  # found at start-up without its marker: maybe cut off while maintd was down
    COMPLETE = "complete"  # whole and deployable; deployed automatically once, if nothing newer is complete


@dataclass(frozen=True)
class Row:
    """One line of `maintctl releases`."""

    name: str
    state: ReleaseState
    size: int | None
    uploaded_at: float
    went_live: float | None
    reason: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Inventory:
    """What `releases/` holds, as far as deploys are concerned."""

    def __init__(self, tree: Tree, store: Store, tracker: UploadTracker) -> None:
        self.tree = tree
        self.store = store
        self.tracker = tracker
        self.complete: dict[str, float] = {}  # complete uploads not yet deployed -> when they completed
        self.refused: dict[str, str] = {}  # -> why
        self.dormant: set[str] = set()  # unmarked releases found at start-up
        self.sizes: dict[str, int] = {}  # bytes, measured once: a complete release's files do not change

    async def measure(self) -> None:
        """Sizes of releases not yet measured, walked in a thread; a release's files do not change once complete."""
        names = [n for n in self.tree.entries()
                 if n not in self.sizes and not name_problem(n) and n not in self.tracker]

        def walk() -> dict[str, int]:
            measured = {}
            for name in names:
                try:
                    measured[name] = self.tree.probe(name).size
                except (ReleaseError, OSError):
                    continue
            return measured

        self.sizes.update(await asyncio.to_thread(walk))

    # --- the state ------------------------------------------------------------------------------------------------

    def judge(self, name: str, live: str | None, previous: str | None) -> tuple[ReleaseState, str]:
        """The one definition of a release's state, and the reason that goes with it; `live` and `previous` are
        passed in so a listing reads `current` once."""
        record = self.store.memory.releases.get(name)
        if name == live:
            return ReleaseState.LIVE, ""
        if name == previous:
            return ReleaseState.PREVIOUS, ""
        if name in self.refused:
            return ReleaseState.REFUSED, self.refused[name]
        if record and record.bad:
            return ReleaseState.BAD, record.bad
        if name in self.tracker:
            return ReleaseState.UPLOADING, "; ".join(self.tracker.uploads[name].reasons)
        if name in self.dormant:
            return ReleaseState.INCOMPLETE, ("found without its marker at start-up: it may have been cut off while "
                                             "maintd was down")
        if record and record.failed:
            return ReleaseState.COMPLETE, f"its last deploy failed through no fault of its own: {record.failed}"
        return ReleaseState.COMPLETE, ""

    def state_now(self, name: str) -> tuple[ReleaseState, str]:
        return self.judge(name, self.tree.live(), self.store.memory.previous)

    def rows(self) -> list[Row]:
        live, previous = self.tree.live(), self.store.memory.previous
        rows = []
        for name in self.tree.entries():
            if name.startswith("."):
                continue
            try:
                uploaded = os.lstat(self.tree.releases / name).st_mtime
            except OSError:
                continue  # removed while we listed
            record = self.store.memory.releases.get(name)
            state, reason = self.judge(name, live, previous)
            rows.append(Row(name, state, self.sizes.get(name), self.complete.get(name, uploaded),
                            record.went_live if record else None, reason))
        return sorted(rows, key=lambda row: name_key(row.name))

    def known(self) -> set[str]:
        """Releases whose upload maintd follows or has judged (not those merely live before)."""
        return set(self.tracker.uploads) | set(self.complete) | set(self.refused) | self.dormant

    # --- what happens to a release --------------------------------------------------------------------------------

    def resume(self, name: str) -> None:
        """Written to again: whatever was judged of it before no longer holds."""
        self.refused.pop(name, None)
        self.dormant.discard(name)
        self.complete.pop(name, None)

    def forget(self, name: str) -> None:
        self.resume(name)
        self.tracker.forget(name)
        self.sizes.pop(name, None)

    def refuse(self, name: str, reason: str) -> bool:
        """True when this is news (so it is logged once)."""
        self.tracker.forget(name)
        news = self.refused.get(name) != reason
        self.refused[name] = reason
        return news

    def completed(self, name: str, when: float, size: int) -> None:
        self.tracker.forget(name)
        self.complete[name] = when
        self.sizes[name] = size

    def found_dormant(self, name: str) -> None:
        self.dormant.add(name)

    def seen_live(self) -> str | None:
        """The live release, found at start: it has gone live, whenever that was (the state may not know it)."""
        live = self.tree.live()
        if live:
            record = self.store.record(live)
            record.went_live = record.went_live or time.time()
        return live

    def went_live_before(self, name: str) -> bool:
        record = self.store.memory.releases.get(name)
        return bool(record and record.went_live)

    # --- choosing -------------------------------------------------------------------------------------------------

    def take_automatic(self) -> tuple[str | None, list[str]]:
        """The release an upload deploys now (the newest complete one never considered), and the older ones it
        passes over; all of them count as considered, so automatic deploys take a release at most once."""
        live, previous = self.tree.live(), self.store.memory.previous
        candidates = [name for name in self.complete if not self.store.record(name).auto_considered
                      and self.judge(name, live, previous)[0] is ReleaseState.COMPLETE]
        if not candidates:
            return None, []
        newest = max(candidates, key=name_key)
        for name in candidates:
            self.store.record(name).auto_considered = True
        return newest, [name for name in candidates if name != newest]

    def newest_complete(self) -> str:
        complete = [row.name for row in self.rows() if row.state is ReleaseState.COMPLETE]
        if not complete:
            raise Refused("no complete release is waiting; name one: maintctl deploy NAME")
        return max(complete, key=name_key)

    def rollback_target(self) -> str:
        """The previous release, or else the one live most recently before it; never a bad one."""
        live, previous = self.tree.live(), self.store.memory.previous
        candidates = sorted(((r.went_live, n) for n, r in self.store.releases().items()
                             if r.went_live and not r.bad and n != live and (self.tree.releases / n).is_dir()),
                            reverse=True)
        names = [n for _, n in candidates]
        if previous in names:
            return previous
        if not names:
            raise Refused("no earlier release to roll back to")
        return names[0]

    def check_deployable(self, name: str, kind: DeployKind) -> None:
        """Refuses, with the reason, a release that an operator may not take live now."""
        if problem := name_problem(name):
            raise Refused(f"bad release name {name!r}: {problem}")
        if not os.path.lexists(self.tree.releases / name):
            raise Refused(f"no release {name!r}")
        state, reason = self.state_now(name)
        if state in (ReleaseState.UPLOADING, ReleaseState.REFUSED) or (
                kind is DeployKind.ROLLBACK and state is ReleaseState.INCOMPLETE):
            raise Refused(f"release {name} is {state}" + (f": {reason}" if reason else ""))
