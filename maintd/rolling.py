"""A member's side of a rolling switch (contract §7a): what `ClusterDeploy`'s steps do instead, once go chose it.

A rolling switch shares everything with a together one up to go (every member prepared the release, one digest, one
decision record) and after it (`commit` once every member is healthy, abort until then). Between the two, no member
enters maintenance: the primary runs the before-swap hooks, then the batches of the record (`Rollout`) swap, restart,
flush and pass their health check one after the other, each batch only once the one before it is healthy and has
stayed so for `batch_wait`, while every other member keeps serving its release. On abort the members that switched go
back in reverse batch order, so the release leaves the fleet the way it came in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .cluster import IN_SWITCH, Choice, Decision, MemberState, Rollout, Standing, Unreadable, View
from .config import Strategy
from .etcd import EtcdUnavailable
from .results import Interrupted, Skipped, StepFailed

if TYPE_CHECKING:
    from .switch import ClusterDeploy

class Rolling:
    def __init__(self, deploy: ClusterDeploy, choice: Choice, rollout: Rollout) -> None:
        self.deploy = deploy
        self.choice = choice
        self.rollout = rollout
        self.waits = deploy.waits
        self.me = deploy.cluster.member
        self.batch = rollout.batch_of(self.me) + 1  # counted from 1, as `MAINTD_BATCH` and `maintctl cluster` say

    @classmethod
    def chosen(cls, deploy: ClusterDeploy, view: View) -> tuple[Choice, Rolling | None]:
        """How go chose to switch (none recorded: together, as an older maintd's switch), and this member's side
        of it if it is rolling."""
        choice = view.choice or Choice(Strategy.TOGETHER, "no strategy recorded: an older maintd's switch")
        rollout = view.rollout
        return choice, cls(deploy, choice, rollout) if rollout else None

    def __str__(self) -> str:
        return f"{self.choice}; this member's batch: {self.batch} of {len(self.rollout.batches)}"

    def no_maintenance(self) -> str:
        """`maintenance_on` and `maintenance_off`: the others serve while this member switches; an operator's
        maintenance stays as it is, its flag following `current`."""
        raise Skipped(f"a rolling switch has no maintenance ({self.choice})")

    def hooks_before(self, run: Callable[[], str]) -> str:
        """The primary runs the before-swap hooks (`run`) at once, before the first batch swaps; the first batch
        waits for it to say they ran. Hooks that fail are not said to have run: the abort follows."""
        primary = self.deploy.cluster.primary
        if self.me != primary:
            raise Skipped(f"the before-swap hooks are run by the primary, {primary}, before the first batch")
        try:
            done = run()
        except Skipped:
            self.waits.say(Standing(MemberState.HOOKS_DONE))
            raise
        self.waits.say(Standing(MemberState.HOOKS_DONE))
        return done

    def take_turn(self) -> None:
        """Before the swap: wait until this member's batch is on, then say that it switches (so that, on abort,
        the earlier batches wait for it to go back). Nothing is written while the batch before stays healthy for
        `batch_wait`: the wait ends by the clock then, not by the watch."""
        primary = self.deploy.cluster.primary
        self.waits.until(lambda view: not self.rollout.turn(view, self.me, primary, time.time()),
                         f"for batch {self.batch} to be on", within=self._settled_in)
        self.waits.say(Standing(MemberState.SWITCHED))
        # The decision as read in the same transaction: an abort written since the wait's last reading stops this
        # member before its swap, not after (it would swap to the aborted release, restart, and go back again)
        if (read := self.waits.said) and read.decision is Decision.ABORT:
            raise StepFailed(f"the switch was aborted: {read.reason}")

    def _settled_in(self, view: View) -> float | None:
        """In how many seconds the batch before this member's has stayed healthy for `batch_wait`; None while
        the clock cannot bring this member's turn (the wait then lasts until the watch's word)."""
        settled = self.rollout.settled_at(view, self.me)
        return None if settled is None else settled - time.time()

    def after_later_batches(self) -> None:
        """On abort, before this member goes back: the members of later batches that switched go back first. The
        order is the contract's, the way back certain whatever the order: so it waits only while etcd answers and
        the daemon runs, and for `switch_timeout` at most (a later member stuck in a restart command holds nobody
        on the release that failed for longer)."""
        try:
            in_order, why = self._wait_for_later_batches()
        finally:
            self.waits.over()
        (self.deploy.log.info if in_order else self.deploy.log.warning)(f"going back: {why}")

    def _wait_for_later_batches(self) -> tuple[bool, str]:
        """Whether this member goes back in reverse batch order, and why it goes back now, in words."""
        deploy, waited = self.deploy, set[str]()
        deadline = time.monotonic() + deploy.cluster.switch_timeout
        while True:
            try:
                view = deploy.co.view(deploy.phase.switch, besides=frozenset())
                behind = self.rollout.behind(view, self.me)
            except (EtcdUnavailable, Unreadable) as exc:
                return False, f"without waiting for the later batches, which etcd cannot tell: {exc}"
            if not behind:
                return True, (f"{', '.join(sorted(waited))} went back first (reverse batch order)" if waited
                              else "no member of a later batch is on the new release")
            if time.monotonic() > deadline:
                return False, f"before {', '.join(behind)}: still not back after switch_timeout"
            waited.update(behind)
            try:
                self.waits.changes(view.revision, IN_SWITCH,
                                   f"for {', '.join(behind)} (later batches) to go back first")
            except Interrupted:
                return False, f"before {', '.join(behind)}: the daemon stops"
