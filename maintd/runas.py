"""Who runs what an upload brings: hooks and `restart.command` run as `hooks.user`, never as root by default.

A hook such as `bin/rails db:migrate` is code from the uploaded release. Run by a root daemon it would give anyone
who can upload a release the machine. So the default is the owner of `<root>/releases/` (the directory uploads
are written into, i.e. the uploader), with that user's groups, home and shell, and nothing of the daemon's
environment (its sd_notify socket, its listening socket) but what `hooks.env` adds. A config that would run them as
root without saying so is refused; `hooks.user = "root"` says so.

The drop happens in the child between fork and exec (`subprocess`'s user/group/extra_groups), so the daemon keeps
CAP_SETUID and CAP_SETGID and the child keeps no capability at all: a uid change away from 0 clears them, and
NoNewPrivileges keeps setuid programs from giving them back.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, RestartMethod

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str
    env: tuple[tuple[str, str], ...] = ()  # hooks.env

    @classmethod
    def of(cls, entry: pwd.struct_passwd, env: tuple[tuple[str, str], ...] = ()) -> RunAs:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir, entry.pw_shell or "/bin/sh", env)

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """A login-like environment for the user, then `hooks.env`, then maintd's own MAINTD_* variables."""
        base = {"PATH": DEFAULT_PATH, "HOME": self.home, "USER": self.name, "LOGNAME": self.name,
                "SHELL": self.shell, "LANG": os.environ.get("LANG", "C.UTF-8")}
        return {**base, **dict(self.env), **extra}

    def popen_args(self) -> dict[str, Any]:
        """What subprocess needs to start a child as this user; nothing when the daemon already is the user."""
        if os.geteuid() == self.uid and os.getegid() == self.gid:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


def resolve(config: Config) -> RunAs:
    """The user that hooks and `restart.command` run as, or ConfigError naming `hooks.user` and why."""
    hooks, where = config.hooks, config.source or "<config>"
    runs_something = bool(hooks.before_swap or hooks.after_swap or config.restart.method is RestartMethod.COMMAND)
    if hooks.user:
        try:
            entry = pwd.getpwnam(hooks.user)
        except KeyError:
            raise ConfigError(f"{where}: hooks.user names no user on this machine: {hooks.user!r}") from None
    else:
        owner = _owner(config.root)
        try:
            entry = pwd.getpwuid(owner)
        except KeyError:
            raise ConfigError(f"{where}: hooks.user is not set and {config.root / 'releases'} belongs to uid "
                              f"{owner}, which has no name on this machine; set hooks.user") from None
        if entry.pw_uid == 0 and runs_something:
            raise ConfigError(
                f"{where}: hooks.user is not set and root owns {config.root / 'releases'}: hooks and "
                "restart.command would run as root. Make the uploader own releases/ (chown deploy: it), set "
                'hooks.user = "deploy", or write hooks.user = "root" to run them as root knowingly')
    if runs_something and os.geteuid() not in (0, entry.pw_uid):
        raise ConfigError(f"{where}: hooks.user is {entry.pw_name}, but maintd runs as "
                          f"{pwd.getpwuid(os.geteuid()).pw_name} and can only run them as itself")
    return RunAs.of(entry, hooks.env)


def _owner(root: Path) -> int:
    """The owner of `releases/`, or of the root before releases/ exists (maintd creates it for that user)."""
    for path in (root / "releases", root):
        try:
            return os.stat(path).st_uid
        except FileNotFoundError:
            continue
    return os.geteuid()
