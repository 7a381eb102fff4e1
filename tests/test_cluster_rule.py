"""The rule of contract §7 (`View.next_move`): what a waiting member tries, from one reading of the keys; and how a
deploy gets into a switch (`View.way_in`). No etcd, no daemon, a clock passed in, as the upload tracker is tested."""

import json

import pytest

from maintd.cluster import Decision, Entry, Keys, MemberState, Move, Report, Standing, SwitchRecord, View
from maintd.config import Cluster

CLUSTER = Cluster(members=("a", "b", "c"), member="a", prefix="/p", primary="a", prepare_timeout=100.0,
                  switch_timeout=50.0)
SWITCH = SwitchRecord("s1", "r1", "d1", "deploy", "a", "upload", since=1000.0)


def view(states: dict[str, str], decision: Decision | None = None, alive: frozenset[str] = frozenset("abc"),
         go_at: float | None = None) -> View:
    """`states` as short words: "prepared:<digest>", or a state's name."""
    standings = {m: Standing(MemberState(word.partition(":")[0]), digest=word.partition(":")[2])
                 for m, word in states.items()}
    return View(CLUSTER.members, alive=set(alive), switch=SWITCH, states=standings, decision=decision, go_at=go_at)


PREPARED = {m: "prepared:d1" for m in "abc"}


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


def test_an_abort_recorded_before_the_others_joined_is_finished():
    """The wedge of issue #20: the member that began the switch aborted it (another was gone) before the others
    joined; they hold no state in it and never will, so it is finished once the one that joined is back."""
    assert view({"a": "back"}, Decision.ABORT).finished()
    assert view({"a": "back"}, Decision.ABORT, alive={"a", "b"}).finished()  # c still away
    assert view({}, Decision.ABORT).finished()  # aborted by an operator or a refusal before anyone prepared
    assert not view({"a": "prepared:d1"}, Decision.ABORT).finished()  # a goes back itself, then signs off
    assert not view({"a": "back", "b": "maintenance"}, Decision.ABORT).finished()
    assert view({"a": "back"}, Decision.ABORT).next_move(CLUSTER, 9999.0) is None  # decided: nothing to try


def test_a_commit_waits_for_every_member_there_even_one_without_state():
    assert not view({"a": "done", "b": "done"}, Decision.COMMIT).finished()


def test_a_member_state_is_json_read_in_one_place():
    prepared = Standing(MemberState.PREPARED, digest="d1")
    assert Standing.parse(prepared.as_json()) == prepared
    assert Standing(MemberState.HEALTHY).as_json() == '{"state": "healthy"}'  # what commit's transaction compares
    assert Standing.parse(Standing(MemberState.MAINTENANCE, runs_hooks=True).as_json()).runs_hooks
    for unreadable in ("prepared:d1", "", "{}", '{"state": "lost"}', '{"state": "done", "colour": 1}', "[1]"):
        assert Standing.parse(unreadable) is None, unreadable


def test_every_key_of_a_switch_is_under_its_prefix():
    keys = Keys("/p")
    switch = keys.of_switch("s1")
    assert all(key.startswith(switch) for key in (keys.state("s1", "a"), keys.decision("s1"), keys.go_at("s1"),
                                                   keys.reason("s1"), keys.state("s1")))
    assert keys.alive("a") == keys.alive() + "a" and keys.bad("r1") == keys.bad() + "r1"


def test_maintctl_cluster_json_has_the_contract_fields():
    reading = view({"a": "maintenance", "b": "prepared:d1"}, Decision.GO, alive={"a", "b"})
    reading.reports = {"a": Report("r0", 1000.0), "c": Report("r0", 1000.0)}
    shown = reading.as_json("a")
    assert shown["members"] == [{"name": "a", "alive": True, "current": "r0", "state": "maintenance"},
                                {"name": "b", "alive": True, "current": None, "state": "prepared"},
                                {"name": "c", "alive": False, "current": "r0", "state": "not prepared"}]
    assert {"id", "release", "decision"} <= shown["switch"].keys() and shown["switch"]["decision"] == "go"


def test_a_switch_record_is_json_read_in_one_place_and_one_it_cannot_read_is_none():
    """An unreadable P/switch is "no switch to join" (View.unreadable), not an error that ends the reading."""
    assert SwitchRecord.parse(SWITCH.as_json()) == SWITCH
    newer = json.dumps({**json.loads(SWITCH.as_json()), "strategy": "rolling"})  # a newer maintd's: not misread
    missing = json.dumps({k: v for k, v in json.loads(SWITCH.as_json()).items() if k != "digest"})
    wrong = [json.dumps({**json.loads(SWITCH.as_json()), **change}) for change in (
        {"since": "soon"}, {"since": True}, {"release": 7}, {"kind": "sideways"}, {"release": "../etc"})]
    for unreadable in ("", "not json", "[1]", "{}", newer, missing, *wrong):
        assert SwitchRecord.parse(unreadable) is None, unreadable


ABANDONED = {"r1": "not prepared by every member within prepare_timeout"}


@pytest.mark.parametrize("reading, release, by_upload, joining, entry, why", [
    (View(CLUSTER.members), "r1", True, "", Entry.BEGIN, ""),
    (view({"b": "prepared:d1"}), "r1", True, "", Entry.JOIN, ""),  # the switch of its release in progress
    (view({"b": "prepared:d1"}), "r2", True, "", Entry.HELD, "a switch of release r1 is in progress (preparing)"),
    (view({m: "back" for m in "abc"}, Decision.ABORT), "r2", True, "", Entry.END, ""),
    (View(CLUSTER.members, unreadable='{"id": "s2"}'), "r2", False, "", Entry.HELD, "cannot read"),
    # an upload's deploy of a release the cluster abandoned does not begin; an operator's may (contract §2)
    (View(CLUSTER.members, bad=ABANDONED), "r1", True, "", Entry.REFUSED, "the cluster abandoned release r1"),
    (View(CLUSTER.members, bad=ABANDONED), "r1", False, "", Entry.BEGIN, ""),
    # joining: that switch and no other, even where the rule would begin one
    (view({"b": "prepared:d1"}), "r1", False, "s1", Entry.JOIN, ""),
    (view({"b": "back"}, Decision.ABORT), "r1", False, "s1", Entry.REFUSED, "s1 was decided (abort) before"),
    (View(CLUSTER.members), "r1", False, "s1", Entry.REFUSED, "switch s1 was ended before"),
])
def test_way_in(reading, release, by_upload, joining, entry, why):
    found, said = reading.way_in(release, by_upload, joining)
    assert found is entry and why in said, (found, said)
