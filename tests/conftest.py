"""Fixtures that start real things: memcached, sshd, and maintd itself, each on free loopback ports, stopped by pid."""

from __future__ import annotations

import atexit
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

BIN = Path(sys.executable).parent
ETC = Path(__file__).parent.parent / "etc"  # the shipped web snippets, unit and Capistrano plugin
README = Path(__file__).parent.parent / "README.md"
Event = dict[str, Any]
# Where passenger-config looks for running Passengers: an empty directory of the tests' own, so a Passenger that this
# machine happens to run (or left stale) never answers for the tests' apps. The Passenger tests point it at theirs.
os.environ["PASSENGER_INSTANCE_REGISTRY_DIR"] = tempfile.mkdtemp(prefix="maintd-test-passenger-")
atexit.register(shutil.rmtree, os.environ["PASSENGER_INSTANCE_REGISTRY_DIR"], True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll a condition outside our control (a file, a port) until it holds; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Memcached:
    """A real memcached on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["memcached", "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-u", "root"])
        wait_until(lambda: port_open(self.port), 10, f"memcached on {self.port}")

    def client(self):
        from pymemcache.client.base import Client

        return Client(("127.0.0.1", self.port), connect_timeout=2, timeout=2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def memcached() -> Iterator[Memcached]:
    server = Memcached()
    yield server
    server.stop()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Any]:
    """A real 3-member etcd cluster on free loopback ports (tests/etcd_cluster.py), for the cluster-mode tests."""
    from etcd_cluster import EtcdCluster  # here: it imports this module

    cluster = EtcdCluster(tmp_path / "etcd")
    yield cluster
    cluster.stop_all()


@pytest.fixture
def own_memcached() -> Iterator[Memcached]:
    """A memcached this test alone may stop or freeze."""
    server = Memcached()
    yield server
    server.stop()


class Gate:
    """A hook that holds a deploy open until the test says so: tests wait on events, never on a hook's `sleep`."""

    made: ClassVar[list[Gate]] = []  # opened at the end of each test (open_every_gate), failed or not

    def __init__(self, base: Path) -> None:
        Gate.made.append(self)
        directory = base / "gate"
        directory.mkdir(mode=0o777, parents=True, exist_ok=True)
        directory.chmod(0o777)  # the hook may run as the app's user
        self.opened = directory / "open"
        self.entered = directory / "entered"

    def script(self) -> str:
        """The shell commands: say it is in, then wait for the gate to open (a wait for a file)."""
        return f"touch {self.entered}; while [ ! -e {self.opened} ]; do sleep 0.01; done; rm -f {self.entered}"

    def hook(self) -> str:
        """The hook's argv as TOML."""
        return f'["sh", "-c", "{self.script()}"]'

    def wait_entered(self, timeout: float = 30.0) -> None:
        wait_until(self.entered.exists, timeout, "a deploy held at the gate")

    def open(self) -> None:
        self.opened.touch()


class App:
    """A throw-away deploy tree with its config file."""

    def __init__(self, base: Path, memcached: str) -> None:
        self.base = base
        self.root = base / "srv"
        self.releases = self.root / "releases"
        self.current = self.root / "current"
        self.shared = self.root / "shared"
        self.state = base / "state"
        self.socket = base / "maintd.sock"
        self.config = base / "app.toml"
        self.memcached = memcached
        self.gate = Gate(base)
        for d in (self.releases, self.shared):
            d.mkdir(parents=True, exist_ok=True)
        self.write_config()

    def write_config(self, extra: str = "", quiet_period: float = 0.5, top: str = "", control: str = "",
                     upload: str = "", hooks_user: str | None = "root", memcached: str = "") -> Path:
        """The app's config; `extra` adds tables at the end. The tests' trees are root's, so hooks run as root
        only because this says `hooks.user = "root"` (pass None to leave it unsaid)."""
        if hooks_user:
            said = f'user = "{hooks_user}"\n'
            extra = extra.replace("[hooks]\n", "[hooks]\n" + said) if "[hooks]\n" in extra else \
                extra + "\n[hooks]\n" + said
        self.config.write_text(f"""
app = "shop"
root = "{self.root}"
{top}
[upload]
quiet_period = {quiet_period}
{upload}
[memcached]
servers = ["{self.memcached}"]
timeout = 0.5
{memcached}
[control]
socket = "{self.socket}"
{control}
[state]
dir = "{self.state}"
{extra}
""")
        return self.config

    def live(self) -> str | None:
        try:
            return os.readlink(self.current).removeprefix("releases/")
        except FileNotFoundError:
            return None

    def make_release(self, name: str, files: int = 3, marker: bool = True, where: Path | None = None) -> Path:
        """Write a small release straight into `releases/` (or into `where`)."""
        path = (where or self.releases) / name
        make_source(path, files, revision=name)
        if marker:
            (path / ".maintd-ready").touch()
        return path

    def upload(self, staging: Path, name: str, marker: bool = True) -> Path:
        """Finish an upload written in `staging` (under releases/) as uploaders do: the marker, the owner of
        releases/ as owner of every file, and a rename into place."""
        if marker:
            (staging / ".maintd-ready").touch()
        owner = self.releases.stat()
        subprocess.run(["chown", "-R", f"{owner.st_uid}:{owner.st_gid}", str(staging)], check=True)
        staging.rename(self.releases / name)
        return self.releases / name

    def history(self) -> list[Event]:
        try:
            return [json.loads(line) for line in (self.state / "history.jsonl").read_text().splitlines()]
        except FileNotFoundError:
            return []


def make_source(path: Path, files: int, revision: str) -> Path:
    """A release-shaped tree: public/, config.ru, REVISION, and `files` files spread over nested directories."""
    (path / "public").mkdir(parents=True, exist_ok=True)
    (path / "REVISION").write_text(revision + "\n")
    (path / "public" / "index.html").write_text(f"<h1>{revision}</h1>\n")
    (path / "config.ru").write_text(f'run ->(env) {{ [200, {{"content-type" => "text/plain"}}, ["{revision}\\n"]] }}\n')
    for i in range(files):
        sub = path / "app" / f"d{i % 25:02d}" / f"e{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.rb").write_text(f"# {revision} file {i}\n" + "x" * (i % 300))
    return path


@pytest.fixture(autouse=True)
def open_every_gate() -> Iterator[None]:
    """A hook still held at a gate when its test ends (a test that failed while it waited) would wait forever, an
    orphan of the daemon killed at the end of the test: every gate made is opened once the test is over."""
    yield
    for gate in Gate.made:
        if gate.opened.parent.is_dir():
            gate.open()
    Gate.made.clear()


@pytest.fixture
def app(tmp_path: Path, memcached: Memcached) -> App:
    return App(tmp_path, memcached.address)


class Daemon:
    """`maintd run` as a real subprocess; its JSON log lines are the events tests wait for."""

    def __init__(self, app: App, *args: str, env: dict[str, str] | None = None) -> None:
        self.app = app
        self.events: list[Event] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            [str(BIN / "maintd"), "run", "--config", str(app.config), "--log-format", "json", *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr
        for raw in self.proc.stderr:
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                event = {"event": raw.decode(errors="replace").rstrip(), "level": "raw"}
            with self.cond:
                self.events.append(event)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def watches(self, path: Path) -> bool:
        """Whether the daemon holds an inotify watch on `path` (read from /proc: what the kernel knows)."""
        inode = f"ino:{os.stat(path).st_ino:x} "
        for info in Path(f"/proc/{self.proc.pid}/fdinfo").iterdir():
            try:
                if inode in info.read_text():
                    return True
            except OSError:
                continue
        return False

    def wait_for(self, timeout: float = 30.0, since: int = 0, **fields: Any) -> Event:
        """The first event (from index `since`) whose fields match; matching values may be callables."""
        def matches(event: Event) -> bool:
            return all(v(event.get(k)) if callable(v) else event.get(k) == v for k, v in fields.items())

        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for event in self.events[since:]:
                    if matches(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    raw = [e["event"] for e in self.events if e.get("level") == "raw"]  # tracebacks
                    tail = "\n".join([*raw, *(json.dumps(e) for e in self.events[-15:])])
                    raise AssertionError(f"no event with {fields} within {timeout}s; last events:\n{tail}")
                self.cond.wait(min(remaining, 0.5))

    def mark(self) -> int:
        """An index into the events: wait_for(since=mark) sees only what came after."""
        with self.cond:
            return len(self.events)

    def deployed(self, release: str, timeout: float = 30.0, since: int = 0) -> Event:
        return self.wait_for(timeout, since, release=release, result=lambda r: r is not None,
                             event=lambda e: e.startswith("deploy of") or e.startswith("rollback of"))

    def steps(self, deploy_id: str) -> list[Event]:
        with self.cond:
            return [e for e in self.events if e.get("deploy_id") == deploy_id and "step" in e]

    def reload(self) -> Event:
        """SIGHUP, and the daemon's word that it took the new configuration."""
        mark = self.mark()
        self.proc.send_signal(signal.SIGHUP)
        return self.wait_for(since=mark, event=lambda e: e.startswith("configuration reloaded"))

    def ready(self) -> Daemon:
        self.wait_for(event=lambda e: str(e).startswith("maintd watching"))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self.reader.join(5)
        return code


@pytest.fixture
def start_daemon(app: App) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True, on: App | None = None) -> Daemon:
        """`maintd run` on the test's app (or `on` another one), stopped with SIGKILL at the end of the test."""
        daemon = Daemon(on or app, *args, env=env)
        started.append(daemon)
        return daemon.ready() if wait else daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL)


def run_deploy(app: App, name: str, extra: str = "", actor: str = "alice", kind: str = "deploy", top: str = "",
               state: Path | None = None) -> tuple[Any, list[Event], Any]:
    """One deploy in-process, the pipeline against the real tree: (outcome, its log events, its context)."""
    from structlog.testing import capture_logs

    from maintd.config import load
    from maintd.context import Context
    from maintd.pipeline import Deploy
    from maintd.state import Store

    app.write_config(extra, top=top)
    config = load(app.config)
    ctx = Context.build(config, Store(state or config.state_dir))
    with capture_logs() as events:
        outcome = Deploy(ctx, name, actor, kind).run()
    return outcome, events, ctx


def maintd_check(app: App, *wrap: str) -> subprocess.CompletedProcess:
    """`maintd check` on the app's file, as the unit's ExecStartPre runs it (under `wrap`: as another user)."""
    return subprocess.run([*wrap, str(BIN / "maintd"), "check", "--config", str(app.config)], capture_output=True,
                          text=True, timeout=60)


def maintctl(app: App, *args: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
    """The real maintctl on the app's socket; `check_rc` asserts its exit code."""
    done = subprocess.run([str(BIN / "maintctl"), "--socket", str(app.socket), *args], capture_output=True,
                          text=True, timeout=120)
    if check_rc is not None:
        assert done.returncode == check_rc, (done.stdout, done.stderr)
    return done


def maintctl_json(app: App, *args: str) -> Any:
    return json.loads(maintctl(app, *args, "--json", check_rc=0).stdout)


def rsync(src: Path, dest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rsync", "-a", *args, f"{src}/", f"{dest}/"], check=True, capture_output=True)


def public_dir(prefix: str) -> Path:
    """A temporary directory other users can enter: pytest's own live under /tmp/pytest-of-root, mode 0700."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


_PUBLIC_MAINTCTL: list[str] = []


def public_maintctl() -> list[str]:
    """maintctl as another user can run it: the checkout may live in a directory only root can enter (/root is
    0700 on Debian), so the package is copied to a world-readable directory and run by the system's Python, which
    maintctl's standard-library-only imports allow."""
    if not _PUBLIC_MAINTCTL:
        public = public_dir("maintd-maintctl-")
        shutil.copytree(Path(__file__).parent.parent / "maintd", public / "maintd",
                        ignore=shutil.ignore_patterns("__pycache__"))
        atexit.register(shutil.rmtree, public, True)
        code = f"import sys; sys.path.insert(0, {str(public)!r}); from maintd.cli import maintctl_main; " \
               "sys.exit(maintctl_main())"
        _PUBLIC_MAINTCTL.extend([os.path.realpath(sys.executable), "-c", code])
    return _PUBLIC_MAINTCTL


# One name per checkout that runs its tests at once with another (two worktrees): the fixture creates and removes it.
DEPLOY_USER = os.environ.get("MAINTD_TEST_DEPLOY_USER", "maintd-deploy")


@pytest.fixture(scope="session")
def deploy_user() -> Iterator[pwd.struct_passwd]:
    """The person who uploads releases, as a real user with a home of its own; removed again afterwards."""
    home = public_dir("maintd-home-")
    try:
        pwd.getpwnam(DEPLOY_USER)
        subprocess.run(["usermod", "--home", str(home), DEPLOY_USER], check=True)  # left by a killed run
    except KeyError:
        # "*": no password, yet not locked ("!"), which sshd refuses even a key for: it logs in over ssh as real
        # deploy users do (Capistrano)
        subprocess.run(["useradd", "--system", "--home-dir", str(home), "--no-create-home", "--shell", "/bin/bash",
                        "--password", "*", DEPLOY_USER], check=True)
    entry = pwd.getpwnam(DEPLOY_USER)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    yield entry
    subprocess.run(["userdel", DEPLOY_USER], check=True)
    shutil.rmtree(home, ignore_errors=True)


def deploy_owned_app(memcached: Memcached, user: pwd.struct_passwd) -> App:
    """An app whose tree `user` owns, in a directory it can reach; maintd itself runs as root."""
    app = App(public_dir("maintd-app-"), memcached.address)
    for path in (app.root, app.releases, app.shared):
        os.chown(path, user.pw_uid, user.pw_gid)
    return app


@pytest.fixture
def deploy_app(memcached: Memcached, deploy_user: pwd.struct_passwd) -> Iterator[App]:
    app = deploy_owned_app(memcached, deploy_user)
    yield app
    shutil.rmtree(app.base, ignore_errors=True)


def have(program: str) -> bool:
    return shutil.which(program) is not None


class Sshd:
    """A real OpenSSH server on a loopback port with a throw-away host key and one authorised client key, for any
    user: `base` must be readable by the users who log in (sshd reads their authorized_keys with their rights).
    ECDSA keys: Ruby's net-ssh (Capistrano) reads them without the optional ed25519 gems."""

    def __init__(self, base: Path, wrap: tuple[str, ...] = ()) -> None:
        """`wrap`: what sshd is started through (a mount namespace of its own, say)."""
        base.mkdir(exist_ok=True)
        self.port = free_port()
        self.key = base / "client"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(base / "host")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-m", "PEM", "-N", "", "-f", str(self.key)], check=True)
        (base / "authorized_keys").write_text((base / "client.pub").read_text())
        (base / "sshd_config").write_text(f"""
Port {self.port}
ListenAddress 127.0.0.1
HostKey {base}/host
PidFile {base}/sshd.pid
AuthorizedKeysFile {base}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
""")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.proc = subprocess.Popen([*wrap, "/usr/sbin/sshd", "-D", "-e", "-f", str(base / "sshd_config")],
                                     stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 10, "sshd")
        self.ssh = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                    "-o", "LogLevel=ERROR", "-i", str(self.key)]

    def scp(self, *args: str, wait: bool = True):
        cmd = ["scp", "-q", "-P", str(self.port), *self.ssh, *args]
        if wait:
            return subprocess.run(cmd, check=True, capture_output=True)
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def run(self, command: str) -> None:
        subprocess.run(["ssh", "-p", str(self.port), *self.ssh, "root@127.0.0.1", command], check=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


JOURNALD_PATHS = (Path("/run/systemd/journal"), Path("/run/log/journal"))  # its sockets, its volatile journal
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


def journald_listens() -> bool:
    """Whether a journald answers on its socket: a stopped one's socket file may still be there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(str(JOURNAL_SOCKET))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def journald():
    """A real systemd-journald, started by hand (PID 1 here is not systemd) unless one already listens.

    journald does not remove its sockets when it stops (systemd owns them where it runs): left behind, they make
    every later program on the machine believe journald runs, and lose what it logs there. So what it creates is
    removed again, and the teardown fails if anything of it is left."""
    if journald_listens():
        yield None
        return
    binary = Path("/lib/systemd/systemd-journald")
    if not binary.exists():
        pytest.skip("systemd-journald is not installed")
    before = _paths_under(JOURNALD_PATHS)
    proc = subprocess.Popen([str(binary)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(journald_listens, 10, "journald's socket")
    yield proc
    proc.terminate()
    proc.wait(10)
    for path in sorted(_paths_under(JOURNALD_PATHS) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    assert _paths_under(JOURNALD_PATHS) == before, "journald left files behind"


def _paths_under(roots: tuple[Path, ...]) -> set[Path]:
    found = set()
    for root in roots:
        if root.exists():
            found.add(root)
            found.update(root.rglob("*"))
    return found


def readme_block(language: str, first_line: str) -> str:
    """The README's fenced `language` block whose first line is `first_line`, as an operator copies it (a block in
    a list item is indented: the indentation is not part of it)."""
    import textwrap

    blocks = README.read_text().split(f"```{language}\n")[1:]
    return next(text for text in (textwrap.dedent(block.split("```")[0]) for block in blocks)
                if text.startswith(first_line))
