"""A member's part in switches that other members began, and in the cluster's verdicts on releases.

A switch begins on whichever member first has the release complete (or where an operator asked for it). Every
other member learns of it here, by reading the keys again when etcd's watch says they changed, and joins as soon as
the release is complete on it too (an operator's switch even when the release is live or bad here: it is that
operator's deploy); a release that is refused here, or bad here when an upload began the switch, aborts the switch
at once instead of leaving the others waiting for `prepare_timeout`. A release the cluster abandoned is marked bad
here too, whether it is already here or comes later, so it is never deployed automatically. An upload whose deploy
could not begin while another switch held the cluster is tried again here, once, when that switch has ended.
Nothing one reading finds (a value this maintd cannot read) ends the reading: it is said once, and the next reading
is another chance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from . import log
from .cluster import (
    FINISHED,
    Area,
    Coordinator,
    Decision,
    MemberState,
    Move,
    SwitchRecord,
    View,
)
from .etcd import EtcdUnavailable
from .inventory import Inventory, ReleaseState
from .results import UPLOAD_ACTOR, DeployKind, Refused
from .runner import DeployRunner
from .tasks import Tasks

# What the joiner reads (besides the switch in progress, with its states and the alive keys): not the reports
READS = frozenset({Area.BAD})
# The changes it reads again on: a switch begun or ended, a release abandoned (an abort marks it bad in the same
# transaction), a member come or gone. Not the states in a switch nor its go or commit: the members in it wait on
# those themselves, and the last one through ends it (a member that died before signing off is found at the next
# reading, every `Coordinator.truth_every` seconds); nor the reports.
WAKES = frozenset({Area.SWITCH, Area.BAD, Area.ALIVE})


class Joiner:
    def __init__(self, coordinator: Coordinator, inventory: Inventory, runner: DeployRunner, tasks: Tasks) -> None:
        self.co = coordinator
        self.inventory = inventory
        self.runner = runner
        self.tasks = tasks
        self.log = log.get(app=runner.ctx.config.app)
        self._said: set[str] = set()  # what was logged once already

    async def run(self) -> None:
        """Reads the keys for as long as the daemon runs, whatever one reading brings: a value this maintd cannot
        read, or a bug, is logged once (per distinct error) and the next reading is another chance. A member whose
        joiner ended would never join a switch again: every switch the others began would wait for it and be
        aborted, its release marked bad on every member. It reads them again when etcd's watch says that
        something it acts on changed, and every `Coordinator.truth_every` seconds anyway: the watch is a hint."""
        after = 0  # the revision of the last reading
        while True:
            await asyncio.to_thread(self.co.changed, after, WAKES)
            try:
                view = await asyncio.to_thread(self.co.view, None, (), READS)
                after = view.revision
                self._mark_abandoned(view)
                self._settle(view)
                self._maybe_join(view)
                self._retry_held_back(view)
            except EtcdUnavailable:
                continue  # Membership reports it; nothing to join while etcd is away
            except Exception as exc:
                self._once(f"failed:{exc!r}", f"could not act on the cluster's keys (tried again at every reading, "
                                              f"said once): {exc}", self.log.error, exc_info=exc)

    def _mark_abandoned(self, view: View) -> None:
        """Marked bad here too, and saved at once: a restart must not forget what the cluster abandoned. Once for
        each abandonment (`ReleaseRecord.abandoned`): the key stays in etcd (contract §7: the cluster abandoned it),
        while this member's record follows what became of the release here since, so that a release an operator
        took live again (`maintctl deploy NAME`) is not bad, here as on a lone server (`ReleaseRecord.acquit`)."""
        store, marked = self.inventory.store, False
        for release, reason in view.bad.items():
            record = store.memory.releases.get(release)
            here = (self.inventory.tree.releases / release).is_dir()
            if here and not (record and record.abandoned == reason):
                record = store.record(release)
                record.abandoned, marked = reason, True
                if not record.bad:  # a member that took part in the switch judged it already, in its own words
                    record.bad = f"abandoned by the cluster: {reason}"
                    self.log.warning(f"release {release} marked bad: the cluster abandoned it: {reason}",
                                     release=release)
        if marked:
            try:
                store.save()
            except OSError as exc:
                self.log.error(f"could not save {store.path}: {exc.strerror or exc}")

    def _settle(self, view: View) -> None:
        """A decided switch this member went through but did not sign off (killed in the last instant) would
        keep the next one from beginning: sign it off, when this member is where the decision says."""
        switch, me = view.switch, self.co.me
        if (not switch or view.decision not in (Decision.COMMIT, Decision.ABORT) or self.runner.busy
                or view.state_of(me) in (None, *FINISHED)):
            return
        live = self.inventory.tree.live()
        landed = live == switch.release if view.decision is Decision.COMMIT else live != switch.release
        if landed:
            state = MemberState.DONE if view.decision is Decision.COMMIT else MemberState.BACK
            self.tasks.spawn(asyncio.to_thread(self.co.sign_off, switch.id, state))

    def _retry_held_back(self, view: View) -> None:
        """An upload that could not begin its switch while another switch held the cluster is taken again once
        that switch has ended (its record gone or another's, or finished: the next begin removes it), not before."""
        held = self.runner.held_back
        for release, holder in list(held.items()):
            if view.holder != holder or view.finished():
                del held[release]
                self.inventory.store.record(release).auto_considered = False
                self.log.info(f"{holder} has ended: release {release} is tried again", release=release)
                self.runner.kick()

    def _maybe_join(self, view: View) -> None:
        """Join the switch in progress when this member can. Whether it may is the rule of the deploy the switch
        stands for: an operator's (`maintctl deploy NAME`, `rollback`) takes any complete release live, the live
        one again or a bad one too (contract §1, §2); an upload's takes a release at most once and never a bad one,
        so a release bad here aborts it at once, as a refused one does, instead of leaving the others waiting."""
        switch, me = view.switch, self.co.me
        if view.unreadable:
            self._once(f"unreadable:{view.unreadable}", f"{self.co.keys.switch} holds a value this maintd cannot "
                       f"read (a newer maintd's switch, or a hand edit): no switch to join here, and none can begin "
                       f"until it is gone: {view.unreadable[:200]}", self.log.warning)
            return
        if not switch or view.decision is not None or view.state_of(me) is not None or self.runner.busy:
            return
        by_upload = switch.actor == UPLOAD_ACTOR
        if self.inventory.store.memory.paused and by_upload:
            self._once(f"paused:{switch.id}", f"automatic deploys are paused here: not joining the switch of "
                                              f"release {switch.release} begun by an upload on {switch.by}")
            return
        if not (self.inventory.tree.releases / switch.release).is_dir():
            self._once(f"absent:{switch.id}", f"switch {switch.id} waits for release {switch.release} to be "
                                              "uploaded here")
            return
        state, why = self.inventory.state_now(switch.release)
        if state is ReleaseState.REFUSED or (state is ReleaseState.BAD and by_upload):
            reason = f"{me}: release {switch.release} is {state} here: {why}"
            self.tasks.spawn(asyncio.to_thread(self._abort, switch.id, switch.release, reason))
        elif state not in (ReleaseState.UPLOADING, ReleaseState.INCOMPLETE):
            self.tasks.spawn(self._join(switch))

    async def _join(self, switch: SwitchRecord) -> None:
        try:
            await self.runner.deploy(switch.release, switch.actor, DeployKind(switch.kind), wait=False,
                                     automatic=True, joining=switch.id)
        except Refused as exc:
            self._once(f"refused:{switch.id}:{exc}", f"not joining the switch of release {switch.release}: {exc}")

    def _abort(self, switch_id: str, release: str, reason: str) -> None:
        try:
            if self.co.decide(switch_id, Move(Decision.ABORT, reason), release, time.time()):
                self.log.warning(f"switch aborted: {reason}", switch_id=switch_id, release=release)
        except EtcdUnavailable:
            pass  # tried again at the next reading

    def _once(self, key: str, message: str, emit: Callable[..., Any] | None = None, **fields: Any) -> None:
        """Log `message` the first time `key` comes up: what every reading finds again is said once."""
        if key not in self._said:
            self._said.add(key)
            (emit or self.log.info)(message, **fields)
