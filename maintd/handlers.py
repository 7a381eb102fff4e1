"""What each command of `commands.COMMANDS` does in the daemon: one handler per command, of the same name.

A handler gets the running daemon, the request's args (already typed and checked against the table), the peer, and
`emit` for event lines; it returns the answer's `result`, or raises `Refused` with a sentence for the operator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cluster import Decision, Move, Unreadable
from .commands import COMMANDS
from .etcd import EtcdUnavailable
from .events import Event, Happening
from .maintenance import Notice
from .pipeline import now_iso
from .results import DeployKind, Outcome, Refused, Skipped, StepRecord

if TYPE_CHECKING:
    from .daemon import Daemon


@dataclass(frozen=True)
class Peer:
    """Who sent a request, as SO_PEERCRED tells it."""

    pid: int
    uid: int
    gid: int
    name: str


Emit = Callable[[dict[str, Any]], None]  # writes one line to the peer now
Handler = Callable[["Daemon", dict[str, Any], Peer, Emit], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {}


def handles(name: str) -> Callable[[Handler], Handler]:
    if name not in COMMANDS:
        raise LookupError(f"handler for {name!r}, which commands.COMMANDS does not declare")

    def register(handler: Handler) -> Handler:
        HANDLERS[name] = handler
        return handler

    return register


@handles("status")
async def status(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    return daemon.status()


@handles("releases")
async def releases(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    await daemon.inventory.measure()
    return [row.as_json() for row in daemon.inventory.rows()]


@handles("history")
async def history(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    entries = await asyncio.to_thread(daemon.store.history)  # the whole file, read off the event loop
    return entries[-args["n"]:] if args["n"] > 0 else []


@handles("deploy")
async def deploy(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    """A marked upload not judged yet is judged first. With `--follow`, the deploy in progress (of NAME, if named),
    or the one maintd ran by itself for NAME last, is joined rather than repeated."""
    name = args["release"]
    if name:
        await daemon.intake.settle(name)
    if args["follow"] and (joined := await daemon.runner.join(name, DeployKind.DEPLOY, _streamer(emit))):
        return _went_live(joined)
    return await _take_live(daemon, name or daemon.inventory.newest_complete(), DeployKind.DEPLOY, args, peer, emit)


@handles("rollback")
async def rollback(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    """With `--follow`, a rollback in progress, or the one maintd ran by itself last (a cluster's), is joined rather
    than repeated."""
    if args["follow"] and (joined := await daemon.runner.join(args["release"], DeployKind.ROLLBACK,
                                                              _streamer(emit))):
        return _went_live(joined)
    name = args["release"] or daemon.inventory.rollback_target()
    return await _take_live(daemon, name, DeployKind.ROLLBACK, args, peer, emit)


@handles("maintenance")
async def maintenance(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    """On at once, in the live release (and wherever a deploy or its way back moves `current` from then on: see
    `Context.move_current`); off waits for a deploy in progress, whose own maintenance must not be lifted under
    it."""
    ctx = daemon.ctx
    live = ctx.tree.live()
    if args["state"] == "on":
        if not live:
            raise Refused("no live release: `current` is missing")
        notice = Notice(args["reason"] or "maintenance", now_iso(), peer.name, args["until"])
        ctx.operator_maintenance_on(notice)
        daemon.log.info(f"maintenance on: {notice.reason}", actor=peer.name, until=notice.until or None)
        daemon.events.publish(Event(Happening.MAINTENANCE_ON, live, actor=peer.name, error=notice.reason))
        daemon.announce()
        return {"on": True, "reason": notice.reason, "since": notice.since, "by": notice.by,
                "until": notice.until or None}
    async with daemon.runner.exclusive():
        ctx.operator_maintenance_off()
    daemon.log.info("maintenance off", actor=peer.name)
    daemon.events.publish(Event(Happening.MAINTENANCE_OFF, ctx.tree.live() or "", actor=peer.name))
    daemon.announce()
    return {"on": False}


@handles("restart")
async def restart(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    return await _on_live(daemon, "restart", daemon.ctx.restart_app, peer)


@handles("flush")
async def flush(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    return await _on_live(daemon, "flush", lambda live: daemon.ctx.flush_cache(daemon.log), peer)


@handles("cluster")
async def cluster(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    """Every member and the switch in progress, read from etcd; `abort` records the decision abort (while there is
    none yet, or it is go), which every member obeys. A switch decided already but not finished (a member not
    through with it) is ended instead: its record removed, so that the next may begin; a member still in it
    obeys the decision, which stays, and cannot join the next switch before it is through."""
    co = daemon.coordinator
    if co is None:
        raise Refused("this maintd is not in cluster mode (its config has no [cluster] table)")
    try:
        view = await asyncio.to_thread(co.view)
        if args["action"] == "show":
            return view.as_json(co.me)
        switch = view.switch
        if switch is None and view.unreadable:
            raise Refused(f"{co.keys.switch} holds a value this maintd cannot read, so it cannot tell which switch "
                          f"to abort: {view.unreadable[:200]} (if no newer maintd is switching, `etcdctl del "
                          f"{co.keys.switch}` removes it)")
        if switch is None:
            raise Refused("no switch is in progress")
        if view.decision in (Decision.COMMIT, Decision.ABORT):
            if not await asyncio.to_thread(co.end, view.switch_value):
                raise Refused(f"switch {switch.id} ended meanwhile; see `maintctl cluster`")
            daemon.log.warning(f"switch {switch.id} of release {switch.release}, decided already ({view.decision}), "
                               f"ended by {peer.name} on {co.me}", switch_id=switch.id, actor=peer.name)
            return {"ended": {"id": switch.id, "release": switch.release, "decision": view.decision}}
        reason = f"aborted by {peer.name} on {co.me}"
        if not await asyncio.to_thread(co.decide, switch.id, Move(Decision.ABORT, reason), switch.release,
                                       time.time()):
            raise Refused(f"switch {switch.id} was decided meanwhile; see `maintctl cluster`")
    except EtcdUnavailable as exc:
        raise Refused(f"etcd cannot be reached: {exc}") from None
    except Unreadable as exc:
        raise Refused(str(exc)) from None
    daemon.log.warning(f"switch {switch.id} of release {switch.release} {reason}", switch_id=switch.id,
                       actor=peer.name)
    return {"aborted": {"id": switch.id, "release": switch.release}}


@handles("pause")
async def pause(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    return daemon.set_paused(True, peer.name)


@handles("resume")
async def resume(daemon: Daemon, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
    return daemon.set_paused(False, peer.name)


if set(HANDLERS) != set(COMMANDS):
    raise LookupError(f"commands without a handler: {', '.join(sorted(set(COMMANDS) - set(HANDLERS)))}")


# --- shared by the handlers ---------------------------------------------------------------------------------------


async def _take_live(daemon: Daemon, name: str, kind: DeployKind, args: dict[str, Any], peer: Peer,
                     emit: Emit) -> Any:
    on_step = _streamer(emit) if args["follow"] else None
    return _went_live(await daemon.runner.deploy(name, peer.name, kind, wait=args["wait"], on_step=on_step))


async def _on_live(daemon: Daemon, step: str, action: Callable[[str], str], peer: Peer) -> Any:
    """A single step on the live release, never beside a deploy."""
    live = daemon.ctx.tree.live()
    if not live:
        raise Refused("no live release")
    async with daemon.runner.exclusive():
        try:
            message = await asyncio.to_thread(action, live)
        except Skipped as skip:
            message = str(skip)
    daemon.log.info(f"{step}: {message}", step=step, release=live, actor=peer.name, result="ok")
    return {"step": step, "release": live, "message": message}


def _streamer(emit: Emit) -> Callable[[StepRecord], None]:
    """A follower that writes each step as an event line, in order, before the final answer can be."""

    def on_step(record: StepRecord) -> None:
        emit({"event": {"step": record.step, "result": record.result, "duration_ms": record.duration_ms,
                        "message": record.message}})

    return on_step


def _went_live(outcome: Outcome) -> Any:
    """A deploy's outcome as the final answer: ok only if the release went live."""
    if not outcome.went_live:
        raise Refused(f"{outcome.kind} of release {outcome.release} {outcome.result}: {outcome.error}")
    return outcome.as_json()
