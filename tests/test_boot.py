"""The restart step's wait for the app's boot (maintd/boot.py, maintd/probe.py), with real processes of real users:
who counts as the app and as whom maintd looks (the shipped unit's rights), where it connects, Puma's phased restart
and a release that never boots, and Passenger's pool when it spawns nothing, with two instances, and with a registry
that anyone may write to."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_web import CONFIG_RU, ApachePassenger, get, go_live_by_hand, rack_release

from conftest import App, Daemon, free_port, maintd_check, public_dir, wait_until
from maintd.config import load
from maintd.context import Context
from maintd.results import StepFailed
from maintd.state import Store
from maintd.tree import Tree

UNIT = Path(__file__).parent.parent / "systemd" / "maintd@.service"
SYSTEM_PYTHON = "/usr/bin/python3"  # what another user can run: the checkout's venv may sit under /root (0700)
HTTP_APP = """import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\napp\\n"); c.close()
"""
# Puma between USR2 and its re-exec: the process listens (in the new release) only once the restart command has
# signalled it (SIGUSR1 here), not before.
LISTENS_AT_RESTART = """import signal, socket
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1], flush=True)
signal.sigwait({signal.SIGUSR1}); s.listen()
while True:
    c, _ = s.accept(); c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\napp\\n"); c.close()
"""
SILENT = """import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); print(s.getsockname()[1], flush=True)
held = []
while True:
    held.append(s.accept()[0])  # accepted, never answered
"""
SLOW_BOOT_RU = """sleep 3  # a Rails app boots for seconds
release = File.read(File.expand_path("REVISION", __dir__)).strip
run ->(env) { [200, {"content-type" => "text/plain"}, ["release #{release}\\n"]] }
"""
needs_puma = pytest.mark.skipif(not shutil.which("puma"), reason="puma is missing (`make test` installs it)")
needs_passenger = pytest.mark.skipif(not os.path.exists("/usr/lib/apache2/modules/mod_passenger.so"),
                                     reason="Apache's Passenger module is missing")


class Process:
    """A real process of `user`, started with its working directory at `cwd`, running Python `code` that prints
    one line (a port) once it listens."""

    def __init__(self, user: pwd.struct_passwd, cwd: Path, code: str) -> None:
        self.proc = subprocess.Popen(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                                      SYSTEM_PYTHON, "-c", code], cwd=cwd, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        self.said = self.proc.stdout.readline().strip()

    def stop(self) -> None:
        os.killpg(self.proc.pid, 9)
        self.proc.wait(10)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def release_dir(app: App, name: str, owner: pwd.struct_passwd) -> Path:
    path = app.releases / name
    path.mkdir()
    os.chown(path, owner.pw_uid, owner.pw_gid)
    path.chmod(0o755)
    return path


def restart_step(app: App, release: str, restart: str = 'method = "command"\ncommand = ["true"]',
                 timeout: float = 10.0, before: str | None = None) -> str:
    """The restart step of a deploy of `release` (Context.restart_app), after its swap, the app's user running
    restart.command; with the default command, the app's processes are the test's own, already in `release`."""
    Tree(app.root).swap(release)
    app.write_config(hooks_user=None, extra=f"[restart]\n{restart}\nhealth_timeout = {timeout}")
    return Context.build(load(app.config), Store(app.state)).restart_app(release, before=before)


def checked(app: App, *wrap: str) -> str:
    """What `maintd check` says of a good config."""
    done = maintd_check(app, *wrap)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- who is the app, as whom maintd looks, where it connects ------------------------------------------------------


def unit_capabilities() -> str:
    """The shipped unit's CapabilityBoundingSet as setpriv's --bounding-set argument."""
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith("CapabilityBoundingSet="))
    return "-all," + ",".join("+" + cap.lower().removeprefix("cap_") for cap in line.split("=", 1)[1].split())


@pytest.mark.parametrize("proc", ["/proc as it is", "ProtectProc=invisible"])
def test_under_the_units_rights_the_apps_listener_is_found(deploy_app, deploy_user, processes, proc):
    """Reading another user's /proc/<pid>/cwd and fd takes CAP_SYS_PTRACE, which the shipped unit does not give,
    and its ProtectProc=invisible (a /proc mounted with hidepid=invisible) hides other users' processes outright:
    maintd looks as the app's user, who sees and reads its own. `maintd check` run with the unit's bounding set (and
    such a /proc, in a mount namespace of its own) names the listener of the deploy user's process, as a deploy
    under systemd finds it."""
    release_dir(deploy_app, "A", deploy_user)
    Tree(deploy_app.root).swap("A")
    app = Process(deploy_user, deploy_app.releases / "A", HTTP_APP)
    processes.append(app)
    deploy_app.write_config(hooks_user=None, extra='[restart]\nmethod = "command"\ncommand = ["true"]')
    unit = ["setpriv", "--bounding-set", unit_capabilities(), "--inh-caps=-all"]
    if proc == "ProtectProc=invisible":
        unit = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t proc -o hidepid=invisible proc /proc && exec "$@"', "-", *unit]
    said = checked(deploy_app, *unit)
    assert f"where it listens now: 127.0.0.1:{app.said} (pid {app.proc.pid}, release A)" in said, said


def test_only_the_app_users_processes_count_and_no_silent_listener_holds_up_the_wait(deploy_app, deploy_user,
                                                                                    processes):
    """Anyone may enter a release (uploads are 0755) and leave there a socket that accepts and never answers:
    `nobody`'s does not count at all. One of the app's own user that never answers (an admin port, say) is asked
    beside the others, each probe for a few seconds at most: the app, listening only once the restart command has
    signalled it (Puma once re-executed), ends the wait."""
    release_dir(deploy_app, "B", deploy_user)
    processes.append(Process(pwd.getpwnam("nobody"), deploy_app.releases / "B", SILENT))
    silent = Process(deploy_user, deploy_app.releases / "B", SILENT)
    processes.append(silent)
    app = Process(deploy_user, deploy_app.releases / "B", LISTENS_AT_RESTART)
    processes.append(app)
    try:
        said = restart_step(deploy_app, "B", f'method = "command"\ncommand = ["/bin/kill", "-USR1", "{app.proc.pid}"]',
                            timeout=4)
    except StepFailed as exc:
        pytest.fail(f"the app answered, yet the restart step failed: {exc}")
    assert f"answered 200 on 127.0.0.1:{app.said} (pid {app.proc.pid}, release B)" in said, said


class Recorder:
    """A Unix socket outside the tree that the app's user may reach, noting every connection it is sent."""

    def __init__(self, base: Path) -> None:
        self.path = base / "elsewhere.sock"
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(self.path))
        self.path.chmod(0o777)
        self.server.listen()
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.server.accept()
            with conn:
                self.received.append(conn.recv(4096))
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")


def test_a_unix_socket_is_asked_only_below_the_root_and_never_through_a_link(deploy_app, deploy_user, processes):
    """/proc/net/unix shows a socket's path as it was bound, and a name that was a socket then may be a link now:
    a socket bound as `<root>/../elsewhere` is not the app's, and one whose name became a link to a socket
    elsewhere is not asked. The probe goes nowhere the tree does not lead."""
    release = release_dir(deploy_app, "B", deploy_user)
    outside = public_dir("maintd-outside-")
    try:
        recorder = Recorder(outside)
        climbing = f"{deploy_app.root}/{os.path.relpath(outside, deploy_app.root)}/climbing.sock"
        swapped = f"{release}/swapped.sock"
        code = f"""import os, signal, socket
held = []
for path in ({climbing!r}, {swapped!r}):
    s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(); held.append(s)
    os.unlink(path); os.symlink({str(recorder.path)!r}, path)
print("ready", flush=True); signal.pause()  # until the test kills it
"""
        os.chown(outside, deploy_user.pw_uid, deploy_user.pw_gid)  # the app's user binds there
        processes.append(Process(deploy_user, release, code))
        with pytest.raises(StepFailed) as failed:
            restart_step(deploy_app, "B", timeout=2)
        assert recorder.received == [], f"maintd's probe reached {recorder.path}: {recorder.received!r}"
        assert f"no answer on {swapped} (pid" in str(failed.value) and "climbing" not in str(failed.value)
    finally:
        shutil.rmtree(outside)


def test_a_unix_socket_whose_path_has_spaces_is_asked(deploy_app, deploy_user, processes):
    release = release_dir(deploy_app, "B", deploy_user)
    path = f"{release}/my sockets/app server.sock"
    code = f"""import os, socket
os.mkdir(os.path.dirname({path!r}))
s = socket.socket(socket.AF_UNIX); s.bind({path!r}); s.listen(); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.recv(4096); c.sendall(b"HTTP/1.0 204 No Content\\r\\n\\r\\n"); c.close()
"""
    app = Process(deploy_user, release, code)
    processes.append(app)
    said = restart_step(deploy_app, "B", timeout=5)
    assert f"answered 204 on {path} (pid {app.proc.pid}, release B)" in said, said


def test_a_listener_on_another_hosts_address_is_never_the_apps(deploy_app, deploy_user, processes):
    """IP_FREEBIND needs no privilege: a process can listen on an address that is not this host's (TEST-NET here;
    an internal service's in real life), and a probe there would be a request sent wherever it chose. Only this
    host's own addresses count. (Asserted on what `maintd check` lists: nothing is sent off this host.)"""
    release_dir(deploy_app, "A", deploy_user)
    Tree(deploy_app.root).swap("A")
    app = Process(deploy_user, deploy_app.releases / "A", HTTP_APP)
    processes.append(app)
    code = """import signal, socket
s = socket.socket(); s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
s.bind(("192.0.2.1", 0)); s.listen(); print(s.getsockname()[1], flush=True); signal.pause()
"""
    processes.append(Process(deploy_user, deploy_app.releases / "A", code))
    deploy_app.write_config(hooks_user=None, extra='[restart]\nmethod = "command"\ncommand = ["true"]')
    said = checked(deploy_app)
    assert f"127.0.0.1:{app.said} (pid {app.proc.pid}, release A)" in said and "192.0.2.1" not in said, said


# --- Puma: the phased restart, and a release that never boots -----------------------------------------------------


class ClusterPuma:
    """Puma in cluster mode (two workers, no preload) as the deploy user, started in `current`; `restart` is the
    phased restart the README offers, as restart.command."""

    def __init__(self, app: App, user: pwd.struct_passwd) -> None:
        self.port, self.pidfile, self.log = free_port(), app.shared / "puma.pid", app.base / "puma.log"
        os.chown(app.shared, user.pw_uid, user.pw_gid)
        self.proc = subprocess.Popen(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                                      "puma", "--dir", str(app.current), "-w", "2", "-b",
                                      f"tcp://127.0.0.1:{self.port}", "--pidfile", str(self.pidfile),
                                      "-e", "production"],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: len(re.findall("booted", self.log.read_text())) == 2, 60, "both workers booted")
        self.restart = f'method = "command"\ncommand = ["/bin/sh", "-c", "kill -USR1 $(cat {self.pidfile})"]'

    def answer(self) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
        return answer.decode().split("\r\n\r\n", 1)[1]

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait(30)


@needs_puma
def test_a_phased_restart_is_waited_for_until_no_old_worker_holds_the_socket(deploy_app, deploy_user):
    """On USR1 Puma's master moves into the new release at once, while the workers, which answer, are the old
    ones, replaced one by one after each boot: the socket is the new release's only once no process of an older
    release holds it."""
    for name in ("A", "B"):
        release = release_dir(deploy_app, name, deploy_user)
        (release / "config.ru").write_text(SLOW_BOOT_RU)
        (release / "REVISION").write_text(f"{name}\n")
    Tree(deploy_app.root).swap("A")
    puma = ClusterPuma(deploy_app, deploy_user)
    try:
        assert puma.answer() == "release A\n"
        Tree(deploy_app.root).swap("B")
        said = restart_step(deploy_app, "B", puma.restart, timeout=60)
        assert puma.answer() == "release B\n", f"the wait ended ({said}) while an old worker still serves"
    finally:
        puma.stop()


def rack_release_with(app: App, name: str, config_ru: str) -> Path:
    """A release of the tiny Rack app (test_web) whose config.ru is `config_ru`, uploaded as it is."""
    staging = app.releases / f".incoming-{name}"
    (staging / "public").mkdir(parents=True)
    (staging / "REVISION").write_text(f"{name}\n")
    (staging / "config.ru").write_text(config_ru)
    return app.upload(staging, name)


@needs_puma
def test_a_release_that_never_boots_under_puma_goes_back_and_the_old_one_answers(deploy_app, deploy_user):
    """B's config.ru raises: in the phased restart no worker of B ever boots, the old worker keeps answering, so
    the wait never ends with B's answer; the restart step fails at restart.health_timeout, the deploy goes back,
    and release A answers."""
    go_live_by_hand(deploy_app, "A")
    puma = ClusterPuma(deploy_app, deploy_user)
    deploy_app.write_config(hooks_user=None, extra=f"[restart]\n{puma.restart}\nhealth_timeout = 8")
    daemon = Daemon(deploy_app).ready()
    try:
        rack_release_with(deploy_app, "B", 'raise "this release cannot boot"\n' + CONFIG_RU)
        done = daemon.deployed("B", timeout=90)
        assert done["result"] == "rolled_back" and deploy_app.live() == "A"
        [restart] = [e for e in daemon.steps(done["deploy_id"]) if e["step"] == "restart"]
        assert "did not answer from release B" in restart["event"], restart
        assert puma.answer() == "release A\n"
    finally:
        daemon.stop()
        puma.stop()


# --- Passenger: a pool it does not refill, two instances, a registry anyone may write to --------------------------


def passenger_restart_to_b(app: App, stack: ApachePassenger, monkeypatch: pytest.MonkeyPatch) -> str:
    """The restart step of a deploy from A to B, maintd told Passenger's registry as the README says."""
    rack_release(app, "B", marker=False)
    monkeypatch.setenv("PASSENGER_INSTANCE_REGISTRY_DIR", str(stack.registry))
    return restart_step(app, "B", 'method = "passenger"', timeout=30, before="A")


@needs_passenger
def test_passenger_starting_the_app_only_at_a_request_is_not_waited_for(deploy_app, monkeypatch):
    """With `PassengerMinInstances 0`, restart-app leaves no process and Passenger spawns one only at a request,
    which maintenance keeps away: waiting would fail every deploy. The pool says so (min_processes 0, nothing being
    spawned), and the step says it does not wait."""
    go_live_by_hand(deploy_app, "A")
    stack = ApachePassenger(deploy_app, vhost="PassengerMinInstances 0")
    try:
        wait_until(lambda: get(stack.port)[:2] == (200, "release A\n"), 60, "Passenger serving release A")
        said = passenger_restart_to_b(deploy_app, stack, monkeypatch)
        assert "only at its first request (PassengerMinInstances 0)" in said, said
        assert get(stack.port)[:2] == (200, "release B\n")
    finally:
        stack.stop()


@needs_passenger
def test_with_two_passenger_instances_each_restarts_the_app_and_each_boot_is_waited_for(deploy_app, monkeypatch):
    """Two Passengers registered (here a second Apache; Passenger Standalone beside Apache is another):
    passenger-config refuses restart-app without --instance, so maintd asks each instance by its name."""
    go_live_by_hand(deploy_app, "A")
    first = ApachePassenger(deploy_app)
    second = ApachePassenger(deploy_app, directory="apache-second", registry=first.registry)
    try:
        for port in (first.port, second.port):
            wait_until(lambda port=port: get(port)[:2] == (200, "release A\n"), 60, "Passenger serving release A")
        said = passenger_restart_to_b(deploy_app, first, monkeypatch)
        assert said.count("has booted") == 2, said
        assert [get(stack.port)[:2] for stack in (first, second)] == [(200, "release B\n")] * 2
    finally:
        second.stop()
        first.stop()


@pytest.mark.skipif(not shutil.which("passenger-config"), reason="Passenger is not installed")
def test_a_passenger_registry_anyone_may_write_to_leads_the_restart_nowhere(tmp_path, deploy_app, monkeypatch):
    """Passenger registers in $TMPDIR or /tmp by default, which anyone may write: a `passenger.*` that another user
    plants there (its properties.json a FIFO, whose open blocks) is no instance of Passenger's, and neither is one of
    root's whose properties.json is not a plain file (a FIFO, a link). The restart step reads none, and ends."""
    registry = public_dir("maintd-tmp-")  # as /tmp is
    registry.chmod(0o1777)
    monkeypatch.delenv("PASSENGER_INSTANCE_REGISTRY_DIR")
    monkeypatch.setenv("TMPDIR", str(registry))
    nobody = pwd.getpwnam("nobody")
    planted, fifo, linked = (registry / f"passenger.{name}" for name in ("planted", "fifo", "linked"))
    subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "sh", "-c",
                    f"mkdir {planted} && touch {planted}/creation_finalized && mkfifo {planted}/properties.json"],
                   check=True)
    for own in (fifo, linked):
        own.mkdir()
        (own / "creation_finalized").touch()
    os.mkfifo(fifo / "properties.json")
    (tmp_path / "properties.json").write_text('{"name": "linked"}')
    (linked / "properties.json").symlink_to(tmp_path / "properties.json")
    go_live_by_hand(deploy_app, "A")
    done: list[str] = []
    thread = threading.Thread(target=lambda: done.append(restart_step(deploy_app, "A", 'method = "passenger"')),
                              daemon=True)
    thread.start()
    thread.join(30)  # a hang guard, far above what the step takes
    hung = thread.is_alive()
    for held in (planted, fifo):
        try:
            os.close(os.open(held / "properties.json", os.O_WRONLY | os.O_NONBLOCK))  # let a reader go
        except OSError:
            pass  # nobody reads it
    thread.join(30)
    shutil.rmtree(registry)
    assert not hung, "the restart step is blocked on a FIFO in a registry anyone may write to"
    assert done and "no Passenger instance is registered" in done[0], done
