"""Command lines: `maintd run|check` for systemd and operators, `maintctl` for talking to a running daemon.

`maintctl` must answer in well under 100 ms, so this module imports only the standard library at the top; the
daemon's modules (watchdog, structlog, systemd) are imported inside `maintd run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from .config import Config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
ANSWER_TIMEOUT = 30.0  # seconds maintctl waits for a command that does not wait for a deploy


# --- maintd -------------------------------------------------------------------------------------------------------


def maintd_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maintd", description="Deploys uploaded releases, atomically.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the daemon in the foreground"), ("check", "check config and tree, then exit")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--config", required=True, help="the app's TOML file")
        command.add_argument("--log-format", choices=("journal", "json", "console"))
    args = parser.parse_args(argv)
    from . import config as config_module

    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as exc:
        print(f"maintd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "check":
        return check(config)
    return run(config, args.log_format)


def check(config: Config) -> int:
    """What `ExecStartPre` runs: problems that would stop the daemon are errors, odd trees are warnings."""
    from .tree import Tree

    problems, warnings = [], []
    tree = Tree(config.root)
    if not config.root.is_dir():
        problems.append(f"root {config.root} is not a directory")
    elif tree.current.exists() and not tree.current.is_symlink():
        problems.append(f"{tree.current} is a real directory or file; it must be a symlink into releases/")
    elif tree.current.is_symlink() and not tree.live():
        warnings.append(f"{tree.current} does not point at a release; `maintctl deploy NAME` repairs it")
    elif tree.live() and not (tree.releases / (tree.live() or "")).is_dir():
        warnings.append(f"{tree.current} points at a missing release; `maintctl deploy NAME` repairs it")
    if config.maintenance.template and not Path(config.maintenance.template).is_file():
        problems.append(f"maintenance.template {config.maintenance.template} is not a readable file")
    for line in warnings:
        print(f"maintd: warning: {line}", file=sys.stderr)
    for line in problems:
        print(f"maintd: {line}", file=sys.stderr)
    if not problems:
        print(f"{config.source}: ok (app {config.app}, live release {tree.live() or 'none'})")
    return EXIT_FAILED if problems else EXIT_OK


def run(config: Config, log_format: str | None) -> int:
    import asyncio

    from . import log
    from .control import ControlServer
    from .daemon import AlreadyRunning, Daemon
    from .notify import inherited_socket

    log.configure(log_format)
    logger = log.get(app=config.app)
    try:
        daemon = Daemon(config)
    except AlreadyRunning as exc:
        logger.error(str(exc))
        return EXIT_FAILED
    except OSError as exc:
        logger.error(f"cannot start: {exc}")
        return EXIT_FAILED
    async def control(running: Daemon) -> ControlServer:
        return await ControlServer(running).start(inherited_socket())

    try:
        asyncio.run(daemon.run([control]))
    except OSError as exc:  # the socket: another daemon listens there, or the path is not ours to take
        logger.error(f"cannot start: {exc.strerror or exc}")
        return EXIT_FAILED
    return EXIT_OK


# --- maintctl -----------------------------------------------------------------------------------------------------


class Unreachable(Exception):
    """No daemon answers on the socket."""


def maintctl_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maintctl", description="Talk to a running maintd.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", help="the app's TOML file (its control.socket is used)")
    where.add_argument("--socket", help="the control socket's path")
    parser.add_argument("--timeout", type=float, default=ANSWER_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for an answer (default {ANSWER_TIMEOUT:g}; deploys are waited for)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("status", "live release, maintenance, deploy in progress"), ("releases", "every release")):
        sub.add_parser(name, help=text).add_argument("--json", action="store_true")
    for name, text in (("deploy", "deploy NAME (default: newest complete)"),
                       ("rollback", "back to NAME (default: the previous release)")):
        command = sub.add_parser(name, help=text)
        command.add_argument("release", nargs="?", metavar="NAME")
        command.add_argument("--follow", action="store_true", help="print each step as it happens")
        command.add_argument("--wait", action="store_true", help="wait for a running deploy instead of refusing")
    maintenance = sub.add_parser("maintenance", help="operator maintenance on or off")
    switch = maintenance.add_subparsers(dest="state", required=True, metavar="on|off")
    on = switch.add_parser("on")
    on.add_argument("--reason", default="")
    on.add_argument("--until", default="", metavar="TIME")
    switch.add_parser("off")
    for name, text in (("restart", "restart the app on the live release"), ("flush", "flush memcached"),
                       ("pause", "stop automatic deploys of uploads"), ("resume", "restart automatic deploys")):
        sub.add_parser(name, help=text)
    history = sub.add_parser("history", help="past deploys and rollbacks")
    history.add_argument("-n", type=int, default=20, metavar="N")
    history.add_argument("--json", action="store_true")
    return parser


def maintctl_main(argv: Sequence[str] | None = None) -> int:
    args = maintctl_parser().parse_args(argv)
    try:
        path = socket_path(args)
    except ValueError as exc:
        print(f"maintctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, object] = {"cmd": args.command, "args": {}}
    if args.command in ("deploy", "rollback"):
        request["args"] = {"release": args.release, "follow": args.follow, "wait": args.wait}
    elif args.command == "maintenance":
        request["args"] = {"state": args.state, **({"reason": args.reason, "until": args.until}
                                                    if args.state == "on" else {})}
    elif args.command == "history":
        request["args"] = {"n": args.n}
    show = Printer(args)
    # Commands that wait for a deploy in progress may take as long as its hooks; the others answer at once.
    waits = args.command in ("deploy", "rollback", "restart", "flush") or getattr(args, "state", "") == "off"
    try:
        reply = call(path, request, on_event=show.event, timeout=None if waits else args.timeout)
    except Unreachable as exc:
        print(f"maintctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not reply.get("ok"):
        print(f"maintctl: {reply.get('error', 'failed')}", file=sys.stderr)
        return EXIT_FAILED
    show.result(reply.get("result"))
    return EXIT_OK


def socket_path(args: argparse.Namespace) -> str:
    """--socket, else the socket named by --config (or the only file in /etc/maintd), read with tomllib alone."""
    if args.socket:
        return args.socket
    config = args.config
    if not config:
        candidates = sorted(Path("/etc/maintd").glob("*.toml"))
        if len(candidates) != 1:
            raise ValueError("say which app: --config /etc/maintd/APP.toml or --socket PATH")
        config = candidates[0]
    import tomllib

    try:
        data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{config}: {exc}") from None
    control = data.get("control")
    control = control if isinstance(control, dict) else {}
    return str(control.get("socket") or f"/run/maintd/{data.get('app', '')}.sock")


def call(path: str, request: dict[str, object], on_event: Callable[[dict], None] | None = None,
         timeout: float | None = ANSWER_TIMEOUT) -> dict:
    """Send one request and read up to its final answer, handing event lines to `on_event` as they come."""
    import json
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)  # blocking: a non-blocking connect fails at once when the backlog is momentarily full
    except OSError as exc:
        sock.close()
        raise Unreachable(f"maintd is not reachable at {path}: {exc.strerror or exc}") from None
    sock.settimeout(timeout)
    try:
        with sock, sock.makefile("rb") as answers:
            sock.sendall(json.dumps(request).encode() + b"\n")
            for line in answers:
                message = json.loads(line)
                if "event" not in message:
                    return message
                if on_event:
                    on_event(message["event"])
    except TimeoutError:
        raise Unreachable(f"maintd at {path} did not answer within {timeout:g}s") from None
    raise Unreachable(f"maintd at {path} closed the connection without an answer")


class Printer:
    """How each command shows its answer: `--json` as JSON, else short aligned lines."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def event(self, event: dict) -> None:
        if getattr(self.args, "follow", False):
            print(f"  {event['step']:<16} {event['result']:<12} {_duration(event['duration_ms']):>9}  "
                  f"{event['message']}", flush=True)

    def result(self, result: Any) -> None:
        """`result` is the daemon's JSON answer, its shape set by the command."""
        import json

        command = self.args.command
        if getattr(self.args, "json", False):
            print(json.dumps(result, indent=2, default=str))
        elif command == "status":
            print(_status_text(result))
        elif command == "releases":
            print(_table(["NAME", "STATE", "SIZE", "UPLOADED", "NOTE"],
                         [[r["name"], r["state"], _size(r["size"]), _when(r["uploaded_at"]), r["reason"] or ""]
                          for r in result]))
        elif command == "history":
            print(_table(["STARTED", "KIND", "RELEASE", "RESULT", "DURATION", "ACTOR", "ERROR"],
                         [[h["started"], h["kind"], h["release"], h["result"], _duration(h["duration_ms"]),
                           h["actor"], h.get("error", "")] for h in result]))
        elif command in ("deploy", "rollback"):
            print(f"release {result['release']} is live ({result['kind']} {result['deploy_id']}, "
                  f"{_duration(result['duration_ms'])})")
        elif command == "maintenance":
            print("maintenance on: " + result["reason"] if result["on"] else "maintenance off")
        elif command in ("restart", "flush"):
            print(f"{command}: {result['message']} (release {result['release']})")
        else:
            print("automatic deploys paused" if command == "pause" else "automatic deploys resumed")


def _status_text(s: dict) -> str:
    m, deploying, last = s["maintenance"], s["deploying"], s["last_deploy"]
    if m["on"] and m["by"]:
        maintenance = f"on: {m['reason']} (by {m['by']} since {m['since']}" + (
            f", until {m['until']})" if m["until"] else ")")
    elif m["on"]:
        maintenance = "on (deploy in progress)"
    else:
        maintenance = "off" + (f" (operator maintenance set by {m['by']}, flag missing)" if m["by"] else "")
    rows = [
        ("app", s["app"]),
        ("current", s["current"] or "none (no live release)"),
        ("previous", s.get("previous") or "-"),
        ("maintenance", maintenance),
        ("paused", "yes (automatic deploys stopped)" if s["paused"] else "no"),
        ("deploying", f"{deploying['release']}: {deploying['step'] or 'starting'} ({deploying['kind']} by "
                      f"{deploying['actor']})" if deploying else "-"),
        ("last deploy", f"{last['release']} {last['result']} in {_duration(last['duration_ms'])} "
                        f"({last.get('kind', 'deploy')}, {last.get('finished', '')})"
                        + (f": {last['error']}" if last.get("error") else "") if last else "-"),
    ]
    if s.get("uploading"):
        rows.append(("uploading", ", ".join(s["uploading"])))
    return "\n".join(f"{key:<12} {value}" for key, value in rows)


def _table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _duration(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _size(size: float | None) -> str:
    if size is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB")
    step = 0
    while size >= 1024 and step < len(units) - 1:
        size, step = size / 1024, step + 1
    return f"{size:.0f} B" if step == 0 else f"{size:.1f} {units[step]}"


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    from datetime import datetime

    return datetime.fromtimestamp(epoch).isoformat(sep=" ", timespec="seconds")


if __name__ == "__main__":
    sys.exit(maintd_main())
