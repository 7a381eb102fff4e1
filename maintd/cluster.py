"""Cluster mode (contract §7): the keys in etcd, what they say, and the one rule for what a member does next.

Key layout, under `cluster.prefix` (P), spelled by `Keys` alone; every value that has fields is JSON, read and
written by the record class named beside it:

    P/alive/<m>                 lease-bound: the member is there (its lease expires `lease_ttl` after it goes quiet)
    P/members/<m>               `Report`: the member's live release, for `maintctl cluster`
    P/switch                    `SwitchRecord`: the switch in progress; created only where absent, so there is one
                                at a time, and removed once it is `finished`, so that the next may begin
    P/s/<id>/state/<m>          `Standing`: the member's `MemberState` in that switch, with its details
    P/s/<id>/decision           go -> commit, or (absent or go) -> abort: written by one transaction each, the first
                                writer wins, and every member obeys the record, never its own reading of the others
    P/s/<id>/strategy           `Choice`: together or rolling, and why; written with go, so every member switches
                                the one way chosen on what every member prepared (absent: together, an older maintd's)
    P/s/<id>/go_at, /reason     when go was decided (the switch timeout runs from there); why it was aborted
    P/bad/<release>             a release the cluster abandoned: marked bad on every member, now or when it arrives

`View` is one reading of those keys and `View.next_move` the pure rule that turns it into the transaction a waiting
member tries (go, commit, abort, or nothing), `View.way_in` the one by which a deploy gets into a switch, and
`Rollout` the order of a rolling switch (contract §7a: when a member's batch is on, who goes back before it): tested
without etcd, as the upload tracker is without inotify. A value a member cannot read is passed over where that is
safe (a member's state; a switch record, which is then no switch to join) and raises `Unreadable` where it is not.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from .changes import Changes
from .config import Cluster, Strategy
from .etcd import Compare, Etcd, EtcdUnavailable, Reading, delete_op, put_op
from .events import Event, Events, Happening
from .results import DeployKind
from .tree import name_problem

T = TypeVar("T")
# Other members whose last state a member writing `healthy` may not have seen yet and still try commit in the same
# transaction (`Coordinator.set_healthy`): the watch tells of a write about one write's commit later, so members that
# finish their restarts within that time do not see each other's; a few unseen catch such a burst, while in a large
# fleet only its last few writers pay commit's comparisons (2 per member, made by etcd).
UNSEEN = 2


class Decision(StrEnum):
    GO = "go"
    COMMIT = "commit"
    ABORT = "abort"


class MemberState(StrEnum):
    """A member's progress through one switch, in order (`back` ends an aborted one). `maintenance` is a together
    switch's only, `switched` (about to swap, its batch being on) a rolling switch's only."""

    PREPARED = "prepared"
    MAINTENANCE = "maintenance"
    HOOKS_DONE = "hooks_done"
    SWITCHED = "switched"
    HEALTHY = "healthy"
    DONE = "done"
    BACK = "back"


IN_MAINTENANCE = (MemberState.MAINTENANCE, MemberState.HOOKS_DONE, MemberState.HEALTHY)
FINISHED = (MemberState.DONE, MemberState.BACK)
HOOKS_RUN = (MemberState.HOOKS_DONE, MemberState.SWITCHED, MemberState.HEALTHY, MemberState.DONE)  # the primary's
ON_NEW = (MemberState.SWITCHED, MemberState.HEALTHY)  # a rolling switch's members that have to go back on abort


@dataclass(frozen=True)
class Standing:
    """A member's state in one switch and its details. Written only through `as_json`, so that a transaction can
    compare a member's value with the one it expects (commit: every member `healthy`)."""

    state: MemberState
    digest: str = ""  # prepared: the digest of the release as this member has it
    migrations: bool = False  # prepared, for strategy "auto": its db/migrate differs from the live release's here
    runs_hooks: bool = False  # maintenance: the primary will run before-swap hooks (the others wait for them)
    at: float = 0.0  # healthy: since when (a rolling switch's next batch waits `batch_wait` from there)

    def as_json(self) -> str:
        return json.dumps({key: value for key, value in asdict(self).items() if value}, sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> Standing | None:
        """None for a value this maintd cannot read: a member that holds no state it knows."""
        fields = _json(text)
        try:
            standing = cls(MemberState(fields.pop("state", "")), **fields)
        except (ValueError, TypeError):
            return None
        kinds = ((standing.digest, str), (standing.migrations, bool), (standing.runs_hooks, bool),
                 (standing.at, (int, float)))
        if any(not isinstance(value, kind) for value, kind in kinds) or isinstance(standing.at, bool):
            return None
        return standing


@dataclass(frozen=True)
class Report:
    """What a member last said about itself, outside any switch."""

    current: str | None
    at: float

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> Report:
        fields = _json(text)
        current, at = fields.get("current"), fields.get("at")
        return cls(current if isinstance(current, str) else None, float(at) if isinstance(at, (int, float)) else 0.0)


ROLLING_FIELDS = ("strategy", "batches", "batch_wait")  # a together switch's record is written without them


@dataclass(frozen=True)
class SwitchRecord:
    id: str
    release: str
    digest: str
    kind: str
    by: str  # the member that began it
    actor: str  # "upload", or the operator who asked for it
    since: float
    # How the members switch, by the config of the member that began it: one record, so every member follows the
    # same order whatever its own config says. "auto" is chosen at go (`Choice`).
    strategy: Strategy = Strategy.TOGETHER
    batches: tuple[tuple[str, ...], ...] = ()
    batch_wait: float = 0.0

    def as_json(self) -> str:
        """A together switch's record as an older maintd wrote it (and reads it): only a switch it cannot take part
        in holds fields it does not know."""
        together = self.strategy is Strategy.TOGETHER
        return json.dumps({key: value for key, value in asdict(self).items()
                           if not (together and key in ROLLING_FIELDS)}, sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> SwitchRecord | None:
        """None for a value this maintd cannot read: not a JSON object, a field missing or one it does not know (a
        newer maintd's switch, which this one could only misread), a wrong type, a kind or a release name it would
        refuse, a rolling switch without batches. Such a value still holds P/switch, so no switch can begin while it
        is there (`View.unreadable`). One without a strategy is together, as an older maintd's switch was."""
        fields = _json(text)
        strategy, batches = fields.pop("strategy", Strategy.TOGETHER), fields.pop("batches", [])
        if not (isinstance(batches, list) and all(isinstance(batch, list) and batch and
                                                  all(isinstance(m, str) for m in batch) for batch in batches)):
            return None
        try:
            record = cls(**fields, strategy=Strategy(strategy), batches=tuple(tuple(batch) for batch in batches))
        except (TypeError, ValueError):  # a field missing, or one more; not a strategy
            return None
        texts = [value for name, value in fields.items() if name not in ("since", "batch_wait")]
        numbers = (record.since, record.batch_wait)
        if (not all(isinstance(value, str) for value in texts)
                or not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers)
                or record.kind not in set(DeployKind) or name_problem(record.release)
                or (record.strategy is not Strategy.TOGETHER and not record.batches)):
            return None
        return record

    def choose(self, differ: list[str]) -> Choice:
        """Together or rolling: as configured, or with "auto" together exactly where db/migrate differs from the
        live release's on any member (`differ`): the rule of maintenance.when = "migrations", over the fleet. Code
        alone can be served old and new side by side; a migration needs everyone to be in maintenance."""
        if self.strategy is not Strategy.AUTO:
            return Choice(self.strategy, "as configured")
        if differ:
            return Choice(Strategy.TOGETHER, f'strategy = "auto": db/migrate differs from the live release\'s on '
                                             f'{", ".join(differ)}')
        return Choice(Strategy.ROLLING, 'strategy = "auto": db/migrate is the same as the live release\'s on every '
                                        "member")


@dataclass(frozen=True)
class Choice:
    """How the members of a switch go live, decided with go: together or rolling, and why (`SwitchRecord.choose`)."""

    strategy: Strategy
    why: str

    def __str__(self) -> str:
        return f"{self.strategy} ({self.why})"

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> Choice:
        """ValueError for a value this maintd cannot read, which it must not pass over (`Unreadable`): the members
        switch one way or not at all."""
        fields = _json(text)
        strategy, why = Strategy(fields.get("strategy", "")), fields.get("why")
        if strategy is Strategy.AUTO or not isinstance(why, str) or set(fields) != {"strategy", "why"}:
            raise ValueError(text)
        return cls(strategy, why)


class Unreadable(ValueError):
    """A value under the prefix that this maintd cannot read and must not pass over (a switch's decision, when go
    was decided): nothing can be made of that switch until the value is gone or readable."""

    def __init__(self, key: str, value: str) -> None:
        super().__init__(f"{key} holds {value[:200]!r}, which this maintd cannot read")


@dataclass(frozen=True)
class Keys:
    """The one spelling of the key layout (see the module's docstring). Called without the member, release or
    switch, a method gives the prefix of all its keys, for a range read."""

    prefix: str

    def alive(self, member: str = "") -> str:
        return f"{self.prefix}/alive/{member}"

    def report(self, member: str = "") -> str:
        return f"{self.prefix}/members/{member}"

    def bad(self, release: str = "") -> str:
        return f"{self.prefix}/bad/{release}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}/switch"

    def of_switch(self, switch: str) -> str:
        return f"{self.prefix}/s/{switch}/"

    def state(self, switch: str, member: str = "") -> str:
        return f"{self.of_switch(switch)}state/{member}"

    def decision(self, switch: str) -> str:
        return f"{self.of_switch(switch)}decision"

    def strategy(self, switch: str) -> str:
        return f"{self.of_switch(switch)}strategy"

    def go_at(self, switch: str) -> str:
        return f"{self.of_switch(switch)}go_at"

    def reason(self, switch: str) -> str:
        return f"{self.of_switch(switch)}reason"

    def area(self, key: str) -> Area:
        """Which part of the layout `key` belongs to: what a change of it may concern (see `Area`)."""
        rest = key.removeprefix(self.prefix + "/")
        if rest == "switch":
            return Area.SWITCH
        head, _, tail = rest.partition("/")
        if head == "s":
            return Area.STATE if tail.partition("/")[2].startswith("state/") else Area.DECISION
        return {"alive": Area.ALIVE, "members": Area.REPORT, "bad": Area.BAD}.get(head, Area.OTHER)


class Area(StrEnum):
    """The parts of the key layout, for reading some of them (`Coordinator.view`) and for waiting on changes to
    some of them (`changes.Changes`)."""

    ALIVE = "alive"
    REPORT = "report"
    BAD = "bad"
    SWITCH = "switch"  # P/switch
    DECISION = "decision"  # a switch's decision, go_at, reason
    STATE = "state"  # a member's state in a switch
    OTHER = "other"


# What a switch's waits read and wait on: the rule (`View.next_move`) and every `ready` need no more
IN_SWITCH = frozenset({Area.ALIVE, Area.SWITCH, Area.DECISION, Area.STATE})
# What a wait for the decision alone waits on (`Waiting.for_decision`)
ON_DECISION = frozenset({Area.ALIVE, Area.SWITCH, Area.DECISION})
# What `Coordinator.view` reads besides the switch by default: everything (`maintctl cluster`, the way in)
EVERYTHING = frozenset({Area.ALIVE, Area.REPORT, Area.BAD})


class Entry(StrEnum):
    """What a deploy not yet in a switch does with one reading of the keys (`View.way_in`)."""

    JOIN = "join"  # the switch in progress is its own
    BEGIN = "begin"  # none is in progress: create one (where P/switch is still absent)
    END = "end"  # a finished switch still holds P/switch: remove it, then read again
    HELD = "held"  # another switch holds the cluster: not this release's fault, it may switch once that one ends
    REFUSED = "refused"  # it does not begin, and has no verdict of its own (the cluster's stands)


@dataclass(frozen=True)
class Move:
    """A transaction to try: `decision` with the conditions under which it may be written: for go and commit, every
    member's state as this reading found it (`expect`: member, value), so that go's `choice` is made on exactly what
    the members prepared."""

    decision: Decision
    reason: str = ""
    choice: Choice | None = None
    expect: tuple[tuple[str, str], ...] = ()


@dataclass
class View:
    """One reading of everything under the prefix."""

    members: tuple[str, ...]
    alive: set[str] = field(default_factory=set)
    reports: dict[str, Report] = field(default_factory=dict)
    switch: SwitchRecord | None = None
    states: dict[str, Standing] = field(default_factory=dict)  # in the switch in progress (or the one asked about)
    decision: Decision | None = None
    choice: Choice | None = None  # how the members switch, once go is decided
    go_at: float | None = None
    reason: str = ""
    bad: dict[str, str] = field(default_factory=dict)
    # P/switch's value when this maintd cannot read it (`SwitchRecord.parse`): no switch a member can join, and it
    # holds the key, so none can begin until it is gone
    unreadable: str = ""
    # P/switch's value as etcd holds it, readable or not: what removing the switch compares (`Coordinator.end`), never
    # the record written out again, which a value written by hand in other spacing would not equal
    switch_value: str = ""
    revision: int = 0  # etcd's revision this reading is of: a change after it is news (changes.py)

    @property
    def holder(self) -> str:
        """What holds P/switch, in words that change when it lets go: the switch in progress, or a value this
        maintd cannot read; "" when nothing does."""
        if self.switch:
            return f"switch {self.switch.id}"
        return "a value under P/switch that this maintd cannot read" if self.unreadable else ""

    def state_of(self, member: str) -> MemberState | None:
        standing = self.states.get(member)
        return standing.state if standing else None

    def digest_of(self, member: str) -> str:
        standing = self.states.get(member)
        return standing.digest if standing and standing.state is MemberState.PREPARED else ""

    def runs_hooks(self, member: str) -> bool:
        standing = self.states.get(member)
        return bool(standing and standing.runs_hooks)

    def all_in(self, states: tuple[MemberState, ...]) -> bool:
        return all(self.state_of(m) in states for m in self.members)

    def finished(self) -> bool:
        """The switch is decided for good and every member still there is through with it. After an abort, a
        member that holds no state in it never joined (it was away, or the release had not reached it yet): it has
        nothing to undo, so it is through too. Waiting for it would hold the cluster for ever: nothing it does
        later writes a state into a switch decided without it."""
        through = (*FINISHED, None) if self.decision is Decision.ABORT else FINISHED
        return self.decision in (Decision.COMMIT, Decision.ABORT) and all(
            self.state_of(m) in through for m in self.members if m in self.alive)

    @property
    def rollout(self) -> Rollout | None:
        """The order of the switch, once go chose a rolling one."""
        if self.switch and self.choice and self.choice.strategy is Strategy.ROLLING:
            return Rollout.of(self.switch, self.members)
        return None

    def shown_state(self, member: str) -> str:
        """A member's state in words: in a rolling switch under way, `waiting` for its batch, `switched`, `healthy`
        or `back` (contract §7a)."""
        if self.switch is None or self.finished():
            return "idle"
        state = self.state_of(member)
        if state is None:
            return "not prepared"
        if self.rollout and state in (MemberState.PREPARED, MemberState.HOOKS_DONE):
            return "waiting"
        return str(state)

    def as_json(self, me: str) -> dict[str, Any]:
        """`maintctl cluster --json`: every member (alive or not, its live release, its state in the switch, its
        batch in a rolling one) and the switch in progress (how it switches, and a rolling one's batch under way)."""
        rollout = self.rollout
        members = []
        for name in self.members:
            report = self.reports.get(name)
            members.append({"name": name, "alive": name in self.alive, "current": report.current if report else None,
                            "state": self.shown_state(name),
                            "batch": rollout.batch_of(name) + 1 if rollout else None})
        switch = None
        if self.switch:
            switch = {**asdict(self.switch), "decision": self.decision, "reason": self.reason or None,
                      "finished": self.finished(), "why": self.choice.why if self.choice else None,
                      "batches": rollout.batches if rollout else self.switch.batches,
                      "batch": rollout.in_progress(self) if rollout and self.decision is Decision.GO else None}
            if self.choice:
                switch["strategy"] = self.choice.strategy
        return {"member": me, "members": members, "switch": switch, "unreadable": self.unreadable or None}

    def way_in(self, release: str, by_upload: bool, joining: str) -> tuple[Entry, str]:
        """How a deploy of `release` gets into a switch, and why not when it cannot. One `joining` the switch
        another member began joins that switch and no other: one decided without it, or gone, is not begun again
        in its place. Any other joins the switch of its release in progress, or begins one. An upload's deploy of a
        release the cluster abandoned does not begin; an operator's may take it live again, as `deploy NAME` may
        a bad release on a lone server (contract §2)."""
        switch = self.switch
        if joining:
            still = switch is not None and switch.id == joining
            if still and self.decision is None:
                return Entry.JOIN, ""
            return Entry.REFUSED, (f"switch {joining} was {f'decided ({self.decision})' if still else 'ended'} "
                                   "before this member joined it")
        if self.unreadable:
            return Entry.HELD, (f"the switch key holds a value this maintd cannot read ({self.unreadable[:80]}): "
                                "no switch can begin until it is gone; see `maintctl cluster`")
        if by_upload and release in self.bad:
            return Entry.REFUSED, f"the cluster abandoned release {release}: {self.bad[release]}"
        if switch is None:
            return Entry.BEGIN, ""
        if self.finished():
            return Entry.END, ""
        if switch.release == release and self.decision is None:
            return Entry.JOIN, ""
        return Entry.HELD, f"a switch of release {switch.release} is in progress ({self.decision or 'preparing'})"

    def next_move(self, cluster: Cluster, now: float) -> Move | None:
        """What a member waiting in this switch tries now: the whole rule of contract §7 in one place."""
        if self.switch is None or self.decision in (Decision.COMMIT, Decision.ABORT):
            return None
        gone = [m for m in self.members if m not in self.alive]
        if gone:
            return Move(Decision.ABORT, f"member {', '.join(gone)} is gone (no lease: down, or cut off from etcd)")
        if self.decision is None:
            digests = {self.digest_of(m) for m in self.members if self.digest_of(m)}
            if len(digests) > 1:
                return Move(Decision.ABORT, "the members' digests differ: " + ", ".join(
                    f"{m} {self.digest_of(m)[:12]}" for m in self.members if self.digest_of(m)))
            if now - self.switch.since > cluster.prepare_timeout:
                missing = [m for m in self.members if self.state_of(m) is not MemberState.PREPARED]
                return Move(Decision.ABORT, f"not prepared by every member within prepare_timeout "
                                            f"({cluster.prepare_timeout:g}s): {', '.join(missing)}")
            if self.all_in((MemberState.PREPARED,)) and digests == {self.switch.digest}:
                choice = self.switch.choose([m for m in self.members if self.states[m].migrations])
                return Move(Decision.GO, f"{choice.strategy}, {choice.why}", choice, self._written())
            return None
        if self.go_at is not None and now - self.go_at > cluster.switch_timeout:
            return Move(Decision.ABORT, f"not committed within switch_timeout ({cluster.switch_timeout:g}s)")
        if self.all_in((MemberState.HEALTHY,)):
            return Move(Decision.COMMIT, expect=self._written())
        return None

    def _written(self) -> tuple[tuple[str, str], ...]:
        """Every member's state as read, as its transaction compares it."""
        return tuple((m, self.states[m].as_json()) for m in self.members)


@dataclass(frozen=True)
class Rollout:
    """The order of a rolling switch (contract §7a), from its record, and the rule of one member's part in it: when
    its batch is on, and who goes back before it on abort. Read against one `View`, as `View.next_move` is."""

    batches: tuple[tuple[str, ...], ...]
    wait: float  # batch_wait: seconds a batch stays healthy before the next one begins

    @classmethod
    def of(cls, record: SwitchRecord, members: tuple[str, ...]) -> Rollout:
        """The record's batches, of `members` only; a member the record leaves out (its beginner's config named
        other members) goes last, in a batch of its own, rather than never."""
        listed = [tuple(m for m in batch if m in members) for batch in record.batches]
        missing = tuple(m for m in members if not any(m in batch for batch in listed))
        return cls(tuple(batch for batch in (*listed, missing) if batch), record.batch_wait)

    def batch_of(self, member: str) -> int:
        return next(k for k, batch in enumerate(self.batches) if member in batch)

    def turn(self, view: View, member: str, primary: str, now: float) -> str:
        """"" once `member`'s batch is on: the primary has run the before-swap hooks, and every member of the batch
        before it is healthy and has stayed so for `wait` seconds. Else what it waits for."""
        if view.decision is Decision.COMMIT:
            return ""
        if view.state_of(primary) not in HOOKS_RUN:
            return f"for the primary, {primary}, to run the before-swap hooks"
        k = self.batch_of(member)
        if k == 0:
            return ""
        if unhealthy := [m for m in self.batches[k - 1] if view.state_of(m) is not MemberState.HEALTHY]:
            return f"for batch {k} ({', '.join(unhealthy)}) to be healthy"
        if (settled := self.settled_at(view, member)) is not None and now < settled:
            return f"for batch {k} to stay healthy for batch_wait ({self.wait:g}s)"
        return ""

    def settled_at(self, view: View, member: str) -> float | None:
        """When the batch before `member`'s has been healthy for `wait` seconds (time.time); None when that is not
        what `member` waits for (its batch is the first, or the one before is not healthy yet): then only a key
        that changes, never the clock, can bring its turn."""
        k = self.batch_of(member)
        before = self.batches[k - 1] if k else ()
        if not before or any(view.state_of(m) is not MemberState.HEALTHY for m in before):
            return None
        return max(view.states[m].at for m in before) + self.wait

    def behind(self, view: View, member: str) -> list[str]:
        """The members of later batches still on the new release and alive: on abort they go back first (reverse
        batch order). One that is gone goes back when it returns (recovery), which nobody can wait for."""
        later = self.batches[self.batch_of(member) + 1:]
        return [m for batch in later for m in batch if m in view.alive and view.state_of(m) in ON_NEW]

    def in_progress(self, view: View) -> int:
        """The number of the last batch that has begun (1: the canary's), 0 before the first."""
        return max((k for k, batch in enumerate(self.batches, 1) if any(view.state_of(m) in ON_NEW for m in batch)),
                   default=0)


class Coordinator:
    """This member's side of the keys: reading them, writing its own, and the decision transactions."""

    def __init__(self, cluster: Cluster, etcd: Etcd, events: Events | None = None) -> None:
        self.cluster = cluster
        self.etcd = etcd
        self.events = events or Events()  # told of an abort this member's transaction wrote
        self.keys = Keys(cluster.prefix)
        self.me = cluster.member
        # Set when the daemon stops (`stop`): every wait on etcd or on the other members ends then (see waiting.py).
        self.stopping = threading.Event()
        self.changes = Changes(etcd, cluster.prefix + "/", self.keys.area)  # started by the daemon

    def stop(self) -> None:
        self.stopping.set()
        self.changes.stop()

    @property
    def truth_every(self) -> float:
        """Seconds a member waiting on the keys goes without reading them while etcd's watch says nothing changed:
        the watch is a hint (changes.py), the reading is the truth, so a silent watch makes a member late by this
        much at worst, never wrong; timeouts are noticed this late too. The pace of its lease's refresh: a third
        of `lease_ttl`, the time the cluster gives a silent member."""
        return self.cluster.lease_ttl / 3

    def changed(self, after: int, areas: frozenset[Area], within: float | None = None) -> bool:
        """Until etcd's watch says that something in `areas` changed after revision `after` (the caller's reading),
        `truth_every` seconds in any case (`within`, if sooner: what the caller awaits may come by the clock), or
        `stop`; whether the watch said so."""
        timeout = self.truth_every if within is None else max(0.0, min(within, self.truth_every))
        return self.changes.wait(after, areas, timeout)

    def view(self, switch_id: str | None = None, writes: tuple[dict[str, Any], ...] = (),
             besides: frozenset[Area] = EVERYTHING) -> View:
        """One consistent reading of the keys that matter now, in one round trip (two when the switch in progress
        is not known yet), after `writes` if any: P/switch, the parts of the layout named in `besides`, and the
        switch `switch_id` (default: the one in progress) with its states and decision and the alive keys, which
        the rule needs; `switch` is None once that switch is no longer the one in P/switch. A switch's waits read
        no more than that: the reports and the abandoned releases only grow with the fleet and with time. The
        second round trip reads everything again: an abort between the two would otherwise show its decision
        without the release it marked bad."""
        k = self.keys
        if switch_id:
            return self._view(self.etcd.read(self._wanted(switch_id, besides), writes), switch_id)
        reading = self.etcd.read(self._wanted("", besides), writes)
        if k.switch in reading.found and (record := SwitchRecord.parse(reading.found[k.switch])):
            return self._view(self.etcd.read(self._wanted(record.id, besides)), record.id)
        return self._view(reading, "")

    def _wanted(self, switch_id: str, besides: frozenset[Area]) -> list[str]:
        """What `view` reads: P/switch, `besides`, and with a switch its keys and the alive keys."""
        k = self.keys
        parts = {Area.ALIVE: k.alive(), Area.REPORT: k.report(), Area.BAD: k.bad()}
        wanted = [k.switch, *(parts[area] for area in sorted(besides))]
        if switch_id:
            wanted += [*([k.alive()] if Area.ALIVE not in besides else []), k.of_switch(switch_id)]
        return wanted

    def _view(self, reading: Reading, switch_id: str) -> View:
        k = self.keys
        view = View(self.cluster.members, revision=reading.revision)
        for key, value in reading.found.items():
            if key.startswith(k.alive()):
                view.alive.add(key.removeprefix(k.alive()))
            elif key.startswith(k.report()):
                view.reports[key.removeprefix(k.report())] = Report.parse(value)
            elif key.startswith(k.bad()):
                view.bad[key.removeprefix(k.bad())] = value
            elif key == k.switch:
                view.switch_value = value
                if (record := SwitchRecord.parse(value)) is None:
                    view.unreadable = value
                else:
                    view.switch = record if record.id == switch_id else None  # another switch is not this one's
            elif switch_id and key.startswith(k.state(switch_id)) and (standing := Standing.parse(value)):
                view.states[key.removeprefix(k.state(switch_id))] = standing
        if switch_id:
            view.decision = _read(reading.found, k.decision(switch_id), Decision)
            view.choice = _read(reading.found, k.strategy(switch_id), Choice.parse)
            view.go_at = _read(reading.found, k.go_at(switch_id), float)
            view.reason = reading.found.get(k.reason(switch_id), "")
        return view

    def set_state(self, switch_id: str, standing: Standing) -> View:
        """Record this member's state in the switch, and read the others' in the same round trip."""
        return self.view(switch_id, (put_op(self.keys.state(switch_id, self.me), standing.as_json()),),
                         frozenset())

    def set_healthy(self, switch_id: str, since: int, at: float = 0.0) -> tuple[bool, View]:
        """Record this member healthy, and read the others' states in the same round trip. When etcd's watch says
        that every other member, or all but `UNSEEN`, has written its state after revision `since` (a reading in
        which each was one state short of healthy), this member's may complete the set: the same transaction
        commits the switch where every other member is healthy indeed (the conditions of `deciding`, but for this
        member's own state, which it writes), one round trip instead of two. Whether it committed. A rolling
        switch's healthy says since when (`at`, for `batch_wait`), which no condition can know of the others: it
        commits by `View.next_move`, on the values read."""
        k, members = self.keys, self.cluster.members
        healthy = Standing(MemberState.HEALTHY).as_json()
        put = put_op(k.state(switch_id, self.me), Standing(MemberState.HEALTHY, at=at).as_json())
        unseen = {k.state(switch_id, m) for m in members if m != self.me} - self.changes.written_since(
            since, k.state(switch_id))
        if at or len(unseen) > UNSEEN:
            return False, self.view(switch_id, (put,), frozenset())
        conditions = [Compare.equals(k.decision(switch_id), Decision.GO),
                      *[Compare.present(k.alive(m)) for m in members],
                      *[Compare.equals(k.state(switch_id, m), healthy) for m in members if m != self.me]]
        won, reading = self.etcd.txn_reading(conditions, [put, put_op(k.decision(switch_id), Decision.COMMIT)],
                                             self._wanted(switch_id, frozenset()), failure=(put,))
        return won, self._view(reading, switch_id)

    def sign_off(self, switch_id: str, state: MemberState) -> None:
        """This member is through with the switch (`done` or `back`), and the last member through removes it, so
        that the next may begin. Not worth waiting for etcd over: the decision is what counts, the joiner signs a
        switch off later if this could not, and the next switch to begin removes a finished one."""
        try:
            view = self.set_state(switch_id, Standing(state))
            if view.switch and view.switch.id == switch_id and view.finished():
                self.end(view.switch_value)
        except (EtcdUnavailable, Unreadable):
            pass

    def begin(self, record: SwitchRecord) -> bool:
        """Create the switch where none is in progress; whether this member's record is the one."""
        return self.etcd.txn([Compare.absent(self.keys.switch)], [put_op(self.keys.switch, record.as_json())])

    def end(self, value: str) -> bool:
        """Remove a finished switch, if P/switch still holds it (`value`, as a reading found it: `View.switch_value`),
        so that the next may begin (or, by hand, one decided but not finished: a member still in it obeys the
        decision kept under P/s/<id>/)."""
        key = self.keys.switch
        return self.etcd.txn([Compare.equals(key, value)], [delete_op(key)])

    def decide(self, switch_id: str, move: Move, release: str, now: float) -> bool:
        """Try to write `move.decision`; whether this member's transaction was the one that did."""
        return self.deciding(switch_id, move, release, now)[0]

    def deciding(self, switch_id: str, move: Move, release: str, now: float) -> tuple[bool, View]:
        """`decide`, and the switch's keys read in the same transaction, won or lost: members that see the same
        reading try the same transaction at once, and the losers learn the winner's decision without another
        round trip."""
        k, members = self.keys, self.cluster.members
        decision = k.decision(switch_id)
        wanted = self._wanted(switch_id, frozenset())

        def attempt(compare: list[Compare], writes: list[dict[str, Any]]) -> tuple[bool, View]:
            won, reading = self.etcd.txn_reading(compare, writes, wanted)
            return won, self._view(reading, switch_id)

        alive = [Compare.present(k.alive(m)) for m in members]
        states = [Compare.equals(k.state(switch_id, m), value) for m, value in move.expect]
        if move.decision is Decision.GO:
            assert move.choice
            return attempt([Compare.absent(decision), *alive, *states],
                           [put_op(decision, Decision.GO), put_op(k.go_at(switch_id), repr(now)),
                            put_op(k.strategy(switch_id), move.choice.as_json())])
        if move.decision is Decision.COMMIT:
            return attempt([Compare.equals(decision, Decision.GO), *alive, *states],
                           [put_op(decision, Decision.COMMIT)])
        abort = [put_op(decision, Decision.ABORT), put_op(k.reason(switch_id), move.reason),
                 put_op(k.bad(release), move.reason)]
        won, view = attempt([Compare.absent(decision)], abort)
        if not won and view.decision is Decision.GO:
            won, view = attempt([Compare.equals(decision, Decision.GO)], abort)
        if won:  # said by the one member whose transaction aborted it, whoever saw why
            self.events.publish(Event(Happening.SWITCH_ABORTED, release, result=str(Decision.ABORT), error=move.reason,
                                      actor=self.me, switch_id=switch_id))
        return won, view

    def abort(self, release: str, reason: str, switch_id: str = "") -> str:
        """Abort switch `switch_id`, or (a member that failed before it joined) the switch of `release` in
        progress, if any; the id of the switch this member's transaction aborted, or "" when none did."""
        if not switch_id:
            view = self.view(besides=frozenset())
            if not view.switch or view.switch.release != release:
                return ""
            switch_id = view.switch.id
        return switch_id if self.decide(switch_id, Move(Decision.ABORT, reason), release, time.time()) else ""

    def alive(self) -> frozenset[str]:
        """The members whose alive key exists: those whose lease has not run out."""
        prefix = self.keys.alive()
        return frozenset(key.removeprefix(prefix) for key in self.etcd.read([prefix]).found)

    def report(self, current: str | None) -> None:
        self.etcd.put(self.keys.report(self.me), Report(current, time.time()).as_json())


class Membership(threading.Thread):
    """Keeps `P/alive/<me>` alive (a lease refreshed every third of its TTL, renewed if it ever expired) and
    `P/members/<me>` saying the live release (`live`): from the first round on, so that `maintctl cluster` shows it
    after a start, and again once `current` has moved, whatever moved it (a switch, its way back, recovery). A
    `nudge` when it may have moved makes that round now rather than at the next refresh."""

    def __init__(self, coordinator: Coordinator, on_problem: Callable[[str], None],
                 live: Callable[[], str | None]) -> None:
        super().__init__(name="maintd-membership", daemon=True)
        self.coordinator = coordinator
        self.on_problem = on_problem
        self.live = live
        self.lease = 0
        self.reported: str | None = ""  # the release P/members/<me> says is live; "" (no release's name): none yet
        self.alive: frozenset[str] | None = None  # the members whose alive key the last round found (None: unknown)
        self.trouble = ""  # why etcd did not answer, while it does not
        self.stopping = threading.Event()
        self.woken = threading.Event()  # a nudge, or the stop
        self.joined = threading.Event()  # the alive key exists: the others can count on this member

    def run(self) -> None:
        ttl = self.coordinator.cluster.lease_ttl
        due = 0.0  # when the lease is refreshed next (time.monotonic)
        while not self.stopping.is_set():
            try:
                if time.monotonic() >= due:
                    due = time.monotonic() + ttl / 3
                    self._keep_alive(ttl)
                    self.alive = self.coordinator.alive()  # for the metrics: who is up, as often as the lease
                if (live := self.live()) != self.reported:
                    self.coordinator.report(live)
                    self.reported = live
                    self._answered()
            except EtcdUnavailable as exc:
                if not self.trouble:
                    self.on_problem(str(exc))
                self.trouble = str(exc)
            self.woken.wait(max(0.0, due - time.monotonic()))
            self.woken.clear()  # before the next round reads `live`: a nudge after it is the next wait's

    def nudge(self) -> None:
        """`current` may have moved: report it now."""
        self.woken.set()

    def stop(self) -> None:
        """Leave at once (revoke the lease) rather than letting the others wait for it to expire."""
        self.stopping.set()
        self.woken.set()
        if self.lease:
            try:
                self.coordinator.etcd.revoke(self.lease)
            except EtcdUnavailable:
                pass

    def _keep_alive(self, ttl: float) -> None:
        etcd = self.coordinator.etcd
        if not self.lease or etcd.keepalive(self.lease) <= 0:
            self.lease = etcd.grant(ttl)
            etcd.put(self.coordinator.keys.alive(self.coordinator.me), json.dumps({"since": time.time()}),
                     lease=self.lease)
            self.joined.set()
        self._answered()

    def _answered(self) -> None:
        if self.trouble:
            self.on_problem("")
            self.trouble = ""


def _read(found: dict[str, str], key: str, kind: Callable[[str], T]) -> T | None:
    """The value of `key` made a `kind`, None when absent; `Unreadable` when it cannot be made one."""
    if not (text := found.get(key)):
        return None
    try:
        return kind(text)
    except ValueError:
        raise Unreadable(key, text) from None


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
