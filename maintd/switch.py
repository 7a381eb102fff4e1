"""A deploy in cluster mode: the steps of contract §7, one member's side of a switch of every member together.

`ClusterDeploy` is the single-server `Deploy` with two steps more (`prepare`, `commit`), a `hooks_before` that only
the primary runs (after every member is in maintenance; the others wait for it), and a check of the decision
before the swap. Between its steps it waits on the others by reading the keys (`cluster.View`) and trying the
transaction the rule says (`View.next_move`). While etcd cannot be reached it waits, never guessing: before
maintenance nothing has happened, and in maintenance nobody can leave it without the decision. How it waits, and
how a wait ends when the daemon stops, is `waiting.Waiting`.
"""

from __future__ import annotations

import time

from . import manifest
from .cluster import (
    IN_MAINTENANCE,
    Coordinator,
    Decision,
    Entry,
    MemberState,
    Standing,
    SwitchRecord,
    Unreadable,
)
from .config import Cluster
from .context import Context
from .etcd import EtcdUnavailable
from .pipeline import Deploy, OnStep, new_deploy_id
from .results import UPLOAD_ACTOR, DeployKind, Outcome, Skipped, StepFailed, StepRecord
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
        self.planned_id = joining or new_deploy_id()
        self.held_by = ""  # what held the cluster when this one could not begin (`View.holder`)
        self.waits = Waiting(self, coordinator, self._left)

    def run(self) -> Outcome:
        # Every entry of the switch carries its id from the first step on: the id of the switch of this release
        # in progress, or the one this member will begin it under (it is re-bound in the rare race of two).
        try:
            if (view := self.co.view()).switch and view.switch.release == self.release and view.decision is None:
                self.planned_id = view.switch.id
        except (EtcdUnavailable, Unreadable):
            pass  # the first step reads the keys again, and says what is wrong with them
        self.log = self.log.bind(switch_id=self.planned_id)
        outcome = super().run()
        if not self.co.stopping.is_set():  # not worth a wait for etcd while stopping
            self._report_member()
        return outcome

    def leave(self) -> None:
        """Through the switch, forward: done, and the last member through removes it. Not worth waiting for etcd
        over: the site is out of maintenance already, and the joiner signs a switch off later if this could not."""
        self._sign_off(MemberState.DONE)

    def way_forward(self) -> tuple[bool, str]:
        """After a crash, the switch's recorded decision says (waiting for etcd as long as it takes), never this
        member's own reading: forward after commit, back after anything else."""
        if not self.switch:
            return False, "cut off before joining the switch"
        view = self.waits.keep_trying(lambda: self.co.view(self.phase.switch), "to read the switch's decision")
        if view.decision is Decision.COMMIT:
            self.phase.committed = True
            return True, ""
        return False, ("the switch was aborted: " + view.reason if view.decision is Decision.ABORT
                       else "the switch was not committed")

    # --- the steps of contract §7 ---------------------------------------------------------------------------------

    def prepare(self) -> str:
        with self.ctx.tree.open(self.release) as top:
            digest = manifest.digest(top, self.ctx.tree.uploaded(self.release, self.ctx.written_by_maintd()))
        self.switch = self.waits.keep_trying(lambda: self._join_or_begin(digest), "to begin or join the switch")
        self.phase.switch = self.switch.id
        self.log = self.log.bind(switch_id=self.switch.id)
        self.waits.say(Standing(MemberState.PREPARED, digest=digest))
        self.waits.for_decision((Decision.GO,), "for every member to prepare the release")
        return f"every member prepared release {self.release} ({digest[:12]}): go"

    def maintenance_on(self) -> str:
        try:
            return super().maintenance_on()
        finally:  # skipped or not, the others learn that this member is ready to swap; the primary says whether
            # it has hooks to run, and when it has none, the others need not wait for it to have run none
            self.waits.say(Standing(MemberState.MAINTENANCE, runs_hooks=self._runs_hooks()))

    def hooks_before(self) -> str:
        primary = self.cluster.primary
        if self.cluster.member != primary:
            self.waits.until(lambda view: view.state_of(primary) in (MemberState.HOOKS_DONE, MemberState.HEALTHY,
                                                                     MemberState.DONE)
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
        if decision is not Decision.GO or time.monotonic() - at > FRESH:
            self.waits.for_decision((Decision.GO, Decision.COMMIT), "for the decision")
        return super().swap()

    def commit(self) -> str:
        # Since the last reading every member was in maintenance (the primary's hooks run): healthy is the next
        # state of each, and this member's may complete the set (see `Coordinator.set_healthy`).
        won, self.waits.said = self.waits.keep_trying(
            lambda: self.co.set_healthy(self.phase.switch, self.waits.revision), "to record healthy")
        if won:
            self.log.info("decided: commit", switch_id=self.phase.switch, decision=str(Decision.COMMIT))
        self.waits.for_decision((Decision.COMMIT,), "for every member to be healthy")
        self.phase.committed = True
        return "every member swapped and is healthy: committed"

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
        record = super().undo(error, fault)
        self._sign_off(MemberState.BACK)
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

    def _join_or_begin(self, digest: str) -> SwitchRecord:
        """Into the switch `View.way_in` says, or refused with its reason (see there)."""
        while True:
            view = self.co.view()
            entry, why = view.way_in(self.release, self.actor == UPLOAD_ACTOR, self.joining)
            if entry is Entry.JOIN and view.switch:
                return view.switch
            if entry is Entry.BEGIN:
                record = SwitchRecord(self.planned_id, self.release, digest, self.kind, self.cluster.member,
                                      self.actor, time.time())
                if self.co.begin(record):
                    self.log.info(f"switch {record.id} of release {self.release} begun", switch_id=record.id)
                    return record
            elif entry is Entry.END and view.switch:
                self.co.end(view.switch)
            elif entry in (Entry.HELD, Entry.REFUSED):
                # No verdict, no abort; held back, the joiner tries it again once the cluster is free
                self.phase.begun, self.held_by = False, view.holder if entry is Entry.HELD else ""
                raise StepFailed(why)

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

    def _sign_off(self, state: MemberState) -> None:
        """This member is through the switch (`done`, or `back`); the last member through a decided switch
        removes it, so that the next may begin: who else is through is read in the same round trip. The decision
        is what counts: what this cannot write, the joiner signs off later, and the next switch to begin removes a
        finished one."""
        if not self.switch:
            return
        try:
            view = self.co.set_state(self.switch.id, Standing(state))
            if view.switch and view.switch.id == self.phase.switch and view.finished():
                self.co.end(view.switch)
        except (EtcdUnavailable, Unreadable):
            pass

    def _report_member(self) -> None:
        try:
            self.co.report(self.ctx.tree.live())
        except EtcdUnavailable:
            pass
