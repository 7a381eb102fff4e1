"""The deploy as its named steps, run in-process on a real tree, a real memcached and real subprocesses."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import free_port, run_deploy
from maintd.config import load
from maintd.maintenance import Notice
from maintd.pipeline import Deploy
from maintd.state import Store

FIELDS = {"app", "deploy_id", "release", "step", "result", "duration_ms", "actor"}


def flag(app, name):
    return (app.releases / name / "tmp" / "maintenance.txt").exists()


def test_steps_run_in_order_each_one_event_with_the_audit_fields(app):
    app.make_release("r1")
    outcome, events, _ = run_deploy(app, "r1")
    steps = [e for e in events if "step" in e]
    assert [e["step"] for e in steps] == list(Deploy.STEPS)
    assert all(e.keys() >= FIELDS for e in steps)
    assert {e["deploy_id"] for e in steps} == {outcome.deploy_id}
    assert {e["actor"] for e in steps} == {"alice"}
    results = {e["step"]: e["result"] for e in steps}
    assert results["swap"] == results["maintenance_on"] == results["flush"] == "ok"
    assert results["hooks_before"] == results["health"] == "skipped"
    assert outcome.result == "ok" and app.live() == "r1"
    assert (app.releases / "r1" / "tmp" / "restart.txt").exists()
    assert not flag(app, "r1")


def test_deploy_records_history_and_revisions_log(app):
    app.make_release("r1")
    app.make_release("r2")
    run_deploy(app, "r1")
    _, _, ctx = run_deploy(app, "r2")
    [_, second] = app.history()
    assert (second["release"], second["previous"], second["result"]) == ("r2", "r1", "ok")
    assert [s["step"] for s in second["steps"]] == list(Deploy.STEPS)
    assert all("duration_ms" in s for s in second["steps"])
    lines = (app.root / "revisions.log").read_text().splitlines()
    assert lines[-1].startswith("Release r2 (at r2) deployed by alice at ")
    assert ctx.store.memory.previous == "r1"


def test_revision_that_is_a_link_never_copies_a_root_only_file_into_revisions_log(app, tmp_path):
    """revisions.log (mode 0644, in the uploader's tree) takes the first line of `<release>/REVISION`, read as root:
    through the uploader's link it would be the first line of a file only root may read. A link is no revision."""
    secret = tmp_path / "root-only-secret"
    secret.write_text("root:$y$j9T$SECRETHASHSECRETHASH:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    release = app.make_release("r1")
    (release / "REVISION").unlink()
    (release / "REVISION").symlink_to(secret)
    outcome, _, _ = run_deploy(app, "r1")
    assert outcome.result == "ok"
    assert (app.root / "revisions.log").read_text().startswith("Release r1 deployed by alice at ")


def test_revision_that_is_a_fifo_does_not_hang_the_deploy(app):
    """A FIFO at REVISION, read as a file, blocks the deploy thread for good, and with it the deploy lock: no deploy,
    restart or stop ever again. The deploy runs in a thread of its own here, so that a hang fails the test."""
    release = app.make_release("r1")
    (release / "REVISION").unlink()
    os.mkfifo(release / "REVISION")
    done: list = []
    worker = threading.Thread(target=lambda: done.append(run_deploy(app, "r1")[0]), daemon=True)
    worker.start()
    worker.join(30)
    hung = worker.is_alive()
    if hung:  # a writer that closes at once gives the blocked reader its end of file, and the thread its end
        os.close(os.open(release / "REVISION", os.O_WRONLY))
        worker.join(30)
    assert not hung, "the deploy thread was still blocked on REVISION after 30 s"
    assert done[0].result == "ok"
    assert (app.root / "revisions.log").read_text().startswith("Release r1 deployed by alice at ")


def test_deploy_flushes_memcached(app, memcached):
    client = memcached.client()
    client.set("views/home", b"old", noreply=False)
    app.make_release("r1")
    run_deploy(app, "r1")
    assert client.get("views/home") is None


def test_memcached_down_is_a_warning_and_the_deploy_completes(app, own_memcached):
    app.memcached = own_memcached.address
    own_memcached.stop()
    app.make_release("r1")
    outcome, events, _ = run_deploy(app, "r1")
    assert outcome.result == "ok" and app.live() == "r1"
    [warning] = [e for e in events if e["log_level"] == "warning"]
    assert "not flushed" in warning["event"] and warning["step"] == "flush"


def test_failing_health_check_rolls_back(app):
    app.make_release("r1")
    app.make_release("r2")
    run_deploy(app, "r1")
    port = free_port()  # nothing listens there
    outcome, events, ctx = run_deploy(app, "r2",
                                  f'[restart]\nhealth_url = "http://127.0.0.1:{port}/up"\nhealth_timeout = 0.5\n')
    assert outcome.result == "rolled_back" and app.live() == "r1"
    assert outcome.error.startswith("health: health check")
    rollback = [e for e in events if e.get("step") == "rollback"]
    assert rollback and rollback[0]["result"] == "rolled_back"
    assert not flag(app, "r1") and not flag(app, "r2")
    assert ctx.store.memory.releases["r2"].bad
    assert "failed to deploy (rolled_back)" in (app.root / "revisions.log").read_text()


def test_failing_hook_before_swap_changes_nothing_and_keeps_its_output(app):
    app.make_release("r1")
    app.make_release("r2")
    run_deploy(app, "r1")
    hook = '[hooks]\nbefore_swap = [["sh", "-c", "echo migration exploded; exit 3"]]\n'
    outcome, events, _ = run_deploy(app, "r2", hook)
    assert outcome.result == "failed" and app.live() == "r1"
    [failed] = [e for e in events if e.get("result") == "failed" and e.get("step") == "hooks_before"]
    assert "exited with status 3" in failed["event"] and "migration exploded" in failed["output"]
    assert not flag(app, "r1") and not flag(app, "r2")


def test_hanging_hook_is_killed_at_the_timeout(app):
    app.make_release("r1")
    outcome, _, _ = run_deploy(app, "r1", '[hooks]\nbefore_swap = [["sleep", "60"]]\ntimeout = 0.3\n')
    assert outcome.result == "failed" and "did not finish in time" in outcome.error
    assert app.live() is None


def test_maintenance_holds_across_the_swap(app):
    """A separate process polls current/tmp/maintenance.txt through the deploy: one unbroken block of 'on'."""
    app.make_release("r1")
    app.make_release("r2")
    run_deploy(app, "r1")
    poller = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        seen = []
        print("ready", flush=True)
        while not os.path.exists("{app.base}/stop"):
            on = os.path.exists("{app.current}/tmp/maintenance.txt")
            rev = open("{app.current}/REVISION").read().strip()
            if not seen or seen[-1] != [on, rev]:
                seen.append([on, rev])
        print(__import__("json").dumps(seen))
    """)], stdout=subprocess.PIPE, text=True)
    assert poller.stdout.readline() == "ready\n"
    slow = '[hooks]\nbefore_swap = [["sleep", "0.3"]]\nafter_swap = [["sleep", "0.3"]]\n'
    outcome, _, _ = run_deploy(app, "r2", slow)
    (app.base / "stop").touch()
    runs = json.loads(poller.communicate(timeout=30)[0])
    assert outcome.result == "ok"
    assert runs == [[False, "r1"], [True, "r1"], [True, "r2"], [False, "r2"]]


def test_operator_maintenance_stays_on_through_a_deploy(app):
    app.make_release("r1")
    app.make_release("r2")
    run_deploy(app, "r1")
    app.write_config()
    store = Store(load(app.config).state_dir)
    store.memory.maintenance = Notice("db upgrade", "2026-11-23T20:00:00+00:00", "root", "22:00")
    store.save()
    outcome, events, _ = run_deploy(app, "r2")
    assert outcome.result == "ok" and app.live() == "r2"
    assert flag(app, "r2")
    assert "db upgrade" in (app.releases / "r2" / "tmp" / "maintenance.txt").read_text()
    assert "db upgrade" in (app.releases / "r2" / "tmp" / "maintenance.html").read_text()
    assert [e["result"] for e in events if e.get("step") == "maintenance_off"] == ["skipped"]


@pytest.mark.parametrize("when, migrate_r2, expected", [
    ("never", "1_a.rb", "skipped"),
    ("migrations", "1_a.rb", "skipped"),
    ("migrations", "2_b.rb", "ok"),
])
def test_maintenance_when(app, when, migrate_r2, expected):
    for name, migration in (("r1", "1_a.rb"), ("r2", migrate_r2)):
        path = app.make_release(name)
        (path / "db" / "migrate").mkdir(parents=True)
        (path / "db" / "migrate" / migration).write_text("class M; end\n")
    run_deploy(app, "r1")
    _, events, _ = run_deploy(app, "r2", f'[maintenance]\nwhen = "{when}"\n')
    assert [e["result"] for e in events if e.get("step") == "maintenance_on"] == [expected]


def test_migrations_are_compared_through_no_link(app, tmp_path):
    """`maintenance.when = "migrations"` compares db/migrate as root: a migration that is a link to a file only root
    may read, beside a live release holding a guess of that file, would tell the uploader whether the guess is right
    (maintenance skipped or not). A link is compared by where it points, never by what root reads through it."""
    secret = tmp_path / "root-only-secret"
    secret.write_text("class M; end\n")
    secret.chmod(0o600)
    for name in ("r1", "r2"):
        (app.make_release(name) / "db" / "migrate").mkdir(parents=True)
    (app.releases / "r1" / "db" / "migrate" / "1_a.rb").write_text("class M; end\n")
    (app.releases / "r2" / "db" / "migrate" / "1_a.rb").symlink_to(secret)
    run_deploy(app, "r1")
    _, events, _ = run_deploy(app, "r2", '[maintenance]\nwhen = "migrations"\n')
    assert [e["result"] for e in events if e.get("step") == "maintenance_on"] == ["ok"]


def test_keep_on_failure_leaves_the_page_up_where_current_points(app):
    """The site stays in maintenance after the failure; the release that failed, which nobody serves, keeps no flag
    to be served with it the day it goes live (leftovers.py)."""
    app.make_release("r1")
    app.make_release("r2")
    run_deploy(app, "r1")
    outcome, _, _ = run_deploy(app, "r2", '[maintenance]\nkeep_on_failure = true\n[hooks]\nbefore_swap = [["false"]]\n')
    assert outcome.result == "failed" and app.live() == "r1"
    assert flag(app, "r1") and not flag(app, "r2")


def test_cleanup_keeps_the_newest_live_ones_and_never_unreleased(app):
    for i in range(1, 8):
        app.make_release(f"r{i}")
    app.make_release("waiting", marker=False)
    for i in range(1, 8):
        outcome, _, _ = run_deploy(app, f"r{i}", top="keep_releases = 3")
        assert outcome.result == "ok"
    remaining = sorted(os.listdir(app.releases))
    assert remaining == ["r5", "r6", "r7", "waiting"]
    assert app.live() == "r7"


def test_shared_files_are_linked_before_the_swap(app):
    (app.shared / "config").mkdir()
    (app.shared / "config" / "database.yml").write_text("production: {}\n")
    app.make_release("r1")
    outcome, _, _ = run_deploy(app, "r1", '[shared]\nfiles = ["config/database.yml"]\n')
    assert outcome.result == "ok"
    assert (app.current / "config" / "database.yml").read_text() == "production: {}\n"


@pytest.mark.skipif(not shutil.which("passenger-config"), reason="Passenger is not installed (make test installs it)")
@pytest.mark.parametrize("instance, said", [
    (False, "no Passenger instance is registered"),  # nothing spawned: the ~95 ms of Ruby stay out of the window
    (True, "Passenger is not running"),  # a registered (here: stale) instance: passenger-config itself is asked
])
def test_passenger_is_asked_only_where_an_instance_is_registered(app, monkeypatch, tmp_path, instance, said):
    registry = tmp_path / "registry"
    registry.mkdir()
    if instance:  # as a Passenger killed leaves it: finalized and named, its watchdog gone
        (registry / "passenger.Stale01").mkdir()
        (registry / "passenger.Stale01" / "creation_finalized").touch()
        (registry / "passenger.Stale01" / "properties.json").write_text('{"name": "Stale01"}')
    monkeypatch.setenv("PASSENGER_INSTANCE_REGISTRY_DIR", str(registry))
    app.make_release("r1")
    outcome, events, _ = run_deploy(app, "r1")
    assert outcome.result == "ok"
    [restart] = [e for e in events if e.get("step") == "restart"]
    assert said in restart["event"], restart["event"]


def test_an_unforeseen_error_in_a_step_is_a_failed_step_and_is_undone(app, monkeypatch):
    """A step that raises what no step foresaw (a bug: here a named fake, an AttributeError from `restart`, since a
    bug cannot be made for real) takes the road of a failed step: rolled back, out of maintenance, the journal
    closed, the traceback in the step's one log entry."""
    app.make_release("r1")
    app.make_release("r2")
    run_deploy(app, "r1")

    def broken(self):
        raise AttributeError("'NoneType' object has no attribute 'pid'")

    monkeypatch.setattr(Deploy, "restart", broken)
    outcome, events, ctx = run_deploy(app, "r2")
    assert outcome.result == "rolled_back" and app.live() == "r1"
    assert outcome.error.startswith("restart: unexpected error: AttributeError(")
    [failed] = [e for e in events if e.get("step") == "restart" and e.get("result") == "failed"]
    assert "Traceback" in failed["output"] and "in broken" in failed["output"]
    assert [e["step"] for e in events if "step" in e][-1] == "rollback"
    assert not flag(app, "r1") and not flag(app, "r2")
    assert ctx.store.in_flight() is None
    assert not ctx.store.memory.releases["r2"].bad, "a bug of maintd's says nothing against the release"


def test_a_missing_shared_path_fails_the_deploy_without_condemning_the_release(app):
    """The server's fault (shared/log missing) fails the deploy and says what to fix; the release is not bad, and
    once the operator has fixed the server it goes live."""
    app.make_release("r1")
    run_deploy(app, "r1")
    app.make_release("r2")
    outcome, _, ctx = run_deploy(app, "r2", '[shared]\ndirs = ["log"]\n')
    assert outcome.result == "failed" and outcome.fault == "server" and app.live() == "r1"
    assert "shared path(s) missing" in outcome.error and "log" in outcome.error
    record = ctx.store.memory.releases["r2"]
    assert not record.bad and "log" in record.failed
    from maintd.inventory import Inventory, ReleaseState
    from maintd.upload import UploadTracker

    inventory = Inventory(ctx.tree, ctx.store, UploadTracker(1.0, False))
    state, reason = inventory.state_now("r2")
    assert state is ReleaseState.COMPLETE and "no fault of its own" in reason
    (app.shared / "log").mkdir()
    outcome, _, ctx = run_deploy(app, "r2", '[shared]\ndirs = ["log"]\n')
    assert outcome.result == "ok" and app.live() == "r2"
    assert not ctx.store.memory.releases["r2"].failed


def test_a_failing_health_check_condemns_the_release(app):
    """The other side of the line: the new code not answering is the release's fault."""
    app.make_release("r1")
    app.make_release("r2")
    run_deploy(app, "r1")
    outcome, _, ctx = run_deploy(app, "r2", f'[restart]\nhealth_url = "http://127.0.0.1:{free_port()}/"\n'
                                            'health_timeout = 0.2\n')
    assert outcome.fault == "release" and ctx.store.memory.releases["r2"].bad


def test_operator_maintenance_is_one_change_a_deploy_sees_whole(app, monkeypatch):
    """`maintenance on` while a deploy is about to lower its own flags: the deploy must either lower them before
    the operator's change or see the operator's maintenance and leave it. The interleaving is forced with a named
    fake: right after the operator's flag is written, the deploy's `maintenance_off` runs (in the same thread, so
    the store's lock, reentrant, lets it through: what it sees is what the order of the change shows)."""
    from maintd.config import load
    from maintd.context import Context
    from maintd.state import MaintenanceOwner

    app.make_release("r1")
    run_deploy(app, "r1")
    ctx = Context.build(load(app.config), Store(load(app.config).state_dir))
    deploy = Deploy(ctx, "r1", "alice")
    deploy.phase.maintenance = MaintenanceOwner.OURS  # as if this deploy had raised its own flags
    real_raise = ctx.flags.raise_in
    lowered: list[str] = []

    def raise_then_race(release, notice):
        real_raise(release, notice)
        try:
            deploy.maintenance_off()
            lowered.append("lowered")
        except Exception as exc:  # Skipped: it saw the operator's maintenance
            lowered.append(str(exc))

    monkeypatch.setattr(ctx.flags, "raise_in", raise_then_race)
    ctx.operator_maintenance_on(Notice("db upgrade", "2026-12-03T10:00:00+00:00", "root"))
    assert lowered == ["operator maintenance stays on until `maintctl maintenance off`"]
    assert flag(app, "r1") and ctx.store.memory.maintenance.reason == "db upgrade"


def test_the_deploy_thread_and_the_loop_share_the_memory_under_one_lock(app):
    """The deploy thread's cleanup walks the releases maintd remembers while the event loop records new ones (an
    upload found, a release marked bad by the cluster) and `rollback` walks them too: none may see a dict change
    size under it. Real threads; the interpreter is made to switch between them as often as it can."""
    import threading

    from maintd.config import load
    from maintd.context import Context
    from maintd.inventory import Inventory
    from maintd.results import Refused, Skipped
    from maintd.upload import UploadTracker

    app.make_release("r1")
    run_deploy(app, "r1")
    ctx = Context.build(load(app.config), Store(load(app.config).state_dir))
    for i in range(300):
        ctx.store.record(f"old{i}").went_live = float(i + 1)  # live once, long gone from disk
    deploy = Deploy(ctx, "r1", "alice")
    inventory = Inventory(ctx.tree, ctx.store, UploadTracker(1.0, False))
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop_side():
        i = 0
        while not stop.is_set():
            try:
                ctx.store.record(f"new{i}")
                inventory.rollback_target()
            except Refused:  # none of them is on disk: the walk is what is tested
                pass
            except Exception as exc:
                errors.append(exc)
            i += 1

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    other = threading.Thread(target=loop_side)
    other.start()
    try:
        for _ in range(300):
            try:
                deploy.cleanup()
            except Skipped:
                pass
            except Exception as exc:
                errors.append(exc)
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(switch_interval)
    assert errors == []


def test_a_dangling_link_in_shared_is_the_servers_fault_too(app):
    """shared/log a link to nothing is as missing as no shared/log at all: the release is not condemned for it."""
    app.make_release("r1")
    os.symlink("/nonexistent-maintd-target", app.shared / "log")
    outcome, _, ctx = run_deploy(app, "r1", '[shared]\ndirs = ["log"]\n')
    assert outcome.result == "failed" and outcome.fault == "server"
    assert not ctx.store.memory.releases["r1"].bad
