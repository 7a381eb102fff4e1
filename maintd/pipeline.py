"""A deploy (or a rollback) as the explicit list of named steps of contract §2.

`Deploy.run` walks `STEPS` in order. Each step either does its work and says what it did, raises `Skipped` when it
does not apply, or raises anything else to fail. Every step is one log event with its duration. A failure before
the swap lifts the maintenance this deploy raised; a failure at or after it points `current` back at the previous
release first (`rolled_back`). Either way the release is marked bad, so it is never deployed automatically again.
Recovery after a crash (`recovery.py`) rebuilds the `Deploy` from its journal and runs the same steps and the same
undo, so there is one way to restart, flush, check health and go back.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import log
from .config import MaintenanceWhen
from .confined import PathRefused
from .context import Context
from .maintenance import Notice
from .results import DeployKind, Interrupted, Outcome, Skipped, StepFailed, StepRecord, StepResult
from .state import InFlight, MaintenanceOwner
from .steps import LONE, Ending, Fault, Step
from .tree import ReleaseError


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_deploy_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


OnStep = Callable[[StepRecord], object]  # what it returns is ignored


class Deploy:
    """One deploy or rollback of `release`, asked for by `actor` ("upload" or a user name)."""

    STEPS: tuple[Step, ...] = LONE

    def __init__(self, ctx: Context, release: str, actor: str, kind: DeployKind = DeployKind.DEPLOY,
                 on_step: OnStep | None = None) -> None:
        self.ctx = ctx
        self.cfg = ctx.config
        self.release = release
        self.actor = actor
        self.kind = DeployKind(kind)
        self.id = new_deploy_id()
        self.previous = ctx.tree.live()
        self.started = now_iso()
        self.on_step = on_step or (lambda record: None)
        self.step: Step | None = None
        self.waiting = ""  # what the step in progress waits for, for `status` (a cluster member waits on others)
        self.maintenance = MaintenanceOwner.NONE  # whose flags this deploy wrote into releases, if any
        self.swapped = False
        self.blame = True  # a failure marks the release bad (not when it merely could not start, in a cluster)
        self.fault: Fault | None = None  # whose fault the failure that ended the deploy was
        self.notes: list[str] = []  # failures after the point of no return, which did not end the deploy
        self.path = ctx.tree.path(release)
        self.log = log.get(app=self.cfg.app, deploy_id=self.id, release=release, actor=actor)
        # A debugging aid for rehearsing recovery: SIGKILL ourselves just before this step (or at "end").
        self.crash_at = os.environ.get("MAINTD_CRASH_AT", "")

    # --- the run --------------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        t0 = time.perf_counter()
        self.log.info(f"{self.kind} of release {self.release} started (live: {self.previous or 'none'})",
                      previous=self.previous)
        try:
            records, error = self.run_steps(self.STEPS)
        except Interrupted as stop:  # cluster: the daemon stops mid-wait. No undo and no outcome recorded: the
            # journal stays, and recovery at the next start obeys the switch's decision (see waiting.py)
            self.log.warning(str(stop), step=self.step)
            interrupted = self.outcome(str(stop), [], t0)
            interrupted.result = StepResult.FAILED
            return interrupted
        if self.crash_at == "end":
            _crash()
        if not error:
            self.leave()  # before the journal goes: a crash in between finds the journal, and recovery leaves again
        outcome = self.outcome(error, records, t0)
        record_outcome(self.ctx, outcome.as_json(), revision_line(outcome, self.path), self.log)
        summary = f"{self.kind} of release {self.release} {'went live' if outcome.went_live else outcome.result}"
        (self.log.info if outcome.went_live else self.log.error)(
            summary + (f": {error}" if error else ""), result=outcome.result, duration_ms=outcome.duration_ms)
        return outcome

    def run_steps(self, steps: Iterable[Step]) -> tuple[list[StepRecord], str]:
        """Run `steps` in order; the first that fails is undone (`undo`), unless there is no way back any more
        (`beyond_return`): then the rest still run and the failure is only noted. Returns the records and the
        error that ended the deploy."""
        records: list[StepRecord] = []
        for step in steps:
            record, output, fault = self._run_step(step)
            self._report(record, output)
            records.append(record)
            if record.result is StepResult.FAILED and self.beyond_return():
                self.notes.append(f"{step}: {record.message}")
            elif record.result is StepResult.FAILED:
                self.fault = fault
                error = f"{step}: {record.message}"
                records.append(self.undo(error))
                self.step = None
                return records, error
        self.step = None
        return records, ""

    def leave(self) -> None:
        """Done, forward: nothing more for a lone server (a cluster member leaves its switch)."""

    def beyond_return(self) -> bool:
        """Whether a failure can no longer be undone; a lone server can always go back."""
        return False

    def outcome(self, error: str, records: list[StepRecord], t0: float) -> Outcome:
        result = StepResult.OK if not error else StepResult.ROLLED_BACK if self.swapped else StepResult.FAILED
        return Outcome(self.id, self.kind, self.release, self.previous, self.actor, result, self.started, _ms(t0),
                       error or "; ".join(self.notes), records, self.fault if error else None)

    def _run_step(self, step: Step) -> tuple[StepRecord, str, Fault | None]:
        """One step, whatever it raises: an error nobody foresaw (a bug, a library's surprise) fails the step like
        any other, with its traceback in the step's log entry, so that the undo runs and nothing is left half done.
        Returns the record, what a command printed, and whose fault a failure is."""
        self.step = step
        t0 = time.perf_counter()
        output, fault = "", None
        try:
            self.ctx.store.journal(self._in_flight(step), durable=step.durable)
            if step == self.crash_at:
                _crash()
            message, result = getattr(self, step.value)(), StepResult.OK
        except Skipped as skip:
            message, result = str(skip), StepResult.SKIPPED
        except StepFailed as exc:
            message, result, output, fault = str(exc), StepResult.FAILED, exc.output, exc.fault or step.blames
        except (ReleaseError, PathRefused) as exc:  # the release itself: a path that leads out of the tree
            message, result, fault = str(exc), StepResult.FAILED, Fault.RELEASE
        except OSError as exc:  # the server: a full disk, permissions, a missing shared path, too many files
            message, result, fault = _describe(exc), StepResult.FAILED, Fault.SERVER
        except Interrupted:  # the daemon stops while a cluster member waits: not a failure (see `run`)
            raise
        except Exception as exc:
            message, result, fault = f"unexpected error: {exc!r}", StepResult.FAILED, Fault.SERVER
            output = traceback.format_exc()
        return StepRecord(step, result, _ms(t0), message), output, fault

    def _report(self, record: StepRecord, output: str) -> None:
        emit = self.log.error if record.result is StepResult.FAILED else self.log.info
        emit(f"{record.step}: {record.message}", step=record.step, result=record.result,
             duration_ms=record.duration_ms, **({"output": output} if output else {}))
        self.on_step(record)

    # --- the steps ------------------------------------------------------------------------------------------------

    def validate(self) -> str:
        if problem := self.ctx.release_problem(self.release):
            raise StepFailed(problem)
        verified = (self.path / self.cfg.upload.manifest).is_file()
        return "release is complete" + ("; manifest verified" if verified else "")

    def link_shared(self) -> str:
        shared = self.cfg.shared
        if not shared.files and not shared.dirs:
            raise Skipped("no shared files or dirs configured")
        if missing := [rel for rel in (*shared.dirs, *shared.files) if not os.path.lexists(self.ctx.tree.shared / rel)]:
            raise StepFailed(f"shared path(s) missing from {self.ctx.tree.shared}: {', '.join(missing)}; create them "
                             "and deploy this release again", fault=Fault.SERVER)
        linked = self.ctx.tree.link_shared(self.release, shared.files, shared.dirs)
        return f"linked {len(linked)} shared path(s)" if linked else "shared paths already linked"

    def maintenance_on(self) -> str:
        with self.ctx.store.lock:  # an operator's `maintenance on` is seen whole or not at all (see Context)
            if operator := self.ctx.store.memory.maintenance:
                self.maintenance = MaintenanceOwner.CARRIED
                self.ctx.flags.raise_in(self.path, operator)
                return "operator maintenance is on; carried into the new release"
        when = self.cfg.maintenance.when
        if when is MaintenanceWhen.NEVER:
            raise Skipped('maintenance.when = "never"')
        previous = self.ctx.tree.path(self.previous) if self.previous else None
        if when is MaintenanceWhen.MIGRATIONS and not migrations_differ(self.path, previous):
            raise Skipped("db/migrate is the same as the live release's")
        notice = Notice(f"deploying release {self.release}", now_iso(), self.actor)
        self.maintenance = MaintenanceOwner.OURS
        self.ctx.flags.raise_in(self.path, notice)
        if previous and previous.is_dir():
            self.ctx.flags.raise_in(previous, notice)
        return "maintenance on"

    def hooks_before(self) -> str:
        return self._hooks(self.cfg.hooks.before_swap)

    def swap(self) -> str:
        self.ctx.tree.swap(self.release)
        self.swapped = True
        record = self.ctx.store.record(self.release)
        record.went_live, record.failed = time.time(), ""
        return f"current -> releases/{self.release}"

    def restart(self) -> str:
        return self.ctx.restart_app(self.release)

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
            if self.maintenance is MaintenanceOwner.NONE:
                raise Skipped("this deploy did not turn maintenance on")
            self._lower_flags()
        return "maintenance off"

    def cleanup(self) -> str:
        store, tree = self.ctx.store, self.ctx.tree
        doomed = [name for name in store.retired(self.cfg.keep_releases, {tree.live(), self.previous})
                  if os.path.isdir(tree.releases / name)]
        for name in doomed:
            tree.remove(name)
            store.forget(name)
        if not doomed:
            raise Skipped(f"no more than {self.cfg.keep_releases} releases have been live")
        return f"removed {len(doomed)} old release(s): {', '.join(doomed)}"

    # --- going back -----------------------------------------------------------------------------------------------

    def undo(self, error: str) -> StepRecord:
        """After a failed step: back to the previous release if the swap happened, then out of our maintenance.
        A release whose own fault it was is marked bad, so no upload can make maintd deploy it (or crash on it) in a
        loop; a server's fault is only noted (`maintctl releases` shows it), and the same release may go again."""
        t0 = time.perf_counter()
        record = self.ctx.store.record(self.release)
        if self.blame and self.fault is Fault.RELEASE:
            record.bad = error
        elif self.blame:
            record.failed = error
        notes = []
        if self.swapped and self.previous:
            try:
                self.ctx.tree.swap(self.previous)
                notes.append(f"current -> releases/{self.previous}")
                notes.append(self.ctx.restart_app(self.previous))
                notes.append(self.ctx.flush_cache(self.log))
            except Skipped as skip:
                notes.append(str(skip))
            except Exception as exc:  # going back as far as it can, and saying what it could not
                notes.append(f"rollback incomplete: {_describe(exc)}")
                self.log.exception("rollback incomplete")
        with self.ctx.store.lock:  # as in maintenance_off
            if self.ctx.store.memory.maintenance:
                notes.append("operator maintenance stays on")
            elif (self.maintenance is MaintenanceOwner.OURS and self.cfg.maintenance.keep_on_failure
                  and self.kind is not DeployKind.RECOVERY):
                notes.append("maintenance kept on (maintenance.keep_on_failure)")
            elif self.maintenance is not MaintenanceOwner.NONE:
                try:
                    self._lower_flags()
                    notes.append("maintenance off")
                except Exception as exc:
                    notes.append(f"maintenance could not be lifted: {_describe(exc)}")
                    self.log.exception("maintenance could not be lifted")
        ending = StepRecord(Ending.ROLLBACK if self.swapped else Ending.ABORT,
                            StepResult.ROLLED_BACK if self.swapped else StepResult.FAILED, _ms(t0),
                            "; ".join(notes) or "nothing to undo")
        self._report(ending, "")
        return ending

    # --- helpers --------------------------------------------------------------------------------------------------

    def _in_flight(self, step: Step) -> InFlight:
        return InFlight(self.id, self.kind, self.release, self.previous, self.actor, self.started, step,
                        self.maintenance, self.switch_id)

    @property
    def switch_id(self) -> str:
        """The cluster switch this deploy is part of; none for a lone server."""
        return ""

    def _hooks(self, commands: tuple[tuple[str, ...], ...]) -> str:
        env = {"MAINTD_APP": self.cfg.app, "MAINTD_RELEASE": self.release, "MAINTD_PREVIOUS": self.previous or "",
               "MAINTD_ROOT": str(self.cfg.root), "MAINTD_DEPLOY_ID": self.id}
        return self.ctx.run_hooks(commands, self.path, env, self.log.bind(step=self.step))

    def _lower_flags(self) -> None:
        self.ctx.flags.lower_in(self.path)
        if self.previous:
            self.ctx.flags.lower_in(self.ctx.tree.path(self.previous))
        self.maintenance = MaintenanceOwner.NONE


def record_outcome(ctx: Context, entry: dict[str, Any], revision: str, logger: Any) -> None:
    """A finished deploy, rollback or recovery (`entry`, its history line) into state, history and revisions.log,
    and its journal closed. What cannot be written is logged: the site is consistent by now, so the deploy stands."""
    last = {key: entry[key] for key in ("release", "result", "duration_ms", "deploy_id", "kind", "error")}
    went_on = entry["result"] == StepResult.OK and entry["previous"] != entry["release"]
    problems = [ctx.store.finish({**last, "finished": now_iso()}, entry, entry["previous"] if went_on else None),
                ctx.tree.append_revision(revision), ctx.store.journal_done()]
    for problem in filter(None, problems):
        logger.error(problem)


def revision_line(outcome: Outcome, release: Path) -> str:
    """One human line of revisions.log, as Capistrano writes it."""
    when, who = now_iso(), outcome.actor
    if outcome.kind is DeployKind.RECOVERY:
        return f"Recovery of release {outcome.release} after a crash: {outcome.result} at {when}"
    if outcome.went_live and outcome.kind is DeployKind.ROLLBACK:
        return f"{who} rolled back to release {outcome.release} at {when}"
    try:
        revision = (release / "REVISION").read_text(encoding="utf-8").strip()[:64]
    except (OSError, UnicodeDecodeError):
        revision = ""
    at = f" (at {revision})" if revision else ""
    if outcome.went_live:
        return f"Release {outcome.release}{at} deployed by {who} at {when}"
    return f"Release {outcome.release}{at} failed to deploy ({outcome.result}) by {who} at {when}: {outcome.error}"


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def migrations_differ(release: Path, previous: Path | None) -> bool:
    """Whether `db/migrate` of the new release differs from the live one's (or there is no live one)."""
    return previous is None or _tree_digest(release / "db/migrate") != _tree_digest(previous / "db/migrate")


def _tree_digest(directory: Path) -> str | None:
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if isinstance(exc, (OSError, ReleaseError, StepFailed, Skipped)):
        return str(exc)
    return repr(exc)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
