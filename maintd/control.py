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
from dataclasses import dataclass
from typing import Any, Callable

from . import log
from .daemon import Daemon, Refused
from .pipeline import Outcome, Skipped, StepRecord, flush_cache, restart_app
from .restart import RestartError
from .tree import ReleaseError, name_key

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 10.0  # seconds a connected peer may take to send its request line
READ_ONLY = {"status", "releases", "history"}
BACKLOG = 1024  # connections waiting to be accepted: a burst of maintctl calls must not be refused


class BadRequest(Exception):
    """A request that cannot be carried out as sent; the message goes back to the peer."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    name: str

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid:{uid}"
        return cls(pid, uid, gid, name)

    def may_change(self, group: str) -> bool:
        """Root always; otherwise only a member of `control.group` (primary or supplementary)."""
        if self.uid == 0:
            return True
        if not group:
            return False
        try:
            wanted = grp.getgrnam(group)
        except KeyError:
            return False
        if self.gid == wanted.gr_gid or self.name in wanted.gr_mem:
            return True
        try:
            return wanted.gr_gid in os.getgrouplist(self.name, self.gid)
        except OSError:
            return False


Emit = Callable[[dict[str, Any]], None]  # writes one line to the peer now; flow control waits for the answer


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
            peer = Peer.of(writer.get_extra_info("socket"))
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
                except asyncio.TimeoutError:
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
            cmd, args = parse(line)
            if cmd not in READ_ONLY and not peer.may_change(self.config.control.group):
                raise Refused(f"{peer.name} may not {cmd}: only root or members of control.group "
                              f"({self.config.control.group or 'none set'}) may change things")
            handler = getattr(self, f"cmd_{cmd}", None)
            if handler is None:
                raise BadRequest(f"unknown command {cmd!r}")
            return {"ok": True, "result": await handler(args, peer, emit)}
        except (BadRequest, Refused, ReleaseError, RestartError) as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            return {"ok": False, "error": f"{exc.strerror or exc}"}
        except Exception as exc:  # noqa: BLE001 - a bug in one command must not cost the peer its answer
            self.log.exception(f"control request failed: {exc!r}", actor=peer.name)
            return {"ok": False, "error": f"internal error: {exc!r} (see the daemon's log)"}

    # --- commands -------------------------------------------------------------------------------------------------

    async def cmd_status(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        return self.daemon.status()

    async def cmd_releases(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        await self.daemon.measure()
        return self.daemon.release_rows()

    async def cmd_history(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        limit = _int(args, "n", 20)
        entries = list(self.daemon.store.history())
        return entries[-limit:] if limit > 0 else []

    async def cmd_deploy(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        running = self.daemon.current_deploy
        name = _str(args, "release")
        if args.get("follow") and running and name in ("", running.release):
            return await self._follow(emit)  # watch the deploy in progress, an upload's as much as anyone's
        return await self._deploy(name or self._newest_complete(), "deploy", args, peer, emit)

    async def cmd_rollback(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        name = _str(args, "release") or self.daemon.rollback_target()
        return await self._deploy(name, "rollback", args, peer, emit)

    async def cmd_maintenance(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        state = _str(args, "state")
        if state == "on":
            operator = self.daemon.maintenance_on(_str(args, "reason"), _str(args, "until"), peer.name)
            return {"on": True, "reason": operator.reason, "since": operator.since, "by": operator.by,
                    "until": operator.until or None}
        if state == "off":
            await self.daemon.maintenance_off(peer.name)
            return {"on": False}
        raise BadRequest('maintenance needs args.state "on" or "off"')

    async def cmd_restart(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        return await self._on_live("restart", lambda live: restart_app(self.daemon.ctx, live), peer)

    async def cmd_flush(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        return await self._on_live("flush", lambda live: flush_cache(self.daemon.ctx, self.log), peer)

    async def cmd_pause(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        self.daemon.set_paused(True, peer.name)
        return {"paused": True}

    async def cmd_resume(self, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        self.daemon.set_paused(False, peer.name)
        return {"paused": False}

    # --- helpers --------------------------------------------------------------------------------------------------

    async def _deploy(self, name: str, kind: str, args: dict[str, Any], peer: Peer, emit: Emit) -> Any:
        rows = {row["name"]: row for row in self.daemon.release_rows()}
        row = rows.get(name)
        if row is None:
            self.daemon.tree.path(name)  # a bad name says so
            raise Refused(f"no release {name!r}")
        if row["state"] in ("uploading", "refused"):
            raise Refused(f"release {name} is {row['state']}" + (f": {row['reason']}" if row["reason"] else ""))
        if kind == "rollback" and row["state"] == "incomplete":
            raise Refused(f"release {name} is incomplete (found unmarked at start-up)")
        on_step = _streamer(emit) if args.get("follow") else None
        return _reply(await self.daemon.deploy(name, peer.name, kind, wait=bool(args.get("wait")), on_step=on_step))

    async def _follow(self, emit: Emit) -> Any:
        outcome = await self.daemon.follow(_streamer(emit))
        if outcome is None:
            raise Refused("no deploy is running")
        return _reply(outcome)

    async def _on_live(self, what: str, action: Callable[[str], str], peer: Peer) -> Any:
        live = self.daemon.tree.live()
        if not live:
            raise Refused("no live release")
        async with self.daemon.deploy_lock:
            try:
                message = await asyncio.to_thread(action, live)
            except Skipped as skip:
                message = str(skip)
        self.log.info(f"{what}: {message}", step=what, release=live, actor=peer.name, result="ok")
        return {"release": live, "message": message}

    def _newest_complete(self) -> str:
        complete = [row["name"] for row in self.daemon.release_rows() if row["state"] == "complete"]
        if not complete:
            raise Refused("no complete release is waiting; name one: maintctl deploy NAME")
        return max(complete, key=name_key)


def _streamer(emit: Emit) -> Callable[[StepRecord], None]:
    """A follower that writes each step as an event line, in order, before the final answer can be."""

    def on_step(record: StepRecord) -> None:
        emit({"event": {"step": record.step, "result": record.result, "duration_ms": record.duration_ms,
                        "message": record.message}})

    return on_step


def _reply(outcome: Outcome) -> Any:
    """A deploy's outcome as the final answer: ok only if the release went live."""
    if not outcome.went_live:
        raise Refused(f"{outcome.kind} of release {outcome.release} {outcome.result}: {outcome.error}")
    return outcome.as_json()


def parse(line: bytes) -> tuple[str, dict[str, Any]]:
    """A request line to (cmd, args), or BadRequest saying what is wrong with it."""
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("request is not JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("request must be a JSON object")
    cmd, args = request.get("cmd"), request.get("args", {})
    if not isinstance(cmd, str):
        raise BadRequest('request needs "cmd" (a string)')
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest('"args" must be an object')
    return cmd, args


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"args.{key} must be a string")
    return value


def _int(args: dict[str, Any], key: str, default: int) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"args.{key} must be a whole number")
    return value


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
