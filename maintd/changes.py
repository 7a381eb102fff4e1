"""Which keys under the cluster's prefix changed, and when, as etcd's watch tells: the hint on which a waiting member
reads the keys again, instead of reading them every few milliseconds whether anything changed or not.

Only a hint, never the truth: what a member acts on is always a reading of the keys (`Coordinator.view`), and every
wait for a change is bounded (`Changes.wait`), so that a watch that is silent when it should not be (a stream held
open by a network that drops packets; one that ends unnoticed, as etcd3gw's watch does) costs time, never a wrong
step. A stream that ends is opened again after the last revision it delivered, so no change in between is missed;
one opened afresh (the first, or after etcd compacted the history it would resume from) counts as a change of every
area, since anything may have changed unseen.

What it costs etcd: one watch per member, whatever the size of the fleet; a member reads the keys once per change
it waits on (changes that land together are read together) rather than hundreds of times a second.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from .etcd import Etcd, EtcdUnavailable

# Seconds a stream may stay silent before it is opened again: a stream that a network holds open without
# delivering anything is replaced within this long (a quiet prefix merely costs a new stream now and then).
IDLE = 30.0
RETRY = 0.5  # seconds between two tries to open a stream while etcd does not answer
# Seconds a wait lasts while no stream is open: the waiters poll, as they must when nothing hints.
UNWATCHED = 0.05
RECENT = 4096  # changes remembered by key, for `written_since`


class Changes(threading.Thread):
    def __init__(self, etcd: Etcd, prefix: str, area: Callable[[str], str]) -> None:
        super().__init__(name="maintd-changes", daemon=True)
        self.etcd = etcd
        self.prefix = prefix  # ends in "/"
        self.area = area  # the kind of a key (cluster.Keys.area): each waiter names the kinds it waits on
        self.cond = threading.Condition()
        self.newest: dict[str, int] = {}  # area -> revision of the newest change seen in it
        self.everything = 0  # the revision up to which anything may have changed unseen (a fresh stream)
        self.recent: deque[tuple[int, str]] = deque(maxlen=RECENT)  # (revision, key) of the latest changes
        self.live = False  # a stream is open
        self.stopping = False

    def run(self) -> None:
        after = 0  # the last revision delivered: a stream opened again follows on from there
        while not self.stopping:
            try:
                after = self.etcd.watch(self.prefix, after, self._opened if after else self._opened_afresh,
                                        self._seen, IDLE)
            except EtcdUnavailable:
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping, RETRY)
            finally:
                self.live = False

    def wait(self, after: int, areas: frozenset[str], timeout: float) -> bool:
        """Until a change newer than revision `after` in one of `areas`, `timeout` seconds, or `stop`, whichever is
        first; without a stream, no longer than `UNWATCHED`. Whether it was a change."""
        with self.cond:
            self.cond.wait_for(lambda: self.stopping or self.changed_since(after, areas),
                               timeout if self.live else min(timeout, UNWATCHED))
            return self.changed_since(after, areas)

    def changed_since(self, after: int, areas: frozenset[str]) -> bool:
        return self.everything > after or any(self.newest.get(area, 0) > after for area in areas)

    def written_since(self, after: int, prefix: str) -> set[str]:
        """The keys under `prefix` that the watch says changed after revision `after`. A hint that may fall short
        (a stream down, changes older than it remembers), never one that names a key that did not change."""
        with self.cond:
            return {key for revision, key in self.recent if revision > after and key.startswith(prefix)}

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def _opened(self, revision: int) -> None:
        self.live = True

    def _opened_afresh(self, revision: int) -> None:
        with self.cond:
            self.live = True
            self.everything = max(self.everything, revision)
            self.cond.notify_all()

    def _seen(self, revision: int, key: str) -> None:
        area = self.area(key)
        with self.cond:
            self.newest[area] = max(self.newest.get(area, 0), revision)
            self.recent.append((revision, key))
            self.cond.notify_all()
