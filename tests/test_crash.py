"""Crash safety with real faults: kill -9 at every step and at random, a really full disk, hanging and failing
commands, a frozen memcached, a release deleted under the deploy, a write the kernel refuses. After each, the site
is consistent: `current` points at a complete release and no maintenance flag maintd raised is left up."""

import dataclasses
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import BIN, App, free_port, maintctl, maintctl_json, run_deploy, wait_until
from maintd.pipeline import Deploy
from maintd.state import InFlight, Store

STEPS = list(Deploy.STEPS)


def assert_consistent(app: App, expected: str | None = None) -> None:
    live = app.live()
    assert live and (app.current / "REVISION").read_text() == f"{live}\n", f"current -> {live}"
    if expected:
        assert live == expected
    flags = sorted(str(p.relative_to(app.releases)) for p in app.releases.glob("*/tmp/maintenance.txt"))
    assert flags == [], f"maintenance left on: {flags}"
    assert not (app.state / "deploy.json").exists()
    assert not list(app.root.glob(".current.tmp-*"))


@pytest.mark.parametrize("step", [*STEPS, "end"])
def test_kill_9_at_every_step_boundary(app, start_daemon, step):
    app.make_release("r1")
    first = start_daemon()
    first.deployed("r1")
    first.stop()
    doomed = start_daemon(env={"MAINTD_CRASH_AT": step})
    app.make_release("r2")
    assert doomed.proc.wait(30) == -signal.SIGKILL
    daemon = start_daemon()
    recovery = daemon.wait_for(step="recovery")
    swapped = step == "end" or STEPS.index(step) > STEPS.index("swap")
    expected = "r2" if swapped else "r1"
    assert recovery["result"] == ("ok" if swapped else "rolled_back")
    assert recovery["interrupted_step"] == (step if step != "end" else "cleanup")
    assert_consistent(app, expected)
    last = maintctl_json(app, "status")["last_deploy"]
    assert last["kind"] == "recovery" and last["release"] == "r2" and "cut off" in last["error"]
    assert [h["kind"] for h in app.history()][-1] == "recovery"
    app.make_release("r3")
    assert daemon.deployed("r3")["result"] == "ok"
    assert_consistent(app, "r3")
    assert not [e for e in daemon.events if e.get("release") == "r2" and e.get("step") == "validate"], \
        "a release whose deploy crashed must not be retried automatically"


def test_kill_9_at_random_moments_during_50_deploys(app, start_daemon):
    app.write_config('[hooks]\nbefore_swap = [["sleep", "0.15"]]\n')
    rng = random.Random(20261123)
    app.make_release("r000")
    first = start_daemon()
    first.deployed("r000")
    first.stop()
    recovered_ids = set()
    for i in range(1, 51):
        daemon = start_daemon()
        app.make_release(f"r{i:03d}")
        threading.Event().wait(rng.uniform(0.0, 0.5))  # the random moment of the kill (not a synchronisation)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.stop()
        journal = app.state / "deploy.json"
        in_flight = json.loads(journal.read_text())["deploy_id"] if journal.exists() else None
        after = start_daemon()
        if in_flight:
            assert after.wait_for(step="recovery", deploy_id=in_flight)
            recovered_ids.add(in_flight)
        assert after.stop() == 0  # SIGTERM: a deploy the start-up rule began finishes first
        assert_consistent(app)
    history_ids = {h["deploy_id"] for h in app.history() if h["kind"] == "recovery"}
    assert recovered_ids <= history_ids
    assert recovered_ids, "the seeded kills should land inside some deploys"


class Restarts:
    """`restart.command` as a script that logs each restart (its number and MAINTD_RELEASE). The restart numbered
    `hold` says it is in (`held` holds its pid, renamed into place whole) and never ends: an app server hanging in
    its restart, where the test kills maintd."""

    def __init__(self, base: Path, hold: int = 0) -> None:
        work = base / "restarts"
        work.mkdir()
        self.log, self.held = work / "log", work / "held"
        script = work / "restart.sh"
        script.write_text(f"""
n=$(cat {work}/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {work}/count
echo "$n $MAINTD_RELEASE" >> {self.log}
if [ $n -eq {hold} ]; then echo $$ > {work}/held.tmp; mv {work}/held.tmp {self.held}; exec sleep infinity; fi
""")
        self.config = f'[restart]\nmethod = "command"\ncommand = ["sh", "{script}"]\n'

    def seen(self) -> list[str]:
        return self.log.read_text().splitlines()


def test_kill_9_in_the_way_backs_restart_of_the_previous_release(app, start_daemon):
    """r2 fails its health check after its swap; on the way back `current` points at r1 again, and r1's restart is
    running when maintd is killed: the app may still run r2's code. The way back was journaled before it was
    taken, so recovery takes it again, r1's restart included, rather than taking `current` at r1 for done."""
    restarts = Restarts(app.base, hold=3)  # r1's deploy, r2's, then the way back's restart of r1
    app.write_config(restarts.config)
    app.make_release("r1")
    daemon = start_daemon()
    assert daemon.deployed("r1")["result"] == "ok"
    app.write_config(restarts.config + f'health_url = "http://127.0.0.1:{free_port()}/"\nhealth_timeout = 0.3\n')
    daemon.reload()
    app.make_release("r2")
    wait_until(restarts.held.exists, 30, "the way back's restart of r1")
    assert app.live() == "r1"
    daemon.stop(signal.SIGKILL)
    os.kill(int(restarts.held.read_text()), signal.SIGKILL)
    app.write_config(restarts.config)
    recovery = start_daemon().wait_for(step="recovery")
    assert recovery["result"] == "rolled_back" and recovery["interrupted_step"] == "rollback", recovery["event"]
    assert restarts.seen() == ["1 r1", "2 r2", "3 r1", "4 r1"], f"r1 not restarted by recovery: {recovery['event']}"
    assert_consistent(app, "r1")
    assert {row["name"]: row["state"] for row in maintctl_json(app, "releases")}["r2"] == "bad"


@pytest.mark.parametrize("ending, fails, restarted", [
    ("rollback", '[hooks]\nafter_swap = [["false"]]\n', ["1 r1", "2 r2", "3 r1"]),
    ("abort", '[hooks]\nbefore_swap = [["false"]]\n', ["1 r1"]),
])
def test_kill_9_as_a_failed_deploy_sets_out_on_its_way_back(app, start_daemon, ending, fails, restarted):
    """maintd killed once the way back is journaled, before any of it is taken: after the swap (`current` still at
    r2, which passes every check but failed its after-swap hook) or before it. Recovery goes back, never forward:
    r1 live and restarted if `current` had left it, out of maintenance, r2 bad as its hook's failure made it."""
    restarts = Restarts(app.base)
    app.write_config(restarts.config)
    app.make_release("r1")
    first = start_daemon()
    first.deployed("r1")
    first.stop()
    app.write_config(restarts.config + fails)
    doomed = start_daemon(env={"MAINTD_CRASH_AT": ending})
    app.make_release("r2")
    assert doomed.proc.wait(30) == -signal.SIGKILL
    app.write_config(restarts.config)
    recovery = start_daemon().wait_for(step="recovery")
    assert recovery["result"] == "rolled_back" and recovery["interrupted_step"] == ending, recovery["event"]
    assert "it had failed (hooks_" in recovery["event"]
    assert_consistent(app, "r1")
    assert restarts.seen() == restarted
    assert {row["name"]: row["state"] for row in maintctl_json(app, "releases")}["r2"] == "bad"


# --- faults inside one deploy (in-process: the pipeline against the real tree) -----------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs of the test's own, to fill for real."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("this machine refuses mount (no CAP_SYS_ADMIN): cannot make a real ENOSPC")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
    return filler


def test_disk_full_while_raising_maintenance_aborts_before_the_swap(tmp_path, memcached, tmpfs):
    app = App(tmpfs / "app", memcached.address)
    app.state = tmp_path / "state"
    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    app.make_release("r2")
    filler = fill(tmpfs)
    outcome, _, _ = run_deploy(app, "r2")
    assert outcome.result == "failed" and "maintenance_on" in outcome.error and "No space left" in outcome.error
    assert_consistent(app, "r1")
    leftovers = [p.name for p in app.releases.glob("*/tmp/.*")]
    assert leftovers == [], "nothing half-written"
    filler.unlink()
    assert run_deploy(app, "r2")[0].result == "ok"
    assert_consistent(app, "r2")


def test_disk_full_for_the_journal_changes_nothing(app, tmpfs):
    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    app.make_release("r2")
    state = tmpfs / "state"
    Store(state)  # the state directory exists; the disk under it is full
    fill(tmpfs)
    outcome, _, _ = run_deploy(app, "r2", state=state)
    assert outcome.result == "failed" and "No space left" in outcome.error
    assert app.live() == "r1" and not list(app.releases.glob("*/tmp/maintenance.txt"))


@pytest.mark.parametrize("command, problem", [
    ('["false"]', "exited with status 1"),
    ('["sleep", "30"]', "did not finish in time"),
])
def test_restart_command_failing_or_hanging_rolls_back(app, command, problem):
    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    app.make_release("r2")
    outcome, _, ctx = run_deploy(app, "r2", f'[restart]\nmethod = "command"\ncommand = {command}\n'
                                                 '[hooks]\ntimeout = 0.3\n')
    assert outcome.result == "rolled_back" and problem in outcome.error
    assert_consistent(app, "r1")
    assert ctx.store.memory.releases["r2"].bad


def test_hanging_hook_times_out_and_its_output_is_logged(app):
    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    app.make_release("r2")
    hook = '[hooks]\nafter_swap = [["sh", "-c", "echo warming caches; sleep 30"]]\ntimeout = 0.5\n'
    outcome, events, _ = run_deploy(app, "r2", hook)
    assert outcome.result == "rolled_back" and "did not finish in time" in outcome.error
    [failed] = [e for e in events if e.get("step") == "hooks_after"]
    assert "warming caches" in failed["output"]
    assert_consistent(app, "r1")


def test_frozen_memcached_times_out_and_the_deploy_completes(app, own_memcached):
    app.memcached = own_memcached.address
    app.make_release("r1")
    own_memcached.proc.send_signal(signal.SIGSTOP)
    try:
        outcome, events, _ = run_deploy(app, "r1")
    finally:
        own_memcached.proc.send_signal(signal.SIGCONT)
    assert outcome.result == "ok"
    assert [e for e in events if e["log_level"] == "warning" and "not flushed" in e["event"]]
    assert_consistent(app, "r1")


def test_release_deleted_while_being_validated(app):
    """Files vanish while the manifest is being checked: the deploy fails at `validate`, nothing else changes."""
    import hashlib
    import shutil

    from conftest import wait_until

    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    for attempt in range(5):
        name = f"gone{attempt}"
        path = app.make_release(name, files=1500)
        files = [p for p in path.rglob("*") if p.is_file() and p.name != ".maintd-ready"]
        (path / ".maintd-manifest").write_text("".join(
            f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(path)}\n" for p in files))
        remover = threading.Thread(target=shutil.rmtree, args=(path / "app",), kwargs={"ignore_errors": True})
        remover.start()
        wait_until(lambda files=files: not all(p.exists() for p in files), 10, "the deletion under way")
        outcome, _, _ = run_deploy(app, name)
        remover.join()
        assert outcome.result == "failed" and outcome.error.startswith("validate: "), outcome.error
        assert_consistent(app, "r1")
        assert json.loads((app.state / "state.json").read_text())["releases"][name]["bad"] == outcome.error


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """`chattr +i` for the duration: the one way to a real EPERM for root. Skips where the file system refuses it."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is refused on this file system: no real EPERM for root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_permission_denied_aborts_cleanly(app):
    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    path = app.make_release("r2")
    with immutable(path):
        outcome, _, _ = run_deploy(app, "r2")
    assert outcome.result == "failed" and "Operation not permitted" in outcome.error
    assert_consistent(app, "r1")


def test_a_state_directory_made_immutable_after_the_swap_leaves_the_deploy_standing(app, tmp_path):
    """After the swap only bookkeeping is left: the release stays live, and what could not be written is logged."""
    with immutable(tmp_path):  # only to know the file system takes it; the hook below sets it for real
        pass
    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    app.make_release("r2")
    try:
        outcome, events, _ = run_deploy(app, "r2", f'[hooks]\nafter_swap = [["chattr", "+i", "{app.state}"]]\n')
    finally:
        subprocess.run(["chattr", "-i", str(app.state)], check=True)
    assert outcome.result == "ok" and app.live() == "r2"
    errors = [e["event"] for e in events if e["log_level"] == "error"]
    assert any("could not record the outcome" in e for e in errors), errors
    assert any("could not remove the deploy journal" in e for e in errors), errors


def operator_maintenance_on(ctx) -> None:
    """`maintctl maintenance on`, as its handler does it."""
    from maintd.maintenance import Notice
    from maintd.pipeline import now_iso

    ctx.operator_maintenance_on(Notice("db upgrade", now_iso(), "root"))


def step_record(events, step: str) -> str:
    [record] = [e["event"] for e in events if e.get("step") == step and "result" in e]
    return record


def r1_live_under_operator_maintenance(app: App) -> Path:
    """r1 live, an operator's maintenance on, r2 uploaded: returns r1's tmp/, where the operator's flag is."""
    app.make_release("r1")
    outcome, _, ctx = run_deploy(app, "r1")
    assert outcome.result == "ok"
    operator_maintenance_on(ctx)
    app.make_release("r2")
    return app.releases / "r1" / "tmp"


@pytest.mark.parametrize("fault", ["a directory where the flag was", "a tmp the kernel refuses to change"])
def test_a_swap_done_is_a_swap_even_when_the_flag_cannot_leave_the_old_release(app, fault):
    """Under an operator's maintenance the swap carries its flag along: into r2, `current` moved, out of r1. When
    the last part fails (r1's uploader put a directory where the flag was: EISDIR; a disk that refuses the change:
    here EPERM, chattr +i) the swap has happened all the same. It used to raise out of the swap after `current`
    moved: the deploy was recorded as failed before its swap, with no way back, while `current` pointed at r2. The
    flag left in r1, which nobody serves, is said in the swap's record (and lowered at the next start)."""
    tmp = r1_live_under_operator_maintenance(app)
    if fault == "a directory where the flag was":
        (tmp / "maintenance.txt").unlink()
        (tmp / "maintenance.txt" / "mine").mkdir(parents=True)
        outcome, events, ctx = run_deploy(app, "r2")
    else:
        with immutable(tmp):
            outcome, events, ctx = run_deploy(app, "r2")
    assert outcome.result == "ok" and app.live() == "r2", (outcome.result, outcome.error)
    assert not ctx.store.memory.releases["r2"].bad
    assert (app.releases / "r2" / "tmp" / "maintenance.txt").is_file(), "the operator's maintenance holds on r2"
    assert "the operator's maintenance flag could not leave releases/r1" in step_record(events, "swap")


@pytest.mark.parametrize("fault", ["a tmp its uploader linked out of the tree", "a tmp the kernel refuses to change"])
def test_the_way_back_is_taken_even_where_the_operators_flag_cannot_go(app, tmp_path, fault):
    """Under an operator's maintenance the way back raises its flag in r1 before it points `current` there. Where
    the flag cannot go (r1's uploader turned its `tmp` into a link out of the tree, before the deploy; a disk that
    refuses the change, from r2's failing after-swap hook on: chattr +i), `current` goes back all the same: r1
    worked, r2 has just failed. It used to stay on r2 while the deploy said `rolled_back`. The record says so."""
    tmp = r1_live_under_operator_maintenance(app)
    try:
        if fault == "a tmp its uploader linked out of the tree":
            (tmp_path / "outside").mkdir()
            shutil.rmtree(tmp)
            tmp.symlink_to(tmp_path / "outside")
            hook = '["false"]'
        else:
            hook = f'["sh", "-c", "chattr +i {tmp}; false"]'
        outcome, events, ctx = run_deploy(app, "r2", f"[hooks]\nafter_swap = [{hook}]\n")
    finally:
        subprocess.run(["chattr", "-i", str(tmp)], capture_output=True)
    assert outcome.result == "rolled_back" and app.live() == "r1", (outcome.result, app.live(), outcome.error)
    assert "the operator's maintenance flag could not go into releases/r1" in step_record(events, "rollback")
    assert not (app.releases / "r2" / "tmp" / "maintenance.txt").exists(), "r2, which nobody serves, keeps no flag"
    assert ctx.store.memory.maintenance, "the operator's maintenance is still on, until `maintenance off`"


def test_a_journal_record_longer_than_a_sector_is_read_back_whole(tmp_path):
    store = Store(tmp_path)
    long = InFlight("id", "deploy", "r" * 128, "p" * 128, "a" * 200, "2026-11-23T00:00:00+00:00", "validate")
    store.journal(long, durable=False)
    short = dataclasses.replace(long, actor="ops", step="swap")
    store.journal(short, durable=False)
    assert store.in_flight() == short


def test_dangling_current_is_reported_and_deploy_name_repairs_it(app, start_daemon):
    app.make_release("r1")
    os.symlink("releases/vanished", app.current)
    daemon = start_daemon()
    assert daemon.wait_for(level="error", event=lambda e: "points at no release" in e or "missing" in e)
    assert os.readlink(app.current) == "releases/vanished"  # not guessed at
    done = subprocess.run([str(BIN / "maintctl"), "--socket", str(app.socket), "deploy", "r1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_consistent(app, "r1")


def test_missing_current_is_reported(app, start_daemon):
    app.make_release("r1", marker=False)
    daemon = start_daemon()
    assert daemon.wait_for(level="error", event=lambda e: "is missing" in e)
    assert app.live() is None and (app.releases / "r1").is_dir()


# A kill -9 that lands where no step boundary is: between maintd's staging of tmp/restart.txt and its rename into
# place. The code is the real one; only the moment of the kill is arranged, by making the rename the kill.
CRASH_BEFORE_THE_RENAME = r"""
import os, signal, sys
from pathlib import Path
from maintd.confined import Confined
os.rename = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
with Confined.open(Path(sys.argv[1]), Path(sys.argv[2])) as top, top.dir("tmp", create=True) as where:
    where.write("restart.txt", "")  # as the restart step makes tmp/restart.txt
"""


def test_a_staging_directory_a_kill_9_left_is_removed_at_the_next_start(app, start_daemon):
    """What maintd makes in a release it makes in a staging directory only root may enter, and renames into place
    (confined.py): a kill -9 in between leaves that directory behind, root's, in the uploader's tree, for good. The
    next start removes it and says so once; a directory of that name the uploader made is theirs, and stays."""
    app.make_release("r1")
    daemon = start_daemon()
    assert daemon.deployed("r1")["result"] == "ok"
    daemon.stop()
    release = app.releases / "r1"
    crashed = subprocess.run([sys.executable, "-c", CRASH_BEFORE_THE_RENAME, str(app.root), str(release)])
    assert crashed.returncode == -signal.SIGKILL
    [left] = (release / "tmp").glob(".maintd-stage-*")
    assert (left / "restart.txt").exists()
    nobody = pwd.getpwnam("nobody")
    theirs = release / ".maintd-stage-theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)

    daemon = start_daemon()
    assert not left.exists() and theirs.is_dir()
    said = [e["event"] for e in daemon.events if "staging director" in e["event"]]
    assert said == [f"removed 1 staging directory left by a crash: {left}"]
    daemon.stop()
    again = start_daemon()
    assert [e for e in again.events if "staging director" in e["event"]] == []


# A kill -9 inside `Context.move_current`, after the swap and before the operator's flag leaves the release left.
# The code is the real one; only the moment of the kill is arranged, by making that lowering the kill.
CRASH_AFTER_THE_SWAP = r"""
import os, signal, sys
from maintd.config import load
from maintd.context import Context
from maintd.maintenance import Flags
from maintd.pipeline import Deploy
from maintd.state import Store
Flags.lower_in = lambda self, release: os.kill(os.getpid(), signal.SIGKILL)
config = load(sys.argv[1])
Deploy(Context.build(config, Store(config.state_dir)), "r2", "root").run()
"""


def test_a_kill_9_inside_the_swap_leaves_no_flag_where_nobody_serves_it(app, start_daemon):
    """Killed between the swap and the lowering of the operator's flag in r1, maintd left that flag in r1, which
    nobody serves; recovery finishes r2 forward and `maintenance off` lowers the flag where `current` points, so
    nothing ever took r1's down, and a later rollback to r1 (needing no maintenance of its own) served the 503
    page with no maintenance recorded. The start lowers it, once no deploy is in flight, and says so; r2's, where
    `current` points, stays: the operator's maintenance holds until `maintenance off`."""
    app.make_release("r1")
    outcome, _, ctx = run_deploy(app, "r1")
    assert outcome.result == "ok"
    operator_maintenance_on(ctx)
    app.make_release("r2")
    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_THE_SWAP, str(app.config)], timeout=120)
    assert crashed.returncode == -signal.SIGKILL and app.live() == "r2"
    flags = {name: app.releases / name / "tmp" / "maintenance.txt" for name in ("r1", "r2")}
    assert flags["r1"].exists() and flags["r2"].exists(), "the kill came between the swap and the lowering"
    daemon = start_daemon()  # ready: recovered, and what nobody serves tidied
    assert daemon.wait_for(step="recovery")["result"] == "ok"
    assert not flags["r1"].exists(), "r1, which nobody serves, still holds the operator's flag"
    assert flags["r2"].exists()
    said = [e["event"] for e in daemon.events if "nobody serves" in e["event"]]
    assert said == ["lowered the maintenance flag left in release(s) nobody serves: r1"]
    assert maintctl_json(app, "status")["maintenance"]["on"]
    maintctl(app, "maintenance", "off", check_rc=0)
    assert_consistent(app, "r2")
