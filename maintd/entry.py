"""How a cluster member's deploy gets into a switch: before its first entry is logged, so that every entry of the
deploy (`started` included) carries the id of the switch recorded in etcd, the same on every member (contract §7).

Several members may find a release complete in the same instant, each with no switch in progress: each tries to
begin one, but P/switch is created only where it is absent (`Coordinator.begin`), so etcd lets one record in and the
others read again and join it. An id is only ever taken from P/switch, or from this member's record once etcd took
it: one that lost the race was never anyone's, and nothing logs, journals or shows it. The member that begins the
switch reads the release's digest for the record before its `validate` step; a release that then fails validation
aborts that switch at once, as it would abort one the others had begun. A deploy that `View.way_in` keeps out of
every switch, or that finds a value it cannot read, is in none: its `prepare` step fails with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .cluster import Coordinator, Entry, SwitchRecord, Unreadable
from .pipeline import new_deploy_id
from .results import UPLOAD_ACTOR, DeployKind, StepFailed


@dataclass(frozen=True)
class Entered:
    """Where a deploy stands in the cluster before its first step."""

    switch: SwitchRecord | None = None  # the switch it is part of, as recorded in etcd
    began: bool = False  # this member's record is the one etcd took
    refusal: Exception | None = None  # why it is in no switch: its `prepare` step fails with this
    # Whether that failure is a verdict on the release: not when another switch held the cluster, the one to join
    # was decided without it, or the cluster had abandoned the release (its verdict stands)
    verdict: bool = True
    held_by: str = ""  # what held the cluster (`View.holder`), when that kept it out: tried again once it ends


def enter(co: Coordinator, release: str, actor: str, kind: DeployKind, joining: str,
          digest: Callable[[], str]) -> Entered:
    """Into the switch `View.way_in` says: the one another member began (`joining`), which this deploy joins or
    none; else the switch of `release` in progress, or one begun with the release's `digest`. `EtcdUnavailable`
    passes through: the caller waits for etcd, without which no switch begins."""
    while True:
        try:
            view = co.view()
        except Unreadable as exc:
            return Entered(refusal=StepFailed(str(exc)), verdict=False)
        entry, why = view.way_in(release, actor == UPLOAD_ACTOR, joining)
        if entry is Entry.JOIN and view.switch:
            return Entered(view.switch)
        if entry is Entry.BEGIN:
            try:
                read = digest()
            except Exception as exc:  # the release cannot be read whole: `prepare` fails as it would have, if
                return Entered(refusal=exc)  # `validate` has not failed first
            record = SwitchRecord(new_deploy_id(), release, read, kind, co.me, actor, time.time(), *co.cluster.how)
            if co.begin(record):
                return Entered(record, began=True)
        elif entry is Entry.END and view.switch:
            co.end(view.switch_value)
        elif entry in (Entry.HELD, Entry.REFUSED):
            return Entered(refusal=StepFailed(why), verdict=False, held_by=view.holder if entry is Entry.HELD else "")
