"""The control socket (contract §5): newline-delimited JSON over a Unix stream socket, peers known by SO_PEERCRED.

A request is one line, `{"cmd": ..., "args": {...}}`; the answer is zero or more `{"event": ...}` lines, then one
`{"ok": true, "result": ...}` or `{"ok": false, "error": ...}`. Anything a peer sends — too long, not JSON, wrong
types, nothing at all — costs it an error line or the connection, never the daemon.

The socket is open to every local user, so it is served by an accept loop of our own rather than asyncio's: each
connection is counted against its uid's share (admission.py) the moment it is accepted and closed at once when over
it, before any task, buffer or name lookup is spent on it; and idle or slow peers are cut off, so none can hold its
descriptor for long. asyncio's loop (CPython 3.11, selector_events `_accept_connection`) accepted everything, and
on EMFILE reported through the loop's exception handler (a traceback) without leaving its loop of `backlog`
accepts: up to 1,024 tracebacks per wake-up, each scheduling another retry, so the log grew by 500,000 lines in 13 s
while root's connection waited in the backlog.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import grp
import json
import os
import resource
import socket
import struct
from typing import TYPE_CHECKING, Any

from . import log
from .admission import Admission, Limits, RefusalLog, TooMany, user_name
from .commands import COMMANDS, BadRequest, Command
from .handlers import HANDLERS, Emit, Peer
from .results import Refused, StepFailed
from .tree import ReleaseError

if TYPE_CHECKING:
    from .daemon import Daemon

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 10.0  # seconds a connected peer may take to send a request line (maintctl sends at once)
WRITE_TIMEOUT = 10.0  # seconds an answer may wait for a peer to read it: one that never reads is cut off
# Connections waiting to be accepted: a burst of maintctl calls must not be refused. They cost the daemon nothing
# (the kernel holds them, charged to the connecting process) until accepted, and the loop below drains them at once.
BACKLOG = 1024
ACCEPT_BATCH = 64  # connections accepted per wake-up: a flood of connects leaves the loop time for everything else
ACCEPT_PAUSE = 1.0  # seconds without accepting after accept() itself failed (out of descriptors or memory)


def credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid, gid


def identify(pid: int, uid: int, gid: int) -> Peer:
    return Peer(pid, uid, gid, user_name(uid))


def may_change(peer: Peer, group: str) -> bool:
    """Root always; otherwise only a member of `control.group` (primary or supplementary)."""
    if peer.uid == 0:
        return True
    if not group:
        return False
    try:
        wanted = grp.getgrnam(group)
    except KeyError:
        return False
    if peer.gid == wanted.gr_gid or peer.name in wanted.gr_mem:
        return True
    try:
        return wanted.gr_gid in os.getgrouplist(peer.name, peer.gid)
    except OSError:
        return False




class ControlServer:
    """Serves one app's socket for a running `Daemon`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.log = log.get(app=daemon.config.app)
        self.sock: socket.socket | None = None
        self.bound = False
        self.files = resource_limit()
        self.admission = Admission(Limits.for_files(self.files))
        self.refusals = RefusalLog(self.log)
        self.accept_failing = False  # accept() failed and has not succeeded since: said once, not once a second

    async def start(self, inherited: socket.socket | None = None) -> ControlServer:
        """Serve the socket systemd passed us, or bind our own (and remove it again on close)."""
        self.bound = inherited is None
        self.sock = inherited or bind(self.config.socket_path, self.config.socket_mode, self.config.control.group)
        self._resume()
        self.log.info(f"control socket {self.config.socket_path}: {self.admission.limits.describe()}, "
                      f"of {self.files} open files")
        return self

    def close(self) -> None:
        if self.sock:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.refusals.flush()
        if self.bound:
            try:
                os.unlink(self.config.socket_path)
            except FileNotFoundError:
                pass

    # --- accepting ------------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        if self.sock:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.sock
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: the socket stays readable; wait, then retry
                self._pause(exc)
                return
            if self.accept_failing:
                self.log.info("accepting connections again")
                self.accept_failing = False
            self._admit(conn)

    def _pause(self, exc: OSError) -> None:
        """Stop accepting for ACCEPT_PAUSE, with one log line for the whole time accept() keeps failing."""
        if not self.accept_failing:
            self.log.error(f"cannot accept connections: {exc.strerror or exc}; trying again every {ACCEPT_PAUSE:g}s")
        self.accept_failing = True
        loop = asyncio.get_running_loop()
        assert self.sock
        loop.remove_reader(self.sock.fileno())
        loop.call_later(ACCEPT_PAUSE, self._resume)

    def _admit(self, conn: socket.socket) -> None:
        """Serve the connection, or close it at once with one error line when its uid is over its share."""
        try:
            pid, uid, gid = credentials(conn)
        except OSError:
            conn.close()
            return
        peer = functools.cache(functools.partial(identify, pid, uid, gid))  # its name looked up only if needed
        try:
            self.admission.take(uid, lambda: may_change(peer(), self.daemon.config.control.group))
        except TooMany as exc:
            self.refusals.count(uid, str(exc))
            try:
                conn.send(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n", socket.MSG_DONTWAIT)
            except OSError:
                pass
            conn.close()
            return
        self.daemon.tasks.spawn(self._serve(conn, peer()))

    # --- one connection -------------------------------------------------------------------------------------------

    async def _serve(self, conn: socket.socket, peer: Peer) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_REQUEST + 1)
        except OSError:
            conn.close()
            self.admission.give_back(peer.uid)
            return

        def emit(message: dict[str, Any]) -> None:
            if not writer.is_closing():  # a peer that left is simply not written to
                writer.write(json.dumps(message, default=str).encode() + b"\n")

        async def send(message: dict[str, Any]) -> None:
            emit(message)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                except TimeoutError:
                    await send({"ok": False, "error": f"no request within {READ_TIMEOUT:g}s"})
                    break
                except (ValueError, asyncio.LimitOverrunError):
                    await send({"ok": False, "error": f"request over {MAX_REQUEST} bytes"})
                    break
                if not line:
                    break
                await send(await self._answer(line, peer, emit))
        except TimeoutError:  # from send: the peer does not read what it asked for
            writer.transport.abort()
        except (ConnectionError, OSError):
            pass  # the peer went away; whatever it asked for carries on
        finally:
            await hang_up(writer)
            self.admission.give_back(peer.uid)

    async def _answer(self, line: bytes, peer: Peer, emit: Emit) -> dict[str, Any]:
        try:
            command, args = parse(line)
            group = self.daemon.config.control.group
            if command.changes(args) and not may_change(peer, group):
                raise Refused(f"user {peer.name} is not allowed to {command.action}: only root and members of "
                              f"control.group ({group or 'none set'}) may change things")
            return {"ok": True, "result": await HANDLERS[command.name](self.daemon, args, peer, emit)}
        except (BadRequest, Refused, ReleaseError, StepFailed) as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            return {"ok": False, "error": f"{exc.strerror or exc}"}
        except Exception as exc:
            self.log.exception(f"control request failed: {exc!r}", actor=peer.name)
            return {"ok": False, "error": f"internal error: {exc!r} (see the daemon's log)"}


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """Close after the answer is flushed, but within WRITE_TIMEOUT: close() alone waits for a peer that never
    reads, and holds the descriptor as long."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT)
    except (TimeoutError, OSError):
        writer.transport.abort()


def resource_limit() -> int:
    """The open files this process may hold (the soft limit, raised at start: admission.raise_file_limit)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse(line: bytes) -> tuple[Command, dict[str, Any]]:
    """A request line to its command and typed args, or BadRequest saying what is wrong with it."""
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("request is not JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("request must be a JSON object")
    name, args = request.get("cmd"), request.get("args") or {}
    if not isinstance(name, str):
        raise BadRequest('request needs "cmd" (a string)')
    if not isinstance(args, dict):
        raise BadRequest('"args" must be an object')
    if name not in COMMANDS:
        raise BadRequest(f"unknown command {name!r}")
    return COMMANDS[name], COMMANDS[name].check(args)


def bind(path: os.PathLike[str] | str, mode: int, group: str) -> socket.socket:
    """Bind the socket ourselves: replace a stale file, but never steal the socket of a live daemon."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: its daemon is gone
        except OSError as exc:
            if exc.errno != errno.ENOTSOCK:
                raise
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket") from None
        else:
            raise OSError(errno.EADDRINUSE, f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock
