"""Putting the site right at start-up after a deploy was cut off (kill -9, power loss, OOM).

The deploy journal says which deploy was in flight, from which previous release, and the step about to run; the
tree says the rest. `current` is only ever replaced by an fsynced rename, so it points at the old or the new release:
- at the new one, and the release is sound: finish forward (restart, flush, health check);
- otherwise (or if the health check fails): back to the previous release, restarted, and the release marked bad,
  so an upload that kills maintd cannot make it crash in a loop.
Either way the maintenance flags maintd raised come down, unless an operator has maintenance on, and the outcome is
one `recovery` log entry and one history entry.
"""

from __future__ import annotations

import time
from typing import Any

from . import log
from .maintenance import Notice
from .pipeline import Context, Skipped, flush_cache, now_iso, record_outcome, restart_app
from .restart import RestartError, wait_healthy
from .state import InFlight
from .tree import ReleaseError


def recover(ctx: Context) -> dict[str, Any] | None:
    """Finish or undo the deploy the journal names; None when none was in flight."""
    inflight = ctx.store.in_flight()
    if inflight is None:
        return None
    t0 = time.perf_counter()
    logger = log.get(app=ctx.config.app, deploy_id=inflight.deploy_id, release=inflight.release,
                     actor=inflight.actor)
    notes: list[str] = [f"{inflight.kind} of {inflight.release} was cut off before {inflight.step}"]
    live = ctx.tree.live()
    forward = live == inflight.release and _sound(ctx, inflight.release)
    if forward:
        problem = _finish(ctx, inflight.release, logger, notes)
        if problem:
            forward = False
            notes.append(problem)
    if not forward:
        _back(ctx, inflight, live, notes)
    _lower_flags(ctx, inflight, notes)
    result = "ok" if forward else "rolled_back"
    duration = round((time.perf_counter() - t0) * 1000, 3)
    message = "; ".join(notes)
    _remember(ctx, inflight, result, duration, message, logger)
    (logger.warning if forward else logger.error)(f"recovery: {message}", step="recovery", result=result,
                                                  duration_ms=duration, interrupted_step=inflight.step)
    return {"release": inflight.release, "result": result, "message": message}


def _sound(ctx: Context, name: str) -> bool:
    try:
        ctx.tree.release_dir(name)
        return not ctx.tree.missing(name, ctx.config.upload.required)
    except ReleaseError:
        return False


def _finish(ctx: Context, release: str, logger: Any, notes: list[str]) -> str | None:
    """The steps after the swap that make the new release serve; a problem sends recovery back instead."""
    try:
        notes.append(restart_app(ctx, release))
        try:
            notes.append(flush_cache(ctx, logger))
        except Skipped:
            pass
        r = ctx.config.restart
        if r.health_url:
            notes.append(wait_healthy(r.health_url, r.health_expect.replace("{release}", release),
                                      r.health_timeout))
    except (RestartError, OSError, ReleaseError) as exc:
        return f"cannot finish forward: {exc}"
    notes.append(f"finished forward: {release} is live")
    return None


def _back(ctx: Context, inflight: InFlight, live: str | None, notes: list[str]) -> None:
    previous = inflight.previous
    ctx.store.record(inflight.release).bad = f"deploy cut off before {inflight.step}"
    if live == previous:
        notes.append(f"{previous or 'no release'} stayed live")
        return
    if previous is None or not _sound(ctx, previous):
        notes.append(f"no sound previous release to return to; current -> {live}: `maintctl deploy NAME` repairs it")
        return
    try:
        ctx.tree.swap(previous)
        notes.append(f"current -> releases/{previous}")
        notes.append(restart_app(ctx, previous))
    except (OSError, ReleaseError, RestartError) as exc:
        notes.append(f"could not return to {previous}: {exc}")


def _lower_flags(ctx: Context, inflight: InFlight, notes: list[str]) -> None:
    """Flags this deploy raised come down; an operator's maintenance stays, on whatever release is live now."""
    operator = ctx.store.memory.maintenance
    live = ctx.tree.live()
    for name in {n for n in (inflight.release, inflight.previous) if n}:
        try:
            path = ctx.tree.release_dir(name)
        except ReleaseError:
            continue
        if operator and name == live:
            continue
        if ctx.flags.is_up(path):
            ctx.flags.lower_in(path)
            notes.append(f"maintenance off on {name}")
    if operator and live:
        ctx.flags.raise_in(ctx.tree.path(live), Notice(operator.reason, operator.since, operator.by, operator.until))
        notes.append("operator maintenance stays on")


def _remember(ctx: Context, inflight: InFlight, result: str, duration: float, message: str, logger: Any) -> None:
    if result == "ok":
        record = ctx.store.record(inflight.release)
        record.went_live = record.went_live or time.time()
    entry = {"deploy_id": inflight.deploy_id, "kind": "recovery", "release": inflight.release,
             "previous": inflight.previous, "actor": inflight.actor, "result": result, "started": inflight.started,
             "duration_ms": duration, "error": message, "interrupted_step": inflight.step,
             "steps": [{"step": "recovery", "result": result, "duration_ms": duration, "message": message}]}
    record_outcome(ctx, entry, f"Recovery of release {inflight.release} after a crash: {result} at {now_iso()}", logger)
