"""Cluster mode (contract §7) with a real 3-member etcd and three real `maintd run` daemons on three trees, standing
in for three app servers. A poller per tree records the maintenance flag and `current/REVISION` as fast as it can;
the timeline they make is what proves that the members switch as one."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_cluster import ETCD, EtcdCluster

from conftest import App, Daemon, wait_until

MEMBERS = ("m1", "m2", "m3")
pytestmark = pytest.mark.skipif(not Path(ETCD).exists(), reason="etcd is missing (`make test` installs etcd-server)")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd")
    yield cluster
    cluster.stop_all()


class Poller(threading.Thread):
    """Samples one tree as a web server would see it: is the flag there, which release answers."""

    def __init__(self, app: App) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.samples: list[tuple[float, bool, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        flag, revision = self.app.current / "tmp" / "maintenance.txt", self.app.current / "REVISION"
        while not self.stopping.is_set():
            try:
                seen = (time.monotonic(), flag.exists(), revision.read_text().strip())
            except OSError:
                continue
            self.samples.append(seen)

    def stop(self) -> list[tuple[float, bool, str]]:
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
    """Three members of one app, each with its tree, its state and its socket, all in one etcd prefix."""

    def __init__(self, base: Path, memcached: str, etcd: EtcdCluster) -> None:
        self.etcd = etcd
        self.prefix = f"/maintd/test-{base.name}"
        self.members = [Member(name, App(base / name, memcached)) for name in MEMBERS]

    def configure(self, lease_ttl: float = 1.5, prepare_timeout: float = 30.0, switch_timeout: float = 30.0,
                  extra: str = "", **per_member: str) -> None:
        for member in self.members:
            member.app.write_config(extra + per_member.get(member.name, "") + f"""
[cluster]
members = {json.dumps(list(MEMBERS))}
member = "{member.name}"
etcd = {json.dumps(self.etcd.endpoints)}
prefix = "{self.prefix}"
lease_ttl = {lease_ttl}
prepare_timeout = {prepare_timeout}
switch_timeout = {switch_timeout}
""")

    def start(self) -> None:
        for member in self.members:
            member.start()

    def upload(self, name: str, to: tuple[str, ...] = MEMBERS) -> None:
        for member in self.members:
            if member.name in to:
                member.app.make_release(name)

    def deployed(self, release: str, timeout: float = 60.0) -> list[dict]:
        return [m.daemon.deployed(release, timeout) for m in self.members if m.daemon]

    def assert_on(self, release: str) -> None:
        """Every member on `release`, complete, out of maintenance."""
        for member in self.members:
            assert member.app.live() == release, f"{member.name} is on {member.app.live()}"
            assert (member.app.current / "REVISION").read_text().strip() == release
            assert not (member.app.current / "tmp" / "maintenance.txt").exists(), f"{member.name} in maintenance"

    def events_tail(self, count: int = 25) -> str:
        """What each member said last, for a failure's message."""
        return "\n".join(f"{m.name}: {json.dumps(e)}" for m in self.members if m.daemon
                         for e in m.daemon.events[-count:])

    def stop(self) -> None:
        for member in self.members:
            if member.daemon:
                member.daemon.stop(signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path: Path, memcached, etcd: EtcdCluster) -> Iterator[Cluster]:
    made = Cluster(tmp_path, memcached.address, etcd)
    yield made
    made.stop()


def go_live(cluster: Cluster, release: str = "r0") -> None:
    cluster.configure()
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
    first_swap = min(next(t for t, _, rev in tl if rev == "r1") for tl in timelines)
    last_swap = max(next(t for t, _, rev in tl if rev == "r1") for tl in timelines)
    all_in = max(next(t for t, flag, _ in tl if flag) for tl in timelines)
    first_out = min(next(t for t, flag, rev in tl if rev == "r1" and not flag) for tl in timelines)
    assert all_in < first_swap, "a member swapped before every member was in maintenance"
    assert last_swap < first_out, "a member left maintenance before every member had swapped"
    switch_ids = {e.get("switch_id") for m in cluster.members for e in m.daemon.events
                  if e.get("release") == "r1" and e.get("step") in ("prepare", "swap", "commit")}
    assert len(switch_ids) == 1 and None not in switch_ids
    steps = [e["step"] for e in cluster.members[1].daemon.steps(outcomes[1]["deploy_id"])]
    assert steps == ["validate", "link_shared", "prepare", "maintenance_on", "hooks_before", "swap", "restart",
                     "flush", "health", "commit", "hooks_after", "maintenance_off", "cleanup"]


CLUSTER_STEPS = ["validate", "link_shared", "prepare", "maintenance_on", "hooks_before", "swap", "restart", "flush",
                 "health", "commit", "hooks_after", "maintenance_off", "cleanup", "end"]
AFTER_COMMIT = CLUSTER_STEPS[CLUSTER_STEPS.index("hooks_after"):]


def crash_and_recover(cluster: Cluster, doomed: Member, step: str) -> str:
    """`doomed` is killed (SIGKILL, by itself) just before `step` of the switch of r1; the others carry on; then it
    comes back. Returns the release every member must end on."""
    go_live(cluster)
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
