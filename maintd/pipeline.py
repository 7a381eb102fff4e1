"""A deploy (or a rollback) as the explicit list of named steps of contract §2.

`Deploy.run` walks `STEPS` in order. Each step either does its work and says what it did, raises `Skipped` when it
does not apply, or raises anything else to fail. Every step is one log event with its duration. A failure before
the swap lifts the maintenance this deploy raised; a failure at or after it points `current` back at the previous
release first (`rolled_back`). A failure that is the release's own fault (`steps.Fault`) marks it bad, so it is
never deployed automatically again; a server's fault is only noted.
Recovery after a crash (`recovery.py`) rebuilds the `Deploy` from its journal and runs the same steps and the same
undo, so there is one way to restart, flush, check health and go back.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import leftovers, log, manifest
from .config import MaintenanceWhen
from .confined import PathRefused
from .context import Context, describe
from .events import Event, Happening
from .maintenance import Notice
from .results import DeployKind, Interrupted, Outcome, Skipped, StepFailed, StepRecord, StepResult
from .state import InFlight, MaintenanceOwner
from .steps import LONE, Ending, Fault, Step
from .tree import ReleaseError, Tree

MIGRATIONS = "db/migrate"  # what maintenance.when = "migrations" compares
REVISION_LIMIT = 4096  # bytes of REVISION read at most: a commit id and a newline, as Capistrano writes it


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_deploy_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


OnStep = Callable[[StepRecord], object]  # what it returns is ignored


@dataclass
class Phase:
    """Where a deploy is: what its undo, its outcome, recovery and `status` must know of what it has done. The deploy
    alone changes it (its steps, its undo, resuming from a journal); its journal (`InFlight`) records it."""

    step: Step | None = None
    waiting: str = ""  # what the step in progress waits for (a cluster member waits on the others)
    maintenance: MaintenanceOwner = MaintenanceOwner.NONE  # whose flags this deploy wrote into releases, if any
    swapped: bool = False
    switch: str = ""  # the cluster switch this deploy is part of, whose decision recovery obeys
    committed: bool = False  # a cluster switch's point of no return: a failure after it is noted, not undone
    # False when a cluster member did not begin (another switch held the cluster, the one it was to join was decided
    # without it, the cluster had abandoned the release): no verdict of its own, no abort
    begun: bool = True
    fault: Fault | None = None  # whose fault the failure that ended the deploy was
    failed: str = ""  # why it failed, once it goes back (journaled: recovery goes back again, never forward)
    notes: list[str] = field(default_factory=list)  # failures after the point of no return
    strategy: str = ""  # in a cluster: how the switch goes, once go chose it (`config.Strategy`)
    # The maintenance window this deploy held (`Outcome.window_ms`): when it began raising its own flags
    # (time.perf_counter), and the milliseconds from then until they were all lowered again
    raised_at: float | None = None
    window_ms: float | None = None

    def lowered(self) -> None:
        """This deploy's flags are all down: its window, if it raised them in this process, is over (one a crash
        cut off is not measured: when it began died with the process)."""
        self.maintenance = MaintenanceOwner.NONE
        if self.raised_at is not None:
            self.window_ms = _ms(self.raised_at)

    @classmethod
    def resumed(cls, journal: InFlight, at_release: bool) -> Phase:
        """Where the deploy a crash cut off was, by its journal and by whether `current` points at its release. A
        deploy cut off on its way back had swapped, wherever `current` points now: the way back is taken again
        whole, the previous release restarted included."""
        # The crash may have come in the middle of maintenance_on, before the journal said so: flags of ours
        # may be up whatever it says, and lowering a flag that is not there costs nothing.
        owner = MaintenanceOwner(journal.maintenance)
        return cls(maintenance=MaintenanceOwner.OURS if owner is MaintenanceOwner.NONE else owner,
                   swapped=at_release or journal.step == Ending.ROLLBACK, switch=journal.switch,
                   begun=journal.fault != Fault.NOBODY, fault=Fault(journal.fault) if journal.fault else None,
                   failed=journal.failed)


class Deploy:
    """One deploy or rollback of `release`, asked for by `actor` ("upload" or a user name); or, given the journal
    a crash left (`journal`), that deploy resumed, to be finished or undone (recovery.py)."""

    STEPS: tuple[Step, ...] = LONE

    def __init__(self, ctx: Context, release: str, actor: str, kind: DeployKind = DeployKind.DEPLOY,
                 on_step: OnStep | None = None, journal: InFlight | None = None) -> None:
        self.ctx, self.cfg, self.release, self.actor = ctx, ctx.config, release, actor
        self.kind, self.path, self.on_step = DeployKind(kind), ctx.tree.path(release), on_step or (lambda record: None)
        self.phase = Phase.resumed(journal, ctx.tree.live() == release) if journal else Phase()
        self.id, self.previous, self.started = ((journal.deploy_id, journal.previous, journal.started) if journal
                                                else (new_deploy_id(), ctx.tree.live(), now_iso()))
        self.log = log.get(app=self.cfg.app, deploy_id=self.id, release=release, actor=actor,
                           **({"switch_id": self.phase.switch} if self.phase.switch else {}))
        # A debugging aid for rehearsing recovery: SIGKILL ourselves just before this step, before the way back
        # ("rollback", "abort": once it is journaled) or at "end".
        self.crash_at = os.environ.get("MAINTD_CRASH_AT", "")

    # --- the run --------------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        t0 = time.perf_counter()
        self.log.info(f"{self.kind} of release {self.release} started (live: {self.previous or 'none'})",
                      previous=self.previous)
        self.ctx.events.publish(Event(Happening.DEPLOY_STARTED, self.release, self.id, self.actor, self.phase.switch))
        try:
            records, error = self.run_steps(self.STEPS)
        except Interrupted as stop:
            return self.interrupted(stop, t0)
        if self.crash_at == "end":
            _crash()
        outcome = self.outcome(error, records, t0)
        record_outcome(self.ctx, outcome, self.log)
        summary = f"{self.kind} of release {self.release} {'went live' if outcome.went_live else outcome.result}"
        (self.log.info if outcome.went_live else self.log.error)(
            summary + (f": {error}" if error else ""), result=outcome.result, duration_ms=outcome.duration_ms)
        return outcome

    def run_steps(self, steps: Iterable[Step]) -> tuple[list[StepRecord], str]:
        """Run `steps` in order; the first that fails is undone (`undo`), unless there is no way back any more (a
        cluster switch committed): then the rest still run and the failure is only noted. Returns the records and
        the error that ended the deploy."""
        records: list[StepRecord] = []
        phase = self.phase
        for step in steps:
            record, output, fault = self._run_step(step)
            self._report(record, output)
            records.append(record)
            if record.result is StepResult.FAILED and phase.committed:
                phase.notes.append(f"{step}: {record.message}")
            elif record.result is StepResult.FAILED:
                error = f"{step}: {record.message}"
                records.append(self.undo(error, fault))
                phase.step = None
                return records, error
        phase.step = None
        return records, ""

    def interrupted(self, stop: Interrupted, t0: float) -> Outcome:
        """The daemon stopped mid-wait: no undo, no outcome recorded; recovery obeys the switch's decision."""
        self.log.warning(str(stop), step=self.phase.step)
        return dataclasses.replace(self.outcome(str(stop), [], t0), result=StepResult.FAILED)

    def outcome(self, error: str, records: list[StepRecord], t0: float) -> Outcome:
        phase = self.phase
        result = StepResult.OK if not error else StepResult.ROLLED_BACK if phase.swapped else StepResult.FAILED
        return Outcome(self.id, self.kind, self.release, self.previous, self.actor, result, self.started, _ms(t0),
                       error or "; ".join(phase.notes), records, phase.fault if error else None, phase.switch or None,
                       phase.strategy or None, phase.window_ms)

    def way_forward(self) -> tuple[bool, str]:
        """After a crash: whether to finish forward, and if not, why. A lone server finishes when `current`
        already points at the release and the release passes the same check an upload does, unless the deploy
        had failed already and was going back."""
        if self.phase.failed:
            return False, f"it had failed ({self.phase.failed}) and was going back"
        problem = self.ctx.release_problem(self.release) if self.phase.swapped else None
        return self.phase.swapped and problem is None, problem or ""

    def _run_step(self, step: Step) -> tuple[StepRecord, str, Fault | None]:
        """One step, whatever it raises: an error nobody foresaw (a bug, a library's surprise) fails the step like
        any other, with its traceback in the step's log entry, so that the undo runs and nothing is left half done.
        Returns the record, what a command printed, and whose fault a failure is."""
        self.phase.step = step
        t0 = time.perf_counter()
        output, fault = "", None
        try:
            self.ctx.store.journal(self._in_flight(step), durable=step.durable)
            if step == self.crash_at:
                _crash()
            message, result = getattr(self, step.value)(), StepResult.OK
        except Skipped as skip:
            message, result = str(skip), StepResult.SKIPPED
        except Interrupted:  # the daemon stops while a cluster member waits: not a failure (see `run`)
            raise
        except Exception as exc:
            (message, output, fault), result = failure(exc, step), StepResult.FAILED
        return StepRecord(step, result, _ms(t0), message), output, fault

    def _report(self, record: StepRecord, output: str) -> None:
        emit = self.log.error if record.result is StepResult.FAILED else self.log.info
        emit(f"{record.step}: {record.message}", step=record.step, result=record.result,
             duration_ms=record.duration_ms, **({"output": output} if output else {}))
        self.on_step(record)

    # --- the steps ------------------------------------------------------------------------------------------------

    def validate(self) -> str:
        return self.ctx.validate(self.release)

    def link_shared(self) -> str:
        return self.ctx.link_shared(self.release)

    def maintenance_on(self) -> str:
        with self.ctx.store.lock:  # an operator's `maintenance on` is seen whole or not at all (see Context)
            if self.ctx.store.memory.maintenance:
                self.phase.maintenance = MaintenanceOwner.CARRIED
                return "operator maintenance is on; its flag goes where `current` goes"
        if why_not := needless(self.cfg.maintenance.when, self.ctx.tree, self.release, self.previous):
            raise Skipped(why_not)
        previous = self.ctx.tree.path(self.previous) if self.previous else None
        notice = Notice(f"deploying release {self.release}", now_iso(), self.actor)
        self.phase.maintenance, self.phase.raised_at = MaintenanceOwner.OURS, time.perf_counter()
        self.ctx.flags.raise_in(self.path, notice)
        if previous and previous.is_dir():
            self.ctx.flags.raise_in(previous, notice)
        return "maintenance on"

    def hooks_before(self) -> str:
        return self._hooks(self.cfg.hooks.before_swap)

    def swap(self) -> str:
        try:
            notes = self.ctx.move_current(self.release, self.log.bind(step=Step.SWAP))
        finally:  # one that happened is one, whatever failed after its rename (the fsync): its undo goes back
            self.phase.swapped = self.ctx.tree.live() == self.release
        record = self.ctx.store.record(self.release)
        record.went_live, record.failed = time.time(), ""
        return "; ".join([f"current -> releases/{self.release}", *notes])

    def restart(self) -> str:
        return self.ctx.restart_app(self.release, before=self.previous)

    def flush(self) -> str:
        return self.ctx.flush_cache(self.log)

    def health(self) -> str:
        return self.ctx.check_health(self.release)

    def hooks_after(self) -> str:
        return self._hooks(self.cfg.hooks.after_swap)

    def maintenance_off(self) -> str:
        with self.ctx.store.lock:  # checked and lowered in one go: an operator's `maintenance on` waits for it
            if self.ctx.store.memory.maintenance:
                raise Skipped("operator maintenance stays on until `maintctl maintenance off`")
            if self.phase.maintenance is MaintenanceOwner.NONE:
                raise Skipped("this deploy did not turn maintenance on")
            self._lower_flags()
        return "maintenance off"

    def cleanup(self) -> str:
        return self.ctx.remove_retired({self.ctx.tree.live(), self.previous})

    # --- going back -----------------------------------------------------------------------------------------------

    def undo(self, error: str, fault: Fault | None) -> StepRecord:
        """After a failed step: the verdict on the release (`ReleaseRecord.judge`), back to the previous release if
        the swap happened, out of our maintenance, no flag left where nobody serves it. The way back is journaled
        before it is taken, durably: a crash on it (in the previous release's restart) is recovered by taking it
        again, never finished forward."""
        t0 = time.perf_counter()
        phase, notes = self.phase, []
        phase.fault, phase.failed = fault if phase.begun else Fault.NOBODY, error
        ending = Ending.ROLLBACK if phase.swapped else Ending.ABORT
        try:  # one that cannot be journaled (a full disk) is taken all the same
            self.ctx.store.journal(self._in_flight(ending), durable=True)
        except OSError as exc:
            notes.append(f"the way back could not be journaled ({describe(exc)})")
        if ending == self.crash_at:
            _crash()
        self.ctx.store.record(self.release).judge(phase.fault, error)
        if phase.swapped and self.previous:
            notes += self.ctx.return_to(self.previous, self.log)
        notes += leftovers.lower_unserved_flags(self.ctx, (self.release, self.previous))[1]
        with self.ctx.store.lock:  # as in maintenance_off
            if self.ctx.store.memory.maintenance:
                notes.append("operator maintenance stays on")
            elif (phase.maintenance is MaintenanceOwner.OURS and self.cfg.maintenance.keep_on_failure
                  and self.kind is not DeployKind.RECOVERY):
                notes.append("maintenance kept on (maintenance.keep_on_failure)")
            elif phase.maintenance is not MaintenanceOwner.NONE:
                try:
                    self._lower_flags()
                    notes.append("maintenance off")
                except Exception as exc:
                    notes.append(f"maintenance could not be lifted: {describe(exc)}")
                    self.log.exception("maintenance could not be lifted")
        closed = StepRecord(ending, StepResult.ROLLED_BACK if phase.swapped else StepResult.FAILED, _ms(t0),
                            "; ".join(notes) or "nothing to undo")
        self._report(closed, "")
        return closed

    # --- helpers --------------------------------------------------------------------------------------------------

    def _in_flight(self, step: Step | Ending) -> InFlight:
        return InFlight(self.id, self.kind, self.release, self.previous, self.actor, self.started, step,
                        self.phase.maintenance, self.phase.switch, self.phase.failed, self.phase.fault or "")

    def _hooks(self, commands: tuple[tuple[str, ...], ...]) -> str:
        env = {"MAINTD_RELEASE": self.release, "MAINTD_PREVIOUS": self.previous or "", "MAINTD_DEPLOY_ID": self.id}
        return self.ctx.run_hooks(commands, self.path, env, self.log.bind(step=self.phase.step))

    def _lower_flags(self) -> None:
        self.ctx.flags.lower_in(self.path)
        if self.previous:
            self.ctx.flags.lower_in(self.ctx.tree.path(self.previous))
        self.phase.lowered()


def record_outcome(ctx: Context, outcome: Outcome, logger: Any, **extra: Any) -> None:
    """A finished deploy, rollback or recovery into state, history (its entry: the outcome and `extra`) and
    revisions.log, its journal closed, and said to whoever listens (events.py). What cannot be written is logged:
    the site is consistent by now, so the deploy stands."""
    entry = {**outcome.as_json(), **extra}
    last = {key: entry[key] for key in ("release", "result", "duration_ms", "deploy_id", "kind", "error")}
    problems = [ctx.store.finish({**last, "finished": now_iso()}, entry, outcome.went_live),
                ctx.tree.append_revision(revision_line(outcome, ctx.tree)), ctx.store.journal_done()]
    for problem in filter(None, problems):
        logger.error(problem)
    ctx.events.publish(Event.finished(outcome))


def revision_line(outcome: Outcome, tree: Tree) -> str:
    """One human line of revisions.log, as Capistrano writes it."""
    when, who = now_iso(), outcome.actor
    if outcome.kind is DeployKind.RECOVERY:
        return f"Recovery of release {outcome.release} after a crash: {outcome.result} at {when}"
    if outcome.went_live and outcome.kind is DeployKind.ROLLBACK:
        return f"{who} rolled back to release {outcome.release} at {when}"
    at = f" (at {revision})" if (revision := revision_of(tree, outcome.release)) else ""
    if outcome.went_live:
        return f"Release {outcome.release}{at} deployed by {who} at {when}"
    return f"Release {outcome.release}{at} failed to deploy ({outcome.result}) by {who} at {when}: {outcome.error}"


def revision_of(tree: Tree, release: str) -> str:
    """The first line of the release's REVISION (Capistrano's commit id), at most 64 characters; "" when there is none
    to be had: no such file, or one that is not a small regular file (a link, say to a file only root may read, whose
    first line revisions.log would show everyone; a FIFO, whose read would hang the deploy thread for good)."""
    try:
        with tree.open(release) as top:
            text = top.read("REVISION", REVISION_LIMIT).decode("utf-8")
    except (OSError, UnicodeDecodeError, ReleaseError):
        return ""
    return next(iter(text.splitlines()), "").strip()[:64]


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def failure(exc: Exception, step: Step) -> tuple[str, str, Fault]:
    """What a step that raised `exc` failed with: the message, what a command printed (or, for an error nobody
    foresaw, a bug, its traceback), and whose fault it is."""
    if isinstance(exc, StepFailed):
        return str(exc), exc.output, exc.fault or step.blames
    if isinstance(exc, (ReleaseError, PathRefused)):  # the release itself: a path that leads out of the tree
        return str(exc), "", Fault.RELEASE
    if isinstance(exc, OSError):  # the server: a full disk, permissions, too many open files
        return describe(exc), "", Fault.SERVER
    return f"unexpected error: {exc!r}", traceback.format_exc(), Fault.SERVER


def needless(when: MaintenanceWhen, tree: Tree, release: str, previous: str | None) -> str:
    """Why this deploy needs no maintenance of its own (`maintenance.when`), or "" when it does."""
    if when is MaintenanceWhen.NEVER:
        return 'maintenance.when = "never"'
    if when is MaintenanceWhen.MIGRATIONS and not migrations_differ(tree, release, previous):
        return "db/migrate is the same as the live release's"
    return ""


def migrations_differ(tree: Tree, release: str, previous: str | None) -> bool:
    """Whether `db/migrate` of the new release differs from the live one's (or there is no live one)."""
    if previous is None:
        return True
    new, old = _migrations(tree, release), _migrations(tree, previous)
    return new is None or old is None or new != old


def _migrations(tree: Tree, release: str) -> str | None:
    """The digest of a release's `db/migrate` (manifest.digest: its files as root may read them, a link by its
    target), "" without one; None when that cannot be known (a link on the way, the release gone), which differs
    from anything: maintenance when in doubt."""
    try:
        with tree.open(release) as top, top.dir(MIGRATIONS, follow=False) as migrations:
            return manifest.digest(migrations, migrations.files())
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except (PathRefused, ReleaseError):
        return None


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
