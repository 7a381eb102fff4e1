"""Command lines: `maintd run|check` for systemd and operators, `maintctl` for talking to a running daemon.

`maintctl` must answer in well under 100 ms, so this module imports only the standard library at the top; the
daemon's modules (watchdog, structlog, systemd) are imported inside `maintd run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .commands import COMMANDS, show_json, step_line
from .version import VersionAction

if TYPE_CHECKING:
    from .config import Config
    from .runas import RunAs
    from .tree import Tree

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
ANSWER_TIMEOUT = 30.0  # seconds maintctl waits for a command that does not wait for a deploy
CONFIG_DIR = Path("/etc/maintd")  # where the apps' files are: `maintctl` alone talks to the only one there
EXAMPLES = "example*.toml"  # files in CONFIG_DIR that configure no app
RELEASES_SHOWN = 5  # releases `maintd check` names, the newest


# --- maintd -------------------------------------------------------------------------------------------------------


def maintd_main(argv: Sequence[str] | None = None) -> int:
    args = maintd_parser().parse_args(argv)
    from . import config as config_module

    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as exc:
        print(f"maintd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "check":
        return check(config)
    return run(config, args.log_format)


MAINTD_COMMANDS = (("run", "run the daemon in the foreground"), ("check", "check config and tree, then exit"))


def maintd_parser() -> argparse.ArgumentParser:
    """maintd's command line (also what its man page and completion are generated from, see docs.py)."""
    parser = argparse.ArgumentParser(prog="maintd", description="Deploys uploaded releases, atomically.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in MAINTD_COMMANDS:
        command = sub.add_parser(name, help=text)
        command.add_argument("--config", required=True, help="the app's TOML file")
        command.add_argument("--log-format", choices=("journal", "json", "console"),
                             help="journald's fields, JSON lines or console lines (default: journal when stderr is "
                                  "the journal, console on a terminal, else json)")
    return parser


def unprivileged_port_start() -> int:
    """The lowest port a process without CAP_NET_BIND_SERVICE may listen on (1024 unless the kernel says less)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def check(config: Config) -> int:
    """What `ExecStartPre` runs: problems that would stop the daemon are errors, odd trees are warnings."""
    from . import boot
    from .config import ConfigError
    from .runas import resolve
    from .state import faults
    from .tree import Tree

    problems: list[str] = []
    warnings = list(config.warnings)  # values `run` takes, saying what it does with them
    tree = Tree(config.root)
    if not config.root.is_dir():
        problems.append(f"root {config.root} is not a directory")
    elif found := tree.current_problem():
        (problems if found[1] else warnings).append(found[0])
    warnings += faults(config.state_dir)  # `run` carries on past these
    if (textfile := config.metrics.textfile) and not Path(textfile).parent.is_dir():  # `run` logs each failed write
        warnings.append(f"metrics.textfile {textfile}: its directory does not exist (is node_exporter installed?)")
    if config.metrics.listen and (port := config.metrics.address[1]) < (lowest := unprivileged_port_start()):
        warnings.append(f"metrics.listen {config.metrics.listen}: port {port} is below {lowest}, where only "
                        "CAP_NET_BIND_SERVICE may listen, which the unit does not give maintd: under systemd it will "
                        "serve no metrics there; take a port from 1024 up, as example.toml's 9464")
    if config.maintenance.template and not Path(config.maintenance.template).is_file():
        problems.append(f"maintenance.template {config.maintenance.template} is not a readable file")
    runas: RunAs | None = None
    try:
        runas = resolve(config)
    except ConfigError as exc:
        problems.append(str(exc))
    else:
        print(who_runs(config, runas))
    if config.root.is_dir():
        print(releases_line(tree))
        warnings += [f"shared.{kind} {rel}: missing from {tree.shared}/, so every deploy fails at link_shared; "
                     "create it there"
                     for kind, paths in (("dirs", config.shared.dirs), ("files", config.shared.files))
                     for rel in tree.missing_shared(paths)]
    for line in boot.described(config, runas):
        print(line)
    if cluster := config.cluster:
        from .etcd import Etcd

        print(f"cluster: member {cluster.member} of {', '.join(cluster.members)} (primary {cluster.primary}), "
              f"keys under {cluster.prefix}; switches {cluster.described}")
        if not Etcd(cluster.etcd, timeout=1.0).answers():
            warnings.append(f"etcd does not answer at {', '.join(cluster.etcd)}: no switch can begin until it does")
    for number, hook in enumerate(config.notify.webhooks, start=1):
        print(f"notify: webhook {number} {hook.shown} ({hook.format}), timeout {config.notify.timeout:g}s")
    for line in warnings:
        print(f"maintd: warning: {line}", file=sys.stderr)
    for line in problems:
        print(f"maintd: {line}", file=sys.stderr)
    if not problems:
        print(f"{config.source}: ok (app {config.app}, live release {tree.live() or 'none'})")
    return EXIT_FAILED if problems else EXIT_OK


def who_runs(config: Config, runas: RunAs) -> str:
    """Who hooks and restart.command run as, and why that user: said even when none is configured yet, since the
    first hook an operator adds runs as this user (or is refused, where root owns releases/ and nobody said so)."""
    from .config import RestartMethod

    why = "hooks.user" if config.hooks.user else f"the owner of {config.root / 'releases'}"
    if config.hooks.before_swap or config.hooks.after_swap or config.restart.method is RestartMethod.COMMAND:
        return f"hooks and restart.command run as {runas.name} (uid {runas.uid}, {why})"
    if runas.uid == 0 and not config.hooks.user:
        return (f"hooks and restart.command: none configured; root owns {config.root / 'releases'}, so adding one "
                "needs hooks.user")
    return f"hooks and restart.command: none configured; they would run as {runas.name} (uid {runas.uid}, {why})"


def releases_line(tree: Tree) -> str:
    """The releases in releases/ (the newest few by name, as maintd orders them) and the live one."""
    from .tree import name_key

    names = sorted((name for name in tree.entries() if not tree.entry_problem(name)), key=name_key)
    shown = ", ".join(names[-RELEASES_SHOWN:]) if names else "none yet"
    more = f"{len(names)} releases, the newest: " if len(names) > RELEASES_SHOWN else ""
    return f"releases in {tree.releases}: {more}{shown}; live: {tree.live() or 'none'}"


def run(config: Config, log_format: str | None) -> int:
    import asyncio

    from . import config as config_module
    from . import log
    from .admission import raise_file_limit
    from .control import ControlServer
    from .daemon import AlreadyRunning, Daemon
    from .notify import inherited_socket

    log.configure(log_format)
    logger = log.get(app=config.app)
    raise_file_limit()  # before anything is opened: see admission.py for why, and by how much
    try:
        daemon = Daemon(config)
    except (AlreadyRunning, config_module.ConfigError) as exc:
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
    """The command line, built from the table of commands."""
    parser = argparse.ArgumentParser(
        prog="maintctl", description="Talk to a running maintd.",
        epilog=f"Without --config or --socket, the app is the only one configured in {CONFIG_DIR}: its single "
               f"*.toml file, {EXAMPLES} (the shipped examples) not counted.")
    parser.add_argument("--version", action=VersionAction)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", help=f"the app's TOML file (its control.socket is used); default: the only "
                                        f"app's file in {CONFIG_DIR}")
    where.add_argument("--socket", help="the control socket's path")
    parser.add_argument("--timeout", type=float, default=ANSWER_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for an answer (default {ANSWER_TIMEOUT:g}; deploys are waited for)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        parsers = {"": sub.add_parser(command.name, help=command.help)}
        for arg in command.args:
            if arg.choices:  # a sub-command: `maintenance on`, `maintenance off`; `cluster` alone is `cluster show`
                choice = parsers[""].add_subparsers(dest=arg.name, required=arg.default is None,
                                                    metavar="|".join(arg.choices))
                parsers.update({name: choice.add_parser(name) for name in arg.choices})
            elif arg.positional:
                parsers[arg.of].add_argument(arg.name, nargs="?", default=arg.default, metavar=arg.name.upper(),
                                             help=arg.help)
            elif arg.type is bool:
                parsers[arg.of].add_argument(f"--{arg.name}", action="store_true", help=arg.help)
            else:
                flags = [arg.short] if arg.short else [f"--{arg.name}"]
                parsers[arg.of].add_argument(*flags, dest=arg.name, type=arg.type, default=arg.default,
                                             metavar=arg.name.upper(), help=arg.help)
    return parser


def maintctl_main(argv: Sequence[str] | None = None) -> int:
    args = maintctl_parser().parse_args(argv)
    try:
        path = socket_path(args)
    except ValueError as exc:
        print(f"maintctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = COMMANDS[args.command]
    values = vars(args)
    request: dict[str, Any] = {"cmd": command.name, "args": command.wire(values)}

    def on_event(event: dict[str, Any]) -> None:
        if values.get("follow"):
            print(step_line(event), flush=True)

    try:
        # A command that waits for a deploy in progress may take as long as its hooks; the others answer at once.
        reply = call(path, request, on_event, timeout=None if command.waits(values) else args.timeout)
    except Unreachable as exc:
        print(f"maintctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not reply.get("ok"):
        print(f"maintctl: {reply.get('error', 'failed')}", file=sys.stderr)
        return EXIT_FAILED
    print((show_json if values.get("json") else command.show)(reply.get("result")))
    return EXIT_OK


def socket_path(args: argparse.Namespace) -> str:
    """--socket, else the socket named by --config (or the only app's file in CONFIG_DIR), read with tomllib alone."""
    if args.socket:
        return str(args.socket)
    config = args.config or the_only_app(CONFIG_DIR)
    import tomllib

    try:
        data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{config}: {exc}") from None
    control = data.get("control")
    control = control if isinstance(control, dict) else {}
    return str(control.get("socket") or f"/run/maintd/{data.get('app', '')}.sock")


def the_only_app(directory: Path) -> Path:
    """The one app's file in `directory`. `make install` and the package put example.toml there beside the apps'
    files, and an operator may keep a copy of it (example-old.toml): those configure no app, so they do not count."""
    apps = sorted(path for path in directory.glob("*.toml") if not path.match(EXAMPLES))
    if len(apps) == 1:
        return apps[0]
    found = f"several apps in {directory} ({', '.join(path.name for path in apps)})" if apps else \
        f"no app's file in {directory} ({EXAMPLES} not counted)"
    raise ValueError(f"{found}: say which app: --config {directory}/APP.toml or --socket PATH")


def call(path: str, request: Mapping[str, Any], on_event: Callable[[dict[str, Any]], None] | None = None,
         timeout: float | None = ANSWER_TIMEOUT) -> dict[str, Any]:
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
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed at once (too many connections of ours): why is in the line it wrote first
            for line in answers:
                message: dict[str, Any] = json.loads(line)
                if "event" not in message:
                    return message
                if on_event:
                    on_event(message["event"])
    except TimeoutError:
        raise Unreachable(f"maintd at {path} did not answer within {timeout:g}s") from None
    raise Unreachable(f"maintd at {path} closed the connection without an answer")


if __name__ == "__main__":
    sys.exit(maintd_main())
