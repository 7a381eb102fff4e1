"""The state directory after a failing disk or a hand edit (issue #20, item 11): real files and deploys, a real daemon.

A `state.json` that is empty, not JSON or of the wrong shape is kept aside and rebuilt from the history and the tree,
paused, with one log line; a torn deploy journal is said once and kept aside; history lines that do not parse are
passed over and counted. Never a traceback.
"""

import json

import pytest

from conftest import maintctl, maintctl_json, maintd_check, run_deploy
from maintd.config import load
from maintd.context import Context
from maintd.maintenance import Notice
from maintd.rebuild import rebuild
from maintd.state import InFlight, Memory, Store, read_memory

FAILS_BEFORE_SWAP = '[hooks]\nbefore_swap = [["false"]]\n'
FAILS_AFTER_SWAP = '[hooks]\nafter_swap = [["false"]]\n'


def past_deploys(app):
    """r1 and r2 went live (r2 is live, r1 previous), r3 failed before its swap, r4 rolled back after its."""
    for name, extra, result in (("r1", "", "ok"), ("r2", "", "ok"), ("r3", FAILS_BEFORE_SWAP, "failed"),
                                ("r4", FAILS_AFTER_SWAP, "rolled_back")):
        app.make_release(name)
        assert run_deploy(app, name, extra)[0].result == result
    app.write_config()


def recorded(reports):
    return lambda text: reports.append(text)


def test_an_empty_state_is_rebuilt_paused_and_the_daemon_carries_on(app, start_daemon):
    past_deploys(app)
    with open(app.state / "history.jsonl", "ab") as history:
        history.write(b'{"release": "r9", "resu\n')  # a line cut by a crash
    (app.state / "state.json").write_bytes(b"")
    (app.state / "deploy.json").write_bytes(b"\0" * 512)  # a journal sector lost in a power cut
    app.make_release("r5")  # marked and newer than the live release: deployed at once, were the state not lost
    daemon = start_daemon()

    line = daemon.wait_for(level="error", event=lambda e: "state.json is empty" in e)["event"]
    assert "kept as state.json.bad-" in line
    assert "previous release (r1)" in line and "the live release (r2)" in line and "(r3, r4)" in line
    assert "paused until `maintctl resume`" in line
    skipped = daemon.wait_for(level="error", event=lambda e: "history.jsonl: 1 line(s) that do not parse" in e)
    assert "the first is line 5" in skipped["event"]
    torn = daemon.wait_for(level="error", event=lambda e: "deploy.json is not JSON" in e)["event"]
    assert "no deploy can be known to have been in flight; kept as deploy.json.bad-" in torn
    assert not (app.state / "deploy.json").exists()
    [kept] = app.state.glob("state.json.bad-*")
    assert kept.read_bytes() == b""  # the damaged file, as it was
    status = maintctl_json(app, "status")
    assert (status["paused"], status["current"], status["previous"]) == (True, "r2", "r1")
    assert (status["last_deploy"]["release"], status["last_deploy"]["result"]) == ("r4", "rolled_back")
    states = {row["name"]: row["state"] for row in maintctl_json(app, "releases")}
    assert (states["r3"], states["r4"]) == ("bad", "bad")

    maintctl(app, "resume", check_rc=0)
    assert daemon.deployed("r5")["result"] == "ok"  # it carries on: what waited goes live once resumed
    assert json.loads((app.state / "state.json").read_text())["paused"] is False
    assert not [e for e in daemon.events if e.get("level") == "raw"], "nothing but log lines (no traceback)"


@pytest.mark.parametrize("content, fault", [
    (b"", "is empty"),
    (b"{\"paused\": tru", "is not JSON (Expecting value at line 1 column 12)"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b"[]", "does not hold maintd's state: the state must be an object, not list"),
    (b'{"paused": "no"}', "paused must be true or false, not str"),
    (b'{"previous": 7}', "previous must be a release name or null, not int"),
    (b'{"releases": {"r1": {"went_live": "yesterday"}}}', "releases.r1.went_live must be a number or null, not str"),
    (b'{"releases": {"../etc": {}}}', "releases names '../etc', which is no release name"),
    (b'{"releases": {"r1": {"colour": "red"}}}', "unexpected keyword argument 'colour'"),
    (b'{"maintenance": {"reason": 1, "since": "", "by": ""}}', "maintenance.reason must be a string, not int"),
])
def test_a_state_that_is_not_one_is_named_kept_aside_and_blank_paused(tmp_path, content, fault):
    (tmp_path / "state.json").write_bytes(content)
    store = Store(tmp_path, recorded([]))
    assert store.damage.startswith(f"{tmp_path / 'state.json'} ")
    assert fault in store.damage
    assert store.memory.paused is True and store.memory.releases == {}
    [kept] = tmp_path.glob("state.json.bad-*")
    assert kept.read_bytes() == content
    Store(tmp_path, recorded([]))  # the next start of a restart loop: the same file is kept once
    assert len(list(tmp_path.glob("state.json.bad-*"))) == 1


def lost_and_rebuilt(app, damaged: str = "") -> tuple[Memory, Store, str]:
    """state.json as the deploys left it, then damaged (`damaged` written over it) and rebuilt from the history and
    the tree: (the state before, the store rebuilt, rebuild's one line)."""
    config = load(app.config)
    before = read_memory(app.state / "state.json")
    (app.state / "state.json").write_text(damaged)
    store = Store(config.state_dir, recorded([]))
    ctx = Context.build(config, store)
    return before, store, rebuild(store, ctx.tree, ctx.flags)


def test_the_rebuilt_state_is_what_the_deploys_left(app):
    past_deploys(app)
    before, store, line = lost_and_rebuilt(app, '{"paused": "no"}')
    after = read_memory(app.state / "state.json")  # saved
    assert after == store.memory
    assert after.paused is True and before.paused is False
    assert after.previous == before.previous == "r1"
    assert {n for n, r in after.releases.items() if r.bad} == {n for n, r in before.releases.items() if r.bad}
    assert after.releases["r3"].bad == before.releases["r3"].bad
    went_live = [n for _, n in sorted((r.went_live, n) for n, r in after.releases.items() if r.went_live)]
    assert went_live == ["r1", "r2"]
    assert abs(after.releases["r2"].went_live - before.releases["r2"].went_live) < 2
    assert {k: after.last_deploy[k] for k in ("release", "result", "deploy_id", "kind", "error")} == \
        {k: before.last_deploy[k] for k in ("release", "result", "deploy_id", "kind", "error")}
    assert after.maintenance is None and "operator" not in line
    assert line.startswith(f"{app.state / 'state.json'} does not hold maintd's state: paused must be true or false")


def test_an_operators_maintenance_is_kept_from_its_flag_but_not_a_deploys_in_flight(app):
    past_deploys(app)
    config = load(app.config)
    ctx = Context.build(config, Store(config.state_dir))
    ctx.flags.raise_in(app.releases / "r2", Notice("db upgrade", "2026-11-23T20:00:00+00:00", "alice", "22:00"))
    (app.state / "state.json").write_text("")

    store = Store(config.state_dir, recorded([]))
    line = rebuild(store, ctx.tree, ctx.flags)
    assert store.memory.maintenance == Notice("db upgrade", "2026-11-23T20:00:00+00:00", "alice", "22:00")
    assert "the operator's maintenance its flag shows (db upgrade)" in line

    (app.state / "state.json").write_text("")
    store = Store(config.state_dir, recorded([]))
    store.journal(InFlight("id", "deploy", "r5", "r2", "upload", "2026-11-23T20:00:00+00:00", "swap", "ours"), False)
    line = rebuild(store, ctx.tree, ctx.flags)
    assert store.memory.maintenance is None and "is the deploy's in flight" in line


@pytest.mark.parametrize("content, fault", [
    (b"\0" * 512, "is not JSON"),
    (b"", "is empty"),
    (b'{"deploy_id": "x"}', "missing"),
    (json.dumps({"deploy_id": "x", "kind": "deploy", "release": "../../etc", "previous": None, "actor": "upload",
                 "started": "", "step": "swap"}).encode(), "names '../../etc', which is no release name"),
    (json.dumps({"deploy_id": "x", "kind": "deploy", "release": "r1", "previous": None, "actor": "upload",
                 "started": "", "step": "swap", "maintenance": "mine"}).encode(), "'mine' is not a valid"),
    (json.dumps({"deploy_id": "x", "kind": "deploy", "release": "r1", "previous": None, "actor": "upload",
                 "started": "", "step": "rollback", "failed": "health", "fault": "hers"}).encode(),
     "'hers' is not a valid Fault"),
])
def test_a_torn_journal_is_said_once_and_kept_aside(tmp_path, content, fault):
    (tmp_path / "deploy.json").write_bytes(content)
    reports = []
    store = Store(tmp_path, recorded(reports))
    assert store.in_flight() is None
    assert store.in_flight() is None
    [line] = reports
    assert line.startswith(f"{tmp_path / 'deploy.json'} ") and fault in line
    assert "no deploy can be known to have been in flight; kept as deploy.json.bad-" in line
    assert not (tmp_path / "deploy.json").exists()
    [kept] = tmp_path.glob("deploy.json.bad-*")
    assert kept.read_bytes() == content


def test_history_lines_that_do_not_parse_are_counted_once_per_state_of_the_file(tmp_path):
    good = json.dumps({"release": "r1", "result": "ok"})
    (tmp_path / "history.jsonl").write_bytes(b"\n".join([good.encode(), b'{"release": "r2", "res', b"\xff\xfe",
                                                         b"[1, 2]", good.encode()]) + b"\n")
    reports = []
    store = Store(tmp_path, recorded(reports))
    assert [e["release"] for e in store.history()] == ["r1", "r1"]
    said = f"{tmp_path / 'history.jsonl'}: 3 line(s) that do not parse were passed over (the first is line 2)"
    assert reports == [said]
    assert [e["release"] for e in store.history()] == ["r1", "r1"]
    assert reports == [said]  # the same file as it was: said already
    store.append_history({"release": "r3", "result": "ok"})
    assert [e["release"] for e in store.history()] == ["r1", "r1", "r3"]
    assert reports == [said, said]  # changed since: said again, once
    store.history()
    assert reports == [said, said]


def test_check_warns_of_a_damaged_state_and_says_what_run_will_do(app):
    app.state.mkdir()
    (app.state / "state.json").write_text("{")
    (app.state / "deploy.json").write_text("")
    done = maintd_check(app)
    assert done.returncode == 0, done.stderr
    assert f"warning: {app.state / 'state.json'} is not JSON" in done.stderr
    assert "maintd run will keep it aside and rebuild the state from history.jsonl and the tree" in done.stderr
    assert f"warning: {app.state / 'deploy.json'} is empty: maintd run will keep it aside" in done.stderr
    assert (app.state / "state.json").read_text() == "{"  # check changes nothing
    assert not list(app.state.glob("*.bad-*"))


def test_a_release_that_failed_through_the_servers_fault_is_not_rebuilt_bad(app):
    """The history says whose fault a failure was: a shared path missing failed r2 without condemning it."""
    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    app.make_release("r2")
    assert run_deploy(app, "r2", '[shared]\ndirs = ["log"]\n')[0].result == "failed"
    app.write_config()
    before, store, _ = lost_and_rebuilt(app)
    assert not store.memory.releases["r2"].bad
    assert store.memory.releases["r2"].failed == before.releases["r2"].failed != ""


def test_a_bad_release_taken_live_again_is_not_bad_live_or_rebuilt(app):
    """A release that went live is no longer bad (`ReleaseRecord.acquit`), as its deploy ends and as rebuild.py
    replays the history: one definition (`Memory.went_live`), so that the state does not depend on whether
    state.json was ever rebuilt. r2 failed through its own fault, then an operator took it live, then r3."""
    app.make_release("r1")
    assert run_deploy(app, "r1")[0].result == "ok"
    app.make_release("r2")
    assert run_deploy(app, "r2", FAILS_BEFORE_SWAP)[0].result == "failed"
    assert read_memory(app.state / "state.json").releases["r2"].bad
    assert run_deploy(app, "r2")[0].result == "ok"
    app.make_release("r3")
    assert run_deploy(app, "r3")[0].result == "ok"
    before, store, _ = lost_and_rebuilt(app)
    after = store.memory
    assert before.previous == after.previous == "r2"
    assert before.releases["r2"].bad == after.releases["r2"].bad == "", (before.releases["r2"], after.releases["r2"])
