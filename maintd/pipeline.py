"""A deploy (or a rollback) as the explicit list of named steps of contract §2.

`Deploy.run` walks `STEPS` in order. Each step either does its work and says what it did, raises `Skipped` when it
does not apply, or raises anything else to fail. Every step is one log event with its duration. A failure before
the swap lifts the maintenance this deploy raised; a failure at or after it points `current` back at the previous
release first (`rolled_back`). Either way the release is marked bad, so it is never deployed automatically again.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import cache, log, proc, restart
from .config import Config
from .maintenance import Flags, Notice
from .restart import RestartError
from .state import InFlight, Store
from .tree import ReleaseError, Tree


class Skipped(Exception):
    """The step does not apply to this deploy; the message says why."""


class StepFailed(Exception):
    """A step failed; `output` holds what a command printed, for the log."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class StepRecord:
    step: str
    result: str  # ok, failed, skipped, rolled_back
    duration_ms: float
    message: str


@dataclass
class Outcome:
    deploy_id: str
    kind: str
    release: str
    previous: str | None
    actor: str
    result: str  # ok, failed, rolled_back
    started: str
    duration_ms: float
    error: str = ""
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def went_live(self) -> bool:
        return self.result == "ok"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """Everything a deploy works on; built once per daemon and per config reload."""

    config: Config
    tree: Tree
    flags: Flags
    store: Store

    @classmethod
    def build(cls, config: Config, store: Store, template: str) -> Context:
        return cls(config, Tree(config.root), Flags(config.maintenance.file, template), store)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_deploy_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


OnStep = Callable[[StepRecord], object]  # what it returns is ignored


class Deploy:
    """One deploy or rollback of `release`, asked for by `actor` ("upload" or a user name)."""

    STEPS = ("validate", "link_shared", "maintenance_on", "hooks_before", "swap", "restart", "flush", "health",
             "hooks_after", "maintenance_off", "cleanup")

    def __init__(self, ctx: Context, release: str, actor: str, kind: str = "deploy",
                 on_step: OnStep | None = None) -> None:
        self.ctx = ctx
        self.cfg = ctx.config
        self.release = release
        self.actor = actor
        self.kind = kind
        self.id = new_deploy_id()
        self.previous = ctx.tree.live()
        self.on_step = on_step or (lambda record: None)
        self.step: str | None = None
        self.maintenance_ours = False  # this deploy turned maintenance on (not an operator)
        self.flags_raised = False  # this deploy wrote flags, its own or an operator's carried across the swap
        self.swapped = False
        self.log = log.get(app=self.cfg.app, deploy_id=self.id, release=release, actor=actor)
        self.path = ctx.tree.path(release)
        self.started = now_iso()
        # A debugging aid for rehearsing recovery: SIGKILL ourselves just before this step (or at "end").
        self.crash_at = os.environ.get("MAINTD_CRASH_AT", "")

    # --- the run --------------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        started, t0 = self.started, time.perf_counter()
        self.log.info(f"{self.kind} of release {self.release} started (live: {self.previous or 'none'})",
                      previous=self.previous)
        records: list[StepRecord] = []
        error = ""
        for name in self.STEPS:
            record, output = self._run_step(name)
            records.append(record)
            self._log_step(record, output)
            self.on_step(record)
            if record.result == "failed":
                error = f"{name}: {record.message}"
                records.append(self._recover(error))
                break
        self.step = None
        if self.crash_at == "end":
            _crash()
        result = "ok" if not error else ("rolled_back" if self.swapped else "failed")
        outcome = Outcome(self.id, self.kind, self.release, self.previous, self.actor, result, started,
                          _ms(t0), error, records)
        record_outcome(self.ctx, outcome.as_json(), self._revision_line(outcome), self.log)
        summary = f"{self.kind} of release {self.release} {'went live' if outcome.went_live else result}"
        (self.log.info if outcome.went_live else self.log.error)(
            summary + (f": {error}" if error else ""), result=result, duration_ms=outcome.duration_ms)
        return outcome

    def _run_step(self, name: str) -> tuple[StepRecord, str]:
        self.step = name
        t0 = time.perf_counter()
        output = ""
        try:
            self.ctx.store.journal(self._in_flight(name), durable=name == "maintenance_on")
            if name == self.crash_at:
                _crash()
            message, result = getattr(self, name)(), "ok"
        except Skipped as skip:
            message, result = str(skip), "skipped"
        except (StepFailed, RestartError) as exc:
            message, result, output = str(exc), "failed", exc.output
        except (OSError, ReleaseError) as exc:
            message, result = _describe(exc), "failed"
        return StepRecord(name, result, _ms(t0), message), output

    def _log_step(self, record: StepRecord, output: str) -> None:
        emit = self.log.error if record.result == "failed" else self.log.info
        emit(f"{record.step}: {record.message}", step=record.step, result=record.result,
             duration_ms=record.duration_ms, **({"output": output} if output else {}))

    # --- the steps ------------------------------------------------------------------------------------------------

    def validate(self) -> str:
        tree, upload = self.ctx.tree, self.cfg.upload
        tree.release_dir(self.release)
        if missing := tree.missing(self.release, upload.required):
            raise StepFailed(f"required path missing: {', '.join(missing)}")
        if (self.path / upload.manifest).is_file():
            if problem := tree.verify_manifest(self.release, upload.manifest, self._written_by_maintd()):
                raise StepFailed(f"manifest does not verify: {problem}")
            return "release is complete; manifest verified"
        return "release is complete"

    def link_shared(self) -> str:
        shared = self.cfg.shared
        if not shared.files and not shared.dirs:
            raise Skipped("no shared files or dirs configured")
        linked = self.ctx.tree.link_shared(self.release, shared.files, shared.dirs)
        return f"linked {len(linked)} shared path(s)" if linked else "shared paths already linked"

    def maintenance_on(self) -> str:
        operator = self.ctx.store.memory.maintenance
        if operator:
            notice = Notice(operator.reason, operator.since, operator.by, operator.until)
            self.ctx.flags.raise_in(self.path, notice)
            self.flags_raised = True
            return "operator maintenance is on; carried into the new release"
        when = self.cfg.maintenance.when
        if when == "never":
            raise Skipped('maintenance.when = "never"')
        if when == "migrations" and not self._migrations_differ():
            raise Skipped("db/migrate is the same as the live release's")
        notice = Notice(f"deploying release {self.release}", now_iso(), self.actor)
        self.maintenance_ours = self.flags_raised = True
        self.ctx.flags.raise_in(self.path, notice)
        if self.previous and (previous := self.ctx.tree.path(self.previous)).is_dir():
            self.ctx.flags.raise_in(previous, notice)
        return "maintenance on"

    def hooks_before(self) -> str:
        return self._hooks(self.cfg.hooks.before_swap)

    def swap(self) -> str:
        self.ctx.tree.swap(self.release)
        self.swapped = True
        self.ctx.store.record(self.release).went_live = time.time()
        return f"current -> releases/{self.release}"

    def restart(self) -> str:
        return restart_app(self.ctx, self.release)

    def flush(self) -> str:
        return flush_cache(self.ctx, self.log)

    def health(self) -> str:
        r = self.cfg.restart
        if not r.health_url:
            raise Skipped("no restart.health_url configured")
        return restart.wait_healthy(r.health_url, r.health_expect.replace("{release}", self.release),
                                    r.health_timeout)

    def hooks_after(self) -> str:
        return self._hooks(self.cfg.hooks.after_swap)

    def maintenance_off(self) -> str:
        if self.ctx.store.memory.maintenance:
            raise Skipped("operator maintenance stays on until `maintctl maintenance off`")
        if not self.flags_raised:
            raise Skipped("this deploy did not turn maintenance on")
        self._lower_ours()
        return "maintenance off"

    def cleanup(self) -> str:
        doomed = self._old_releases()
        for name in doomed:
            self.ctx.tree.remove(name)
            self.ctx.store.memory.releases.pop(name, None)
        if not doomed:
            raise Skipped(f"no more than {self.cfg.keep_releases} releases have been live")
        return f"removed {len(doomed)} old release(s): {', '.join(doomed)}"

    # --- helpers --------------------------------------------------------------------------------------------------

    def _in_flight(self, step: str) -> InFlight:
        carried = "carried" if self.flags_raised else ""
        return InFlight(self.id, self.kind, self.release, self.previous, self.actor, self.started, step,
                        "ours" if self.maintenance_ours else carried)

    def _hooks(self, commands: tuple[tuple[str, ...], ...]) -> str:
        if not commands:
            raise Skipped("no hooks configured")
        env = {"MAINTD_APP": self.cfg.app, "MAINTD_RELEASE": self.release, "MAINTD_PREVIOUS": self.previous or "",
               "MAINTD_ROOT": str(self.cfg.root), "MAINTD_DEPLOY_ID": self.id}
        for argv in commands:
            ran = proc.run(argv, cwd=self.path, timeout=self.cfg.hooks.timeout, env=env)
            if not ran.ok:
                raise StepFailed(f"hook {ran.describe()}", ran.output)
            if ran.output:
                self.log.info(f"hook {argv[0]} said", step=self.step, output=ran.output)
        return f"ran {len(commands)} hook(s)"

    def _lower_ours(self) -> None:
        self.ctx.flags.lower_in(self.path)
        if self.previous:
            self.ctx.flags.lower_in(self.ctx.tree.path(self.previous))
        self.flags_raised = False

    def _recover(self, error: str) -> StepRecord:
        """After a failed step: back to the previous release if the swap happened, then out of our maintenance."""
        t0 = time.perf_counter()
        self.ctx.store.record(self.release).bad = error
        notes = []
        if self.swapped and self.previous:
            try:
                self.ctx.tree.swap(self.previous)
                notes.append(f"current -> releases/{self.previous}")
                notes.append(restart_app(self.ctx, self.previous))
                notes.append(flush_cache(self.ctx, self.log))
            except Skipped as skip:
                notes.append(str(skip))
            except (OSError, ReleaseError, RestartError) as exc:
                notes.append(f"rollback incomplete: {_describe(exc)}")
        if self.ctx.store.memory.maintenance:
            notes.append("operator maintenance stays on")
        elif self.maintenance_ours and self.cfg.maintenance.keep_on_failure:
            notes.append("maintenance kept on (maintenance.keep_on_failure)")
        elif self.flags_raised:
            try:
                self._lower_ours()
                notes.append("maintenance off")
            except OSError as exc:
                notes.append(f"maintenance could not be lifted: {_describe(exc)}")
        record = StepRecord("rollback" if self.swapped else "abort", "rolled_back" if self.swapped else "failed",
                            _ms(t0), "; ".join(notes) or "nothing to undo")
        self._log_step(record, "")
        self.on_step(record)
        return record

    def _revision_line(self, outcome: Outcome) -> str:
        when = now_iso()
        if outcome.went_live and self.kind == "rollback":
            return f"{self.actor} rolled back to release {self.release} at {when}"
        revision = self._revision()
        at = f" (at {revision})" if revision else ""
        if outcome.went_live:
            return f"Release {self.release}{at} deployed by {self.actor} at {when}"
        return (f"Release {self.release}{at} failed to deploy ({outcome.result}) by {self.actor} at {when}: "
                f"{outcome.error}")

    def _revision(self) -> str:
        try:
            return (self.path / "REVISION").read_text(encoding="utf-8").strip()[:64]
        except (OSError, UnicodeDecodeError):
            return ""

    def _migrations_differ(self) -> bool:
        if not self.previous:
            return True
        return _tree_digest(self.path / "db/migrate") != _tree_digest(self.ctx.tree.path(self.previous) / "db/migrate")

    def _written_by_maintd(self) -> tuple[str, ...]:
        """Paths maintd itself adds to a release; a manifest cannot list them, so a redeploy must not trip on them."""
        up = self.cfg.upload
        flag, page = self.ctx.flags.paths(Path())
        return (up.marker, up.manifest, str(flag), str(page), restart.RESTART_FILE,
                *self.cfg.shared.files, *self.cfg.shared.dirs)

    def _old_releases(self) -> list[str]:
        """Releases that were live, beyond the newest `keep_releases` of them; never the live or previous one."""
        memory = self.ctx.store.memory
        been_live = sorted((record.went_live, name) for name, record in memory.releases.items()
                           if record.went_live is not None)
        keep: set[str | None] = {name for _, name in been_live[-self.cfg.keep_releases:]}
        keep |= {self.ctx.tree.live(), memory.previous, self.previous}
        return [name for _, name in been_live
                if name not in keep and os.path.isdir(self.ctx.tree.releases / name)]


def restart_app(ctx: Context, release: str) -> str:
    """The `restart` step, also what `maintctl restart` runs on the live release."""
    r, root = ctx.config.restart, ctx.config.root
    if r.method == "command":
        return restart.command(r.command, root, ctx.config.hooks.timeout, release)
    return restart.passenger(root, ctx.tree.path(release), ctx.config.hooks.timeout)


def flush_cache(ctx: Context, logger: Any) -> str:
    """The `flush` step, also what `maintctl flush` runs; servers that are down are warnings."""
    m = ctx.config.memcached
    if m.flush == "none" or not m.servers:
        raise Skipped('memcached.flush = "none"')
    outcomes = cache.flush(m.servers, m.flush, m.namespace_key, m.timeout)
    down = [o for o in outcomes if o.error]
    for outcome in down:
        logger.warning(f"memcached {outcome.server} not flushed: {outcome.error}", step="flush",
                       server=outcome.server)
    what = "flushed" if m.flush == "all" else f"bumped {m.namespace_key} on"
    return f"{what} {len(outcomes) - len(down)} of {len(outcomes)} memcached server(s)"


def record_outcome(ctx: Context, entry: dict[str, Any], revision: str, logger: Any) -> None:
    """A finished deploy, rollback or recovery (`entry`, its history line) into state, history and revisions.log,
    and its journal closed. What cannot be written is logged: the site is consistent by now, so the deploy stands."""
    last = {key: entry[key] for key in ("release", "result", "duration_ms", "deploy_id", "kind", "error")}
    went_on = entry["result"] == "ok" and entry["previous"] != entry["release"]
    problems = [ctx.store.finish({**last, "finished": now_iso()}, entry, entry["previous"] if went_on else None),
                ctx.tree.append_revision(revision), ctx.store.journal_done()]
    for problem in filter(None, problems):
        logger.error(problem)


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


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
    return str(exc)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
