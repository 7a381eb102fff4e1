"""How a cluster member's deploy waits: for etcd while it does not answer, and for the other members.

A wait says what it waits for (in `status`, and in the log when etcd does not answer) and ends at once when the
daemon stops (`Coordinator.stopping`), raising `Interrupted` with one sentence saying what this member leaves: the
deploy then ends without its undo and with its journal in place, and recovery at the next start finishes or undoes
it by the decision recorded in etcd. Undoing it now would be guessing: the others may commit without this member.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from .cluster import Area, Coordinator
from .etcd import EtcdUnavailable
from .pipeline import Deploy
from .results import Interrupted

T = TypeVar("T")
UNREACHABLE_PAUSE = 0.5  # seconds between two tries while etcd does not answer


class Waiting:
    def __init__(self, deploy: Deploy, stopping: threading.Event, left: Callable[[], str]) -> None:
        self.deploy = deploy
        self.stopping = stopping
        self.left = left  # what this member leaves behind if it stops now, in words
        self.unreachable = ""  # why etcd does not answer, while it does not

    def keep_trying(self, action: Callable[[], T], what: str) -> T:
        """`action` until etcd answers it; `what` says what for ("to record maintenance")."""
        while True:
            try:
                result = action()
            except EtcdUnavailable as exc:
                self.unanswered(what, exc)
                continue
            self.answered()
            return result

    def unanswered(self, what: str, exc: EtcdUnavailable) -> None:
        """etcd did not answer: say so once, and pause before the next try."""
        if not self.unreachable:
            self.deploy.log.error(f"etcd cannot be reached; waiting {what}, never guessing: {exc}",
                                  switch_id=self.deploy.phase.switch)
        self.unreachable = str(exc)
        self.pause(UNREACHABLE_PAUSE, what, f"etcd unreachable: waiting {what}")

    def answered(self) -> None:
        if self.unreachable:
            self.deploy.log.info("etcd answers again", switch_id=self.deploy.phase.switch)
            self.unreachable = ""

    def pause(self, seconds: float, what: str, shown: str = "") -> None:
        """Wait `seconds`, `status` showing what for, unless the daemon stops first: then `Interrupted`."""
        self.deploy.phase.waiting = shown or f"waiting {what}"
        self.stopping.wait(seconds)
        self._unless_stopping(what)

    def until_changed(self, co: Coordinator, after: int, areas: frozenset[Area], what: str) -> bool:
        """Wait until something in `areas` changed after revision `after` (the reading the caller has), or long
        enough that the keys must be read anyway (`Coordinator.changed`), `status` showing what for; whether it
        was a change. `Interrupted` if the daemon stops first."""
        self.deploy.phase.waiting = f"waiting {what}"
        changed = co.changed(after, areas)
        self._unless_stopping(what)
        return changed

    def _unless_stopping(self, what: str) -> None:
        if self.stopping.is_set():
            raise Interrupted(f"stopping while waiting {what}: {self.left()}; recovery at the next start obeys "
                              "the decision recorded in etcd")

    def over(self) -> None:
        self.deploy.phase.waiting = ""
