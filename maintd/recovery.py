"""Putting the site right at start-up after a deploy was cut off (kill -9, power loss, OOM).

The deploy journal says which deploy was in flight, from which previous release, and the step about to run; the
tree says the rest. `current` is only ever replaced by an fsynced rename, so it points at the old or the new release:
- at the new one, and the release passes the same check an upload does: finish forward with the deploy's own
  `restart`, `flush`, `health` and `maintenance_off` steps;
- otherwise (or if one of those fails): the deploy's own undo: back to the previous release, restarted and flushed,
  out of maintenance, and the release marked bad, so an upload that kills maintd cannot make it crash in a loop;
- a deploy that had failed and was going back (its journal names the `rollback` or `abort` it was in) is never
  finished forward: its way back is taken again whole, wherever `current` points, so the previous release is
  restarted even when the crash cut off that restart; its journaled verdict stands.
In a cluster the switch's decision in etcd decides instead: forward after `commit`; after anything else the switch is
aborted (if nobody has yet: this member failed it by crashing) and undone. A deploy that a stop interrupted while it
waited (`Interrupted`) is recovered the same way.
After-swap hooks are not run again: a hook that killed maintd would kill it on every start.
The outcome is one `recovery` log entry and one history entry, beside the steps' own entries.
Then maintenance flags in releases nobody serves are lowered (leftovers.py): a kill -9 between the swap and the
lowering of the operator's flag in the release left leaves one there, which a later rollback would serve.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import leftovers, log
from .cluster import Coordinator
from .context import Context
from .pipeline import Deploy, record_outcome
from .results import DeployKind, Interrupted, Outcome, StepResult
from .state import InFlight
from .steps import FINISH, Ending, Fault, Step
from .switch import ClusterDeploy


def recover(ctx: Context, coordinator: Coordinator | None = None,
            on_start: Callable[[Deploy], object] | None = None) -> Outcome | None:
    """Finish or undo the deploy the journal names; None when none was in flight, or when the daemon stopped
    before etcd told the decision. In a cluster, the switch's recorded decision says which (waiting for etcd as
    long as it takes), never this member's own reading. Then, once no deploy is in flight (none was, or it is over
    now), no maintenance flag stays where nobody serves it: in any release but the live one."""
    inflight = ctx.store.in_flight()
    outcome = _resume(ctx, inflight, coordinator, on_start) if inflight else None
    if inflight is None or outcome is not None:  # not one the daemon's stop left for the next start
        lowered, problems = leftovers.lower_unserved_flags(ctx, ctx.tree.entries())
        logger = log.get(app=ctx.config.app)
        if lowered:
            logger.warning(f"lowered the maintenance flag left in release(s) nobody serves: {', '.join(lowered)}")
        for problem in problems:
            logger.error(problem)
    return outcome


def _resume(ctx: Context, inflight: InFlight, coordinator: Coordinator | None,
            on_start: Callable[[Deploy], object] | None) -> Outcome | None:
    """The deploy `inflight` names, finished or undone (see `recover`); None when the daemon stopped first."""
    t0 = time.perf_counter()
    deploy: Deploy
    if coordinator:  # cut off before it joined a switch, it still aborts the switch of its release (if any)
        deploy = ClusterDeploy(ctx, inflight.release, inflight.actor, DeployKind.RECOVERY, None, coordinator, inflight)
    else:
        deploy = Deploy(ctx, inflight.release, inflight.actor, DeployKind.RECOVERY, journal=inflight)
    if on_start:
        on_start(deploy)
    notes = [f"{inflight.kind} of {inflight.release} was cut off before {inflight.step}"]
    try:
        forward, problem = deploy.way_forward()
    except Interrupted as stop:  # the daemon stops before etcd told the decision: the journal stays for next time
        deploy.log.warning(str(stop), step=Ending.RECOVERY)
        return None
    if forward:
        records, error = deploy.run_steps((*(() if deploy.phase.swapped else (Step.SWAP,)), *FINISH))
        notes += [r.message for r in records]
        if not error:
            notes.append(f"finished forward: {inflight.release} is live")
    else:
        error = f"deploy cut off before {inflight.step}" + (f"; {problem}" if problem else "")
        if problem:  # why it goes back: in a cluster, the switch's decision
            notes.append(problem)
        if not deploy.phase.swapped:
            notes.append(f"{ctx.tree.live() or 'no release'} stayed live")
        # Held against the release, whatever killed maintd: one that does (a hook eating memory until the OOM killer
        # comes) would otherwise be deployed again at every start, and crash it again. Unless it had failed and was
        # going back already: then whose fault that was is journaled, and stands.
        records = [deploy.undo(error, deploy.phase.fault or Fault.RELEASE)]
        notes.append(records[0].message)
    result = StepResult.ROLLED_BACK if error else StepResult.OK
    if result is StepResult.OK:
        record = ctx.store.record(inflight.release)
        record.went_live = record.went_live or time.time()
        if isinstance(deploy, ClusterDeploy):
            deploy.leave()  # through the switch, forward, as its cleanup step would have said
    outcome = deploy.outcome(error, records, t0)
    outcome.result, outcome.error = result, "; ".join(notes)
    record_outcome(ctx, outcome, deploy.log, interrupted_step=inflight.step)
    (deploy.log.warning if result is StepResult.OK else deploy.log.error)(
        f"recovery: {outcome.error}", step=Ending.RECOVERY, result=result, duration_ms=outcome.duration_ms,
        interrupted_step=inflight.step)
    return outcome
