"""Waiting, inside the maintenance window, until the restarted app has booted the new release (contract §9).

A restart only *asks* for the new code: `passenger-config restart-app` returns at once and Passenger spawns the new
processes afterwards; Puma's `kill -USR2` returns before Puma has even re-executed. A Rails app then boots for
seconds. Ending maintenance at that point hands the boot to the first visitors (measured: 1.8–8.6 s for the first
request, 2.0–2.7 s stalls with no maintenance at all). So the `restart` step lasts until the app can answer, by what
the server itself says, without any configured URL:

- Passenger: its own pool (`passenger-status --show=xml`, in each instance that restarted the app) lists an app
  process only once it has loaded the app; the wait ends when every group of this tree has a process spawned after
  the restart began. Nothing is sent to the app. A group for which Passenger spawns nothing has nothing to wait
  for: with `PassengerMinInstances 0` Passenger starts the app only at a request (the pool shows `min_processes` 0),
  and the step says so. Otherwise a group that has no new process and none being spawned is one whose spawn failed
  (an app that raises at boot): Passenger tries again only at a request, so the step fails at once.
- a restart command (Puma, Unicorn, anything that serves from the release): the app's processes are found in /proc
  and probed with an HTTP request, by probe.py, run as `hooks.user` (the app's user: see there why, and why only
  its processes count). The wait ends when a socket held by processes of the new release only answers a request
  with any HTTP status there, sent with maintd's health header. A socket that a process of an older release still
  holds does not count: its answer may be the old code's (Puma between the signal and its re-exec; in a phased
  restart, the old workers that answer while the master already runs in the new release).

Only an app that was running is waited for: one that was not (Passenger starts it on the first request; no process
listened before the command) has nothing to boot now, and the step says so.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from . import probe, proc
from .config import Config, RestartMethod
from .restart import HEALTH_HEADER  # sent to the app's own socket too: maintd's probes are told from visitors
from .results import StepFailed
from .runas import RunAs
from .steps import Fault

POLL_INTERVAL = 0.2  # seconds between looks: a boot takes seconds; each passenger-status costs ~0.2 s of Ruby
# What runs probe.py: the system's Python, which every user may run, not maintd's (its virtualenv may be unreadable
# to the app's user); -I: nothing of the user's environment or directories is imported.
SYSTEM_PYTHON = "/usr/bin/python3"
LOOK_WINDOW = 5.0  # seconds one run of probe.py waits for an answer: what it saw comes back to the step this often
LOOK_SLACK = 10.0  # seconds a run may take beyond its window (Python's start, /proc, a last probe) before it is killed


# --- Passenger ----------------------------------------------------------------------------------------------------


class Spawn(Enum):
    """Where a Passenger group of this tree is, after the restart, by its pool."""

    BOOTED = "booted"  # lists a process spawned since the restart: it has loaded the app
    SPAWNING = "spawning"  # restarting, or spawning a process
    ON_DEMAND = "on demand"  # no new process and none being spawned, and none asked for (min_processes 0)
    FAILED = "failed"  # no new process and none being spawned, though min_processes asks for one: the spawn failed


@dataclass(frozen=True)
class Group:
    instance: str
    app_root: str
    spawn: Spawn


def passenger_booted(root: Path, instances: list[str], since: float, timeout: float) -> str:
    """Wait until Passenger lists, for each app under `root`, a process spawned at or after `since` (epoch seconds),
    in the named instances; not for a group Passenger starts only at a request; StepFailed for one whose spawn
    failed, or at the deadline."""
    tool = shutil.which("passenger-status")
    if not tool:
        return "passenger-status is not installed: the boot is not waited for"
    deadline = time.monotonic() + timeout
    while True:
        groups = [group for name in instances for group in _passenger_groups(tool, name, root, since)]
        if not groups:
            return "Passenger runs no process of this app: nothing to wait for"
        if failed := [group for group in groups if group.spawn is Spawn.FAILED]:
            raise StepFailed(f"Passenger {failed[0].instance} could not start {failed[0].app_root}: its spawn "
                             "failed, and Passenger tries again only at a request (the web server's error log says "
                             "why)")
        if not any(group.spawn is Spawn.SPAWNING for group in groups):
            return "; ".join(_waited(group, since) for group in groups)
        if time.monotonic() + POLL_INTERVAL > deadline:
            spawning = next(group for group in groups if group.spawn is Spawn.SPAWNING)
            raise StepFailed(f"Passenger {spawning.instance} did not boot {spawning.app_root} within {timeout:g} s "
                             "of the restart")
        time.sleep(POLL_INTERVAL)


def _waited(group: Group, since: float) -> str:
    if group.spawn is Spawn.BOOTED:
        return f"Passenger {group.instance} has booted {group.app_root} after {time.time() - since:.1f} s"
    return (f"Passenger {group.instance} starts {group.app_root} only at its first request "
            "(PassengerMinInstances 0): its boot is not waited for")


def _passenger_groups(tool: str, instance: str, root: Path, since: float) -> Iterator[Group]:
    """Each Passenger group under `root` in `instance`, and where its spawn is."""
    shown = proc.run((tool, "--show=xml", instance), cwd=root, timeout=10)
    if not shown.ok:
        return
    try:
        pool = ET.fromstring(shown.output[shown.output.find("<?xml"):])
    except ET.ParseError:
        return
    for group in pool.iter("group"):
        app_root = group.findtext("app_root") or ""
        if _under(app_root, root):
            yield Group(instance, app_root, _spawn(group, since))


def _spawn(group: ET.Element, since: float) -> Spawn:
    """Read from the fields Passenger 6 gives a group: `<restarting/>` until its restart is done, then `<spawning/>`
    and `processes_being_spawned` while a process loads the app; `min_processes` among its options."""
    if any(int(p.findtext("spawn_start_time") or 0) / 1e6 >= since for p in group.iter("process")
           if p.findtext("enabled") == "ENABLED" and p.findtext("life_status") == "ALIVE"):
        return Spawn.BOOTED
    if (group.find("restarting") is not None or group.find("spawning") is not None
            or int(group.findtext("processes_being_spawned") or 0) > 0):
        return Spawn.SPAWNING
    return Spawn.ON_DEMAND if group.findtext("options/min_processes") == "0" else Spawn.FAILED


def _under(path: str, root: Path) -> bool:
    top = str(root).rstrip("/")
    return path == top or path.startswith(top + "/")


# --- an app that listens itself (restart command) ----------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    address: str  # host:port, or a Unix socket's path
    holders: tuple[tuple[int, str], ...]  # (pid, release) of each process of the app's user that holds it

    def describe(self) -> str:
        pids = [str(pid) for pid, _ in self.holders]
        releases = sorted({release for _, release in self.holders})
        return (f"{self.address} (pid{'s' * (len(pids) > 1)} {', '.join(pids)}, "
                f"release{'s' * (len(releases) > 1)} {', '.join(releases)})")


@dataclass(frozen=True)
class Look:
    """What probe.py saw, as the app's user."""

    listeners: list[Listener]
    answered: tuple[str, int] | None = None  # (address, HTTP status)
    unanswered: dict[str, str] = field(default_factory=dict)  # address -> why not

    def describe(self, address: str) -> str:
        """A socket probe.py asked, with its holders as the last look saw them (none: it was gone by then)."""
        return next((found.describe() for found in self.listeners if found.address == address), address)


class LookFailed(Exception):
    """probe.py could not be run or said nothing readable: a fault of this machine, not of the release."""


@functools.cache
def _probe_source() -> str:
    return Path(probe.__file__).read_text(encoding="utf-8")


def look(root: Path, runas: RunAs, release: str = "", window: float = 0.0) -> Look:
    """The listening sockets of `runas`'s processes in `root`'s releases (probe.py), as that user sees them; with
    `release`, also the first answer, within `window` seconds, of a socket that only processes of that release
    hold."""
    argv = (SYSTEM_PYTHON, "-I", "-c", _probe_source(), str(root), release, f"{window:g}", HEALTH_HEADER)
    ran = proc.run(argv, cwd=Path("/"), timeout=window + LOOK_SLACK, runas=runas)
    lines = ran.output.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if ran.ok and lines else None
        if not isinstance(report, dict):
            raise ValueError
        listeners = [Listener(str(found["address"]), tuple((int(pid), str(held)) for pid, held in found["holders"]))
                     for found in report["listeners"]]
        answer = report.get("answered")
        answered = (str(answer["address"]), int(answer["status"])) if answer else None
        return Look(listeners, answered, {str(k): str(v) for k, v in report.get("unanswered", {}).items()})
    except (ValueError, KeyError, TypeError, IndexError):
        said = ran.describe() if not ran.ok else f"it said nothing readable: {ran.tail()}"  # describe() quotes it
        raise LookFailed(f"cannot look for the app's sockets as {runas.name} ({SYSTEM_PYTHON}: {said})") from None


def answering(root: Path, release: str, timeout: float, runas: RunAs) -> str:
    """Wait until a socket of `release`'s processes answers; StepFailed at the deadline, the machine's fault when
    the last look could not be made."""
    started = time.monotonic()
    deadline = started + timeout
    last, failed = "no process of it listens yet", False
    while True:
        try:
            seen = look(root, runas, release, min(LOOK_WINDOW, max(0.1, deadline - time.monotonic())))
        except LookFailed as exc:
            last, failed = str(exc), True
        else:
            failed = False
            if seen.answered:
                address, status = seen.answered
                return (f"release {release} answered {status} on {seen.describe(address)} "
                        f"after {time.monotonic() - started:.1f} s")
            last = _why_not(seen, release)
        if time.monotonic() + POLL_INTERVAL > deadline:
            raise StepFailed(f"the app did not answer from release {release} within {timeout:g} s: {last}",
                             fault=Fault.SERVER if failed else None)
        if failed:
            time.sleep(POLL_INTERVAL)  # probe.py looks again by itself; a run that failed is not run again at once


def _why_not(seen: Look, release: str) -> str:
    if seen.unanswered:
        return "; ".join(f"no answer on {seen.describe(address)}: {why}"
                         for address, why in seen.unanswered.items())
    if mixed := [found for found in seen.listeners if any(held == release for _, held in found.holders)]:
        return f"an older release still holds {mixed[0].describe()}"
    return "no process of it listens yet"


# --- what `maintd check` tells -----------------------------------------------------------------------------------


def described(config: Config, runas: RunAs | None) -> list[str]:
    """What a deploy waits for before it ends maintenance, in the words `maintd check` prints, found as a deploy
    would find it now (the app's processes as `runas`, hooks.user, sees them)."""
    r = config.restart
    if r.method is RestartMethod.PASSENGER:
        if not shutil.which("passenger-config"):
            waits = ("touches tmp/restart.txt only (passenger-config is not installed): Passenger restarts at its "
                     "next look, so the first request after maintenance waits for the boot")
        elif not shutil.which("passenger-status"):
            waits = "runs passenger-config restart-app; passenger-status is missing, so the boot is not waited for"
        else:
            waits = (f"runs passenger-config restart-app in each Passenger instance, then waits (at most "
                     f"{r.health_timeout:g} s, restart.health_timeout) until Passenger lists a process of the new "
                     "release, so its boot falls inside maintenance; nothing is waited for when Passenger runs no "
                     "app of this tree, or starts it only at a request (PassengerMinInstances 0)")
    elif runas is None:
        waits = "runs restart.command; hooks.user cannot be used (see below), so no process of the app can be seen"
    else:
        waits = _described_command(config, runas)
    health = (f"GET {r.health_url} until it answers 2xx/3xx with {r.health_expect!r} (at most {r.health_timeout:g} s)"
              if r.health_url else "not checked (restart.health_url is empty)")
    return [f"restart: {waits}", f"health: {health}"]


def _described_command(config: Config, runas: RunAs) -> str:
    r, root = config.restart, config.root
    try:
        found = look(root, runas).listeners
    except LookFailed as exc:
        return f"runs restart.command, but {exc}: a deploy's restart step would fail"
    if found:
        return (f"runs restart.command, then waits (at most {r.health_timeout:g} s, restart.health_timeout) until "
                f"the app answers from the new release where it listens now: "
                f"{', '.join(listener.describe() for listener in found)} (as {runas.name} sees its own processes "
                f"in {root}/releases/)")
    return (f"runs restart.command; no process of {runas.name} (hooks.user) listens now with its working directory "
            f"in {root}/releases/, so a deploy would wait for no boot: set restart.health_url to wait on a URL")
