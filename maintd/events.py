"""What happened that someone outside maintd may want to hear of at once: the deploys, an operator's maintenance, an
upload refused, a cluster switch aborted (contract §11). Said once, where it happens, to every listener.

The journal already has all of it, line by line; an `Event` is the same happening as one record with the fields of
contract §11's webhook body, for listeners that act on it (webhooks, metrics). `Events.publish` is called from the
loop and from a deploy's thread, inside a maintenance window too: a listener must take the event and return at once
(a queue, a counter), never do I/O in the caller's thread, and never raise into it (one that does is logged once per
kind of failure and the others still hear the event).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from . import log
from .results import Outcome, StepResult


class Happening(StrEnum):
    DEPLOY_STARTED = "deploy_started"
    DEPLOY_FINISHED = "deploy_finished"  # result ok, failed or rolled_back; step and error of a failure
    MAINTENANCE_ON = "maintenance_on"  # by an operator (a deploy's own window is in its steps)
    MAINTENANCE_OFF = "maintenance_off"
    UPLOAD_REFUSED = "upload_refused"
    SWITCH_ABORTED = "switch_aborted"  # by this member's transaction: one event per aborted switch in the cluster
    # A memcached server a flush could not reach (`server`): for the metrics' error counter. Not one of contract
    # §11's webhook events: a server that is down is a logged warning (contract §2), said once per deploy already.
    CACHE_NOT_FLUSHED = "cache_not_flushed"


# Contract §11's webhook events: every happening but what only the metrics count
NOTIFIED = frozenset(Happening) - {Happening.CACHE_NOT_FLUSHED}


@dataclass(frozen=True)
class Event:
    """One happening, with contract §11's webhook fields ("" where one does not apply)."""

    event: Happening
    release: str = ""
    deploy_id: str = ""
    actor: str = ""
    switch_id: str = ""
    result: str = ""
    step: str = ""
    error: str = ""
    server: str = ""  # CACHE_NOT_FLUSHED: the memcached server, HOST:PORT (not a webhook field)
    app: str = ""  # stamped by `Events.publish`
    timestamp: float = field(default_factory=time.time)
    outcome: Outcome | None = field(default=None, compare=False)  # DEPLOY_FINISHED: the whole outcome

    def fields(self) -> dict[str, Any]:
        """The webhook body's fields (contract §11), without the outcome and the server."""
        return {key: str(value) if isinstance(value, Happening) else value
                for key, value in asdict(self).items() if key not in ("outcome", "server")}

    @classmethod
    def finished(cls, outcome: Outcome) -> Event:
        """A deploy's end, with the step that failed and why, if it did: the first step that failed, which ended it
        (the records after it are the way back, `Ending.ABORT` failed too)."""
        failed = next((s for s in outcome.steps if s.result is StepResult.FAILED), None)
        return cls(Happening.DEPLOY_FINISHED, outcome.release, outcome.deploy_id, outcome.actor,
                   outcome.switch_id or "", str(outcome.result), failed.step if failed else "", outcome.error,
                   outcome=outcome)


Listener = Callable[[Event], None]


class Events:
    """The listeners, and `publish`. Listeners come and go with the configuration (a reload), so the list is
    replaced whole under a lock, never changed while a publish walks it."""

    def __init__(self, app: str = "") -> None:
        self.app = app
        self._listeners: tuple[Listener, ...] = ()
        self._lock = threading.Lock()
        self._failed: set[str] = set()  # kinds of listener failure logged already
        self.log = log.get()

    def listen(self, *listeners: Listener) -> None:
        with self._lock:
            self._listeners = listeners

    def publish(self, event: Event) -> None:
        event = replace(event, app=self.app)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception as exc:  # a listener's bug must not fail the step that said what happened
                said = f"{type(exc).__name__}: {exc}"
                if said not in self._failed:
                    self._failed.add(said)
                    self.log.error(f"a listener of maintd's events failed ({said}); the event is dropped for it",
                                   app=self.app)
