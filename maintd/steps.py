"""The steps of a deploy (contract §2, and §7 for a cluster switch), declared once with what each one implies.

Every list of steps is built from `Step`'s order: the lone server's deploy (`LONE`), a cluster member's side of a
switch (`SWITCH`), the steps recovery runs to finish forward (`Step.finishes`). A step's traits stand beside it:
whether the journal must reach the disk before it runs (`durable`), and whose fault its failure is by default
(`blames`), which decides whether the release is marked bad.
"""

from __future__ import annotations

from enum import StrEnum


class Fault(StrEnum):
    """Whose fault a failed deploy is. Only the release's marks it bad ("never deployed automatically again",
    skipped by `rollback`): a missing shared path, a full disk or a Passenger that cannot restart say nothing
    about the release, and an operator who fixes the server deploys the same release again."""

    RELEASE = "release"
    SERVER = "server"
    NOBODY = "nobody"  # it could not begin (a cluster member while another switch held the cluster): nothing changed


class Step(StrEnum):
    # What journald and history call the step; whose fault its failure is unless the error says otherwise;
    # whether the journal is fsynced before it; whether only a cluster member runs it.
    VALIDATE = "validate", Fault.RELEASE
    LINK_SHARED = "link_shared", Fault.SERVER
    PREPARE = "prepare", Fault.RELEASE, False, True
    # Durable: once flags may be up, recovery must know to take them down again, even after a power cut.
    MAINTENANCE_ON = "maintenance_on", Fault.SERVER, True
    HOOKS_BEFORE = "hooks_before", Fault.RELEASE
    SWAP = "swap", Fault.SERVER
    RESTART = "restart", Fault.RELEASE  # restart.command is the release's own (as its uploader); Passenger's is not
    FLUSH = "flush", Fault.SERVER
    HEALTH = "health", Fault.RELEASE
    COMMIT = "commit", Fault.RELEASE, False, True
    HOOKS_AFTER = "hooks_after", Fault.RELEASE
    MAINTENANCE_OFF = "maintenance_off", Fault.SERVER
    CLEANUP = "cleanup", Fault.SERVER

    blames: Fault
    durable: bool
    switch_only: bool

    def __new__(cls, value: str, blames: Fault, durable: bool = False, switch_only: bool = False) -> Step:
        step = str.__new__(cls, value)
        step._value_ = value
        step.blames, step.durable, step.switch_only = blames, durable, switch_only
        return step

    @property
    def finishes(self) -> bool:
        """Run again by recovery to finish a deploy forward whose swap happened (after-swap hooks are not: a hook
        that killed maintd would kill it on every start)."""
        return self in (Step.RESTART, Step.FLUSH, Step.HEALTH, Step.MAINTENANCE_OFF)


class Ending(StrEnum):
    """The records that close a deploy that did not go forward, and a recovery's own entry. The first two are also
    the step its journal names while it goes back, so that a crash on the way back is recovered by taking it
    again."""

    ROLLBACK = "rollback"  # swapped: `current` pointed back
    ABORT = "abort"  # failed before the swap
    RECOVERY = "recovery"


LONE: tuple[Step, ...] = tuple(step for step in Step if not step.switch_only)
SWITCH: tuple[Step, ...] = tuple(Step)
FINISH: tuple[Step, ...] = tuple(step for step in Step if step.finishes)
