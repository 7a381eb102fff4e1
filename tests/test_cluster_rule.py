"""The rule of contract §7 (`View.next_move`): what a waiting member tries, from one reading of the keys. No etcd,
no daemon, a clock passed in, as the upload tracker is tested."""

import pytest

from maintd.cluster import Decision, MemberState, Move, SwitchRecord, View
from maintd.config import Cluster

CLUSTER = Cluster(members=("a", "b", "c"), member="a", prefix="/p", primary="a", prepare_timeout=100.0,
                  switch_timeout=50.0)
SWITCH = SwitchRecord("s1", "r1", "d1", "deploy", "a", "upload", since=1000.0)


def view(states: dict[str, str], decision: Decision | None = None, alive: frozenset[str] = frozenset("abc"),
         go_at: float | None = None) -> View:
    return View(CLUSTER.members, alive=set(alive), switch=SWITCH, states=states, decision=decision, go_at=go_at)


PREPARED = {m: f"{MemberState.PREPARED}:d1" for m in "abc"}


@pytest.mark.parametrize("reading, now, move", [
    (view({"a": "prepared:d1"}), 1001.0, None),  # the others have not prepared yet: wait
    (view(PREPARED), 1001.0, Move(Decision.GO)),  # all prepared, one digest, all alive: go
    (view({**PREPARED, "c": "prepared:d2"}), 1001.0, "digests differ"),
    (view({"a": "prepared:d1", "b": "prepared:d1"}), 1101.0, "within prepare_timeout (100s): c"),
    (view(PREPARED, alive={"a", "b"}), 1001.0, "member c is gone"),  # before go too: a switch needs every member
    (view({m: "maintenance" for m in "abc"}, Decision.GO, go_at=1001.0), 1002.0, None),
    (view({"a": "healthy", "b": "healthy", "c": "maintenance"}, Decision.GO, go_at=1001.0), 1002.0, None),
    (view({m: "healthy" for m in "abc"}, Decision.GO, go_at=1001.0), 1002.0, Move(Decision.COMMIT)),
    (view({m: "healthy" for m in "abc"}, Decision.GO, alive={"a", "c"}, go_at=1001.0), 1002.0, "member b is gone"),
    (view({m: "maintenance" for m in "abc"}, Decision.GO, go_at=1001.0), 1052.0, "switch_timeout (50s)"),
    (view({m: "healthy" for m in "abc"}, Decision.COMMIT, alive={"a"}), 9999.0, None),  # decided for good
    (view({m: "back" for m in "abc"}, Decision.ABORT), 9999.0, None),
])
def test_next_move(reading, now, move):
    found = reading.next_move(CLUSTER, now)
    if isinstance(move, str):
        assert found and found.decision is Decision.ABORT and move in found.reason, found
    else:
        assert found == move


def test_a_switch_is_finished_once_decided_and_every_member_there_is_through():
    assert not view({"a": "done", "b": "healthy", "c": "done"}, Decision.COMMIT).finished()
    assert view({"a": "done", "b": "healthy", "c": "done"}, Decision.COMMIT, alive={"a", "c"}).finished()
    assert view({"a": "back", "b": "back", "c": "back"}, Decision.ABORT).finished()
    assert not view({m: "done" for m in "abc"}, Decision.GO).finished()


def test_maintctl_cluster_json_has_the_contract_fields():
    reading = view({"a": "maintenance", "b": "prepared:d1"}, Decision.GO, alive={"a", "b"})
    reading.reports = {"a": {"current": "r0"}, "c": {"current": "r0"}}
    shown = reading.as_json("a")
    assert shown["members"] == [{"name": "a", "alive": True, "current": "r0", "state": "maintenance"},
                                {"name": "b", "alive": True, "current": None, "state": "prepared"},
                                {"name": "c", "alive": False, "current": "r0", "state": "not prepared"}]
    assert {"id", "release", "decision"} <= shown["switch"].keys() and shown["switch"]["decision"] == "go"
