"""One deploy at a time: starting them (for an upload, or for an operator), following them, handing out outcomes.

A deploy runs in a worker thread (its steps block on the disk, on hooks, on the network); its steps come back to
the loop one by one, for followers (`maintctl deploy --follow`, from the first step even when they join late) and for
the status line. The automatic policy lives here too: the newest complete upload, once, unless paused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from . import log
from .cluster import Coordinator
from .context import Context
from .inventory import Inventory, ReleaseState
from .pipeline import Deploy, OnStep
from .recovery import recover
from .results import UPLOAD_ACTOR, DeployKind, Outcome, Refused, StepRecord
from .switch import ClusterDeploy
from .tasks import Tasks


class DeployRunner:
    def __init__(self, ctx: Context, inventory: Inventory, tasks: Tasks, on_change: Callable[[], None],
                 coordinator: Coordinator | None = None) -> None:
        self.ctx = ctx
        self.coordinator = coordinator  # in a cluster, every deploy is this member's side of a switch
        self.inventory = inventory
        self.tasks = tasks
        self.on_change = on_change  # the status line may have changed
        self.log = log.get(app=ctx.config.app)
        self.lock = asyncio.Lock()  # taken only through `exclusive`
        self.current: Deploy | None = None
        self.accepting = True  # false once the daemon is stopping: no new automatic deploys
        self._steps_done: list[StepRecord] = []  # of the deploy in progress, for followers who join late
        self._followers: set[OnStep] = set()
        self._outcome: asyncio.Future[Outcome] | None = None
        # The outcome of the deploy that ran last, if maintd started it by itself (an upload's, a cluster switch's)
        self.last_automatic: Outcome | None = None
        # Automatic deploys that could not begin while another switch held the cluster: release -> that switch's id.
        # The joiner tries each again once that switch has ended, not before (joiner.py)
        self.held_back: dict[str, str] = {}

    @property
    def busy(self) -> bool:
        """Whether anything holds the deploy lock (a deploy, a recovery, a single step): the one answer to "may a
        deploy begin now?". Whoever holds it looks for uploads when it lets go."""
        return self.lock.locked()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """The one way to hold the deploy lock: a deploy, a recovery, `maintctl restart`/`flush`/`maintenance off`.
        An upload that completed meanwhile found the lock held and was left for now (`kick`); it is taken here,
        when the lock is let go, whoever held it."""
        try:
            async with self.lock:
                yield
        finally:
            self.kick()

    def kick(self) -> None:
        """Start an automatic deploy of the newest complete upload, if there is one and if allowed now. While the
        lock is held nothing starts: its holder kicks again when it lets go (`exclusive`)."""
        if self.ctx.store.memory.paused or self.busy or not self.accepting:
            return
        newest, passed_over = self.inventory.take_automatic()
        for name in passed_over:
            self.log.info(f"release {name} left alone: newer release {newest} is complete too", release=name)
        if newest:
            self.tasks.spawn(self._automatic(newest))

    async def _automatic(self, name: str) -> None:
        """An upload's deploy; anything but a refusal is logged with its traceback by `Tasks`."""
        try:
            await self.deploy(name, UPLOAD_ACTOR, automatic=True)
        except Refused as exc:  # changed between completing and its turn (written to again, say)
            self.log.info(f"automatic deploy of release {name} not started: {exc}", release=name)

    async def deploy(self, name: str, actor: str, kind: DeployKind = DeployKind.DEPLOY, wait: bool = True,
                     on_step: OnStep | None = None, automatic: bool = False,
                     joining: str = "") -> Outcome:
        """Run one deploy; refuses at once when another runs and `wait` is false. An `automatic` one (maintd's own:
        an upload's, or this member's side of the cluster switch `joining`) counts as `last_automatic`. An upload's
        is refused once its release is live or bad: two of them may race for one release. One joining a switch goes
        into that switch or nowhere (`ClusterDeploy`), so it needs no such guard, and may take the live release
        again: the switch is an operator's redeploy (contract §1)."""
        self.inventory.check_deployable(name, kind)
        if self.busy:
            running = self.current
            what = f"a {running.kind} of release {running.release}" if running else "another command"
            if not wait:
                raise Refused(f"{what} is running (use --wait)")
            self.log.info(f"{kind} of release {name} waits for {what} to end", release=name, actor=actor)
        async with self.exclusive():
            self.inventory.check_deployable(name, kind)  # again: it may have changed while we waited
            state, reason = self.inventory.state_now(name)
            if automatic and not joining and state in (ReleaseState.LIVE, ReleaseState.BAD):  # became so meanwhile
                raise Refused(f"release {name} is {state}" + (f": {reason}" if state is ReleaseState.BAD else ""))
            loop = asyncio.get_running_loop()
            deploy = self._new(name, actor, kind, lambda record: loop.call_soon_threadsafe(self._stepped, record),
                               joining)
            self.current, self._steps_done = deploy, []
            self._followers = {on_step} if on_step else set()
            outcome_future = self._outcome = loop.create_future()
            try:
                outcome = await asyncio.to_thread(deploy.run)
            except Exception as exc:
                outcome_future.set_exception(exc)  # followers get the error, not a wait without end
                raise
            finally:
                self.current = None
                self.on_change()
            outcome_future.set_result(outcome)
            self.last_automatic = outcome if automatic else None
            if deploy.phase.begun:
                self.inventory.complete.pop(name, None)
            elif automatic and isinstance(deploy, ClusterDeploy) and deploy.entered.held_by:
                # It could not begin while another switch held the cluster: tried again once that one has ended
                self.held_back[name] = deploy.entered.held_by
        return outcome

    def _new(self, name: str, actor: str, kind: DeployKind, on_step: OnStep, joining: str) -> Deploy:
        if self.coordinator:
            return ClusterDeploy(self.ctx, name, actor, kind, on_step, self.coordinator, joining=joining)
        return Deploy(self.ctx, name, actor, kind, on_step)

    async def recover(self) -> None:
        """Recovery of a cluster switch a crash cut off: it may wait for etcd as long as it takes, so it runs
        like a deploy (one at a time, shown in `status`) instead of holding up the start."""
        async with self.exclusive():
            try:
                await asyncio.to_thread(recover, self.ctx, self.coordinator,
                                        lambda deploy: setattr(self, "current", deploy))
            finally:
                self.current = None
                self.on_change()

    def _stepped(self, record: StepRecord) -> None:
        self._steps_done.append(record)
        self.on_change()
        for follower in list(self._followers):
            follower(record)

    async def join(self, name: str, kind: DeployKind, on_step: OnStep) -> Outcome | None:
        """A deploy (or rollback) of `name` that is running, followed to its end; or the one maintd started by
        itself for `name` (an upload's, or this member's side of a cluster switch), if that is the last one that ran,
        its steps replayed. None when there is neither, and a deploy of `name` would be new.

        How `cap deploy` (the marker, then `deploy NAME --follow` on every server) sees the deploy the marker
        started, however soon maintd began and ended it, instead of a second one. A rollback without a name joins
        the same way: in a cluster, the rollback switch another member began is this member's rollback too."""
        running = self.current
        if running and name in ("", running.release) and (kind is DeployKind.DEPLOY or running.kind is kind):
            return await self.follow(on_step)  # a deploy's follower takes whatever takes the release live
        last = self.last_automatic
        if last and last.kind is kind and (name == last.release or (not name and kind is DeployKind.ROLLBACK)):
            for record in last.steps:
                on_step(record)
            return last
        return None

    async def follow(self, on_step: OnStep) -> Outcome:
        """Watch the deploy in progress (whoever started it) from its first step to its outcome."""
        if not self.current or not self._outcome:
            raise Refused("no deploy is running")
        for record in self._steps_done:
            on_step(record)
        self._followers.add(on_step)
        try:
            return await asyncio.shield(self._outcome)
        finally:
            self._followers.discard(on_step)

    def describe(self) -> dict[str, Any] | None:
        """The deploy in progress, for `status`."""
        deploy = self.current
        if not deploy:
            return None
        phase = deploy.phase
        return {"release": deploy.release, "step": phase.step, "kind": deploy.kind, "deploy_id": deploy.id,
                "actor": deploy.actor, "switch_id": phase.switch or None, "waiting": phase.waiting or None}
