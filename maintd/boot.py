"""Waiting, inside the maintenance window, until the restarted app has booted the new release (contract §9).

A restart only *asks* for the new code: `passenger-config restart-app` returns at once and Passenger spawns the new
processes afterwards; Puma's `kill -USR2` returns before Puma has even re-executed. A Rails app then boots for
seconds. Ending maintenance at that point hands the boot to the first visitors (measured: 1.8–8.6 s for the first
request, 2.0–2.7 s stalls with no maintenance at all). So the `restart` step lasts until the app can answer, by what
the server itself says, without any configured URL:

- Passenger: its own pool (`passenger-status --show=xml`, per registered instance) lists an app process only once
  it has loaded the app; the wait ends when a group of this tree has a process spawned after the restart began.
  Nothing is sent to the app.
- a restart command (Puma, Unicorn, anything that serves from the release): the app's processes are found in /proc
  as those whose working directory is inside `releases/` and that listen on a socket (TCP, or a Unix socket under
  the root). The wait ends when one whose working directory is the new release answers a request with any HTTP
  status there, sent with maintd's health header. A process still in the old release (Puma between the signal and
  its re-exec) does not count: its answer would be the old code's.

Only an app that was running is waited for: one that was not (Passenger starts it on the first request; no process
listened before the command) has nothing to boot now, and the step says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import proc
from .config import Config, RestartMethod
from .restart import HEALTH_HEADER  # sent to the app's own socket too: maintd's probes are told from visitors
from .results import StepFailed

POLL_INTERVAL = 0.2  # seconds between looks: a boot takes seconds; each passenger-status costs ~0.2 s of Ruby
_PROBE = f"GET / HTTP/1.0\r\nHost: localhost\r\n{HEALTH_HEADER}: 1\r\nConnection: close\r\n\r\n".encode()
_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})")
_SOCKET_LINK = re.compile(r"^socket:\[(\d+)\]$")
_TCP_LISTEN = "0A"
_UNIX_ACCEPTING = 1 << 16  # __SO_ACCEPTCON in /proc/net/unix's flags
_UNIX_STREAM = 1


# --- Passenger ----------------------------------------------------------------------------------------------------


def passenger_booted(root: Path, instances: list[Path], since: float, timeout: float) -> str:
    """Wait until Passenger lists, for an app under `root`, a process spawned at or after `since` (epoch seconds)."""
    tool = shutil.which("passenger-status")
    if not tool:
        return "passenger-status is not installed: the boot is not waited for"
    deadline = time.monotonic() + timeout
    while True:
        groups = list(_passenger_groups(tool, instances, root))
        if not groups:
            return "Passenger runs no process of this app: nothing to wait for"
        if any(spawned >= since for _, spawned in groups):
            return f"Passenger has booted {groups[0][0]} after {time.time() - since:.1f} s"
        if time.monotonic() + POLL_INTERVAL > deadline:
            raise StepFailed(f"Passenger did not boot {groups[0][0]} within {timeout:g} s of the restart")
        time.sleep(POLL_INTERVAL)


def _passenger_groups(tool: str, instances: list[Path], root: Path) -> Iterator[tuple[str, float]]:
    """(app root, newest spawn time of an enabled, live process, or 0) for each Passenger group under `root`."""
    for instance in instances:
        try:
            name = json.loads((instance / "properties.json").read_text())["name"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shown = proc.run((tool, "--show=xml", str(name)), cwd=root, timeout=10)
        if not shown.ok:
            continue
        try:
            pool = ET.fromstring(shown.output[shown.output.find("<?xml"):])
        except ET.ParseError:
            continue
        for group in pool.iter("group"):
            app_root = group.findtext("app_root") or ""
            if not _under(app_root, root):
                continue
            spawned = [int(p.findtext("spawn_start_time") or 0) / 1e6 for p in group.iter("process")
                       if p.findtext("enabled") == "ENABLED" and p.findtext("life_status") == "ALIVE"]
            yield app_root, max(spawned, default=0.0)


def _under(path: str, root: Path) -> bool:
    top = str(root).rstrip("/")
    return path == top or path.startswith(top + "/")


# --- an app that listens itself (restart command) ----------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    pid: int
    release: str  # the release the process runs in (its working directory)
    address: tuple[str, int] | str  # (host, port) to connect to, or a Unix socket's path

    def describe(self) -> str:
        where = self.address if isinstance(self.address, str) else f"{self.address[0]}:{self.address[1]}"
        return f"{where} (pid {self.pid}, release {self.release})"


def app_listeners(root: Path) -> list[Listener]:
    """The listening sockets of every process whose working directory is a release of `root` (read from /proc)."""
    releases = os.path.realpath(root / "releases") + "/"
    tcp, unix = _listening_sockets(str(root).rstrip("/") + "/")
    addresses: dict[int, tuple[str, int] | str] = {**tcp, **unix}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            if not cwd.startswith(releases):
                continue
            links = [os.readlink(f"/proc/{entry.name}/fd/{fd}") for fd in os.listdir(f"/proc/{entry.name}/fd")]
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        release = cwd[len(releases):].split("/", 1)[0]
        inodes = {int(m.group(1)) for link in links if (m := _SOCKET_LINK.match(link))}
        found += [Listener(int(entry.name), release, addresses[inode]) for inode in sorted(inodes & addresses.keys())]
    return found


def _listening_sockets(under: str) -> tuple[dict[int, tuple[str, int]], dict[int, str]]:
    """inode -> where to connect, for every listening TCP socket and every listening Unix socket below `under`."""
    tcp: dict[int, tuple[str, int]] = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN:
                tcp[int(fields[9])] = _connectable(family, fields[1])
    unix: dict[int, str] = {}
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if (len(fields) > 7 and int(fields[3], 16) & _UNIX_ACCEPTING and int(fields[4], 16) == _UNIX_STREAM
                and fields[7].startswith(under)):
            unix[int(fields[6])] = fields[7]
    return tcp, unix


def _connectable(family: socket.AddressFamily, hex_address: str) -> tuple[str, int]:
    """/proc/net/tcp's `0100007F:1F90` -> ("127.0.0.1", 8080); a wildcard address is reached on loopback."""
    raw, port = hex_address.split(":")
    packed = bytes.fromhex(raw)
    # the kernel prints each 32-bit word in host order (little-endian here)
    packed = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
    host = socket.inet_ntop(family, packed)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if family is socket.AF_INET else "::1"
    return host, int(port, 16)


def answered(listener: Listener, timeout: float) -> int | None:
    """The HTTP status the app answers a probe with on `listener`, or None (refused, closed, not HTTP)."""
    family = socket.AF_UNIX if isinstance(listener.address, str) else (
        socket.AF_INET6 if ":" in listener.address[0] else socket.AF_INET)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(listener.address)
            conn.sendall(_PROBE)
            head = conn.recv(64)
    except OSError:
        return None
    status = _STATUS_LINE.match(head)
    return int(status.group(1)) if status else None


def answering(root: Path, release: str, timeout: float) -> str:
    """Wait until a process of `release` answers on one of its listening sockets; StepFailed at the deadline."""
    started = time.monotonic()
    deadline = started + timeout
    last = "no process of it listens yet"
    while True:
        for listener in (found for found in app_listeners(root) if found.release == release):
            status = answered(listener, max(0.1, deadline - time.monotonic()))
            if status is not None:
                return (f"release {release} answered {status} on {listener.describe()} "
                        f"after {time.monotonic() - started:.1f} s")
            last = f"no answer on {listener.describe()}"
        if time.monotonic() + POLL_INTERVAL > deadline:
            raise StepFailed(f"the app did not answer from release {release} within {timeout:g} s: {last}")
        time.sleep(POLL_INTERVAL)


# --- what `maintd check` tells -----------------------------------------------------------------------------------


def described(config: Config) -> list[str]:
    """What a deploy waits for before it ends maintenance, in the words `maintd check` prints, found as a deploy
    would find it now."""
    r, root = config.restart, config.root
    if r.method is RestartMethod.PASSENGER:
        if not shutil.which("passenger-config"):
            waits = ("touches tmp/restart.txt only (passenger-config is not installed): Passenger restarts at its "
                     "next look, so the first request after maintenance waits for the boot")
        elif not shutil.which("passenger-status"):
            waits = "runs passenger-config restart-app; passenger-status is missing, so the boot is not waited for"
        else:
            waits = (f"runs passenger-config restart-app, then waits (at most {r.health_timeout:g} s, "
                     "restart.health_timeout) until Passenger lists a process of the new release, so its boot falls "
                     "inside maintenance; nothing is waited for when Passenger runs no app of this tree")
    elif found := app_listeners(root):
        waits = (f"runs restart.command, then waits (at most {r.health_timeout:g} s, restart.health_timeout) until "
                 f"the app answers from the new release where it listens now: "
                 f"{', '.join(listener.describe() for listener in found)}")
    else:
        waits = (f"runs restart.command; no process of the app listens now (none whose working directory is in "
                 f"{root}/releases/), so a deploy would wait for no boot: set restart.health_url to wait on a URL")
    health = (f"GET {r.health_url} until it answers 2xx/3xx with {r.health_expect!r} (at most {r.health_timeout:g} s)"
              if r.health_url else "not checked (restart.health_url is empty)")
    return [f"restart: {waits}", f"health: {health}"]
