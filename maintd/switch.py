"""A deploy in cluster mode: the steps of contract §7, one member's side of a switch of every member together.

`ClusterDeploy` is the single-server `Deploy` with two steps more (`prepare`, `commit`), a `hooks_before` that only
the primary runs (after every member is in maintenance; the others wait for it), and a check of the decision
before the swap; when go chooses a rolling switch (contract §7a), the steps between `prepare` and `commit` are
`rolling.Rolling`'s instead. It is in its switch before its first entry (entry.py), so that every entry carries the
id etcd recorded. Between its steps it waits on the others by reading the keys (`cluster.View`) and trying the
transaction the rule says (`View.next_move`). While etcd cannot be reached it waits, never guessing: before
maintenance nothing has happened, and in maintenance nobody can leave it without the decision. How it waits, and
how a wait ends when the daemon stops, is `waiting.Waiting`.
"""

from __future__ import annotations

import time
from functools import cached_property

from . import manifest
from .cluster import (
    HOOKS_RUN,
    IN_MAINTENANCE,
    Coordinator,
    Decision,
    MemberState,
    Standing,
    SwitchRecord,
    Unreadable,
    View,
)
from .config import Cluster
from .context import Context
from .entry import Entered, enter
from .etcd import EtcdUnavailable
from .pipeline import Deploy, OnStep, migrations_differ
from .results import DeployKind, Interrupted, Outcome, Skipped, StepRecord
from .rolling import Rolling
from .state import InFlight, MaintenanceOwner
from .steps import SWITCH, Fault
from .waiting import Waiting

FRESH = 0.05  # seconds for which the decision a wait just read stands in for reading it again


class ClusterDeploy(Deploy):
    STEPS = SWITCH

    def __init__(self, ctx: Context, release: str, actor: str, kind: DeployKind, on_step: OnStep | None,
                 coordinator: Coordinator, journal: InFlight | None = None, joining: str = "") -> None:
        super().__init__(ctx, release, actor, kind, on_step, journal)
        assert ctx.config.cluster
        self.cluster: Cluster = ctx.config.cluster
        self.co = coordinator
        # Resumed, the switch is known by its id alone: what recovery needs to read its decision and to abort it
        self.switch = SwitchRecord(self.phase.switch, release, "", kind, "", "", 0.0) if self.phase.switch else None
        self.joining = joining  # the id of the switch another member began, which this deploy joins or nothing
        self.entered = Entered()  # how it got into its switch, or why it is in none (entry.py)
        self.rolling: Rolling | None = None  # once go chose a rolling switch
        self.waits = Waiting(self, coordinator, self._left)

    def run(self) -> Outcome:
        """Into the switch before the first entry, so that every entry carries the id recorded in etcd (entry.py);
        waiting for etcd meanwhile, as long as it takes, as every step does."""
        t0 = time.perf_counter()
        try:
            self.entered = self.waits.keep_trying(lambda: enter(self.co, self.release, self.actor, self.kind,
                                                                self.joining, lambda: self.digest),
                                                  "to begin or join the switch")
        except Interrupted as stop:
            return self.interrupted(stop, t0)
        if switch := self.entered.switch:
            self.switch, self.phase.switch = switch, switch.id
            self.log = self.log.bind(switch_id=switch.id)
            if self.entered.began:
                self.log.info(f"switch {switch.id} of release {self.release} begun")
        return super().run()

    def leave(self) -> None:
        """Through the switch, forward: done, and the last member through removes it (`Coordinator.sign_off`)."""
        if self.switch:
            self.co.sign_off(self.switch.id, MemberState.DONE)

    def way_forward(self) -> tuple[bool, str]:
        """After a crash, the switch's recorded decision says (waiting for etcd as long as it takes), never this
        member's own reading: forward after commit, back after anything else."""
        if not self.switch:
            return False, "cut off before joining the switch"
        view = self.waits.keep_trying(lambda: self.co.view(self.phase.switch), "to read the switch's decision")
        self._follow(view)
        if view.decision is Decision.COMMIT:
            self.phase.committed = True
            return True, ""
        return False, ("the switch was aborted: " + view.reason if view.decision is Decision.ABORT
                       else "the switch was not committed")

    # --- the steps of contract §7 ---------------------------------------------------------------------------------

    def prepare(self) -> str:
        if not self.switch:  # kept out of every switch (entry.py): held back, the joiner tries it again once the
            self.phase.begun = self.entered.verdict  # cluster is free; no verdict, no abort, where it is no failing
            assert self.entered.refusal is not None  # of the release's own
            raise self.entered.refusal
        migrations = migrations_differ(self.ctx.tree, self.release, self.previous)
        self.waits.say(Standing(MemberState.PREPARED, digest=self.digest, migrations=migrations))
        view = self.waits.for_decision((Decision.GO,), "for every member to prepare the release")
        return f"every member prepared release {self.release} ({self.digest[:12]}): go, {self._follow(view)}"

    @cached_property
    def digest(self) -> str:
        """The release as uploaded here (contract §7), read once: by `prepare`, or before the first step by the
        member that begins the switch, for its record."""
        with self.ctx.tree.open(self.release) as top:
            return manifest.digest(top, self.ctx.tree.uploaded(self.release, self.ctx.written_by_maintd()))

    def maintenance_on(self) -> str:
        if self.rolling:
            return self.rolling.no_maintenance()
        try:
            return super().maintenance_on()
        finally:  # skipped or not, the others learn that this member is ready to swap; the primary says whether
            # it has hooks to run, and when it has none, the others need not wait for it to have run none
            self.waits.say(Standing(MemberState.MAINTENANCE, runs_hooks=self._runs_hooks()))

    def hooks_before(self) -> str:
        if self.rolling:
            return self.rolling.hooks_before(super().hooks_before)
        primary = self.cluster.primary
        if self.cluster.member != primary:
            self.waits.until(lambda view: view.state_of(primary) in HOOKS_RUN
                             or (view.state_of(primary) is MemberState.MAINTENANCE and not view.runs_hooks(primary)
                                 and view.all_in(IN_MAINTENANCE)),
                             f"for the primary, {primary}, to run the before-swap hooks")
            raise Skipped(f"the before-swap hooks are run by the primary, {primary}")
        self.waits.until(lambda view: view.all_in(IN_MAINTENANCE), "for every member to be in maintenance")
        try:
            return super().hooks_before()
        finally:  # with none to run, the others do not wait for this (see maintenance_on): no round trip for it
            if self._runs_hooks():
                self.waits.say(Standing(MemberState.HOOKS_DONE))

    def swap(self) -> str:
        # Read the decision again, unless the wait that just ended read it a moment ago: an abort decided while
        # the primary ran its hooks stops every member here.
        at, decision = self.waits.seen
        if self.rolling:
            self.rolling.take_turn()
        elif decision is not Decision.GO or time.monotonic() - at > FRESH:
            self.waits.for_decision((Decision.GO, Decision.COMMIT), "for the decision")
        return super().swap()

    def commit(self) -> str:
        # Together, since the last reading every member was in maintenance (the primary's hooks run): healthy is
        # the next state of each, and this member's may complete the set (see `Coordinator.set_healthy`).
        won, self.waits.said = self.waits.keep_trying(
            lambda: self.co.set_healthy(self.phase.switch, self.waits.revision, time.time() if self.rolling else 0),
            "to record healthy")
        if won:
            self.log.info("decided: commit", switch_id=self.phase.switch, decision=str(Decision.COMMIT))
        self.waits.for_decision((Decision.COMMIT,), "for every member to be healthy")
        self.phase.committed = True
        return "every member swapped and is healthy: committed"

    def maintenance_off(self) -> str:
        return self.rolling.no_maintenance() if self.rolling else super().maintenance_off()

    def cleanup(self) -> str:
        """The last step of a switch gone forward: then this member leaves it (before the journal is closed, so
        that a crash in between finds the journal, finishes forward and leaves again)."""
        try:
            return super().cleanup()
        finally:
            self.leave()

    # --- going back -----------------------------------------------------------------------------------------------

    def undo(self, error: str, fault: Fault | None) -> StepRecord:
        """A failure before commit aborts the switch for every member (if none has yet), then goes back here."""
        if self.phase.begun:
            self.abort(error)
            fault = Fault.RELEASE  # contract §7: an aborted switch marks the release bad on every member
        if self.rolling and self.phase.swapped:
            self.rolling.after_later_batches()
        record = super().undo(error, fault)
        if self.switch:
            self.co.sign_off(self.switch.id, MemberState.BACK)
        return record

    def abort(self, reason: str) -> None:
        """Abort this member's switch, or (failed before joining) the one of this release the others began."""
        said = f"{self.cluster.member}: {reason}"
        try:
            if aborted := self.co.abort(self.release, said, self.phase.switch):
                self.log.warning(f"switch aborted: {said}", switch_id=aborted)
        except (EtcdUnavailable, Unreadable) as exc:
            # Going back alone is safe before commit: commit needs this member healthy. The others abort at their
            # timeout once etcd answers again.
            self.log.error(f"could not record the abort in etcd ({exc}); going back here")

    # --- waiting on the others ------------------------------------------------------------------------------------

    def _follow(self, view: View) -> str:
        """Switch the way go chose, said in words; in a rolling switch every entry from here on carries the batch."""
        choice, self.rolling = Rolling.chosen(self, view)
        self.phase.strategy = str(choice.strategy)
        self.log = self.log.bind(batch=self.rolling.batch) if self.rolling else self.log
        return str(self.rolling or choice)

    def _runs_hooks(self) -> bool:
        return self.cluster.member == self.cluster.primary and bool(self.cfg.hooks.before_swap)

    def _left(self) -> str:
        """What this member leaves behind if it stops now, in words, for the line that says so."""
        maintenance = "not in maintenance" if self.phase.maintenance is MaintenanceOwner.NONE else "in maintenance"
        live = f"current -> releases/{self.ctx.tree.live() or 'none'}" + (" (swapped)" if self.phase.swapped else "")
        decision = self.waits.seen[1]
        switch = (f"switch {self.phase.switch} " + (f"last read as {decision}" if decision else "undecided")
                  if self.switch else "in no switch yet")
        return f"{maintenance}, {live}, {switch}"

