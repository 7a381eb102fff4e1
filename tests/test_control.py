"""maintctl and the control socket, end to end: the real CLI, the real socket, a real daemon, real users."""

import errno
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import BIN, free_port, maintctl_json, public_dir, public_maintctl, wait_until
from conftest import maintctl as root_maintctl
from maintd.commands import COMMANDS

PROBE_USER, OPERATOR_USER, OPS_GROUP = "maintd-probe", "maintd-operator", "maintd-ops"


def maintctl(app, *args, user=None, check_rc=None):
    """As root (conftest's), or as `user` through setpriv."""
    if not user:
        return root_maintctl(app, *args, check_rc=check_rc)
    entry = pwd.getpwnam(user)
    done = subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
                           *public_maintctl(), "--socket", str(app.socket), *args],
                          capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert done.returncode == check_rc, (done.stdout, done.stderr)
    return done


def raw(app, payload: bytes):
    """Send raw bytes; return every line the daemon answered (parsed), or [] when it only closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(app.socket))
        sock.settimeout(30)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def live(app, start_daemon):
    """A daemon with release r1 live."""
    app.make_release("r1")
    daemon = start_daemon()
    daemon.deployed("r1")
    return daemon


def test_status_json_has_the_contract_fields(app, live):
    status = maintctl_json(app, "status")
    assert status["app"] == "shop" and status["current"] == "r1"
    assert status["maintenance"] == {**status["maintenance"], "on": False, "reason": None, "since": None, "by": None}
    assert status["paused"] is False and status["deploying"] is None
    assert {"release", "result", "duration_ms"} <= status["last_deploy"].keys()
    assert status["last_deploy"]["release"] == "r1" and status["last_deploy"]["result"] == "ok"
    text = maintctl(app, "status", check_rc=0).stdout
    assert "current      r1" in text


def test_releases_lists_every_release_with_its_state(app, live):
    app.make_release("r2", marker=False)
    (app.releases / "r2" / ".maintd-manifest").write_text("nonsense\n")
    live.wait_for(release="r2", result="refused")
    rows = {r["name"]: r for r in maintctl_json(app, "releases")}
    assert rows["r1"]["state"] == "live" and rows["r1"]["size"] > 0 and rows["r1"]["uploaded_at"]
    assert rows["r2"]["state"] == "refused" and "manifest" in rows["r2"]["reason"]
    assert "r2    refused" in maintctl(app, "releases", check_rc=0).stdout


def test_deploy_follow_prints_every_step_in_order_and_rollback_goes_back(app, live):
    maintctl(app, "pause", check_rc=0)
    app.make_release("r2")
    live.wait_for(release="r2", event=lambda e: e.startswith("upload of release r2 is complete"))
    done = maintctl(app, "deploy", "--follow", check_rc=0)  # default: newest complete
    steps = [line.split()[0] for line in done.stdout.splitlines()[:-1]]
    assert steps == ["validate", "link_shared", "maintenance_on", "hooks_before", "swap", "restart", "flush",
                     "health", "hooks_after", "maintenance_off", "cleanup"]
    assert done.stdout.splitlines()[-1].startswith("release r2 is live")
    assert app.live() == "r2"
    assert live.steps(live.deployed("r2")["deploy_id"])[0]["actor"] == "root"
    maintctl(app, "rollback", check_rc=0)
    assert app.live() == "r1"
    history = maintctl_json(app, "history", "-n", "2")
    assert [(h["kind"], h["release"]) for h in history] == [("deploy", "r2"), ("rollback", "r1")]
    assert "rolled back to release r1" in (app.root / "revisions.log").read_text()


def test_deploy_refusals_exit_1_with_the_reason(app, live):
    for name, reason in (("nope", "no release 'nope'"), ("../etc", "bad release name")):
        done = maintctl(app, "deploy", name, check_rc=1)
        assert reason in done.stderr
    done = maintctl(app, "deploy", check_rc=1)
    assert "no complete release" in done.stderr


def test_failed_deploy_exits_1_and_rollback_skips_bad_releases(app, live):
    app.write_config('[hooks]\nafter_swap = [["sh", "-c", "test \\"$MAINTD_RELEASE\\" != r2"]]\n')
    live.stop()
    from conftest import Daemon

    daemon = Daemon(app).ready()
    try:
        app.make_release("r2")
        assert daemon.deployed("r2")["result"] == "rolled_back"
        app.make_release("r3")
        daemon.deployed("r3")
        assert app.live() == "r3"
        done = maintctl(app, "rollback", check_rc=0)  # r2 is bad: back to r1
        assert "release r1 is live" in done.stdout
        done = maintctl(app, "deploy", "r2", check_rc=1)  # an operator may try a bad one; it fails again
        assert "rolled_back" in done.stderr and "hooks_after" in done.stderr
    finally:
        daemon.stop()


def test_a_bad_release_an_operator_took_live_is_where_rollback_goes_as_releases_says(app, start_daemon):
    """r2 failed once through its own fault (its before-swap hook): bad. Once its cause was fixed an operator took it
    live (`maintctl deploy r2`, contract §2), then r3 went live. `releases` calls r2 `previous`, where `rollback`
    goes; rollback used to skip it as bad and take r1 live, two releases back, across r2's migrations: nothing
    cleared the mark on the live path, while a state rebuilt from the history (rebuild.py) had it cleared."""
    fail = app.base / "fail-r2"
    app.write_config(f'[hooks]\nbefore_swap = [["sh", "-c", "test ! -e {fail}"]]\n')
    app.make_release("r1")
    daemon = start_daemon()
    assert daemon.deployed("r1")["result"] == "ok"
    fail.touch()
    mark = daemon.mark()
    app.make_release("r2")
    assert daemon.deployed("r2", since=mark)["result"] == "failed"
    assert {row["name"]: row["state"] for row in maintctl_json(app, "releases")}["r2"] == "bad"
    fail.unlink()
    maintctl(app, "deploy", "r2", check_rc=0)
    mark = daemon.mark()
    app.make_release("r3")
    assert daemon.deployed("r3", since=mark)["result"] == "ok"
    rows = {row["name"]: row for row in maintctl_json(app, "releases")}
    assert rows["r2"]["state"] == "previous", rows["r2"]
    assert not json.loads((app.state / "state.json").read_text())["releases"]["r2"]["bad"]
    maintctl(app, "rollback", check_rc=0)
    assert app.live() == "r2", f"`releases` said r2 is previous; rollback took {app.live()} live"


def test_one_deploy_at_a_time(app, start_daemon):
    app.write_config(f'[hooks]\nbefore_swap = [{app.gate.hook()}]\n')
    app.make_release("r1")
    daemon = start_daemon()
    app.gate.wait_entered()
    maintctl(app, "pause", check_rc=0)  # r2 waits for an operator, not for r1's deploy to end
    app.make_release("r2")
    daemon.wait_for(release="r2", event=lambda e: e.startswith("upload of release r2 is complete"))
    busy = maintctl(app, "deploy", "r2", check_rc=1)
    assert "a deploy of release r1 is running" in busy.stderr
    mark = daemon.mark()
    waiting = subprocess.Popen([str(BIN / "maintctl"), "--socket", str(app.socket), "deploy", "r2", "--wait"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    daemon.wait_for(since=mark, release="r2", event="deploy of release r2 waits for a deploy of release r1 to end")
    assert app.gate.entered.exists() and waiting.poll() is None  # queued behind r1, which is still held
    app.gate.open()
    assert waiting.wait(60) == 0, waiting.stderr.read()
    assert app.live() == "r2"
    assert [e["release"] for e in daemon.events if e.get("step") == "swap"] == ["r1", "r2"]


def test_an_upload_completed_while_a_single_step_held_the_lock_goes_live_after_it(app, start_daemon):
    """`maintctl restart` (likewise flush, maintenance off) holds the deploy lock; an upload whose marker comes
    meanwhile must go live when it lets go, not wait for some later event."""
    app.write_config(f'[restart]\nmethod = "command"\ncommand = {app.gate.hook()}\n')
    app.make_release("r1")
    daemon = start_daemon()
    app.gate.open()
    daemon.deployed("r1")
    app.gate.opened.unlink()
    restart = subprocess.Popen([str(BIN / "maintctl"), "--socket", str(app.socket), "restart"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    app.gate.wait_entered()
    app.make_release("r2")
    daemon.wait_for(release="r2", event=lambda e: e.startswith("upload of release r2 is complete"))
    app.gate.open()
    assert restart.wait(60) == 0, restart.stderr.read()
    assert daemon.deployed("r2", timeout=20)["result"] == "ok"
    assert app.live() == "r2"


def test_operator_maintenance_survives_a_deploy(app, live):
    done = maintctl(app, "maintenance", "on", "--reason", "db upgrade", "--until", "22:00", check_rc=0)
    assert "db upgrade" in done.stdout
    status = maintctl_json(app, "status")
    assert status["maintenance"]["on"] and status["maintenance"]["by"] == "root"
    assert status["maintenance"]["reason"] == "db upgrade" and status["maintenance"]["since"]
    app.make_release("r2")
    assert live.deployed("r2")["result"] == "ok"
    assert (app.current / "tmp" / "maintenance.txt").exists()
    assert "22:00" in (app.current / "tmp" / "maintenance.html").read_text()
    maintctl(app, "maintenance", "off", check_rc=0)
    assert not (app.current / "tmp" / "maintenance.txt").exists()
    assert maintctl_json(app, "status")["maintenance"]["on"] is False


def test_operator_maintenance_turned_on_after_the_swap_holds_when_the_deploy_goes_back(app, start_daemon):
    """r2 needs no maintenance of its own (`when = "migrations"`, and no migrations): the operator turns it on while
    r2's restart runs, after its swap, when `current` points at r2 alone. r2 then fails its health check and
    `current` goes back to r1: the operator's flag goes with it, so the site stays in maintenance on whatever
    `current` points to until `maintenance off`, which leaves no flag behind in any release."""
    restart = f'[maintenance]\nwhen = "migrations"\n[restart]\nmethod = "command"\ncommand = {app.gate.hook()}\n'
    app.write_config(restart)
    app.make_release("r1")
    app.gate.open()
    daemon = start_daemon()
    assert daemon.deployed("r1")["result"] == "ok"
    app.gate.opened.unlink()
    app.write_config(restart + f'health_url = "http://127.0.0.1:{free_port()}/"\nhealth_timeout = 0.3\n')
    daemon.reload()
    mark = daemon.mark()
    app.make_release("r2")
    app.gate.wait_entered()  # r2's restart, after its swap
    assert app.live() == "r2"
    maintctl(app, "maintenance", "on", "--reason", "db upgrade", check_rc=0)
    app.gate.open()
    outcome = daemon.deployed("r2", since=mark)
    assert outcome["result"] == "rolled_back" and app.live() == "r1"
    steps = {e["step"]: e["result"] for e in daemon.steps(outcome["deploy_id"])}
    assert steps["maintenance_on"] == "skipped" and steps["health"] == "failed"
    flag = app.current / "tmp" / "maintenance.txt"
    assert flag.exists(), "the operator's maintenance is on, but r1, where `current` went back to, has no flag"
    assert "db upgrade" in flag.read_text()
    status = maintctl_json(app, "status")["maintenance"]
    assert status["on"] and status["reason"] == "db upgrade"
    maintctl(app, "maintenance", "off", check_rc=0)
    assert sorted(app.releases.glob("*/tmp/maintenance.txt")) == []


def test_a_deploy_that_fails_before_its_swap_under_an_operators_maintenance_leaves_no_flag(app, start_daemon):
    """r2's deploy raised its own flag in r1 and r2; the operator turned maintenance on while r2's before-swap hook
    ran; the hook failed. The operator's maintenance stays on where `current` points, r1; r2's flag, where nobody
    serves it, used to stay too, after `maintenance off` as well: served as a 503 with no maintenance recorded the
    day r2 goes live (`maintctl deploy r2` once its cause is fixed, needing no maintenance of its own)."""
    app.write_config(f'[hooks]\nbefore_swap = [{app.gate.hook()}, '
                     '["sh", "-c", "test \\"$MAINTD_RELEASE\\" != r2"]]\n')
    app.make_release("r1")
    app.gate.open()
    daemon = start_daemon()
    assert daemon.deployed("r1")["result"] == "ok"
    app.gate.opened.unlink()
    mark = daemon.mark()
    app.make_release("r2")
    app.gate.wait_entered()
    assert (app.releases / "r2" / "tmp" / "maintenance.txt").exists(), "r2's deploy raised its own flag"
    maintctl(app, "maintenance", "on", "--reason", "db upgrade", check_rc=0)
    app.gate.open()
    assert daemon.deployed("r2", since=mark)["result"] == "failed"
    assert app.live() == "r1" and "db upgrade" in (app.current / "tmp" / "maintenance.txt").read_text()
    assert not (app.releases / "r2" / "tmp" / "maintenance.txt").exists()
    maintctl(app, "maintenance", "off", check_rc=0)
    assert sorted(app.releases.glob("*/tmp/maintenance.txt")) == []


def test_pause_survives_a_restart_and_resume_deploys_what_waited(app, live):
    maintctl(app, "pause", check_rc=0)
    live.stop()
    from conftest import Daemon

    daemon = Daemon(app).ready()
    try:
        app.make_release("r2")
        daemon.wait_for(release="r2", event=lambda e: e.startswith("upload of release r2 is complete"))
        assert maintctl_json(app, "status")["paused"] is True
        assert {r["name"]: r["state"] for r in maintctl_json(app, "releases")}["r2"] == "complete"
        assert app.live() == "r1"
        maintctl(app, "resume", check_rc=0)
        assert daemon.deployed("r2")["result"] == "ok"
    finally:
        daemon.stop()


def test_restart_and_flush_run_on_the_live_release(app, live, memcached):
    client = memcached.client()
    client.set("k", b"v", noreply=False)
    restart_file = app.releases / "r1" / "tmp" / "restart.txt"
    before = restart_file.stat().st_mtime_ns
    assert "touched tmp/restart.txt" in maintctl(app, "restart", check_rc=0).stdout
    assert restart_file.stat().st_mtime_ns > before
    assert "flushed 1 of 1" in maintctl(app, "flush", check_rc=0).stdout
    assert client.get("k") is None


def test_usage_errors_exit_2_and_a_missing_daemon_exits_3(app, tmp_path):
    assert maintctl(app, "bogus").returncode == 2
    assert maintctl(app, "deploy", "--nope").returncode == 2
    done = subprocess.run([str(BIN / "maintctl"), "--socket", str(tmp_path / "none.sock"), "status"],
                          capture_output=True, text=True)
    assert done.returncode == 3 and "not reachable" in done.stderr


def test_a_daemon_that_does_not_answer_exits_3_and_is_fine_once_it_does(app, live):
    os.kill(live.proc.pid, signal.SIGSTOP)  # the socket accepts (the kernel queues the connection); nobody reads
    try:
        done = maintctl(app, "--timeout", "0.5", "status", check_rc=3)
        assert "did not answer within 0.5s" in done.stderr
    finally:
        os.kill(live.proc.pid, signal.SIGCONT)
    assert maintctl_json(app, "status")["current"] == "r1"


def test_maintctl_imports_none_of_the_daemons_heavy_modules():
    code = ("import sys, maintd.cli; from maintd.cli import maintctl_parser; maintctl_parser();"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'watchdog', 'structlog', 'systemd',"
            " 'pymemcache', 'asyncio'}))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


# --- the socket itself ------------------------------------------------------------------------------------------


def test_bad_requests_get_errors_and_the_daemon_carries_on(app, live):
    assert raw(app, b"not json\n") == [{"ok": False, "error": "request is not JSON"}]
    assert raw(app, b'{"cmd": "launch"}\n') == [{"ok": False, "error": "unknown command 'launch'"}]
    assert raw(app, b'[1, 2]\n')[0]["ok"] is False
    assert raw(app, b'{"cmd": "history", "args": {"n": "all"}}\n')[0]["error"] == "args.n must be a whole number"
    huge = raw(app, b'{"cmd": "status", "pad": "' + b"x" * 70000 + b'"}\n')
    assert huge == [{"ok": False, "error": "request over 65536 bytes"}]
    assert raw(app, b'{"cmd": "status"}\n{"cmd": "status"}\n')[1]["result"]["current"] == "r1"
    assert maintctl_json(app, "status")["current"] == "r1"


def test_a_silent_client_is_dropped_and_others_are_served_meanwhile(app, live):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(app.socket))
    silent.sendall(b'{"cmd": "sta')  # and never a newline
    assert maintctl_json(app, "status")["current"] == "r1"
    silent.settimeout(30)
    answer = silent.recv(4096)
    assert b"no request within" in answer
    assert silent.recv(4096) == b""  # then dropped
    silent.close()


def test_others_are_served_while_the_history_is_being_read(app, live):
    """The history is read whole, off the event loop: a read that takes its time holds up that request only. The
    slow disk is a stand-in, a FIFO in place of history.jsonl (a read that waits for as long as the test likes)."""
    history = app.state / "history.jsonl"
    written = history.read_bytes()
    history.unlink()
    os.mkfifo(history)
    asking = subprocess.Popen([str(BIN / "maintctl"), "--socket", str(app.socket), "history", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The daemon has the FIFO open for reading once a writer that will not wait can open it (ENXIO before).
        writer = wait_until(lambda: _open_fifo_writer(history), 30, "the daemon reading the history")
        assert maintctl_json(app, "status")["current"] == "r1"  # meanwhile, nothing else waits for that read
        os.write(writer, written)
        os.close(writer)
        out, err = asking.communicate(timeout=60)
    finally:
        asking.kill()
    assert asking.returncode == 0, err
    assert [entry["release"] for entry in json.loads(out)] == ["r1"]


def _open_fifo_writer(path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return None
        raise


def test_two_hundred_clients_at_once(app, live):
    results: list[bool] = []

    def ask() -> None:
        [reply] = raw(app, b'{"cmd": "status"}\n')
        results.append(reply["ok"] and reply["result"]["current"] == "r1")

    threads = [threading.Thread(target=ask) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [True] * 200


def test_a_client_gone_mid_stream_does_not_stop_the_deploy(app, start_daemon):
    app.write_config(f'[hooks]\nbefore_swap = [{app.gate.hook()}]\n')
    app.make_release("r1")
    app.gate.open()
    daemon = start_daemon()
    daemon.deployed("r1")
    app.gate.opened.unlink()
    maintctl(app, "pause", check_rc=0)
    app.make_release("r2")
    daemon.wait_for(release="r2", event=lambda e: e.startswith("upload of release r2 is complete"))
    follower = subprocess.Popen([str(BIN / "maintctl"), "--socket", str(app.socket), "deploy", "r2", "--follow"],
                                stdout=subprocess.PIPE, text=True)
    assert follower.stdout.readline().split()[0] == "validate"
    follower.kill()
    follower.wait()
    app.gate.wait_entered()  # the deploy carries on after its follower is gone ...
    app.gate.open()
    assert daemon.deployed("r2")["result"] == "ok"  # ... to the end
    assert maintctl_json(app, "status")["current"] == "r2"


def test_stale_socket_is_replaced_but_a_live_one_is_not_stolen(app, start_daemon, tmp_path):
    app.make_release("r1")
    first = start_daemon()
    first.stop(signal.SIGKILL)  # leaves its socket file behind
    assert app.socket.is_socket()
    second = start_daemon()
    assert maintctl_json(app, "status")["current"] == "r1"
    other_state = tmp_path / "state2"
    text = app.config.read_text().replace(f'dir = "{app.state}"', f'dir = "{other_state}"')
    (tmp_path / "other.toml").write_text(text)
    thief = subprocess.run([str(BIN / "maintd"), "run", "--config", str(tmp_path / "other.toml"),
                            "--log-format", "json"], capture_output=True, text=True, timeout=30)
    assert thief.returncode == 1 and "another daemon is listening" in thief.stderr
    assert maintctl_json(app, "status")["current"] == "r1"
    second.stop()


def test_a_second_daemon_for_the_same_app_refuses_naming_the_holder(app, live):
    second = subprocess.run([str(BIN / "maintd"), "run", "--config", str(app.config), "--log-format", "json"],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"another maintd (pid {live.proc.pid})" in second.stderr


# --- who may do what --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def users():
    """An unprivileged user, and an operator in control.group; created for real (the tests run as root)."""
    try:
        grp.getgrnam(OPS_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", OPS_GROUP], check=True)
    for user, groups in ((PROBE_USER, []), (OPERATOR_USER, [OPS_GROUP])):
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            *(["--groups", ",".join(groups)] if groups else []), user], check=True)
    return PROBE_USER, OPERATOR_USER


@pytest.fixture
def open_app(app):
    """The app's socket in a directory other users can reach (pytest's own are private to root)."""
    public = public_dir("maintd-sock-")
    app.socket = public / "shop.sock"
    yield app
    shutil.rmtree(public, ignore_errors=True)


def test_other_users_may_read_but_not_change(open_app, users, start_daemon):
    app = open_app
    app.write_config(control=f'group = "{OPS_GROUP}"')
    app.make_release("r1")
    daemon = start_daemon()
    daemon.deployed("r1")
    probe, operator = users
    assert json.loads(maintctl(app, "status", "--json", user=probe, check_rc=0).stdout)["current"] == "r1"
    maintctl(app, "releases", user=probe, check_rc=0)
    maintctl(app, "history", user=probe, check_rc=0)
    for args in (("pause",), ("maintenance", "on"), ("deploy", "r1"), ("rollback",), ("restart",), ("flush",)):
        done = maintctl(app, *args, user=probe, check_rc=1)
        assert f"user {probe} is not allowed to {COMMANDS[args[0]].action}: only root and members of " \
               f"control.group ({OPS_GROUP})" in done.stderr
    assert maintctl_json(app, "status")["paused"] is False
    maintctl(app, "pause", user=operator, check_rc=0)
    assert daemon.wait_for(event="automatic deploys paused")["actor"] == operator
    assert maintctl_json(app, "status")["paused"] is True


def test_mode_0660_keeps_other_users_out(open_app, users, start_daemon):
    app = open_app
    app.write_config(control='mode = "0660"')
    start_daemon()
    assert oct(app.socket.stat().st_mode & 0o777) == "0o660"
    done = maintctl(app, "status", user=users[0])
    assert done.returncode == 3 and "Permission denied" in done.stderr


def test_follow_attaches_to_a_deploy_an_upload_started(app, start_daemon):
    app.write_config(f'[hooks]\nbefore_swap = [{app.gate.hook()}]\n')
    daemon = start_daemon()
    app.make_release("r1")
    app.gate.wait_entered()
    follower = subprocess.Popen([str(BIN / "maintctl"), "--socket", str(app.socket), "deploy", "--follow"],
                                stdout=subprocess.PIPE, text=True)
    first = follower.stdout.readline()
    assert first.split()[0] == "validate"  # attached: the steps so far, replayed
    app.gate.open()
    lines = [first, *follower.stdout.read().splitlines()]
    assert follower.wait(60) == 0
    steps = [line.split()[0] for line in lines[:-1]]
    assert steps == ["validate", "link_shared", "maintenance_on", "hooks_before", "swap", "restart", "flush",
                     "health", "hooks_after", "maintenance_off", "cleanup"]
    assert "release r1 is live" in lines[-1]
    assert daemon.steps(daemon.deployed("r1")["deploy_id"])[0]["actor"] == "upload"


def test_deploy_follow_attaches_to_a_rollback_in_progress(app, start_daemon):
    """Whatever takes a release live is followed by `deploy --follow`, an operator's rollback too."""
    daemon = start_daemon()
    for name in ("r1", "r2"):
        app.make_release(name)
        daemon.deployed(name)
    app.write_config(f'[hooks]\nbefore_swap = [{app.gate.hook()}]\n')
    daemon.reload()
    rollback = subprocess.Popen([str(BIN / "maintctl"), "--socket", str(app.socket), "rollback"],
                                stdout=subprocess.DEVNULL)
    app.gate.wait_entered()
    follower = subprocess.Popen([str(BIN / "maintctl"), "--socket", str(app.socket), "deploy", "--follow"],
                                stdout=subprocess.PIPE, text=True)
    assert follower.stdout.readline().split()[0] == "validate"
    app.gate.open()
    assert follower.wait(60) == 0 and rollback.wait(60) == 0
    assert "release r1 is live (rollback" in follower.stdout.read()


def test_deploy_by_name_with_follow_joins_the_deploy_its_upload_just_ended(app, start_daemon):
    """`cap deploy` writes the marker, then runs `deploy NAME --follow`: maintd may have begun and ended the upload's
    deploy before maintctl connects. That deploy is reported, not repeated (a second maintenance window)."""
    daemon = start_daemon()
    app.make_release("r1")
    daemon.deployed("r1")
    done = maintctl(app, "deploy", "r1", "--follow", check_rc=0)
    assert [line.split()[0] for line in done.stdout.splitlines()][:3] == ["validate", "link_shared", "maintenance_on"]
    assert "release r1 is live" in done.stdout
    assert [e["release"] for e in maintctl_json(app, "history")] == ["r1"]
    app.make_release("r2")
    daemon.deployed("r2")
    maintctl(app, "deploy", "r1", "--follow", check_rc=0)  # no longer the last deploy: a deploy of its own
    assert [e["release"] for e in maintctl_json(app, "history")] == ["r1", "r2", "r1"]


def test_marker_then_deploy_by_name_at_once_is_one_deploy(app, start_daemon):
    """However the two race (the marker not yet seen, its deploy starting, running or over), one deploy each."""
    app.write_config(upload="require_marker = true")
    start_daemon()
    names = [f"r{i}" for i in range(6)]
    for name in names:
        release = app.make_release(name, files=200, marker=False)
        (release / ".maintd-ready").touch()
        maintctl(app, "deploy", name, "--follow", check_rc=0)
    assert [e["release"] for e in maintctl_json(app, "history")] == names


def test_rollback_refuses_a_refused_or_uploading_release(app, live):
    app.make_release("bad", marker=False)
    (app.releases / "bad" / ".maintd-manifest").write_text("nonsense\n")
    live.wait_for(release="bad", result="refused")
    done = maintctl(app, "rollback", "bad", check_rc=1)
    assert "release bad is refused" in done.stderr
    (app.releases / "slow").mkdir()
    (app.releases / "slow" / ".partial.bin.Ab12Cd").write_text("still coming")
    live.wait_for(release="slow", event=lambda e: "temporary file left" in e)
    assert "release slow is uploading" in maintctl(app, "deploy", "slow", check_rc=1).stderr
    assert app.live() == "r1"


def test_releases_says_an_unmarked_upload_waiting_for_quiet_could_be_a_cut_one(app, live):
    app.write_config(quiet_period=60)
    live.reload()
    app.make_release("r2", marker=False)
    wait_until(lambda: any(r["name"] == "r2" and r["state"] == "uploading" for r in maintctl_json(app, "releases")),
               20, "r2 to be seen")
    [row] = [r for r in maintctl_json(app, "releases") if r["name"] == "r2"]
    assert "a cut scp, or rsync with --partial, --inplace or --temp-dir, would look as complete" in row["reason"]


def maintctl_with_etc_maintd(tmp_path, files: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """maintctl with neither --config nor --socket, where the real /etc/maintd holds `files`: in a mount namespace
    of its own, an overlay over /etc gives it that directory without touching the machine's."""
    if not shutil.which("unshare") or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1)")
    upper, work = tmp_path / "etc-upper", tmp_path / "etc-work"
    (upper / "maintd").mkdir(parents=True)
    work.mkdir()
    for name, text in files.items():
        (upper / "maintd" / name).write_text(text)
    overlay = f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc && exec \"$@\""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", overlay, "sh",
                           str(BIN / "maintctl"), *args], capture_output=True, text=True, timeout=60)


def test_maintctl_alone_finds_the_only_app_beside_the_shipped_example(app, start_daemon, tmp_path):
    """`make install` and the package put /etc/maintd/example.toml beside the app's file: it configures no app, so
    `maintctl status` still finds the one app there (as the deploy user runs it, without options)."""
    start_daemon()
    example = (Path(__file__).parent.parent / "etc" / "maintd" / "example.toml").read_text()
    done = maintctl_with_etc_maintd(tmp_path, {"example.toml": example, "example-old.toml": example,
                                               "shop.toml": app.config.read_text()}, "status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["app"] == "shop"


def test_maintctl_alone_with_several_apps_names_them(app, tmp_path):
    config = app.config.read_text()
    done = maintctl_with_etc_maintd(tmp_path, {"example.toml": "", "shop.toml": config, "blog.toml": config},
                                    "status")
    assert done.returncode == 2
    assert "several apps in /etc/maintd (blog.toml, shop.toml): say which app: --config" in done.stderr
    done = maintctl_with_etc_maintd(tmp_path / "none", {"example.toml": ""}, "status")
    assert done.returncode == 2
    assert "no app's file in /etc/maintd (example*.toml not counted)" in done.stderr
