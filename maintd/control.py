"""The control socket (contract §5): newline-delimited JSON over a Unix stream socket, peers known by SO_PEERCRED.

A request is one line, `{"cmd": ..., "args": {...}}`; the answer is zero or more `{"event": ...}` lines, then one
`{"ok": true, "result": ...}` or `{"ok": false, "error": ...}`. Anything a peer sends — too long, not JSON, wrong
types, nothing at all — costs it an error line or the connection, never the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import json
import os
import pwd
import socket
import struct
from typing import TYPE_CHECKING, Any

from . import log
from .commands import COMMANDS, BadRequest, Command
from .handlers import HANDLERS, Emit, Peer
from .results import Refused, StepFailed
from .tree import ReleaseError

if TYPE_CHECKING:
    from .daemon import Daemon

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 10.0  # seconds a connected peer may take to send its request line
BACKLOG = 1024  # connections waiting to be accepted: a burst of maintctl calls must not be refused


def identify(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid:{uid}"
    return Peer(pid, uid, gid, name)


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
        self.server: asyncio.AbstractServer | None = None
        self.bound = False

    async def start(self, inherited: socket.socket | None = None) -> ControlServer:
        """Serve the socket systemd passed us, or bind our own (and remove it again on close)."""
        self.bound = inherited is None
        sock = inherited or bind(self.config.socket_path, self.config.socket_mode, self.config.control.group)
        self.server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST + 1, backlog=BACKLOG)
        return self

    def close(self) -> None:
        if self.server:
            self.server.close()
        if self.bound:
            try:
                os.unlink(self.config.socket_path)
            except FileNotFoundError:
                pass

    # --- one connection -------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = identify(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return

        def emit(message: dict[str, Any]) -> None:
            if not writer.is_closing():  # a peer that left is simply not written to
                writer.write(json.dumps(message, default=str).encode() + b"\n")

        async def send(message: dict[str, Any]) -> None:
            emit(message)
            await writer.drain()

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
        except (ConnectionError, OSError):
            pass  # the peer went away; whatever it asked for carries on
        finally:
            writer.close()

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
