"""Rolling switches (contract §7a) with a real 3-member etcd and four real `maintd run` daemons: tests/test_cluster.py's
cluster with one member more. Batch after batch from the canary, never a maintenance flag (inotify sees every one
made, however briefly), the members that switched back in reverse batch order when a later one fails, `auto` both
ways, and the faults a together switch survives. Orders are read from the members' own log timestamps (one clock:
one machine), never from how long anything took."""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from etcd_cluster import ETCD, EtcdCluster
from test_cluster import Cluster, Member, Poller, crash_and_recover, go_live, quorum_lost, waiting_of
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from conftest import maintctl, maintctl_json, wait_until
from maintd.cluster import MemberState, Standing

FOUR = ("m1", "m2", "m3", "m4")
pytestmark = [pytest.mark.skipif(not Path(ETCD).exists(), reason="etcd is missing (`make test` unpacks Debian's "
                                                                  "into .deps/)"),
              # watchdog's recursive watch adding a new directory twice, in a race of its own: nothing is lost
              pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")]


@pytest.fixture
def fleet(tmp_path: Path, memcached, etcd: EtcdCluster) -> Iterator[Cluster]:
    made = Cluster(tmp_path, memcached.address, etcd, names=FOUR)
    yield made
    made.stop()


def rolling(batch: int | str = 1, wait: float = 0.0, strategy: str = "rolling", canary: str = "") -> str:
    """The keys of §7a, for Cluster.configure(keys=...)."""
    return (f'strategy = "{strategy}"\nbatch = {json.dumps(batch)}\nbatch_wait = {wait}\n'
            + (f'canary = "{canary}"\n' if canary else ""))


class FlagWatch(FileSystemEventHandler):
    """Every maintenance flag made under the members' releases/ while it watches, as inotify reports it (watchdog,
    recursive, so in releases uploaded meanwhile too): a flag that exists for a microsecond is seen as well, which no
    polling can promise. `made` holds the paths."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__()
        self.made: list[str] = []
        self.observer = Observer()
        for member in cluster.members:
            self.observer.schedule(self, str(member.app.releases), recursive=True)
        self.observer.start()

    def on_any_event(self, event: FileSystemEvent) -> None:
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if event.event_type in ("created", "moved", "modified") and os.path.basename(path) == "maintenance.txt":
                self.made.append(str(path))

    def stop(self) -> list[str]:
        self.observer.stop()
        self.observer.join(10)
        return self.made


def named(cluster: Cluster, name: str) -> Member:
    return next(m for m in cluster.members if m.name == name)


def change_restart(member: Member, command: str) -> None:
    """`member`'s restart.command (and what follows it in the table) from now on, reloaded into the daemon."""
    member.app.config.write_text(member.app.config.read_text().replace('command = ["true"]', command))
    member.daemon.reload()


def hold_restart(cluster: Cluster, name: str) -> Member:
    """`name`'s restart waits at its gate from now on (`member.app.gate.open()` lets it go on)."""
    member = named(cluster, name)
    change_restart(member, f"command = {member.app.gate.hook()}")
    return member


def steps_of(member: Member, release: str) -> dict[str, dict[str, Any]]:
    """The step entries of `member`'s last deploy of `release`, by step."""
    outcome = member.daemon.deployed(release)
    return {e["step"]: e for e in member.daemon.steps(outcome["deploy_id"])}


def at(entry: dict[str, Any]) -> float:
    """When the member logged `entry`, by its timestamp."""
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


def going_back(member: Member) -> dict[str, Any]:
    """The entry a member of a rolling switch logs as it turns to go back (after the later batches)."""
    return member.daemon.wait_for(event=lambda e: e.startswith("going back"))


def make_release_with_migrations(cluster: Cluster, name: str, migrations: tuple[str, ...]) -> None:
    for member in cluster.members:
        release = member.app.make_release(name, marker=False)
        (release / "db" / "migrate").mkdir(parents=True)
        for migration in migrations:
            (release / "db" / "migrate" / migration).write_text(f"# {migration}\n")
        (release / ".maintd-ready").touch()


def abandoned_everywhere(cluster: Cluster, because: str) -> None:
    """Every member back on r0, out of maintenance, r1 bad on every member with the reason."""
    cluster.assert_on("r0")
    for member in cluster.members:
        bad = json.loads((member.app.state / "state.json").read_text())["releases"]["r1"]["bad"]
        assert because in bad, f"{member.name}: {bad}\n{cluster.events_tail()}"


def test_batches_go_live_one_after_the_other_from_the_canary_with_no_maintenance_anywhere(fleet):
    """canary m2 alone, then m1 and m3 together, then m4; each batch only once the one before it has been healthy
    for batch_wait; the primary's hooks before the first batch; commit once the last batch is healthy."""
    wait = 1.0
    go_live(fleet, keys=rolling(batch=2, wait=wait, canary="m2"), m1='[hooks]\nbefore_swap = [["true"]]\n')
    last = hold_restart(fleet, "m4")
    flags = FlagWatch(fleet)
    fleet.upload("r1")
    last.app.gate.wait_entered()
    shown = maintctl_json(fleet.members[2].app, "cluster")
    assert [(m["name"], m["state"], m["batch"]) for m in shown["members"]] == [
        ("m1", "healthy", 2), ("m2", "healthy", 1), ("m3", "healthy", 2), ("m4", "switched", 3)]
    assert (shown["switch"]["strategy"], shown["switch"]["why"], shown["switch"]["batch"]) == (
        "rolling", "as configured", 3)
    text = maintctl(fleet.members[0].app, "cluster", check_rc=0).stdout
    assert "BATCH" in text and "batch 3 of 3 in progress" in text, text
    last.app.gate.open()
    outcomes = fleet.deployed("r1")
    assert flags.stop() == [], "a maintenance flag was made during a rolling switch"
    assert all(o["result"] == "ok" for o in outcomes), fleet.events_tail()
    fleet.assert_on("r1")

    steps = {m.name: steps_of(m, "r1") for m in fleet.members}
    batch = {"m2": 1, "m1": 2, "m3": 2, "m4": 3}
    assert len({e["switch_id"] for s in steps.values() for e in list(s.values())[2:]}) == 1  # from prepare on
    for name, taken in steps.items():
        for step in ("maintenance_on", "maintenance_off"):
            assert taken[step]["result"] == "skipped" and "a rolling switch has no maintenance" in taken[step]["event"]
        assert "go, rolling (as configured)" in taken["prepare"]["event"]
        assert all(taken[s].get("batch") == batch[name] for s in list(taken)[list(taken).index("prepare") + 1:]), name
    assert steps["m1"]["hooks_before"]["result"] == "ok"
    assert all(steps[m]["hooks_before"]["result"] == "skipped" for m in ("m2", "m3", "m4"))
    # the order: hooks, the canary, then each batch once the one before it was healthy batch_wait ago, then commit
    assert at(steps["m1"]["hooks_before"]) <= at(steps["m2"]["swap"])
    for name in ("m1", "m3"):
        assert at(steps["m2"]["health"]) + wait <= at(steps[name]["swap"]), name
        assert at(steps[name]["health"]) + wait <= at(steps["m4"]["swap"]), name
    assert all(at(steps["m4"]["health"]) <= at(s["commit"]) <= at(s["hooks_after"]) for s in steps.values())


def test_a_member_waiting_for_its_batch_reads_the_keys_only_when_they_change(fleet):
    """Issue 22: a member waiting for its batch reads the keys again when etcd's watch says that something it waits
    on changed (or when batch_wait ends by the clock), not again and again. m2 (batch 2) waits while the canary m1
    is held in its restart: its readings, counted at its proxy, stand still while nothing changes. lease_ttl is long,
    so the reading a member makes anyway (every third of it) does not come during the test. It used to read the keys
    as fast as etcd answered: while the batch before was not healthy, the wait was told that the clock would make
    it ready in a negative number of seconds (`Rollout.settled_at` being 0 then), and a wait of 0 s ends at once."""
    waiting = named(fleet, "m2")
    go_live(fleet, lease_ttl=300.0, proxied=(waiting.name,), keys=rolling())
    canary = hold_restart(fleet, "m1")
    proxy = fleet.proxies[waiting.name]
    fleet.upload("r1")
    canary.app.gate.wait_entered()
    wait_until(lambda: "for batch 2 to be on" in waiting_of(waiting), 30, "m2 to wait for its batch")
    quiet = proxy.count("/v3/kv/txn")
    for _ in range(10):  # the test reads too: time passes, and nothing m2 waits on changes
        assert fleet.etcd.etcdctl("get", "--prefix", fleet.prefix).returncode == 0
    # at most one reading: the one on the watch's word that m1 switched, which may still have been on its way
    assert proxy.count("/v3/kv/txn") - quiet <= 1, f"m2 read the keys {proxy.count('/v3/kv/txn') - quiet} times"
    canary.app.gate.open()
    outcomes = fleet.deployed("r1")
    assert all(o["result"] == "ok" for o in outcomes), f"{outcomes}\n{fleet.events_tail()}"
    fleet.assert_on("r1")


def test_an_abort_written_while_a_member_says_it_switches_stops_it_before_its_swap(fleet):
    """m2 (batch 2) finds its batch on and writes that it switches; an operator's abort lands first (m2's write is
    held at its proxy meanwhile). m2 reads the decision back in the same transaction as its write, so it never
    swaps: only the canary served r1. It used to swap to the aborted release, restart, flush, and go back."""
    go_live(fleet, proxied=("m2",), keys=rolling())
    proxy = fleet.proxies["m2"]
    proxy.hold(base64.b64encode(Standing(MemberState.SWITCHED).as_json().encode()))
    fleet.upload("r1")
    assert proxy.holding.wait(60), fleet.events_tail()
    done = maintctl(fleet.members[0].app, "cluster", "abort")
    proxy.let_go.set()
    assert done.returncode == 0, done.stderr
    m1, m2, m3, m4 = fleet.members
    assert m1.daemon.deployed("r1")["result"] == "rolled_back"
    assert all(m.daemon.deployed("r1")["result"] == "failed" for m in (m2, m3, m4))
    taken = steps_of(m2, "r1")
    assert taken["swap"]["result"] == "failed" and "the switch was aborted" in taken["swap"]["event"], taken
    assert not {"restart", "flush", "health", "rollback"} & set(taken), list(taken)
    fleet.assert_on("r0")


def test_a_canary_that_fails_is_the_only_member_that_ever_changed(fleet):
    go_live(fleet, keys=rolling())
    canary = fleet.members[0]
    change_restart(canary, 'command = ["false"]')
    pollers = [Poller(m.app) for m in fleet.members[1:]]
    for poller in pollers:
        poller.start()
    flags = FlagWatch(fleet)
    fleet.upload("r1")
    assert canary.daemon.deployed("r1")["result"] == "rolled_back"
    assert all(m.daemon.deployed("r1")["result"] == "failed" for m in fleet.members[1:])
    abandoned_everywhere(fleet, because="restart")
    assert flags.stop() == []
    for member, poller in zip(fleet.members[1:], pollers, strict=True):
        assert {s.release for s in poller.stop()} == {"r0"}, f"{member.name} served r1"
        taken = steps_of(member, "r1")
        assert taken["swap"]["result"] == "failed" and "the switch was aborted" in taken["swap"]["event"]
        assert not {"restart", "flush", "health", "rollback"} & set(taken), (member.name, list(taken))


def test_a_later_batch_that_fails_takes_the_switched_ones_back_in_reverse_batch_order(fleet):
    go_live(fleet, keys=rolling())
    change_restart(named(fleet, "m3"), 'command = ["true"]\nhealth_url = "http://127.0.0.1:9/"\nhealth_timeout = 0.3')
    flags = FlagWatch(fleet)
    fleet.upload("r1")
    for member in fleet.members:
        assert member.daemon.deployed("r1")["result"] == ("failed" if member.name == "m4" else "rolled_back")
    abandoned_everywhere(fleet, because="health")
    assert flags.stop() == []
    m1, m2, m3, m4 = fleet.members
    back = {m.name: steps_of(m, "r1")["rollback"] for m in (m1, m2, m3)}
    assert at(back["m3"]) <= at(going_back(m2)) and at(back["m2"]) <= at(going_back(m1))
    assert "swap" not in {s for s, e in steps_of(m4, "r1").items() if e["result"] == "ok"}, "m4 switched"


def test_auto_switches_code_alone_rolling_and_a_migration_together(fleet):
    go_live(fleet, "r00", keys=rolling(strategy="auto"))  # r00 has no db/migrate: the next one differs
    make_release_with_migrations(fleet, "r0", ("001_orders.rb",))
    assert all(d["result"] == "ok" for d in fleet.deployed("r0"))
    flags = FlagWatch(fleet)
    make_release_with_migrations(fleet, "r1", ("001_orders.rb",))
    assert all(d["result"] == "ok" for d in fleet.deployed("r1"))
    assert flags.made == [], "a maintenance flag in a switch that changes code alone"
    for member in fleet.members:
        said = steps_of(member, "r1")["prepare"]["event"]
        assert 'rolling (strategy = "auto": db/migrate is the same as the live release\'s on every member)' in said
    make_release_with_migrations(fleet, "r2", ("001_orders.rb", "002_add_total.rb"))
    assert all(d["result"] == "ok" for d in fleet.deployed("r2"))
    assert flags.stop(), "a switch with a migration had no maintenance"
    for member in fleet.members:
        taken = steps_of(member, "r2")
        assert ('together (strategy = "auto": db/migrate differs from the live release\'s on m1, m2, m3, m4)'
                in taken["prepare"]["event"]), taken["prepare"]
        assert taken["maintenance_on"]["result"] == "ok" and "batch" not in taken["swap"]
    fleet.assert_on("r2")


@pytest.mark.parametrize("name, step", [("m1", "restart"), ("m3", "health"), ("m3", "hooks_after")])
def test_kill_9_of_a_member_after_it_switched(fleet, name, step):
    """The canary, or a later member, killed once it swapped: before commit the others abort and go back (not
    waiting for one that is gone) and it goes back when it returns; after commit every member goes forward."""
    expected = crash_and_recover(fleet, named(fleet, name), step, keys=rolling())
    fleet.assert_on(expected)
    if expected == "r0":
        abandoned_everywhere(fleet, because=f"{name} is gone")
    fleet.upload("r2")  # and the fleet switches again
    assert all(d["result"] == "ok" for d in fleet.deployed("r2"))
    fleet.assert_on("r2")


def test_a_member_stopped_past_its_lease_aborts_and_the_others_go_back_around_it(fleet):
    """m2, switched and healthy, stops (SIGSTOP) while m4 restarts: it is gone, the switch aborted; m4 goes back
    first, then m3, then m1, without waiting for m2, which goes back itself once it runs again."""
    go_live(fleet, keys=rolling())
    last = hold_restart(fleet, "m4")
    fleet.upload("r1")
    last.app.gate.wait_entered()
    m1, m2, m3, m4 = fleet.members
    m2.daemon.proc.send_signal(signal.SIGSTOP)
    try:
        m3.daemon.wait_for(event=lambda e: "the switch was aborted" in e and "m2 is gone" in e)
        last.app.gate.open()
        for member in (m4, m3, m1):
            assert member.daemon.deployed("r1")["result"] == "rolled_back", member.name
        assert m2.app.live() == "r1"  # stopped: nobody could take it back
    finally:
        m2.daemon.proc.send_signal(signal.SIGCONT)
    assert m2.daemon.deployed("r1")["result"] == "rolled_back"
    abandoned_everywhere(fleet, because="m2 is gone")
    back = {m.name: steps_of(m, "r1")["rollback"] for m in (m4, m3)}
    assert at(back["m4"]) <= at(going_back(m3)) and at(back["m3"]) <= at(going_back(m1))
    assert "m4 went back first" in going_back(m3)["event"]  # it was held in its restart meanwhile


def test_the_etcd_leader_killed_mid_rolling(fleet, etcd):
    go_live(fleet, keys=rolling())
    held = hold_restart(fleet, "m3")
    fleet.upload("r1")
    held.app.gate.wait_entered()
    etcd.kill(etcd.leader())
    held.app.gate.open()
    assert all(d["result"] == "ok" for d in fleet.deployed("r1"))
    fleet.assert_on("r1")


def test_quorum_lost_mid_rolling_leaves_each_member_serving_what_it_serves(fleet, etcd):
    """m1 switched, m2 switching, m3 and m4 waiting their turn when etcd loses quorum: nobody can read the decision,
    and nobody guesses; the switched ones serve r1, the others r0, none in maintenance, until etcd is back."""
    go_live(fleet, keys=rolling())
    held = hold_restart(fleet, "m2")
    flags = FlagWatch(fleet)
    fleet.upload("r1")
    held.app.gate.wait_entered()
    with quorum_lost(fleet, etcd, held.app.gate.open, fleet.members[1]):
        assert [m.app.live() for m in fleet.members] == ["r1", "r1", "r0", "r0"]
        assert not any(json.loads(maintctl(m.app, "status", "--json", check_rc=0).stdout)["maintenance"]["on"]
                       for m in fleet.members)
    outcomes = {d["result"] for d in fleet.deployed("r1", timeout=60)}
    assert flags.stop() == [], "a member went into maintenance without the decision"
    fleet.assert_on("r1" if outcomes == {"ok"} else "r0")  # one release everywhere, whichever the decision was
