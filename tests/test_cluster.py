"""Cluster mode (contract §7) with a real 3-member etcd and three real `maintd run` daemons on three trees, standing
in for three app servers. A poller per tree records the maintenance flag and `current/REVISION` as fast as it can;
the timeline they make is what proves that the members switch as one."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from etcd_cluster import ETCD, EtcdCluster
from etcd_proxy import EtcdProxy

from conftest import App, Daemon, maintctl, maintctl_json, maintd_check, wait_until

MEMBERS = ("m1", "m2", "m3")
pytestmark = pytest.mark.skipif(not Path(ETCD).exists(),
                                reason="etcd is missing (`make test` unpacks Debian's into .deps/)")


class Sample(NamedTuple):
    """What one look at a tree saw, and the interval it was seen in (threads share the GIL: the look itself may
    happen well after `before`), so that orderings are only claimed when certain."""

    before: float
    after: float
    flag: bool
    release: str


class Poller(threading.Thread):
    """Samples one tree as a web server would see it: is the flag there, which release answers."""

    def __init__(self, app: App) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.samples: list[Sample] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        flag, revision = self.app.current / "tmp" / "maintenance.txt", self.app.current / "REVISION"
        while not self.stopping.is_set():
            before = time.monotonic()
            try:
                on, release = flag.exists(), revision.read_text().strip()
            except OSError:
                continue
            self.samples.append(Sample(before, time.monotonic(), on, release))

    def stop(self) -> list[Sample]:
        self.stopping.set()
        self.join(10)
        return self.samples


class Member:
    def __init__(self, name: str, app: App) -> None:
        self.name = name
        self.app = app
        self.daemon: Daemon | None = None

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        self.daemon = Daemon(self.app, env=env).ready()
        return self.daemon


class Cluster:
    """The members of one app (three unless `names` says otherwise), each with its tree, its state and its socket,
    all in one etcd prefix."""

    def __init__(self, base: Path, memcached: str, etcd: EtcdCluster, names: tuple[str, ...] = MEMBERS) -> None:
        self.etcd = etcd
        self.prefix = f"/maintd/test-{base.name}"
        self.names = names
        self.members = [Member(name, App(base / name, memcached)) for name in names]
        self.proxies: dict[str, EtcdProxy] = {}  # members that reach etcd through a proxy the test can cut

    def configure(self, lease_ttl: float = 1.0, prepare_timeout: float = 30.0, switch_timeout: float = 30.0,
                  extra: str = "", proxied: tuple[str, ...] = (), keys: str = "", **per_member: str) -> None:
        """Every member's config: the restart command does nothing (the trees run no app), `per_member` adds
        tables to one member's, the members `proxied` reach etcd through a proxy of their own (`proxies`), and
        `keys` are more keys of the [cluster] table."""
        for name in proxied:
            self.proxies[name] = EtcdProxy(self.etcd.client[self.etcd.names[0]])
        for member in self.members:
            endpoints = [self.proxies[member.name].url] if member.name in proxied else self.etcd.endpoints
            # only the marker completes an upload: the tests write every release's files, then its marker, and a
            # pause of quiet_period in between (a loaded machine) must not make a member take half of one
            member.app.write_config(upload="require_marker = true", extra=extra + per_member.get(member.name, "") + """
[restart]
method = "command"
command = ["true"]""" + f"""
[cluster]
members = {json.dumps(list(self.names))}
member = "{member.name}"
etcd = {json.dumps(endpoints)}
prefix = "{self.prefix}"
lease_ttl = {lease_ttl}
prepare_timeout = {prepare_timeout}
switch_timeout = {switch_timeout}
{keys}
""")

    def start(self) -> None:
        for member in self.members:
            member.start()

    def upload(self, name: str, to: tuple[str, ...] = ()) -> None:
        """`name` written into every member's releases/ (or those `to`), each with its marker."""
        for member in self.members:
            if member.name in (to or self.names):
                member.app.make_release(name)

    def deployed(self, release: str, timeout: float = 60.0) -> list[dict]:
        return [m.daemon.deployed(release, timeout) for m in self.members if m.daemon]

    def assert_on(self, release: str) -> None:
        """Every member on `release`, complete, out of maintenance."""
        for member in self.members:
            assert member.app.live() == release, f"{member.name} is on {member.app.live()}"
            assert (member.app.current / "REVISION").read_text().strip() == release
            assert not (member.app.current / "tmp" / "maintenance.txt").exists(), f"{member.name} in maintenance"

    def keys(self, under: str) -> str:
        """What etcd holds under the cluster's prefix + `under`, as etcdctl prints it (keys and values)."""
        return self.etcd.etcdctl("get", "--prefix", f"{self.prefix}/{under}").stdout

    def alive(self, name: str) -> bool:
        return bool(self.keys(f"alive/{name}"))

    def events_tail(self, count: int = 25) -> str:
        """What each member said last, for a failure's message."""
        return "\n".join(f"{m.name}: {json.dumps(e)}" for m in self.members if m.daemon
                         for e in m.daemon.events[-count:])

    def stop(self) -> None:
        for member in self.members:
            if member.daemon:
                member.daemon.stop(signal.SIGKILL)
        for proxy in self.proxies.values():
            proxy.stop()


@pytest.fixture
def cluster(tmp_path: Path, memcached, etcd: EtcdCluster) -> Iterator[Cluster]:
    made = Cluster(tmp_path, memcached.address, etcd)
    yield made
    made.stop()


def go_live(cluster: Cluster, release: str = "r0", **config: Any) -> None:
    """Every member started with `config` (see Cluster.configure) and on `release`."""
    cluster.configure(**config)
    cluster.start()
    cluster.upload(release)
    assert all(d["result"] == "ok" for d in cluster.deployed(release))
    cluster.assert_on(release)


def test_one_upload_to_every_member_switches_them_as_one(cluster):
    go_live(cluster)
    pollers = [Poller(m.app) for m in cluster.members]
    for poller in pollers:
        poller.start()
    cluster.upload("r1")
    outcomes = cluster.deployed("r1")
    timelines = [poller.stop() for poller in pollers]
    assert all(o["result"] == "ok" for o in outcomes)
    cluster.assert_on("r1")
    # A violation is claimed only where it is certain: a flag still seen off after a swap was already seen, or a
    # release still seen old after a member was already seen out of maintenance.
    first_swap_seen = min(next(s.after for s in tl if s.release == "r1") for tl in timelines)
    last_out_of_maintenance = max(max(s.before for s in tl if s.release == "r0" and not s.flag and s.before <
                                      next(t.before for t in tl if t.flag)) for tl in timelines)
    first_out_seen = min(next(s.after for s in tl if s.release == "r1" and not s.flag) for tl in timelines)
    last_old_seen = max(max(s.before for s in tl if s.release == "r0") for tl in timelines)
    assert last_out_of_maintenance < first_swap_seen, "a member swapped before every member was in maintenance"
    assert last_old_seen < first_out_seen, "a member left maintenance before every member had swapped"
    assert all(any(s.flag for s in tl) for tl in timelines), "a member never showed the maintenance page"
    switch_ids = {e.get("switch_id") for m in cluster.members for e in m.daemon.events
                  if e.get("release") == "r1" and e.get("step") in ("prepare", "swap", "commit")}
    assert len(switch_ids) == 1 and None not in switch_ids
    steps = [e["step"] for e in cluster.members[1].daemon.steps(outcomes[1]["deploy_id"])]
    assert steps == ["validate", "link_shared", "prepare", "maintenance_on", "hooks_before", "swap", "restart",
                     "flush", "health", "commit", "hooks_after", "maintenance_off", "cleanup"]


CLUSTER_STEPS = ["validate", "link_shared", "prepare", "maintenance_on", "hooks_before", "swap", "restart", "flush",
                 "health", "commit", "hooks_after", "maintenance_off", "cleanup", "end"]
AFTER_COMMIT = CLUSTER_STEPS[CLUSTER_STEPS.index("hooks_after"):]


def crash_and_recover(cluster: Cluster, doomed: Member, step: str, **config: Any) -> str:
    """`doomed` is killed (SIGKILL, by itself) just before `step` of the switch of r1; the others carry on; then it
    comes back. `config` as go_live's. Returns the release every member must end on."""
    go_live(cluster, **config)
    doomed.daemon.stop(signal.SIGKILL)
    doomed.start(env={"MAINTD_CRASH_AT": step})
    cluster.upload("r1")
    try:
        assert doomed.daemon.proc.wait(60) == -signal.SIGKILL
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{doomed.name} never reached {step}:\n{cluster.events_tail()}") from None
    expected = "r1" if step in AFTER_COMMIT else "r0"
    for member in cluster.members:
        if member is not doomed:
            result = member.daemon.deployed("r1")["result"]
            assert result == "ok" if expected == "r1" else result in ("failed", "rolled_back"), result
    doomed.start()
    doomed.daemon.wait_for(step="recovery")
    wait_until(lambda: doomed.app.live() == expected and not list(doomed.app.releases.glob("*/tmp/maintenance.txt")),
               30, f"{doomed.name} back on {expected}")
    return expected


@pytest.mark.parametrize("step", CLUSTER_STEPS)
def test_kill_9_of_the_primary_at_every_step(cluster, step):
    expected = crash_and_recover(cluster, cluster.members[0], step)
    cluster.assert_on(expected)
    if expected == "r0":
        assert all(json.loads((m.app.state / "state.json").read_text())["releases"]["r1"]["bad"]
                   for m in cluster.members), "the abandoned release is bad on every member"
    cluster.upload("r2")  # and the cluster switches again
    assert all(d["result"] == "ok" for d in cluster.deployed("r2"))
    cluster.assert_on("r2")


@pytest.mark.parametrize("step", CLUSTER_STEPS)
def test_kill_9_of_a_member_not_primary_at_every_step(cluster, step):
    expected = crash_and_recover(cluster, cluster.members[1], step)
    cluster.assert_on(expected)


def hold_at_primary_hook(cluster: Cluster) -> Member:
    """r0 live everywhere, then r1 uploaded and held at the primary's before-swap hook: every member in
    maintenance, nobody swapped. Returns the primary; `primary.app.gate.open()` lets the switch go on."""
    primary = cluster.members[0]
    primary.app.gate.open()
    go_live(cluster, m1=f"[hooks]\nbefore_swap = [{primary.app.gate.hook()}]\n")
    primary.app.gate.opened.unlink()
    cluster.upload("r1")
    primary.app.gate.wait_entered()
    wait_until(lambda: all((m.app.current / "tmp" / "maintenance.txt").exists() for m in cluster.members), 30,
               "every member in maintenance")
    return primary


def assert_abandoned(cluster: Cluster, release: str = "r1", because: str = "") -> None:
    """Every member back on r0, out of maintenance, and `release` bad everywhere, with the reason."""
    for member in cluster.members:
        result = member.daemon.deployed(release)["result"]
        assert result in ("failed", "rolled_back"), f"{member.name}: {result}"
    cluster.assert_on("r0")
    for member in cluster.members:
        bad = json.loads((member.app.state / "state.json").read_text())["releases"][release]["bad"]
        assert because in bad, f"{member.name}: {bad}\n{cluster.events_tail()}"


def test_a_member_stopped_past_its_lease_is_gone_and_everyone_goes_back(cluster):
    hold_at_primary_hook(cluster)
    stopped = cluster.members[2]
    stopped.daemon.proc.send_signal(signal.SIGSTOP)
    try:
        cluster.members[1].daemon.wait_for(event=lambda e: "decided: abort" in e and "m3 is gone" in e)
    finally:
        stopped.daemon.proc.send_signal(signal.SIGCONT)
    cluster.members[0].app.gate.open()
    assert_abandoned(cluster, because="m3 is gone")


def test_the_etcd_leader_killed_mid_switch(cluster, etcd):
    primary = hold_at_primary_hook(cluster)
    etcd.kill(etcd.leader())
    primary.app.gate.open()
    assert all(d["result"] == "ok" for d in cluster.deployed("r1"))
    cluster.assert_on("r1")


def waiting_of(member: Member) -> str:
    deploying = json.loads(maintctl(member.app, "status", "--json", check_rc=0).stdout)["deploying"] or {}
    return deploying.get("waiting") or ""


@contextmanager
def quorum_lost(cluster: Cluster, etcd: EtcdCluster, then: Callable[[], Any], waiting: Member) -> Iterator[None]:
    """Two of three etcd members killed, then `then` (what happens in the dark); once every member has said it
    cannot reach etcd and `waiting`'s status says why it waits, the body checks what holds meanwhile; etcd is
    back afterwards."""
    lost = etcd.names[:2]
    for name in lost:
        etcd.kill(name)
    then()
    for member in cluster.members:
        member.daemon.wait_for(event=lambda e: e.startswith("etcd cannot be reached"))
    wait_until(lambda: "etcd unreachable" in waiting_of(waiting), 30, "status to say why it waits")
    yield
    for name in lost:
        etcd.start(name)


def test_quorum_lost_before_a_switch_begins_nothing_until_it_is_back(cluster, etcd):
    go_live(cluster)
    with quorum_lost(cluster, etcd, lambda: cluster.upload("r1"), cluster.members[0]):
        assert not any((m.app.current / "tmp" / "maintenance.txt").exists() for m in cluster.members)
    assert all(d["result"] == "ok" for d in cluster.deployed("r1"))
    cluster.assert_on("r1")


def test_quorum_lost_mid_switch_keeps_everyone_in_maintenance_until_it_is_back(cluster, etcd):
    primary = hold_at_primary_hook(cluster)
    with quorum_lost(cluster, etcd, primary.app.gate.open, cluster.members[1]):
        assert json.loads(maintctl(cluster.members[1].app, "status", "--json", check_rc=0).stdout)["maintenance"]["on"]
        assert all((m.app.current / "tmp" / "maintenance.txt").exists() for m in cluster.members), \
            "a member left maintenance without the decision"
    outcomes = {d["result"] for d in cluster.deployed("r1")}
    release = "r1" if outcomes == {"ok"} else "r0"
    cluster.assert_on(release)  # one release everywhere, whichever the decision was


@pytest.mark.parametrize("name, change, because", [
    ("m2", 'command = ["false"]', "restart"),
    ("m3", 'command = ["true"]\nhealth_url = "http://127.0.0.1:9/"\nhealth_timeout = 0.3', "health"),
])
def test_one_member_failing_after_the_swap_takes_every_member_back(cluster, name, change, because):
    go_live(cluster)
    member = next(m for m in cluster.members if m.name == name)
    member.app.config.write_text(member.app.config.read_text().replace('command = ["true"]', change))
    member.daemon.reload()
    cluster.upload("r1")
    assert_abandoned(cluster, because=because)


def test_digests_that_differ_abandon_the_release(cluster):
    go_live(cluster)
    cluster.upload("r1", to=("m1", "m2"))
    odd = cluster.members[2].app.make_release("r1", marker=False)
    (odd / "config.ru").write_text("run ->(env) { [200, {}, ['not the same']] }\n")
    (odd / ".maintd-ready").touch()
    assert_abandoned(cluster, because="digests differ")


def bad_here(member: Member, release: str) -> dict | None:
    """`release`'s row of `maintctl releases` on `member` once it is bad there."""
    rows = {r["name"]: r for r in json.loads(maintctl(member.app, "releases", "--json", check_rc=0).stdout)}
    return rows[release] if rows.get(release, {}).get("state") == "bad" else None


def test_a_release_that_never_reaches_one_member_is_abandoned_at_prepare_timeout(cluster):
    go_live(cluster, prepare_timeout=2.0)
    cluster.upload("r1", to=("m1", "m2"))
    for member in cluster.members[:2]:
        assert member.daemon.deployed("r1")["result"] == "failed"
    cluster.assert_on("r0")
    late = cluster.members[2]
    late.app.make_release("r1")  # arrives after the cluster gave up on it: bad here too, never switched
    row = wait_until(lambda: bad_here(late, "r1"), 30, f"r1 bad on {late.name}")
    assert not (late.app.current / "tmp" / "maintenance.txt").exists() and late.app.live() == "r0"
    assert "prepare_timeout" in row["reason"], row


def test_maintctl_cluster_abort_ends_a_switch_by_hand(cluster):
    primary = hold_at_primary_hook(cluster)
    done = maintctl(cluster.members[2].app, "cluster", "abort", check_rc=0)
    assert "aborted" in done.stdout
    primary.app.gate.open()
    assert_abandoned(cluster, because="aborted by root on m3")


def test_maintctl_cluster_shows_every_member_and_the_switch(cluster):
    primary = hold_at_primary_hook(cluster)
    shown = json.loads(maintctl(cluster.members[1].app, "cluster", "--json", check_rc=0).stdout)
    assert [m["name"] for m in shown["members"]] == list(MEMBERS) and all(m["alive"] for m in shown["members"])
    assert all(m["current"] == "r0" for m in shown["members"])
    assert {m["state"] for m in shown["members"]} == {"maintenance"}
    assert shown["switch"]["release"] == "r1" and shown["switch"]["decision"] == "go" and shown["switch"]["id"]
    text = maintctl(cluster.members[1].app, "cluster", check_rc=0).stdout
    assert "m2 (this one)" in text and "decision: go" in text
    primary.app.gate.open()
    cluster.deployed("r1")
    shown = json.loads(maintctl(cluster.members[0].app, "cluster", "--json", check_rc=0).stdout)
    assert all(m["current"] == "r1" for m in shown["members"])


def test_deploy_and_rollback_from_any_member_switch_every_member(cluster):
    go_live(cluster)
    for member in cluster.members:
        maintctl(member.app, "pause", check_rc=0)
    cluster.upload("r1")
    for member in cluster.members:
        member.daemon.wait_for(event=lambda e: e.startswith("upload of release r1 is complete"))
    done = maintctl(cluster.members[2].app, "deploy", "r1", check_rc=0)
    assert "release r1 is live" in done.stdout
    assert all(d["result"] == "ok" for d in cluster.deployed("r1"))
    cluster.assert_on("r1")
    done = maintctl(cluster.members[1].app, "rollback", check_rc=0)
    assert "release r0 is live" in done.stdout
    wait_until(lambda: all(m.app.live() == "r0" for m in cluster.members), 30, "every member back on r0")
    for member in cluster.members:
        member.daemon.wait_for(release="r0", event=lambda e: e.startswith("rollback of release r0 went live"))
    cluster.assert_on("r0")


def test_maintd_check_checks_the_cluster_table_and_etcd(cluster, etcd):
    cluster.configure()
    app = cluster.members[0].app
    done = maintd_check(app)
    assert done.returncode == 0 and "cluster: member m1 of m1, m2, m3 (primary m1)" in done.stdout, done.stderr
    assert "etcd does not answer" not in done.stderr
    etcd.stop_all()
    done = maintd_check(app)
    assert done.returncode == 0 and "warning: etcd does not answer" in done.stderr
    app.config.write_text(app.config.read_text().replace('member = "m1"', 'member = "m9"'))
    done = maintd_check(app)
    assert done.returncode == 1 and "cluster.member 'm9' is not one of members (m1, m2, m3)" in done.stderr


def take_away(cluster: Cluster, member: Member, how: str) -> None:
    """`member` gone to the others: its maintd killed, or cut off from etcd by its proxy while it runs."""
    if how == "killed":
        member.daemon.stop(signal.SIGKILL)
    elif how == "refused":
        cluster.proxies[member.name].refuse()
    else:
        cluster.proxies[member.name].silence()
    wait_until(lambda: not cluster.alive(member.name), 30, f"{member.name}'s lease to expire")


def bring_back(cluster: Cluster, member: Member, how: str) -> None:
    if how == "killed":
        member.start()
    else:
        cluster.proxies[member.name].forward()
    wait_until(lambda: cluster.alive(member.name), 30, f"{member.name} alive again")


@pytest.mark.parametrize("how", ["killed", "refused", "unanswered"])
def test_a_switch_aborted_while_a_member_was_away_ends_and_the_next_release_goes_live(cluster, how):
    away = cluster.members[2]
    go_live(cluster, proxied=(away.name,))
    take_away(cluster, away, how)
    # r1 reaches m1 alone first: m1 begins its switch and aborts it (m3 is gone) before any other member joined;
    # m2 gets r1 only then, and agrees that it is bad.
    cluster.upload("r1", to=("m1",))
    assert cluster.members[0].daemon.deployed("r1")["result"] == "failed"
    cluster.upload("r1", to=("m2",))
    cluster.members[1].daemon.wait_for(release="r1", event=lambda e: "abandoned" in e)
    bring_back(cluster, away, how)
    wait_until(lambda: not cluster.keys("switch"), 30, "the aborted switch to end")
    cluster.upload("r2")
    outcomes = cluster.deployed("r2")
    assert all(o["result"] == "ok" for o in outcomes), f"{outcomes}\n{cluster.events_tail()}"
    cluster.assert_on("r2")
    held = [e for m in cluster.members for e in m.daemon.events if "is in progress" in e["event"]]
    assert not held, held[:3]


def test_an_upload_that_finds_another_switch_in_progress_is_tried_once_more_when_that_one_ends(cluster):
    go_live(cluster, prepare_timeout=4.0)
    late = cluster.members[2]
    cluster.upload("r1", to=("m1", "m2"))  # r1 never reaches m3: its switch waits for prepare_timeout, then ends
    late.daemon.wait_for(event=lambda e: "waits for release r1 to be uploaded here" in e)
    cluster.upload("r2")
    late.daemon.wait_for(release="r2", step="prepare", result="failed",
                         event=lambda e: "a switch of release r1 is in progress" in e)

    def refused() -> int:
        return len([e for e in list(late.daemon.events) if e.get("release") == "r2" and e.get("step") == "prepare"
                    and e.get("result") == "failed"])

    for member in cluster.members[:2]:  # r1's switch held the cluster until here
        assert member.daemon.deployed("r1")["result"] == "failed"
    assert refused() == 1, f"r2 tried {refused()} times on {late.name} while r1's switch held the cluster"
    late.daemon.wait_for(release="r2", event=lambda e: "has ended" in e and "r2" in e, timeout=60)
    for member in cluster.members:
        member.daemon.wait_for(release="r2", result="ok", event=lambda e: e.startswith("deploy of release r2"),
                               timeout=60)
    cluster.assert_on("r2")
    assert refused() == 1


def test_a_deploy_that_could_not_begin_is_no_verdict_on_the_release_in_a_rebuilt_state(cluster):
    """r2 reaches m3 while the switch of r1, which never reaches m3, holds the cluster: m3's deploy of r2 cannot
    begin and changes nothing. Its history entry says whose fault that was (nobody's), so that when m3's state.json
    is lost and rebuilt from the history, r2 is not made bad for it."""
    go_live(cluster)
    late = cluster.members[2]
    cluster.upload("r1", to=("m1", "m2"))
    late.daemon.wait_for(event=lambda e: "waits for release r1 to be uploaded here" in e)
    late.app.make_release("r2")
    outcome = late.daemon.deployed("r2")
    assert outcome["result"] == "failed" and "a switch of release r1 is in progress" in outcome["event"]
    [entry] = [h for h in late.app.history() if h["release"] == "r2"]
    assert entry["fault"] == "nobody", entry
    assert late.daemon.stop() == 0
    (late.app.state / "state.json").write_text("")
    daemon = late.start()
    daemon.wait_for(event=lambda e: "is empty" in e and "Rebuilt from history.jsonl" in e)
    rows = {row["name"]: row for row in maintctl_json(late.app, "releases")}
    assert rows["r2"]["state"] != "bad", rows["r2"]


def test_maintctl_cluster_abort_ends_a_switch_decided_but_not_finished(cluster):
    primary = hold_at_primary_hook(cluster)
    maintctl(cluster.members[2].app, "cluster", "abort", check_rc=0)
    for member in cluster.members[1:]:  # back at once; the primary is still in its hook, so the switch is unfinished
        assert member.daemon.deployed("r1")["result"] in ("failed", "rolled_back")
    assert cluster.keys("switch")
    done = maintctl(cluster.members[1].app, "cluster", "abort", check_rc=0)
    assert "decided already (abort)" in done.stdout and "ended" in done.stdout, done.stdout
    assert not cluster.keys("switch")
    primary.app.gate.open()
    assert_abandoned(cluster, because="aborted by root on m3")
    cluster.upload("r2")
    assert all(d["result"] == "ok" for d in cluster.deployed("r2"))
    cluster.assert_on("r2")


def test_sigterm_while_cut_off_from_etcd_in_maintenance_ends_the_wait_and_recovery_obeys_the_decision(cluster):
    cut = cluster.members[1]
    primary = cluster.members[0]
    primary.app.gate.open()
    go_live(cluster, proxied=(cut.name,), m1=f"[hooks]\nbefore_swap = [{primary.app.gate.hook()}]\n")
    primary.app.gate.opened.unlink()
    cluster.upload("r1")
    primary.app.gate.wait_entered()
    wait_until(lambda: all((m.app.current / "tmp" / "maintenance.txt").exists() for m in cluster.members), 30,
               "every member in maintenance")
    mark = cut.daemon.mark()
    cluster.proxies[cut.name].silence()
    cut.daemon.wait_for(since=mark, event=lambda e: e.startswith("etcd cannot be reached; waiting"))
    cut.daemon.proc.send_signal(signal.SIGTERM)
    try:
        cut.daemon.proc.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGTERM did not end {cut.name}'s wait:\n{cluster.events_tail()}") from None
    cut.daemon.reader.join(5)
    left = cut.daemon.wait_for(since=mark, event=lambda e: e.startswith("stopping while waiting"))
    assert "in maintenance" in left["event"] and "recovery at the next start" in left["event"], left
    assert left.get("switch_id"), left
    assert not any(e.get("step") in ("abort", "rollback") for e in cut.daemon.events[mark:]), "undone: a guess"
    assert (cut.app.current / "tmp" / "maintenance.txt").exists(), "it left maintenance without the decision"
    assert (cut.app.state / "deploy.json").exists(), "the deploy journal is gone: recovery would not know"
    primary.app.gate.open()  # the others abort (m2 is gone) and go back
    for member in (cluster.members[0], cluster.members[2]):
        assert member.daemon.deployed("r1")["result"] in ("failed", "rolled_back")
    cluster.proxies[cut.name].forward()
    cut.start()
    recovered = cut.daemon.wait_for(step="recovery")
    assert "the switch was aborted: " in recovered["event"], recovered
    wait_until(lambda: not (cut.app.current / "tmp" / "maintenance.txt").exists(), 30, f"{cut.name} out of maintenance")
    cluster.assert_on("r0")
    cluster.upload("r2")
    assert all(d["result"] == "ok" for d in cluster.deployed("r2"))
    cluster.assert_on("r2")


def test_a_switch_record_this_maintd_cannot_read_is_said_once_and_the_next_switch_is_joined(cluster):
    """A value under P/switch this maintd cannot read (the record a newer maintd writes, with a field more), then a
    switch whose decision is no decision: each member says so once, naming the key, however many readings find it,
    refuses to begin a switch while it holds the key, and joins the next switch once it is gone. One such value used
    to end every member's joiner for good: a rollback begun later was never joined, and was aborted, its release
    marked bad on every member."""
    go_live(cluster, prepare_timeout=8.0)
    for member in cluster.members:
        maintctl(member.app, "pause", check_rc=0)
    cluster.upload("r1")
    for member in cluster.members:
        member.daemon.wait_for(event=lambda e: e.startswith("upload of release r1 is complete"))
    maintctl(cluster.members[0].app, "deploy", "r1", check_rc=0)
    cluster.assert_on("r1")
    marks = [m.daemon.mark() for m in cluster.members]
    key = f"{cluster.prefix}/switch"
    newer = {"id": "20990101T000000Z-abcdef", "release": "r9", "digest": "", "kind": "deploy", "by": "m1",
             "actor": "upload", "since": 0.0, "tier": "blue"}
    assert cluster.etcd.etcdctl("put", key, json.dumps(newer)).returncode == 0

    def unreadable(event: str) -> bool:
        return event.startswith(f"{key} holds a value this maintd cannot read")

    for member, mark in zip(cluster.members, marks, strict=True):
        member.daemon.wait_for(since=mark, event=unreadable)
    held = maintctl(cluster.members[1].app, "rollback", check_rc=1)
    assert "holds a value this maintd cannot read" in held.stderr and "no switch can begin" in held.stderr
    assert "unknown: a value this maintd cannot read" in maintctl(cluster.members[2].app, "cluster", check_rc=0).stdout
    garbled = {**newer, "id": "20990101T000000Z-fedcba"}
    del garbled["tier"]
    decision = f"{cluster.prefix}/s/{garbled['id']}/decision"
    assert cluster.etcd.etcdctl("put", decision, "perhaps").returncode == 0
    assert cluster.etcd.etcdctl("put", key, json.dumps(garbled)).returncode == 0

    def undecidable(event: str) -> bool:
        return f"{decision} holds 'perhaps', which this maintd cannot read" in event

    for member, mark in zip(cluster.members, marks, strict=True):
        member.daemon.wait_for(since=mark, event=undecidable)
    assert cluster.etcd.etcdctl("del", "--prefix", f"{cluster.prefix}/s/{garbled['id']}/").returncode == 0
    assert cluster.etcd.etcdctl("del", key).returncode == 0
    done = maintctl(cluster.members[1].app, "rollback")
    assert done.returncode == 0, (done.stdout, done.stderr, cluster.events_tail())
    cluster.assert_on("r0")
    for member, mark in zip(cluster.members, marks, strict=True):
        said = [e["event"] for e in member.daemon.events[mark:] if unreadable(e["event"]) or undecidable(e["event"])]
        assert len(said) == 2, f"{member.name} said it {len(said)} times: {said[:4]}"


def test_deploying_the_live_release_again_from_one_member_redeploys_every_member(cluster):
    """Contract §1: "an operator can deploy any complete release again with `maintctl deploy NAME`", and on one
    server a deploy of the live release goes through every step again (restart, flush, health): a redeploy. So on
    a cluster, every member joins that switch. They used to refuse it as an upload's deploy of a live release, at
    every reading, until prepare_timeout aborted it and the live release was marked bad on every member."""
    go_live(cluster, prepare_timeout=8.0)
    marks = [m.daemon.mark() for m in cluster.members]
    done = maintctl(cluster.members[0].app, "deploy", "r0")
    assert done.returncode == 0, (done.stderr, cluster.keys("bad/"), cluster.events_tail())
    for member, mark in zip(cluster.members, marks, strict=True):
        outcome = member.daemon.deployed("r0", since=mark)
        assert outcome["result"] == "ok", (member.name, outcome)
        steps = {e["step"]: e["result"] for e in member.daemon.steps(outcome["deploy_id"])}
        assert steps["swap"] == steps["restart"] == steps["flush"] == steps["commit"] == "ok", (member.name, steps)
        refusals = [e["event"] for e in member.daemon.events[mark:] if "not joining" in e["event"]]
        assert not refusals, (member.name, refusals[:3])
    cluster.assert_on("r0")
    assert not cluster.keys("bad/")
    for member in cluster.members:
        assert not json.loads((member.app.state / "state.json").read_text())["releases"]["r0"]["bad"]


def test_an_operator_deploys_a_release_the_cluster_abandoned_on_every_member(cluster):
    """Contract §2: a bad release is never deployed automatically again, but `maintctl deploy NAME` still may; §7:
    an abandoned release is bad on every member. So an operator's deploy of it switches every member, as it would
    take it live on a lone server, however late it reached a member. It used to be refused for good."""
    go_live(cluster, prepare_timeout=3.0)
    cluster.upload("r1", to=("m1", "m2"))
    for member in cluster.members[:2]:
        assert member.daemon.deployed("r1")["result"] == "failed"
    late = cluster.members[2]
    late.app.make_release("r1")  # arrives after the cluster gave up on it: bad here too, not switched by itself
    wait_until(lambda: bad_here(late, "r1"), 30, f"r1 bad on {late.name}")
    cluster.assert_on("r0")
    marks = [m.daemon.mark() for m in cluster.members]
    done = maintctl(cluster.members[1].app, "deploy", "r1")
    assert done.returncode == 0, (done.stderr, cluster.events_tail())
    for member, mark in zip(cluster.members, marks, strict=True):  # (m3's own try at the upload may end first)
        member.daemon.wait_for(since=mark, release="r1", result="ok", event=lambda e: e.startswith("deploy of"))
    cluster.assert_on("r1")
    # The cluster abandoned r1, and its key stays; each member's record follows what became of r1 there: it went
    # live, so it is bad no more, as on a lone server, and the joiner, which reads the key at every reading, does not
    # mark it bad again. So `rollback`, after r2, goes back to r1, the release `releases` calls previous.
    assert cluster.keys("bad/r1")
    marks = [m.daemon.mark() for m in cluster.members]
    cluster.upload("r2")
    assert all(d["result"] == "ok" for d in cluster.deployed("r2"))
    cluster.assert_on("r2")
    joined = [member for member, mark in zip(cluster.members, marks, strict=True)  # each read the keys, r1 live
              if not any("of release r2 begun" in e["event"] for e in member.daemon.events[mark:])]  # there, first
    assert joined
    for member in joined:
        assert not json.loads((member.app.state / "state.json").read_text())["releases"]["r1"]["bad"], member.name
        assert {r["name"]: r["state"] for r in maintctl_json(member.app, "releases")}["r1"] == "previous"
    marks = [m.daemon.mark() for m in cluster.members]
    done = maintctl(joined[0].app, "rollback")
    assert done.returncode == 0, (done.stderr, cluster.events_tail())
    for member, mark in zip(cluster.members, marks, strict=True):
        member.daemon.wait_for(since=mark, release="r1", result="ok", event=lambda e: e.startswith("rollback of"))
    cluster.assert_on("r1")
    assert cluster.keys("bad/r1")


@pytest.fixture
def four(tmp_path: Path, memcached, etcd: EtcdCluster) -> Iterator[Cluster]:
    made = Cluster(tmp_path, memcached.address, etcd, ("m1", "m2", "m3", "m4"))
    yield made
    made.stop()


def test_every_entry_of_a_switch_carries_the_recorded_id_when_the_markers_land_everywhere_at_once(four):
    """Contract §7: a switch's entries carry its id, the same on every member. Four members whose uploads
    complete within a millisecond of each other each find no switch and try to begin one; one begins it. Every
    entry of every member's deploy, from `started` on, and its history entry carry that one id. A member used to
    log its first entries (`started`, `validate`, `link_shared`) under an id of its own that lost the race."""
    go_live(four)
    for release in ("r1", "r2", "r3"):
        marks = [m.daemon.mark() for m in four.members]
        markers = [m.app.make_release(release, marker=False) / ".maintd-ready" for m in four.members]
        for marker in markers:
            marker.touch()
        outcomes = [m.daemon.deployed(release, since=mark) for m, mark in zip(four.members, marks, strict=True)]
        assert all(o["result"] == "ok" for o in outcomes), (outcomes, four.events_tail())
        begun = [e for m, mark in zip(four.members, marks, strict=True) for e in m.daemon.events[mark:]
                 if e["event"].endswith(f" of release {release} begun")]
        [recorded] = [e["switch_id"] for e in begun]
        for member, outcome in zip(four.members, outcomes, strict=True):
            entries = [e for e in member.daemon.events if e.get("deploy_id") == outcome["deploy_id"]]
            strays = [(e.get("step"), e["event"][:60], e.get("switch_id")) for e in entries
                      if e.get("switch_id") != recorded]
            assert len(entries) > len(CLUSTER_STEPS) and not strays, (member.name, release, recorded, strays)
            [entry] = [h for h in member.app.history() if h["deploy_id"] == outcome["deploy_id"]]
            assert entry["switch_id"] == recorded, (member.name, entry)
    four.assert_on("r3")


def reported(cluster: Cluster) -> dict[str, str | None]:
    """Each member's live release as `maintctl cluster --json` shows it (asked of the first member)."""
    shown = maintctl_json(cluster.members[0].app, "cluster")
    return {m["name"]: m["current"] for m in shown["members"]}


def test_every_member_reports_its_live_release_from_its_start_and_wherever_current_moves(cluster):
    """Contract §7: `maintctl cluster` shows each member's live release. A member used to report it at the end of a
    switch alone: after a start every member showed none, though a release was live (here r0, live before these
    servers ran as a cluster), and a member that a crash cut off showed the release it had before, whatever its
    recovery made live."""
    cluster.configure()
    for member in cluster.members:
        member.app.make_release("r0")
        member.app.current.symlink_to("releases/r0")
    cluster.start()
    wait_until(lambda: reported(cluster) == dict.fromkeys(MEMBERS, "r0"), 30, "every member to report r0")
    doomed = cluster.members[1]
    for release, step, expected in (("r1", "hooks_after", "r1"), ("r2", "restart", "r1")):
        doomed.daemon.stop(signal.SIGKILL)
        doomed.start(env={"MAINTD_CRASH_AT": step})
        cluster.upload(release)
        assert doomed.daemon.proc.wait(60) == -signal.SIGKILL
        for member in cluster.members:
            if member is not doomed:
                member.daemon.deployed(release)
        doomed.start()
        doomed.daemon.wait_for(step="recovery")
        wait_until(lambda expected=expected: reported(cluster) == dict.fromkeys(MEMBERS, expected), 30,
                   f"every member to report {expected}, the recovered one too")
        cluster.assert_on(expected)


def prepared(cluster: Cluster, *names: str) -> bool:
    return all(f"/state/{name}\n" in cluster.keys("s/") for name in names)


def test_a_waiting_member_reads_the_keys_when_they_change_and_learns_of_go_through_the_watch(cluster):
    """Issue 22: a member waiting for go reads the keys again when etcd's watch says that something it waits on
    changed, not on a timer: its readings, counted at its proxy, stand still while nothing changes (it used to read
    every member's keys every 4 to 50 ms). lease_ttl is long here, so the reading a member makes anyway (every third
    of it) would come far too late: the switch goes through on the watch alone, even after the stream ended and was
    opened again from the last revision it had delivered."""
    waiting = cluster.members[1]
    go_live(cluster, lease_ttl=300.0, proxied=(waiting.name,))
    proxy = cluster.proxies[waiting.name]
    cluster.upload("r1", to=("m1", "m2"))  # not m3 yet: the switch waits for it in prepare
    wait_until(lambda: prepared(cluster, "m1", "m2"), 30, "m1 and m2 to prepare r1")
    wait_until(lambda: "for every member to prepare" in waiting_of(waiting), 30, "m2 to wait for go")
    quiet = proxy.count("/v3/kv/txn")
    for _ in range(10):  # the test reads too: time passes, and nothing under the prefix changes
        assert cluster.etcd.etcdctl("get", "--prefix", cluster.prefix).returncode == 0
    assert proxy.count("/v3/kv/txn") == quiet, "m2 read the keys again while nothing had changed"
    assert proxy.end_watches() == 1
    wait_until(lambda: proxy.count("/v3/watch") == 2, 30, "m2 to open its watch again")
    cluster.upload("r1", to=("m3",))
    outcomes = cluster.deployed("r1")
    assert all(o["result"] == "ok" for o in outcomes), f"{outcomes}\n{cluster.events_tail()}"
    cluster.assert_on("r1")


def test_a_member_whose_watch_falls_silent_still_switches_through_its_readings(cluster):
    """etcd3gw's watch can end silently (../shared/cluster-notes.md): the stream is held open here, and nothing comes
    through it any more, as on a network that drops a connection's packets. The member learns nothing from it and
    still switches with the others: the reading it makes anyway, every third of lease_ttl, is the truth."""
    cut = cluster.members[1]
    go_live(cluster, proxied=(cut.name,))
    assert cluster.proxies[cut.name].silence_watches() == 1
    cluster.upload("r1")
    outcomes = cluster.deployed("r1")
    assert all(o["result"] == "ok" for o in outcomes), f"{outcomes}\n{cluster.events_tail()}"
    cluster.assert_on("r1")


def kv(cluster: Cluster, key: str, *args: str) -> dict | None:
    """The key as etcd holds it (now, or `--rev=N`): its value and revisions, None when absent."""
    done = cluster.etcd.etcdctl("get", f"{cluster.prefix}/{key}", "-w", "json", *args)
    found = json.loads(done.stdout).get("kvs") or [None]
    return found[0] and {**found[0], "value": base64.b64decode(found[0]["value"]).decode()}


def test_the_member_whose_health_completes_the_set_commits_in_the_same_transaction(cluster):
    """When etcd's watch says that every other member (but at most two) has recorded its state since this member
    last read them, its own `healthy` may complete the set: it writes `commit` in the same transaction (etcd
    comparing the others' keys, as ever), one round trip instead of two inside every member's window. m3 is held in
    its restart until m1 and m2 are healthy: the decision is written at the very revision of m3's `healthy`. It used
    to take a transaction of its own, after m3 had read its own write back."""
    go_live(cluster)
    late = cluster.members[2]
    late.app.gate.open()
    late.app.config.write_text(late.app.config.read_text().replace('command = ["true"]',
                                                                   f"command = {late.app.gate.hook()}"))
    late.daemon.reload()
    late.app.gate.opened.unlink()
    cluster.upload("r1")
    late.app.gate.wait_entered()
    switch = json.loads(kv(cluster, "switch")["value"])["id"]
    healthy = json.dumps({"state": "healthy"})
    wait_until(lambda: all((kv(cluster, f"s/{switch}/state/{name}") or {}).get("value") == healthy
                           for name in ("m1", "m2")), 30, "m1 and m2 to be healthy")
    late.app.gate.open()
    outcomes = cluster.deployed("r1")
    assert all(o["result"] == "ok" for o in outcomes), f"{outcomes}\n{cluster.events_tail()}"
    cluster.assert_on("r1")
    decision = kv(cluster, f"s/{switch}/decision")
    assert decision and decision["value"] == "commit"
    then = kv(cluster, f"s/{switch}/state/m3", f"--rev={decision['mod_revision']}")
    assert then and then["value"] == healthy and then["mod_revision"] == decision["mod_revision"], (decision, then)


def test_a_finished_switch_held_in_json_of_another_spacing_is_ended_and_the_next_switch_begins(cluster):
    """A finished switch still in P/switch is removed by the next switch to begin, by a transaction that compares
    the key's value with the record. Written by hand (etcdctl, a restored backup) in JSON spaced otherwise than
    Python writes it, the record reads the same but compares unequal: it was never removed, and every deploy's way
    into a switch tried again and again, as fast as etcd answered, a wait that not even SIGTERM ended."""
    go_live(cluster)
    record = {"id": "20990101T000000Z-abcdef", "release": "r9", "digest": "", "kind": "deploy", "by": "m1",
              "actor": "upload", "since": 0.0}
    assert cluster.etcd.etcdctl("put", f"{cluster.prefix}/s/{record['id']}/decision", "abort").returncode == 0
    assert cluster.etcd.etcdctl("put", f"{cluster.prefix}/switch",
                                json.dumps(record, separators=(",", ":"))).returncode == 0
    cluster.upload("r1")
    outcomes = cluster.deployed("r1")
    assert all(o["result"] == "ok" for o in outcomes), f"{outcomes}\n{cluster.events_tail()}"
    cluster.assert_on("r1")
