"""Making the app serve the release `current` points at, and proving that it does.

Passenger looks at `tmp/restart.txt` only when a request reaches the app, and at most every
PassengerStatThrottleRate seconds; during maintenance no request does, so the touch alone would let the first users
after maintenance see the old code. Where `passenger-config` is installed it is asked to restart the app at once.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import proc
from .confined import Confined
from .results import StepFailed
from .runas import RunAs

RESTART_FILE = "tmp/restart.txt"
_PROPERTIES_LIMIT = 1 << 16  # an instance's properties.json is ~1 KiB
_RESTART_DIR, _RESTART_NAME = os.path.split(RESTART_FILE)
# passenger-config's words for an instance that is registered but not up (its watchdog gone): "there doesn't seem to
# be a Passenger instance running with the name …", or without --instance "Passenger doesn't seem to be running"
PASSENGER_NOT_RUNNING = "doesn't seem to be"
PASSENGER_RESTARTING = "Restarting "  # what it prints for each app it restarts ("Restarting /srv/shop/current (…)")
# Sent with every health request: the shipped web snippets let a request from this host through maintenance only
# with it, so that visitors behind a proxy on this host (who all come from loopback) still get the page.
HEALTH_HEADER = "X-Maintd-Health"
HEALTH_INTERVAL = 0.2  # seconds between health requests; an app booting needs a moment, not a busy loop


@dataclass(frozen=True)
class PassengerRestart:
    done: str  # what was done, for the step's message
    instances: list[str]  # the Passenger instances (names) that restarted an app of this tree: the boots to wait for


def passenger(root: Path, release: Path, before: Path, timeout: float) -> PassengerRestart:
    """Restart the app at once where Passenger's tool can, in every registered Passenger instance, and leave
    `tmp/restart.txt` in the release.

    passenger-config refuses `restart-app` without `--instance` where two instances are registered (Apache and a
    Passenger Standalone beside it, two web servers), so it is asked once per instance, by name; each one that
    restarted an app of this tree is one whose boot the step waits for.

    Passenger compares the restart file's mtime with the one it saw at its last look, at the first request after
    the restart: a fresh mtime there restarts the app a second time, so the first visitor after maintenance waits
    for a whole boot again (measured: the request that met the new release took 5.3 s). So when `restart-app`
    restarted the app, the new release's file gets the mtime that `before`'s (the release `current` pointed at when
    Passenger last looked) has, and only otherwise a fresh one, for Passenger to restart by at its next look."""
    tool = shutil.which("passenger-config")
    if not tool:
        return PassengerRestart(_touch(root, release, None), [])
    if not (instances := passenger_instances()):
        # Spawning passenger-config (Ruby) only to hear that nothing runs cost ~95 ms inside every maintenance
        # window on machines that have Passenger installed but serve with something else.
        return PassengerRestart(f"{_touch(root, release, None)} (no Passenger instance is registered)", [])
    running, restarted = 0, []
    for name in instances:
        ran = proc.run((tool, "restart-app", str(root), "--instance", name, "--ignore-app-not-running",
                        "--ignore-passenger-not-running"), cwd=root, timeout=timeout)
        if not ran.ok:
            _touch(root, release, None)
            raise StepFailed(f"passenger-config restart-app --instance {name}: {ran.describe()}", ran.output)
        if PASSENGER_NOT_RUNNING in ran.output:
            continue  # a stale registration: a Passenger that starts later loads the new release anyway
        running += 1
        if PASSENGER_RESTARTING in ran.output:
            restarted.append(name)
    if not running:
        return PassengerRestart(f"{_touch(root, release, None)} (Passenger is not running)", [])
    if not restarted:
        # No app of this tree runs: the first request will start the new release.
        return PassengerRestart(f"{_touch(root, release, None)} (Passenger runs no app under {root})", [])
    return PassengerRestart(f"ran passenger-config restart-app (instance {', '.join(restarted)}); "
                            f"{_touch(root, release, before)}", restarted)


def _touch(root: Path, release: Path, like: Path | None) -> str:
    """Write `tmp/restart.txt` in `release`: with the mtime `like`'s has (none there: no file, as there), else
    fresh. Made aside and renamed into place, never written through a symlink (it could point anywhere root can
    write), and owned by the release's owner, whose own `touch tmp/restart.txt` must keep working."""
    seen: os.stat_result | None = None
    if like is not None:
        try:
            with Confined.open(root, like) as top, top.dir(_RESTART_DIR) as where:
                seen = where.entry(_RESTART_NAME)
        except OSError:  # no tmp/ there (or not a plain one): Passenger saw no file
            seen = None
        if seen is None or not stat.S_ISREG(seen.st_mode):
            return f"left {RESTART_FILE} out (none in release {like.name}: a new one would restart the app again)"
    with Confined.open(root, release) as top, top.dir(_RESTART_DIR, create=True) as where:
        where.write(_RESTART_NAME, "", mtime_ns=seen.st_mtime_ns if seen else None)
    return f"touched {RESTART_FILE}" + (f" (as in release {like.name})" if like is not None else "")


def passenger_instances() -> list[str]:
    """The names of the Passenger instances registered on this machine, found where passenger-config looks: the
    directory in PASSENGER_INSTANCE_REGISTRY_DIR, else $TMPDIR, /tmp and /var/run/passenger-instreg (Debian's
    packages). An instance is a `passenger.*` directory whose creation was finalized, named in its properties.json;
    a stale one (Passenger killed) is left to passenger-config to judge.

    $TMPDIR and /tmp are anyone's to write: a `passenger.*` planted there is not Passenger's. So only a directory
    that root (or maintd's own user, for a Passenger Standalone of its own) owns and nobody else may write counts,
    and its properties.json is read as an uploader's files are (confined.py): never through a link (which could
    lead root anywhere), never a FIFO (whose open would block the restart for good), at most 64 KiB."""
    configured = os.environ.get("PASSENGER_INSTANCE_REGISTRY_DIR")
    registries = [configured] if configured else [os.environ.get("TMPDIR") or "", "/tmp", "/var/run/passenger-instreg"]
    found = []
    for registry in filter(None, registries):
        try:
            with os.scandir(registry) as entries:
                candidates = sorted(e.name for e in entries if e.name.startswith("passenger."))
            with Confined.open(Path(registry), Path(registry)) as top:
                found += [name for entry in candidates if (name := _instance_name(top, entry))]
        except OSError:
            continue
    return found


def _instance_name(registry: Confined, entry: str) -> str | None:
    """The name of the Passenger instance in directory `entry` of `registry`, if it is one maintd may trust."""
    try:
        with registry.dir(entry, follow=False) as instance:
            owner = instance.status()
            if owner.st_uid not in (0, os.geteuid()) or owner.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return None
            if instance.kind("creation_finalized") != stat.S_IFREG:
                return None
            name = json.loads(instance.read("properties.json", _PROPERTIES_LIMIT)).get("name")
    except (OSError, ValueError, AttributeError):  # gone, a link, not a directory, not JSON, not an object
        return None
    return name if isinstance(name, str) and name else None


def command(argv: tuple[str, ...], root: Path, timeout: float, release: str, runas: RunAs) -> str:
    """Run the configured restart command in `<root>/current`, as `hooks.user`."""
    ran = proc.run(argv, cwd=root / "current", timeout=timeout, env={"MAINTD_RELEASE": release}, runas=runas)
    if not ran.ok:
        raise StepFailed(f"restart command {ran.describe()}", ran.output)
    return f"ran {' '.join(argv)}"


def wait_healthy(url: str, expect: str, timeout: float) -> str:
    """GET `url` until it answers 2xx/3xx with `expect` in the body; raises StepFailed at the deadline."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        try:
            request = urllib.request.Request(url, headers={HEALTH_HEADER: "1"})
            with urllib.request.urlopen(request, timeout=max(0.1, min(remaining, 5.0))) as answer:
                body = answer.read(1 << 20).decode("utf-8", "replace")
                if expect in body:
                    return f"{url} answered {answer.status}"
                last = f"answered {answer.status} without {expect!r}"
        except urllib.error.HTTPError as exc:
            last = f"answered {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = f"{getattr(exc, 'reason', exc)}"
        if time.monotonic() + HEALTH_INTERVAL > deadline:
            raise StepFailed(f"health check {url} failed within {timeout:g}s: {last}")
        time.sleep(HEALTH_INTERVAL)
