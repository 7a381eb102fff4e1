"""A release's state, decided in one place: driven in-process with real directories, no daemon and no threads."""

import pytest

from maintd.inventory import Inventory, ReleaseState
from maintd.results import DeployKind, Refused
from maintd.state import Store
from maintd.tree import Tree
from maintd.upload import UploadTracker


@pytest.fixture
def inventory(tmp_path):
    tree = Tree(tmp_path / "srv")
    tree.releases.mkdir(parents=True)
    return Inventory(tree, Store(tmp_path / "state"), UploadTracker(quiet_period=5.0, require_marker=False))


def make(inventory: Inventory, *names: str) -> None:
    for name in names:
        (inventory.tree.releases / name).mkdir()


def states(inventory: Inventory) -> dict[str, ReleaseState]:
    return {row.name: row.state for row in inventory.rows()}


def test_each_source_of_knowledge_gives_its_state(inventory):
    make(inventory, "live1", "prev1", "up1", "done1", "refused1", "bad1", "dormant1", "old1")
    inventory.tree.swap("live1")
    inventory.store.memory.previous = "prev1"
    inventory.tracker.activity("up1", now=100.0)
    inventory.completed("done1", when=100.0, size=10)
    inventory.refuse("refused1", "manifest does not verify")
    inventory.store.record("bad1").bad = "health: failed"
    inventory.found_dormant("dormant1")
    inventory.store.record("old1").went_live = 50.0
    assert states(inventory) == {
        "bad1": ReleaseState.BAD, "done1": ReleaseState.COMPLETE, "dormant1": ReleaseState.INCOMPLETE,
        "live1": ReleaseState.LIVE, "old1": ReleaseState.COMPLETE, "prev1": ReleaseState.PREVIOUS,
        "refused1": ReleaseState.REFUSED, "up1": ReleaseState.UPLOADING,
    }
    reasons = {row.name: row.reason for row in inventory.rows()}
    assert reasons["refused1"] == "manifest does not verify" and reasons["bad1"] == "health: failed"
    assert "may have been cut off" in reasons["dormant1"]


def test_live_and_previous_outrank_what_was_learned_of_them(inventory):
    make(inventory, "r1", "r2")
    inventory.store.record("r1").bad = "an old failure"
    inventory.tree.swap("r1")
    inventory.refuse("r2", "required path missing: config.ru")
    inventory.store.memory.previous = "r2"
    assert states(inventory) == {"r1": ReleaseState.LIVE, "r2": ReleaseState.PREVIOUS}


def test_written_to_again_a_refused_or_dormant_release_is_uploading_afresh(inventory):
    make(inventory, "r1", "r2")
    inventory.refuse("r1", "bad manifest")
    inventory.found_dormant("r2")
    for name in ("r1", "r2"):
        inventory.resume(name)
        inventory.tracker.activity(name, now=1.0)
    assert states(inventory) == {"r1": ReleaseState.UPLOADING, "r2": ReleaseState.UPLOADING}
    assert inventory.refuse("r1", "bad manifest") is True  # news again after the resumption
    assert inventory.refuse("r1", "bad manifest") is False


def test_automatic_deploys_take_the_newest_complete_once(inventory):
    make(inventory, "v9", "v10", "v11")
    for name in ("v9", "v11", "v10"):
        inventory.completed(name, when=1.0, size=1)
    inventory.store.record("v11").bad = "failed before"
    assert inventory.take_automatic() == ("v10", ["v9"])  # v11 is bad; v10 > v9 as people read versions
    assert inventory.take_automatic() == (None, [])


def test_rollback_goes_to_the_previous_release_else_the_latest_good_one(inventory):
    make(inventory, "r1", "r2", "r3")
    inventory.tree.swap("r3")
    for name, when in (("r1", 1.0), ("r2", 2.0), ("r3", 3.0)):
        inventory.store.record(name).went_live = when
    inventory.store.memory.previous = "r2"
    assert inventory.rollback_target() == "r2"
    inventory.store.record("r2").bad = "hooks_after: failed"
    assert inventory.rollback_target() == "r1"
    inventory.store.record("r1").bad = "too"
    with pytest.raises(Refused, match="no earlier release"):
        inventory.rollback_target()


@pytest.mark.parametrize("setup, kind, refusal", [
    (lambda inv: inv.tracker.activity("r1", now=1.0), DeployKind.DEPLOY, "release r1 is uploading"),
    (lambda inv: inv.refuse("r1", "bad manifest"), DeployKind.DEPLOY, "release r1 is refused: bad manifest"),
    (lambda inv: inv.found_dormant("r1"), DeployKind.ROLLBACK, "release r1 is incomplete"),
])
def test_operators_are_refused_what_may_not_go_live(inventory, setup, kind, refusal):
    make(inventory, "r1")
    setup(inventory)
    with pytest.raises(Refused, match=refusal):
        inventory.check_deployable("r1", kind)


def test_operators_may_take_a_bad_or_dormant_release_live_by_name(inventory):
    make(inventory, "r1", "r2")
    inventory.store.record("r1").bad = "failed"
    inventory.found_dormant("r2")
    inventory.check_deployable("r1", DeployKind.DEPLOY)
    inventory.check_deployable("r2", DeployKind.DEPLOY)
    for name, refusal in (("nope", "no release 'nope'"), ("../etc", "bad release name")):
        with pytest.raises(Refused, match=refusal.replace(".", r"\.")):
            inventory.check_deployable(name, DeployKind.DEPLOY)


def test_newest_complete_ignores_every_other_state(inventory):
    make(inventory, "a1", "a2", "a3")
    inventory.tree.swap("a1")
    inventory.tracker.activity("a3", now=1.0)
    assert inventory.newest_complete() == "a2"
    inventory.refuse("a2", "bad")
    with pytest.raises(Refused, match="no complete release"):
        inventory.newest_complete()
