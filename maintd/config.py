"""One app's configuration: the TOML file of contract §3, checked key by key.

A deploy daemon that guesses at a mistyped key deploys the wrong way, so every unknown key, wrong type or impossible
value is an error that names the key and, because TOML parsers do not report where a value stood, the line we find
it on ourselves. A few values an earlier maintd took without a word work, though not as the operator may think:
each is a warning in the same form (`Config.warnings`), so that a daemon upgraded in place starts on the config it
ran with (see `_tolerated`).
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import math
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SOCKET_PATH_MAX = 107  # bytes: sun_path holds 108, with the terminating NUL
CACHE_KEY_MAX = 250  # bytes: memcached refuses longer keys, and any with spaces or control characters


class ConfigError(Exception):
    """A configuration problem, phrased for the operator: file, line and key first."""


# The choices of contract §3, parsed once here: everything after compares members, never strings.


class MaintenanceWhen(StrEnum):
    """`maintenance.when`: which deploys put the site into maintenance."""

    ALWAYS = "always"
    NEVER = "never"
    MIGRATIONS = "migrations"  # only when the release's db/migrate differs from the live one's


class RestartMethod(StrEnum):
    """`restart.method`: how the app is made to load the new release."""

    PASSENGER = "passenger"
    COMMAND = "command"  # the argv of `restart.command`


class Strategy(StrEnum):
    """`cluster.strategy`: how the members of a cluster switch (contract §7a)."""

    TOGETHER = "together"  # every member at once, in maintenance (contract §7)
    ROLLING = "rolling"  # batch after batch, without maintenance, the others serving meanwhile
    AUTO = "auto"  # together when db/migrate differs from the live release's on any member, else rolling


class WebhookFormat(StrEnum):
    """`notify.webhooks[].format`: the body of a webhook's POST (contract §11)."""

    JSON = "json"  # the event's fields
    SLACK = "slack"  # {"text": one readable line}: Slack's incoming webhooks, and Mattermost's and Rocket.Chat's


class FlushMode(StrEnum):
    """`memcached.flush`: what happens to the cache after a swap."""

    ALL = "all"
    NAMESPACE = "namespace"  # bump `memcached.namespace_key`: only this app's cache
    NONE = "none"


@dataclass(frozen=True)
class Upload:
    marker: str = ".maintd-ready"
    require_marker: bool = False
    quiet_period: float = 5.0
    manifest: str = ".maintd-manifest"
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shared:
    files: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Maintenance:
    file: str = "tmp/maintenance.txt"
    when: MaintenanceWhen = MaintenanceWhen.ALWAYS
    keep_on_failure: bool = False
    template: str = ""


@dataclass(frozen=True)
class Restart:
    method: RestartMethod = RestartMethod.PASSENGER
    command: tuple[str, ...] = ()
    health_url: str = ""
    health_expect: str = ""
    health_timeout: float = 30.0


@dataclass(frozen=True)
class Memcached:
    servers: tuple[str, ...] = ("127.0.0.1:11211",)
    flush: FlushMode = FlushMode.ALL
    namespace_key: str = ""
    timeout: float = 2.0


@dataclass(frozen=True)
class Hooks:
    before_swap: tuple[tuple[str, ...], ...] = ()
    after_swap: tuple[tuple[str, ...], ...] = ()
    timeout: float = 600.0
    # "": the owner of <root>/releases (see runas.py), worked out where maintd runs: no value a file may say stands
    # for it, so the man page shows none (metadata `written`: how a default is written in a file, None for none)
    user: str = field(default="", metadata={"written": None})
    # (name, value) pairs, in the file's order; written in a file as a table
    env: tuple[tuple[str, str], ...] = field(default=(), metadata={"written": "{}"})


@dataclass(frozen=True)
class Control:
    socket: str = ""
    mode: str = "0666"
    group: str = ""


@dataclass(frozen=True)
class State:
    dir: str = ""


@dataclass(frozen=True)
class Webhook:
    url: str
    format: WebhookFormat = WebhookFormat.JSON

    @property
    def shown(self) -> str:
        """The URL as logs and `status` may show it (`shown_url`)."""
        return shown_url(self.url)


@dataclass(frozen=True)
class Notify:
    webhooks: tuple[Webhook, ...] = ()
    timeout: float = 5.0  # seconds per POST


def shown_url(url: str) -> str:
    """scheme://host[:port]/… and nothing more: a webhook's secret is in its path (Slack's tokens), its query or its
    user:password@, so none of them is ever logged or shown."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unreadable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}/…" if parts.scheme else "(not a URL)"


@dataclass(frozen=True)
class Metrics:
    """Contract §11: where the metrics are served (`listen`, HOST:PORT) and written (`textfile`); "" is off."""

    listen: str = ""
    textfile: str = ""

    @property
    def on(self) -> bool:
        return bool(self.listen or self.textfile)

    @property
    def address(self) -> tuple[str, int]:
        """`listen` as a socket address (the brackets of an IPv6 host dropped)."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class BatchSize:
    """`cluster.batch`: members per batch of a rolling switch, as a count or as a percentage of `members`."""

    count: int = 1
    percent: bool = False

    def of(self, members: int) -> int:
        """Members per batch in a cluster of `members`: a percentage rounds up, so every batch holds one at least."""
        return max(1, math.ceil(members * self.count / 100)) if self.percent else self.count

    def __str__(self) -> str:
        return f"{self.count}%" if self.percent else str(self.count)


@dataclass(frozen=True)
class Cluster:
    """Contract §7: this server is one `member` of `members`, which switch through etcd (§7a: how)."""

    members: tuple[str, ...]
    member: str
    etcd: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = ""
    primary: str = field(default="", metadata={"written": None})  # "": the first of members
    lease_ttl: float = 10.0
    prepare_timeout: float = 900.0
    switch_timeout: float = 300.0
    strategy: Strategy = Strategy.TOGETHER
    batch: BatchSize = field(default_factory=BatchSize)
    canary: str = ""  # "": the first of members
    batch_wait: float = 0.0

    @property
    def described(self) -> str:
        """How a switch this member begins goes, in words, for `maintd check`."""
        batches = " | ".join(", ".join(batch) for batch in self.batches)
        rolling = f"rolling, without maintenance, in batches {batches} ({self.batch_wait:g}s apart)"
        return {Strategy.TOGETHER: "together, in maintenance", Strategy.ROLLING: rolling,
                Strategy.AUTO: f"together when db/migrate differs on any member, else {rolling}"}[self.strategy]

    @property
    def how(self) -> tuple[Strategy, tuple[tuple[str, ...], ...], float]:
        """How a switch this member begins goes, for its record (`cluster.SwitchRecord`): strategy, batches, wait."""
        if self.strategy is Strategy.TOGETHER:
            return self.strategy, (), 0.0
        return self.strategy, self.batches, self.batch_wait

    @property
    def batches(self) -> tuple[tuple[str, ...], ...]:
        """A rolling switch's batches: the canary alone first, whatever `batch` says (a release that breaks breaks
        one server), then the others in `members` order, `batch` at a time."""
        canary = self.canary or self.members[0]
        rest = [m for m in self.members if m != canary]
        size = self.batch.of(len(self.members))
        return ((canary,), *(tuple(rest[at:at + size]) for at in range(0, len(rest), size)))


@dataclass(frozen=True)
class Config:
    app: str
    root: Path
    keep_releases: int = 5
    upload: Upload = field(default_factory=Upload)
    shared: Shared = field(default_factory=Shared)
    maintenance: Maintenance = field(default_factory=Maintenance)
    restart: Restart = field(default_factory=Restart)
    memcached: Memcached = field(default_factory=Memcached)
    hooks: Hooks = field(default_factory=Hooks)
    control: Control = field(default_factory=Control)
    state: State = field(default_factory=State)
    notify: Notify = field(default_factory=Notify)
    metrics: Metrics = field(default_factory=Metrics)
    cluster: Cluster | None = None  # no [cluster] table: a single server, and nothing of contract §7 applies
    source: Path | None = None
    warnings: tuple[str, ...] = ()  # "file:line: key ...", each logged at start and printed by `maintd check`

    @property
    def state_dir(self) -> Path:
        return Path(self.state.dir)

    @property
    def socket_path(self) -> Path:
        return Path(self.control.socket)

    @property
    def socket_mode(self) -> int:
        return int(self.control.mode, 8)


def changed_keys(old: Config, new: Config, keys: tuple[str, ...]) -> list[str]:
    """Which of `keys` (top-level keys or tables) differ between two configs, as dotted keys: what a reload
    names when it refuses to change something that needs a restart."""
    found = []
    for key in keys:
        before, after = getattr(old, key), getattr(new, key)
        if dataclasses.is_dataclass(before):
            found += [f"{key}.{f.name}" for f in dataclasses.fields(before)
                      if getattr(before, f.name) != getattr(after, f.name)]
        elif before != after:
            found.append(key)
    return found


# --- value checks -------------------------------------------------------------------------------------------------

Check = Callable[[Any], Any]


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_kind(value)}")
    if "\0" in value:  # no path, argument or environment can hold one: the system call would refuse it mid-deploy
        raise ValueError(f"must not hold a NUL character: {value!r}")
    return value


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_kind(value)}")
    return value


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, not {_kind(value)}")
    if not math.isfinite(value):  # TOML has nan and inf; a deadline of either never comes
        raise ValueError(f"must be a finite number, not {value}")
    if value <= 0:
        raise ValueError(f"must be greater than 0, not {value}")
    return float(value)


def _not_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, not {_kind(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number, 0 or more, not {value}")
    return float(value)


def _batch(value: Any) -> BatchSize:
    """A whole number of members, or a percentage of them written as a string ("25%")."""
    if isinstance(value, str) and (match := re.fullmatch(r"\s*(\d+)\s*%\s*", value)):
        percent = int(match.group(1))
        if 1 <= percent <= 100:
            return BatchSize(percent, percent=True)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return BatchSize(value)
    raise ValueError(f'must be a number of members (1 or more) or a percentage of them such as "25%" (1% to 100%), '
                     f"not {value!r}")


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, not {_kind(value)}")
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def _one_of(choices: type[StrEnum]) -> Check:
    def check(value: Any) -> StrEnum:
        try:
            return choices(_string(value))
        except ValueError:
            raise ValueError(f"must be one of {', '.join(repr(str(c)) for c in choices)}, not {value!r}") from None

    return check


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of strings, not {_kind(value)}")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"must be a list of strings, but holds {_kind(item)}")
        _string(item)  # and none with a NUL
    return tuple(value)


def _relative_paths(value: Any) -> tuple[str, ...]:
    paths = _strings(value)
    for path in paths:
        _relative_path(path)
    return paths


def _relative_path(value: Any) -> str:
    path = _nonempty(value)
    parts = Path(path).parts
    if path.startswith("/") or ".." in parts or not parts:  # "." is the release itself (a shared "." replaces it)
        raise ValueError(f"must be a path inside the release, not {path!r}")
    return path


def _file_path(value: Any) -> str:
    """A file inside the release: not a directory's path ("tmp/"), and not one of the files beside it (maintenance.py
    puts `maintenance.html` and `maintenance.retry-after` next to the flag: a flag of such a name would be
    overwritten by them, or overwrite them)."""
    from .maintenance import BESIDE_FLAG  # here, not at the top: maintenance.py imports this module (through tree.py)

    path = _relative_path(value)
    if path.rsplit("/", 1)[-1] in ("", "."):
        raise ValueError(f"must name a file, not a directory: {path!r}")
    if Path(path).name in BESIDE_FLAG:
        raise ValueError(f"must not be named {Path(path).name}: maintd writes {' and '.join(BESIDE_FLAG)} beside it")
    return path


def _file_name(value: Any) -> str:
    """A file at the top of the release (the marker, the manifest): a name, not a path."""
    name = _nonempty(value)
    if "/" in name or name in (".", ".."):
        raise ValueError(f"must be a file name at the top of the release, not a path: {name!r}")
    return name


def _http_url(value: Any) -> str:
    """"" (no health check), or an http(s) URL with a host: the health check speaks HTTP and nothing else."""
    url = _string(value)
    if url and not _usable_url(url):
        raise ValueError(f"must be an http:// or https:// URL with a host, such as \"http://127.0.0.1/up\", "
                         f"not {url!r}")
    return url


def _usable_url(url: str) -> bool:
    """http(s), a host the lookup takes, a port from 1 to 65535 if any, and nothing a request line cannot carry."""
    try:
        parts = urllib.parse.urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        (parts.hostname or "").encode("idna")  # what socket's lookup does first: an empty label, or one over 63
    except ValueError:  # a port that is not a number from 1 to 65535; a host IDNA refuses (UnicodeError)
        return False
    return usable and url.isascii() and not re.search(r"[\s\x00-\x1f\x7f]", url)


def _webhook_url(value: Any) -> str:
    url = _string(value)
    if not _usable_url(url):
        raise ValueError("must be an http:// or https:// URL with a host (ASCII, no spaces), not "
                         + (shown_url(url) if url else "empty"))
    return url


def _webhooks(value: Any) -> tuple[Webhook, ...]:
    """A list of { url = "https://…", format = "json" | "slack" }. A bad URL is shown as `shown_url` shows it: the
    error is logged when a reload refuses the file, and the rest of the URL may be a secret."""
    example = '[{ url = "https://hooks.example/…", format = "slack" }]'
    if not isinstance(value, list):
        raise ValueError(f"must be a list of tables such as {example}, not {_kind(value)}")
    hooks: list[Webhook] = []
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"entry {number} must be a table such as {example[1:-1]}, not {_kind(item)}")
        if unknown := [key for key in item if key not in ("url", "format")]:
            raise ValueError(f"entry {number}: {unknown[0]} is not a known key (known: url, format)")
        try:
            key = "url"
            url = _webhook_url(item.get(key, ""))
            key = "format"
            form = WebhookFormat(_one_of(WebhookFormat)(item.get(key, str(WebhookFormat.JSON))))
        except ValueError as exc:
            raise ValueError(f"entry {number}: {key} {exc}") from None
        if any(hook.url == url for hook in hooks):
            raise ValueError(f"entry {number}: url {shown_url(url)} is listed twice")
        hooks.append(Webhook(url, form))
    return tuple(hooks)


def _cache_key(value: Any) -> str:
    key = _nonempty(value)
    if len(key.encode()) > CACHE_KEY_MAX or re.search(r"[\s\x00-\x1f\x7f]", key):
        raise ValueError(f"must be a memcached key (at most {CACHE_KEY_MAX} bytes, no spaces or control "
                         f"characters), not {key!r}")
    return key


def _argv(value: Any) -> tuple[str, ...]:
    argv = _strings(value)
    if value and not argv[0]:
        raise ValueError("must name a program first")
    return argv


def _argvs(value: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of commands (each a list of strings), not {_kind(value)}")
    commands = tuple(_argv(item) for item in value)
    if any(not argv for argv in commands):
        raise ValueError("holds an empty command")
    return commands


def _environment(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a table of NAME = \"value\", not {_kind(value)}")
    for name, item in value.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"names an impossible environment variable: {name!r}")
        if not isinstance(item, str):
            raise ValueError(f"{name} must be a string, not {_kind(item)}")
        if "\0" in item:
            raise ValueError(f"{name} must not hold a NUL character: {item!r}")
    return tuple(value.items())


def _names(value: Any) -> tuple[str, ...]:
    names = _strings(value)
    if not names:
        raise ValueError("must name at least one member")
    for name in names:
        if not RELEASE_NAME.fullmatch(name):
            raise ValueError(f"must hold plain names (letters, digits, . _ -), not {name!r}")
    if len(set(names)) != len(names):
        raise ValueError("names a member twice")
    return names


def _urls(value: Any) -> tuple[str, ...]:
    urls = _strings(value)
    if not urls:
        raise ValueError("must list at least one etcd client URL")
    for url in urls:
        if not re.fullmatch(r"https?://[^/\s]+:\d+/?", url):
            raise ValueError(f"must list URLs as http://HOST:PORT, not {url!r}")
    return tuple(url.rstrip("/") for url in urls)


def _prefix(value: Any) -> str:
    text = _nonempty(value)
    if not text.startswith("/") or text.endswith("/"):
        raise ValueError(f"must start with / and not end with one, not {value!r}")
    return text


def _servers(value: Any) -> tuple[str, ...]:
    servers = _strings(value)
    for server in servers:
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must list servers as HOST:PORT, not {server!r}")
    return servers


def _listen(value: Any) -> str:
    """"" (off), or HOST:PORT with a literal address to bind: a name would be resolved at every start, to whatever
    it says that day, and a metrics endpoint bound to the wrong interface is one the whole network can read."""
    text = _string(value)
    if not text:
        return text
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
        usable = bool(sep) and port.isdigit() and 0 < int(port) < 65536 and (":" not in host or host[0] == "[")
    except ValueError:
        usable = False
    if not usable:
        raise ValueError(f'must be "" (off) or ADDRESS:PORT such as "127.0.0.1:9464" or "[::1]:9464", not {text!r}')
    return text


def _textfile(value: Any) -> str:
    """"" (off), or an absolute path ending in .prom: node_exporter's textfile collector reads no other name."""
    text = _string(value)
    if text and (not text.startswith("/") or not text.endswith(".prom") or text.endswith("/.prom")):
        raise ValueError(f'must be "" (off) or an absolute path of a file ending in .prom (node_exporter reads only '
                         f"those), not {text!r}")
    return text


def _mode(value: Any) -> str:
    text = _string(value)
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError(f"must be an octal file mode such as \"0660\", not {value!r}")
    return text


def _group(value: Any) -> str:
    text = _string(value)
    if text:
        try:
            grp.getgrnam(text)
        except KeyError:
            raise ValueError(f"names no group on this machine: {value!r}") from None
    return text


def _absolute(value: Any) -> str:
    text = _nonempty(value)
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path, not {value!r}")
    return text


def _app_name(value: Any) -> str:
    text = _nonempty(value)
    if not RELEASE_NAME.fullmatch(text):
        raise ValueError(f"must be a plain name (letters, digits, . _ -), not {value!r}")
    return text


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


SECTIONS: dict[str, tuple[type, dict[str, Check]]] = {
    "upload": (Upload, {"marker": _file_name, "require_marker": _bool, "quiet_period": _positive,
                        "manifest": _file_name, "required": _relative_paths}),
    "shared": (Shared, {"files": _relative_paths, "dirs": _relative_paths}),
    "maintenance": (Maintenance, {"file": _file_path, "when": _one_of(MaintenanceWhen), "keep_on_failure": _bool,
                                  "template": _string}),
    "restart": (Restart, {"method": _one_of(RestartMethod), "command": _argv, "health_url": _http_url,
                          "health_expect": _string, "health_timeout": _positive}),
    "memcached": (Memcached, {"servers": _servers, "flush": _one_of(FlushMode), "namespace_key": _cache_key,
                              "timeout": _positive}),
    "hooks": (Hooks, {"before_swap": _argvs, "after_swap": _argvs, "timeout": _positive, "user": _nonempty,
                      "env": _environment}),
    "control": (Control, {"socket": _absolute, "mode": _mode, "group": _group}),
    "state": (State, {"dir": _absolute}),
    "notify": (Notify, {"webhooks": _webhooks, "timeout": _positive}),
    "metrics": (Metrics, {"listen": _listen, "textfile": _textfile}),
}
OPTIONAL: dict[str, tuple[type, dict[str, Check]]] = {  # tables whose absence means something
    "cluster": (Cluster, {"members": _names, "member": _app_name, "etcd": _urls, "prefix": _prefix,
                          "primary": _app_name, "lease_ttl": _positive, "prepare_timeout": _positive,
                          "switch_timeout": _positive, "strategy": _one_of(Strategy), "batch": _batch,
                          "canary": _string, "batch_wait": _not_negative}),
}
TOP_LEVEL: dict[str, Check] = {"app": _app_name, "root": _absolute, "keep_releases": _count}
# Defaults named after the app ({app}), filled in when a file is read; the man page shows them as they stand here.
DERIVED: dict[str, dict[str, str]] = {
    "memcached": {"namespace_key": "{app}:cache-version"},
    "control": {"socket": "/run/maintd/{app}.sock"},
    "state": {"dir": "/var/lib/maintd/{app}"},
    "cluster": {"prefix": "/maintd/{app}"},
}


# --- loading ------------------------------------------------------------------------------------------------------


def load(path: str | Path) -> Config:
    """Read and check one app's config file; raises ConfigError naming the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, path)


def parse(text: str, path: Path | None = None) -> Config:
    """Check a config file's text; `path` only names it in errors and in the result."""
    where = str(path) if path else "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None

    def said(table: str | None, key: str, problem: str, line_key: str | None = None) -> str:
        """One line about a key: file and line first."""
        dotted = f"{table}.{key}" if table else key
        line = _line_of(text, table, line_key or key)
        at = f"{where}:{line}" if line else where
        return f"{at}: {dotted} {problem}"

    def fail(table: str | None, key: str, problem: str, line_key: str | None = None) -> ConfigError:
        return ConfigError(said(table, key, problem, line_key))

    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS or key in OPTIONAL:
            if not isinstance(value, dict):
                raise fail(None, key, f"must be a table ([{key}]), not {_kind(value)}")
            section_type, checks = SECTIONS.get(key) or OPTIONAL[key]
            values = {}
            for sub, sub_value in value.items():
                if sub not in checks:
                    raise fail(key, sub, f"is not a known key (known: {', '.join(checks)})")
                try:
                    values[sub] = checks[sub](sub_value)
                except ValueError as exc:
                    raise fail(key, sub, str(exc)) from None
            sections[key] = values
        elif key in TOP_LEVEL:
            try:
                top[key] = TOP_LEVEL[key](value)
            except ValueError as exc:
                raise fail(None, key, str(exc)) from None
        else:
            known = ", ".join([*TOP_LEVEL, *(f"[{s}]" for s in (*SECTIONS, *OPTIONAL))])
            raise fail(None, key, f"is not a known key (known: {known})")
    for key in ("app", "root"):
        if key not in top:
            raise ConfigError(f"{where}: {key} is required")

    app = top["app"]
    built = {}
    for name, (section_type, _checks) in SECTIONS.items():
        derived = {key: value.format(app=app) for key, value in DERIVED.get(name, {}).items()}
        built[name] = section_type(**{**derived, **sections.get(name, {})})
    _conflicts(built, sections, fail)
    warnings = _tolerated(built, said)
    cluster = _cluster(sections["cluster"], app, fail) if "cluster" in sections else None
    return Config(app=app, root=Path(top["root"]), keep_releases=top.get("keep_releases", 5), cluster=cluster,
                  source=path, warnings=tuple(warnings), **built)


def _conflicts(built: dict[str, Any], given: dict[str, dict[str, Any]], fail: Callable[..., ConfigError]) -> None:
    """Values each right on its own that cannot work together (or with a default)."""
    restart, upload, control = built["restart"], built["upload"], built["control"]
    if restart.method is RestartMethod.COMMAND and not restart.command:
        raise fail("restart", "command", 'must be set when restart.method = "command"', line_key="method")
    if upload.marker == upload.manifest:
        key, other = ("manifest", "marker") if "manifest" in given.get("upload", {}) else ("marker", "manifest")
        raise fail("upload", key, f"must differ from upload.{other} ({upload.marker!r}): one file cannot be "
                                  "both the marker and the manifest")
    if (size := len(control.socket.encode())) > SOCKET_PATH_MAX:
        raise fail("control", "socket", f"{control.socket} is too long for a Unix socket ({size} bytes, at most "
                                        f"{SOCKET_PATH_MAX})")


def _tolerated(built: dict[str, Any], said: Callable[..., str]) -> list[str]:
    """Values that maintd before issue #20 took without a word and that work, though not as the operator may think:
    one warning each, naming key and line, and what the daemon does instead. Contract §3 refuses impossible values
    only, and these are not: refusing them would stop a daemon upgraded in place on the config it ran with.

    - A relative `maintenance.template` is read from `/` (`built` is given the absolute path): `/` is the working
      directory systemd gives a service without WorkingDirectory=, the shipped unit among them, so the path names
      the file the daemon read before, and `maintd check` run by hand in any directory reads that same file. (The
      config file's directory would be the other choice, but it would name a file the running daemon never read.)
    - `restart.command` with `restart.method = "passenger"` is never run: the restart is Passenger's.
    - `memcached.servers = []` with `memcached.flush` other than "none" flushes nothing: the flush step is skipped
      (`Context.flush_cache`), and this is the one warning about it.
    """
    maintenance, restart, memcached = built["maintenance"], built["restart"], built["memcached"]
    warnings = []
    if maintenance.template and not maintenance.template.startswith("/"):
        read_as = str(Path("/", maintenance.template))
        built["maintenance"] = dataclasses.replace(maintenance, template=read_as)
        warnings.append(said("maintenance", "template", f"{maintenance.template!r} is relative: it is read as "
                                                        f"{read_as}, from / as systemd runs maintd; write it absolute"))
    if restart.method is RestartMethod.PASSENGER and restart.command:
        warnings.append(said("restart", "command", 'is never run: restart.method is "passenger", whose restart is '
                                                   'used (set method = "command" to run it, or remove it)'))
    if not memcached.servers and memcached.flush is not FlushMode.NONE:
        warnings.append(said("memcached", "servers", f'is empty, so memcached.flush = "{memcached.flush}" flushes '
                                                     'nothing: the flush step is skipped (set flush = "none")'))
    return warnings


def _cluster(values: dict[str, Any], app: str, fail: Callable[..., ConfigError]) -> Cluster:
    """[cluster]: `members` required; `member` defaults to this host's short name and must be one of them."""
    if "members" not in values:
        raise fail(None, "cluster", "needs members = [...] (every server of this app)")
    members = values["members"]
    member = values.get("member") or socket.gethostname().split(".")[0]
    if member not in members:
        said = "member" in values
        raise fail("cluster", "member" if said else "members",
                   f"{member!r} is not one of members ({', '.join(members)})"
                   + ("" if said else ": this host's name is the default member; set member"))
    primary = values.get("primary") or members[0]
    for key, name in (("primary", primary), ("canary", values.get("canary"))):
        if name and name not in members:
            raise fail("cluster", key, f"{name!r} is not one of members ({', '.join(members)})")
    cluster = Cluster(**{**values, "member": member, "primary": primary,
                         "prefix": values.get("prefix") or DERIVED["cluster"]["prefix"].format(app=app)})
    gaps = len(cluster.batches) - 1
    if cluster.strategy is not Strategy.TOGETHER and cluster.batch_wait * gaps >= cluster.switch_timeout:
        raise fail("cluster", "batch_wait", f"{cluster.batch_wait:g}s after each of the first {gaps} of {gaps + 1} "
                                            f"batches leaves no time to commit within switch_timeout "
                                            f"({cluster.switch_timeout:g}s)")
    return cluster


def located(config: Config, table: str, key: str) -> str:
    """"FILE:LINE: table.key" of a value the daemon found it cannot use (a port taken), as `parse` names a key."""
    try:
        line = _line_of(config.source.read_text(encoding="utf-8"), table, key) if config.source else None
    except (OSError, UnicodeDecodeError):
        line = None
    return f"{config.source or '<config>'}{f':{line}' if line else ''}: {table}.{key}"


def _line_of(text: str, table: str | None, key: str) -> int | None:
    """The 1-based line where `key` is assigned inside `[table]` (or before any table), if it can be found."""
    current: str | None = None
    header = re.compile(r"\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
    assign = re.compile(r"\s*(?:\"([^\"]+)\"|([A-Za-z0-9_-]+))\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if match := header.match(line):
            current = match.group(1)
            if table is None and current == key:
                return number
            continue
        if (match := assign.match(line)) and current == table and (match.group(1) or match.group(2)) == key:
            return number
    return None

