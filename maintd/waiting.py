"""How a cluster member's deploy waits: for etcd while it does not answer, and for the other members.

Waiting for the others is reading the keys (`cluster.View`) until the step's condition holds, trying the transaction
the rule says on the way (`View.next_move`); between two readings, waiting for etcd's watch to say that something the
wait reads has changed (`Coordinator.changed`), not reading again and again. A wait says what it waits for (in
`status`, and in the log when etcd does not answer) and ends at once when the daemon stops (`Coordinator.stopping`),
raising `Interrupted` with one sentence saying what this member leaves: the deploy then ends without its undo and
with its journal in place, and recovery at the next start finishes or undoes it by the decision recorded in etcd.
Undoing it now would be guessing: the others may commit without this member.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from .cluster import IN_SWITCH, ON_DECISION, Area, Coordinator, Decision, Standing, View
from .etcd import EtcdUnavailable
from .pipeline import Deploy
from .results import Interrupted, StepFailed

T = TypeVar("T")
UNREACHABLE_PAUSE = 0.5  # seconds between two tries while etcd does not answer


class Waiting:
    def __init__(self, deploy: Deploy, co: Coordinator, left: Callable[[], str]) -> None:
        self.deploy = deploy
        self.co = co
        self.stopping = co.stopping
        self.left = left  # what this member leaves behind if it stops now, in words
        self.unreachable = ""  # why etcd does not answer, while it does not
        self.said: View | None = None  # read with this member's last state: the next wait's first reading
        self.seen: tuple[float, Decision | None] = (0.0, None)  # when a wait last read the keys, and the decision
        self.revision = 0  # etcd's revision that reading was of

    def say(self, standing: Standing) -> None:
        """Record this member's state; the others' states, read in the same round trip, serve the next wait."""
        self.said = self.keep_trying(lambda: self.co.set_state(self.deploy.phase.switch, standing),
                                     f"to record {standing.state}")

    def for_decision(self, decisions: tuple[Decision, ...], what: str) -> View:
        """`until` the decision is one of `decisions`: only a decision, a member come or gone (the rule then
        aborts) or the switch record change what a member does then, not each state another member writes."""
        return self.until(lambda view: view.decision in decisions, what, ON_DECISION)

    def until(self, ready: Callable[[View], bool], what: str, wakes: frozenset[Area] = IN_SWITCH,
              within: Callable[[View], float | None] | None = None) -> View:
        """Read the keys until `ready`, trying whatever transaction the rule says on the way; an abort ends the
        step. Go and commit are tried on the reading that came with this member's own state (the member whose
        write completes the set sees it complete there), and on a reading made without the watch's word (nothing
        in `wakes` changed for a while, or etcd did not answer), should that member not have decided: not by every
        member the watch wakes at once, each comparing every member's keys. An abort, by whoever sees why.
        `within`: in how many seconds a reading may become ready by the clock alone, with no key changing (None:
        it cannot)."""
        switch, woken = self.deploy.phase.switch, False  # woken: the next reading is made on the watch's word
        while True:
            try:
                own = self.said is not None  # the reading came with this member's own state
                view, self.said = self.said or self.co.view(switch, besides=frozenset()), None
                self.seen, self.revision = (time.monotonic(), view.decision), view.revision
                move = view.next_move(self.co.cluster, time.time())
                if move and (move.decision is Decision.ABORT or own or not woken):
                    # Read again in the same transaction, won or lost; lost, the change that beat it is after
                    # `self.revision`, so the wait below reads once more at once if this reading is not ready yet
                    won, view = self.co.deciding(switch, move, self.deploy.release, time.time())
                    self.seen = (time.monotonic(), view.decision)
                    if won:
                        self.deploy.log.info(f"decided: {move.decision}" + (f" ({move.reason})" if move.reason
                                                                            else ""),
                                             switch_id=switch, decision=str(move.decision))
            except EtcdUnavailable as exc:
                self.unanswered(what, exc)
                woken = False
                continue
            self.answered()
            if view.decision is Decision.ABORT:
                raise StepFailed(f"the switch was aborted: {view.reason}")
            if ready(view):
                self.over()
                return view
            woken = self.changes(self.revision, wakes, what, within(view) if within else None)

    def changes(self, revision: int, wakes: frozenset[Area], what: str, within: float | None = None) -> bool:
        """Wait for a change in `wakes` after `revision` (`Coordinator.changed`), `status` showing what for, unless
        the daemon stops first: then `Interrupted`. Whether the watch said something changed."""
        self.deploy.phase.waiting = f"waiting {what}"
        woken = self.co.changed(revision, wakes, within)
        self._unless_stopping(what)
        return woken

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
            self.deploy.log.error(f"etcd cannot be reached; waiting {what}, never guessing: {exc}")
        self.unreachable = str(exc)
        self.pause(UNREACHABLE_PAUSE, what, f"etcd unreachable: waiting {what}")

    def answered(self) -> None:
        if self.unreachable:
            self.deploy.log.info("etcd answers again")
            self.unreachable = ""

    def pause(self, seconds: float, what: str, shown: str = "") -> None:
        """Wait `seconds`, `status` showing what for, unless the daemon stops first: then `Interrupted`."""
        self.deploy.phase.waiting = shown or f"waiting {what}"
        self.stopping.wait(seconds)
        self._unless_stopping(what)

    def _unless_stopping(self, what: str) -> None:
        if self.stopping.is_set():
            raise Interrupted(f"stopping while waiting {what}: {self.left()}; recovery at the next start obeys "
                              "the decision recorded in etcd")

    def over(self) -> None:
        self.deploy.phase.waiting = ""
