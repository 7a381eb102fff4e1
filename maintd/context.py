"""What a deploy works on, and the actions that also run on their own.

`Context` is built once per daemon and once per accepted reload. The functions below are the single actions of a
deploy that are needed elsewhere too: restarting the app and flushing the cache (`maintctl restart`, `maintctl
flush`, recovery after a crash, a rollback), the health check (recovery), and the one check that says whether a
release may go live (an upload completing, the `validate` step, recovery): one definition each, so the rules cannot
drift apart.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import boot, cache, manifest, proc, restart
from .config import Config, ConfigError, FlushMode, RestartMethod
from .events import Event, Events, Happening
from .maintenance import Flags, Notice, default_template
from .results import Skipped, StepFailed
from .runas import RunAs, resolve
from .state import Store
from .steps import Fault
from .tree import ReleaseError, Tree, machine_fault


@dataclass(frozen=True)
class Context:
    config: Config
    tree: Tree
    flags: Flags
    store: Store
    runas: RunAs  # who runs hooks and restart.command
    events: Events = field(default_factory=Events)  # the daemon's, the same across reloads

    @classmethod
    def build(cls, config: Config, store: Store, events: Events | None = None) -> Context:
        """Reads the maintenance template: one that cannot be read refuses a start or a reload, naming the key."""
        m = config.maintenance
        try:
            template = Path(m.template).read_text(encoding="utf-8") if m.template else default_template()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{config.source}: maintenance.template {m.template}: cannot read: {reason}") from None
        return cls(config, Tree(config.root), Flags(m.file, template, config.root), store, resolve(config),
                   events or Events())

    def written_by_maintd(self) -> tuple[str, ...]:
        """Paths maintd itself puts into a release (and an uploader's manifest therefore cannot list)."""
        up, shared = self.config.upload, self.config.shared
        flag, page = self.flags.paths(Path())
        return (up.marker, up.manifest, str(flag), str(page), restart.RESTART_FILE, *shared.files, *shared.dirs)

    def release_problem(self, name: str) -> str | None:
        """Why release `name` may not go live (None when it may): not a real directory, a path of
        `upload.required` missing, or a manifest that does not verify (contract §1)."""
        upload = self.config.upload
        try:
            if missing := self.tree.missing(name, upload.required):
                return f"required path missing: {', '.join(missing)}"
            with self.tree.open(name) as top:
                if top.kind(upload.manifest) is not None:
                    uploaded = self.tree.uploaded(name, self.written_by_maintd())
                    if problem := manifest.verify(top, upload.manifest, uploaded):
                        return f"manifest does not verify: {problem}"
        except ReleaseError as exc:
            return str(exc)
        except OSError as exc:
            if machine_fault(exc):  # not the release's: the caller retries (intake) or fails the step (validate)
                raise
            return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
        return None

    def validate(self, release: str) -> str:
        """The `validate` step: the release may go live (`release_problem`)."""
        if problem := self.release_problem(release):
            raise StepFailed(problem)
        verified = (self.tree.path(release) / self.config.upload.manifest).is_file()
        return "release is complete" + ("; manifest verified" if verified else "")

    def link_shared(self, release: str) -> str:
        """The `link_shared` step: a path missing from `shared/` (or a dangling link there, which Tree.link_shared
        would refuse the same way) is the server's fault, not the release's."""
        shared = self.config.shared
        if not shared.files and not shared.dirs:
            raise Skipped("no shared files or dirs configured")
        if missing := self.tree.missing_shared((*shared.dirs, *shared.files)):
            raise StepFailed(f"shared path(s) missing from {self.tree.shared}: {', '.join(missing)}; create them and "
                             "deploy this release again", fault=Fault.SERVER)
        linked = self.tree.link_shared(release, shared.files, shared.dirs)
        return f"linked {len(linked)} shared path(s)" if linked else "shared paths already linked"

    def remove_retired(self, protected: set[str | None]) -> str:
        """The `cleanup` step: releases that were live, beyond the newest `keep_releases`, never one `protected`."""
        store, tree, keep = self.store, self.tree, self.config.keep_releases
        doomed = [name for name in store.retired(keep, protected) if os.path.isdir(tree.releases / name)]
        for name in doomed:
            tree.remove(name)
            store.forget(name)
        if not doomed:
            raise Skipped(f"no more than {keep} releases have been live")
        return f"removed {len(doomed)} old release(s): {', '.join(doomed)}"

    def move_current(self, release: str, logger: Any, back: bool = False) -> list[str]:
        """Point `current` at `release`: the swap, the way back, the one way it moves. While an operator holds
        maintenance its flag moves along: into `release` first, so the site stays in maintenance wherever `current`
        ends up, then out of the release left, which nobody serves now and whose flag `maintenance off` (lowering
        it where `current` points) would never take down. Under the store's lock, as `operator_maintenance_on`
        raises the flag where `current` points: neither can miss the other.

        It raises only where `current` did not move, so that a swap that happened is always known (and undone) as
        one. A flag that cannot go into `release` (a full disk, a `tmp` its uploader turned into a link out of the
        tree) stops a swap forward before anything moved, but not the way back (`back`): the release that worked,
        out of maintenance, is a lesser harm than the one that failed, in it. A flag that cannot leave the release
        left stays where nobody serves it until the next start lowers it (leftovers.py). Either is logged, and
        returned in words for the record of the swap or of the way back."""
        notes = []
        with self.store.lock:
            leaving = self.tree.live()
            if operator := self.store.memory.maintenance:
                try:
                    self.flags.raise_in(self.tree.path(release), operator)
                except Exception as exc:
                    if not back:
                        raise
                    notes.append(f"the operator's maintenance flag could not go into releases/{release} "
                                 f"({describe(exc)}); `current` went back there all the same")
            self.tree.swap(release)
            if operator and leaving and leaving != release:
                try:
                    self.flags.lower_in(self.tree.path(leaving))
                except Exception as exc:
                    notes.append(f"the operator's maintenance flag could not leave releases/{leaving}, which nobody "
                                 f"serves now ({describe(exc)}): the next start lowers it")
        for note in notes:
            logger.warning(note)
        return notes

    def return_to(self, previous: str, logger: Any) -> list[str]:
        """A failed deploy's way back after its swap: `current` to `previous`, restarted and flushed, as far as it
        goes; what it did, and what it could not, in words for the undo's record."""
        done = []
        try:
            failed = self.tree.live()
            done += [f"current -> releases/{previous}", *self.move_current(previous, logger, back=True)]
            done.append(self.restart_app(previous, before=failed))
            done.append(self.flush_cache(logger))
        except Skipped as skip:
            done.append(str(skip))
        except Exception as exc:  # going back as far as it can, and saying what it could not
            done.append(f"rollback incomplete: {describe(exc)}")
            logger.exception("rollback incomplete")
        return done

    def restart_app(self, release: str, before: str | None = None) -> str:
        """The `restart` step, also `maintctl restart` on the live release: it ends once the app has booted
        `release` (boot.py), so that the boot falls inside maintenance, not into the first visitor's request.
        `before`: the release `current` pointed at until now (default: `release`, no swap)."""
        r, root = self.config.restart, self.config.root
        if r.method is RestartMethod.COMMAND:
            try:
                serving, blind = boot.look(root, self.runas).listeners, None
            except boot.LookFailed as exc:  # the command runs all the same: a rollback must restart the app
                serving, blind = [], exc
            done = restart.command(r.command, root, self.config.hooks.timeout, release, self.runas)
            if blind:
                raise StepFailed(f"{done}, but its boot cannot be waited for: {blind}", fault=Fault.SERVER)
            if not serving:
                return f"{done}; no process of {self.runas.name} listened in releases/ before: no boot to wait for"
            return f"{done}; {boot.answering(root, release, r.health_timeout, self.runas)}"
        since = time.time()
        try:
            restarted = restart.passenger(root, self.tree.path(release), self.tree.path(before or release),
                                          self.config.hooks.timeout)
        except StepFailed as exc:  # passenger-config is the system's tool, not the release's
            raise StepFailed(str(exc), exc.output, Fault.SERVER) from exc
        if not restarted.instances:
            return restarted.done
        return f"{restarted.done}; {boot.passenger_booted(root, restarted.instances, since, r.health_timeout)}"

    def flush_cache(self, logger: Any) -> str:
        """The `flush` step, also `maintctl flush`; servers that are down are warnings, not failures."""
        m = self.config.memcached
        if m.flush is FlushMode.NONE:
            raise Skipped('memcached.flush = "none"')
        if not m.servers:  # the config's warning said so once, at start
            raise Skipped("memcached.servers is empty")
        outcomes = cache.flush(m.servers, m.flush, m.namespace_key, m.timeout)
        down = [o for o in outcomes if o.error]
        for outcome in down:
            logger.warning(f"memcached {outcome.server} not flushed: {outcome.error}", step="flush",
                           server=outcome.server)
            self.events.publish(Event(Happening.CACHE_NOT_FLUSHED, step="flush", error=outcome.error or "",
                                      server=outcome.server))
        what = "flushed" if m.flush is FlushMode.ALL else f"bumped {m.namespace_key} on"
        return f"{what} {len(outcomes) - len(down)} of {len(outcomes)} memcached server(s)"

    def run_hooks(self, commands: tuple[tuple[str, ...], ...], release: Path, env: dict[str, str],
                  logger: Any) -> str:
        """`hooks.before_swap` or `hooks.after_swap`, in the release's directory, each bounded by `hooks.timeout`;
        `env` (the deploy's MAINTD_* variables) beside MAINTD_APP and MAINTD_ROOT."""
        if not commands:
            raise Skipped("no hooks configured")
        env = {"MAINTD_APP": self.config.app, "MAINTD_ROOT": str(self.config.root), **env}
        for argv in commands:
            ran = proc.run(argv, cwd=release, timeout=self.config.hooks.timeout, env=env, runas=self.runas)
            if not ran.ok:
                raise StepFailed(f"hook {ran.describe()}", ran.output)
            if ran.output:
                logger.info(f"hook {argv[0]} said", output=ran.output)
        return f"ran {len(commands)} hook(s)"

    def operator_maintenance_on(self, notice: Notice) -> None:
        """`maintctl maintenance on`: one state change, under the store's lock, that a deploy checking whether an
        operator holds maintenance (and lowering its own flags if not) sees whole or not at all. Recorded first,
        then raised in the release `current` points to, which cannot move meanwhile (`move_current` takes the flag
        along from then on). A crash in between leaves an operator's maintenance whose flag the next deploy or
        `status` shows missing, never flags up that nothing would take down."""
        with self.store.lock:
            before, self.store.memory.maintenance = self.store.memory.maintenance, notice
            self.store.save()
            try:
                if live := self.tree.live():
                    self.flags.raise_in(self.tree.path(live), notice)
            except BaseException:
                self.store.memory.maintenance = before
                self.store.save()
                raise

    def operator_maintenance_off(self) -> None:
        """`maintctl maintenance off` (run while no deploy runs): forgotten, then the live release's flag removed."""
        with self.store.lock:
            self.store.memory.maintenance = None
            self.store.save()
            if live := self.tree.live():
                self.flags.lower_in(self.tree.path(live))

    def check_health(self, release: str) -> str:
        """The `health` step: the new release's own answer, when `restart.health_url` is set."""
        r = self.config.restart
        if not r.health_url:
            raise Skipped("no restart.health_url configured")
        return restart.wait_healthy(r.health_url, r.health_expect.replace("{release}", release), r.health_timeout)


def describe(exc: BaseException) -> str:
    """An error in the words of a step's record: an OSError's text and file, one of maintd's own its message, any
    other (a bug) as Python shows it."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if isinstance(exc, (OSError, ReleaseError, StepFailed, Skipped)):
        return str(exc)
    return repr(exc)
