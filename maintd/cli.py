"""Command lines: `maintd run|check` for systemd and operators, `maintctl` for talking to a running daemon.

`maintctl` must answer in well under 100 ms, so this module imports only the standard library at the top; the
daemon's modules (watchdog, structlog, systemd) are imported inside `maintd run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .config import Config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


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
    from .daemon import AlreadyRunning, Daemon

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
    asyncio.run(daemon.run())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(maintd_main())
