"""Talking to systemd: sd_notify (READY, STATUS, WATCHDOG, RELOADING, STOPPING, EXTEND_TIMEOUT_USEC) and socket
activation.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op; `daemon.notify` would return False there, and it raises
OSError when NOTIFY_SOCKET names a socket that is gone, which must not take the daemon down.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from systemd import daemon as sd

from . import log


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.last_status = ""
        self.log = log.get()

    def send(self, *lines: str) -> None:
        if not self.enabled:
            return
        try:
            sd.notify("\n".join(lines))
        except OSError as exc:
            self.log.warning(f"sd_notify failed: {exc}; no more notifications will be sent")
            self.enabled = False

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self.last_status:
            self.last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    async def hold_timeout(self, seconds: float) -> None:
        """Until cancelled, keep the timeout of the unit's current state (TimeoutStopSec while stopping) from running
        out: each EXTEND_TIMEOUT_USEC grants `seconds` from its arrival, and the next comes a third of that later,
        so one late wake-up loses nothing; a process that hangs stops sending, and its timeout runs out."""
        while True:
            self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")
            await asyncio.sleep(seconds / 3)


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC when the watchdog is meant for this process (sd_watchdog_enabled(3)), else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed (LISTEN_FDS), if it passed one."""
    fds = sd.listen_fds()
    if not fds:
        return None
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(False)
    return sock
