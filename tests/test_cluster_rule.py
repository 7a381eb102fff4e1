"""The rule of contract §7 (`View.next_move`): what a waiting member tries, from one reading of the keys; and how a
deploy gets into a switch (`View.way_in`). No etcd, no daemon, a clock passed in, as the upload tracker is tested."""

import dataclasses
import json

import pytest

from maintd.cluster import Choice, Decision, Entry, Keys, MemberState, Report, Standing, SwitchRecord, View
from maintd.config import Cluster, Strategy

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
    (view(PREPARED), 1001.0, Decision.GO),  # all prepared, one digest, all alive: go
    (view({**PREPARED, "c": "prepared:d2"}), 1001.0, "digests differ"),
    (view({"a": "prepared:d1", "b": "prepared:d1"}), 1101.0, "within prepare_timeout (100s): c"),
    (view(PREPARED, alive={"a", "b"}), 1001.0, "member c is gone"),  # before go too: a switch needs every member
    (view({m: "maintenance" for m in "abc"}, Decision.GO, go_at=1001.0), 1002.0, None),
    (view({"a": "healthy", "b": "healthy", "c": "maintenance"}, Decision.GO, go_at=1001.0), 1002.0, None),
    (view({m: "healthy" for m in "abc"}, Decision.GO, go_at=1001.0), 1002.0, Decision.COMMIT),
    (view({m: "healthy" for m in "abc"}, Decision.GO, alive={"a", "c"}, go_at=1001.0), 1002.0, "member b is gone"),
    (view({m: "maintenance" for m in "abc"}, Decision.GO, go_at=1001.0), 1052.0, "switch_timeout (50s)"),
    (view({m: "healthy" for m in "abc"}, Decision.COMMIT, alive={"a"}), 9999.0, None),  # decided for good
    (view({m: "back" for m in "abc"}, Decision.ABORT), 9999.0, None),
])
def test_next_move(reading, now, move):
    found = reading.next_move(CLUSTER, now)
    if isinstance(move, Decision):
        assert found and found.decision is move, found
    elif isinstance(move, str):
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
    assert shown["members"] == [{"name": "a", "alive": True, "current": "r0", "state": "maintenance", "batch": None},
                                {"name": "b", "alive": True, "current": None, "state": "prepared", "batch": None},
                                {"name": "c", "alive": False, "current": "r0", "state": "not prepared",
                                 "batch": None}]
    assert {"id", "release", "decision"} <= shown["switch"].keys() and shown["switch"]["decision"] == "go"


def test_a_switch_record_is_json_read_in_one_place_and_one_it_cannot_read_is_none():
    """An unreadable P/switch is "no switch to join" (View.unreadable), not an error that ends the reading."""
    assert SwitchRecord.parse(SWITCH.as_json()) == SWITCH
    newer = json.dumps({**json.loads(SWITCH.as_json()), "tier": 2})  # a newer maintd's: not misread
    batchless = json.dumps({**json.loads(SWITCH.as_json()), "strategy": "rolling"})
    missing = json.dumps({k: v for k, v in json.loads(SWITCH.as_json()).items() if k != "digest"})
    wrong = [json.dumps({**json.loads(SWITCH.as_json()), **change}) for change in (
        {"since": "soon"}, {"since": True}, {"release": 7}, {"kind": "sideways"}, {"release": "../etc"})]
    wrong += [json.dumps({**json.loads(batchless), **change}) for change in (
        {"strategy": "sideways", "batches": [["a"]]}, {"batches": "abc"}, {"batches": [["a"], []]},
        {"batches": [[1]]}, {"batches": [["a"]], "batch_wait": "long"})]
    for unreadable in ("", "not json", "[1]", "{}", newer, batchless, missing, *wrong):
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


# --- contract §7a: rolling switches -------------------------------------------------------------------------------

FOUR = Cluster(members=("a", "b", "c", "d"), member="b", prefix="/p", primary="b", switch_timeout=50.0,
               strategy=Strategy.ROLLING)
ROLLING = SwitchRecord("s2", "r1", "d1", "deploy", "a", "upload", since=1000.0, strategy=Strategy.ROLLING,
                       batches=(("a",), ("b", "c"), ("d",)), batch_wait=10.0)
ROLLED = Choice(Strategy.ROLLING, "as configured")


def rolling(states: dict[str, str], decision: Decision | None = Decision.GO, alive: str = "abcd",
            record: SwitchRecord = ROLLING) -> View:
    """`states` as short words: a state's name, "prepared:<digest>", "migrations" (prepared, db/migrate differs
    there), or "healthy@<since>"."""
    def standing(word: str) -> Standing:
        name, _, detail = word.replace("@", ":").partition(":")
        if name == "migrations":
            return Standing(MemberState.PREPARED, digest="d1", migrations=True)
        if name == "healthy":
            return Standing(MemberState.HEALTHY, at=float(detail or 0))
        return Standing(MemberState(name), digest=detail)

    return View(FOUR.members, alive=set(alive), switch=record, states={m: standing(w) for m, w in states.items()},
                decision=decision, go_at=1000.0, choice=ROLLED if decision else None)


ALL_PREPARED = {m: "prepared:d1" for m in "abcd"}


@pytest.mark.parametrize("strategy, states, chosen, why", [
    (Strategy.ROLLING, ALL_PREPARED, Strategy.ROLLING, "as configured"),
    (Strategy.TOGETHER, ALL_PREPARED, Strategy.TOGETHER, "as configured"),
    (Strategy.AUTO, ALL_PREPARED, Strategy.ROLLING, "db/migrate is the same as the live release's on every member"),
    (Strategy.AUTO, {**ALL_PREPARED, "c": "migrations"}, Strategy.TOGETHER,
     "db/migrate differs from the live release's on c"),
    (Strategy.AUTO, {m: "migrations" for m in "abcd"}, Strategy.TOGETHER,
     "differs from the live release's on a, b, c, d"),
])
def test_go_chooses_the_strategy_once_on_what_every_member_prepared(strategy, states, chosen, why):
    """The choice is made by the transaction that writes go, on the members' states it compares: every member then
    follows that record, whatever its own config or its own reading says."""
    reading = rolling(states, decision=None, record=dataclasses.replace(ROLLING, strategy=strategy))
    move = reading.next_move(FOUR, 1001.0)
    assert move and move.decision is Decision.GO and move.choice and move.choice.strategy is chosen, move
    assert why in move.choice.why and why in move.reason
    assert move.expect == tuple((m, reading.states[m].as_json()) for m in "abcd")


def test_commit_compares_every_member_healthy_as_read():
    reading = rolling({m: f"healthy@{1001 + i}" for i, m in enumerate("abcd")})
    move = reading.next_move(FOUR, 1010.0)
    assert move and move.decision is Decision.COMMIT
    assert dict(move.expect) == {m: Standing(MemberState.HEALTHY, at=1001.0 + i).as_json()
                                 for i, m in enumerate("abcd")}
    assert rolling({"a": "healthy@1001", "b": "healthy@1002", "c": "switched", "d": "prepared"}).next_move(
        FOUR, 1010.0) is None  # a later batch still to switch: no commit yet


@pytest.mark.parametrize("states, now, member, waits_for", [
    # nobody swaps before the primary (b) has run the before-swap hooks, not even the canary (a)
    ({m: "prepared" for m in "abcd"}, 1001.0, "a", "for the primary, b, to run the before-swap hooks"),
    ({"a": "prepared", "b": "hooks_done", "c": "prepared", "d": "prepared"}, 1001.0, "a", ""),
    # batch 2 (b, c) waits for the canary to be healthy, then for it to stay so for batch_wait (10 s)
    ({"a": "switched", "b": "hooks_done", "c": "prepared", "d": "prepared"}, 1001.0, "c", "for batch 1 (a) to be "),
    ({"a": "healthy@1005", "b": "hooks_done", "c": "prepared", "d": "prepared"}, 1014.9, "b", "to stay healthy"),
    ({"a": "healthy@1005", "b": "hooks_done", "c": "prepared", "d": "prepared"}, 1015.0, "b", ""),
    ({"a": "healthy@1005", "b": "hooks_done", "c": "prepared", "d": "prepared"}, 1015.0, "c", ""),
    # batch 3 (d) waits for every member of batch 2, and for the last of them to have been healthy 10 s
    ({"a": "healthy@1005", "b": "healthy@1020", "c": "switched", "d": "prepared"}, 1099.0, "d", "batch 2 (c)"),
    ({"a": "healthy@1005", "b": "healthy@1020", "c": "healthy@1025", "d": "prepared"}, 1034.0, "d", "stay healthy"),
    ({"a": "healthy@1005", "b": "healthy@1020", "c": "healthy@1025", "d": "prepared"}, 1035.0, "d", ""),
])
def test_a_batch_is_on_once_the_one_before_it_has_been_healthy_for_batch_wait(states, now, member, waits_for):
    reading = rolling(states)
    turn = reading.rollout.turn(reading, member, FOUR.primary, now)
    assert (waits_for in turn) if waits_for else turn == "", turn


def test_after_commit_every_turn_is_taken():
    """Recovery of a member cut off after commit finishes forward: its turn needs no waiting."""
    reading = rolling({m: "done" for m in "abc"}, decision=Decision.COMMIT)
    assert reading.rollout.turn(reading, "d", FOUR.primary, 0.0) == ""


@pytest.mark.parametrize("states, alive, member, behind", [
    # reverse batch order: the canary goes back after batch 2, batch 2 after batch 3
    ({"a": "healthy", "b": "healthy", "c": "switched", "d": "prepared"}, "abcd", "a", ["b", "c"]),
    ({"a": "healthy", "b": "back", "c": "switched", "d": "prepared"}, "abcd", "a", ["c"]),
    ({"a": "healthy", "b": "back", "c": "back", "d": "prepared"}, "abcd", "a", []),  # d never switched
    ({"a": "healthy", "b": "healthy", "c": "healthy", "d": "healthy"}, "abcd", "b", ["d"]),
    ({"a": "healthy", "b": "healthy", "c": "healthy", "d": "healthy"}, "abcd", "c", ["d"]),  # not its own batch's b
    ({"a": "healthy", "b": "healthy", "c": "healthy", "d": "healthy"}, "abcd", "d", []),
    ({"a": "healthy", "b": "healthy", "c": "healthy", "d": "switched"}, "abc", "b", []),  # d gone: back when it returns
])
def test_on_abort_the_later_batches_go_back_first(states, alive, member, behind):
    reading = rolling(states, Decision.ABORT, alive=alive)
    assert reading.rollout.behind(reading, member) == behind


def test_the_order_is_the_records_for_the_members_there():
    """A member the record leaves out (the beginner's config named other members) goes last, never never; a name
    that is no member is no batch."""
    record = dataclasses.replace(ROLLING, batches=(("a",), ("x", "c"), ("y",)))
    reading = rolling({}, record=record)
    assert reading.rollout.batches == (("a",), ("c",), ("b", "d"))
    assert (reading.rollout.batch_of("d"), reading.rollout.wait) == (2, 10.0)


def test_maintctl_cluster_shows_the_batch_in_progress_and_each_members_state_in_it():
    reading = rolling({"a": "healthy@1005", "b": "switched", "c": "hooks_done", "d": "prepared"})
    shown = reading.as_json("b")
    assert [(m["name"], m["state"], m["batch"]) for m in shown["members"]] == [
        ("a", "healthy", 1), ("b", "switched", 2), ("c", "waiting", 2), ("d", "waiting", 3)]
    switch = shown["switch"]
    assert (switch["strategy"], switch["why"], switch["batch"]) == ("rolling", "as configured", 2)
    assert switch["batches"] == (("a",), ("b", "c"), ("d",))
    undecided = rolling({"a": "prepared:d1"}, decision=None).as_json("a")
    assert undecided["switch"]["strategy"] == "rolling" and undecided["switch"]["batch"] is None
    assert undecided["members"][0]["state"] == "prepared"  # not waiting for a turn before go
    aborted = rolling({"a": "back", "b": "healthy", "c": "prepared", "d": "prepared"}, Decision.ABORT).as_json("a")
    assert [m["state"] for m in aborted["members"]] == ["back", "healthy", "waiting", "waiting"]


def test_a_together_switch_record_is_the_one_an_older_maintd_wrote_and_reads():
    """A together switch is written without the fields of §7a, so an older maintd still joins it and this one
    removes an older one's (`Coordinator.end` compares the text); one without them is together."""
    assert set(json.loads(SWITCH.as_json())) == {"id", "release", "digest", "kind", "by", "actor", "since"}
    assert SwitchRecord.parse(SWITCH.as_json()).strategy is Strategy.TOGETHER
    assert SwitchRecord.parse(ROLLING.as_json()) == ROLLING
    assert json.loads(ROLLING.as_json())["batches"] == [["a"], ["b", "c"], ["d"]]
    older_go = View(FOUR.members, switch=ROLLING, decision=Decision.GO)  # go written without a choice: together
    assert older_go.rollout is None and rolling({}).rollout is not None


def test_the_choice_is_read_whole_or_not_at_all():
    assert Choice.parse(ROLLED.as_json()) == ROLLED
    for unreadable in ("", "rolling", '{"strategy": "auto", "why": "x"}', '{"strategy": "rolling"}',
                       '{"strategy": "rolling", "why": 1}', '{"strategy": "sideways", "why": "x"}'):
        with pytest.raises(ValueError):
            Choice.parse(unreadable)


def test_a_standing_holds_only_what_this_maintd_can_read():
    healthy = Standing(MemberState.HEALTHY, at=1005.5)
    assert Standing.parse(healthy.as_json()) == healthy
    assert Standing.parse(Standing(MemberState.PREPARED, digest="d1", migrations=True).as_json()).migrations
    for unreadable in ('{"state": "healthy", "at": "soon"}', '{"state": "healthy", "at": true}',
                       '{"state": "prepared", "migrations": "yes"}', '{"state": "prepared", "digest": 7}'):
        assert Standing.parse(unreadable) is None, unreadable
