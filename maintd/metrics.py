"""The metrics of contract §11: what they count, and the families prometheus-client turns into its text format.

Two kinds of value, kept apart because they come from different places and live differently:
- what accumulates (`Tally`): the counters, the histograms and the time of the last deploy of each result. Counted
  from the events a deploy publishes (events.py), in whatever thread publishes them, in memory only: the counting
  costs a deploy's window a lock and a few additions. The tally is kept in `state.dir` (`metrics.json`) by a writer
  thread of its own (monitoring.py), so a restart of maintd does not reset a counter, which `increase()` would read
  as a reset and a rate over it as a gap.
- what the daemon's state is now (`Gauges`): maintenance, the live release, releases by state, paused, the cluster's
  members and etcd. A snapshot taken on the daemon's loop where that state changes (`Daemon.announce`, and every few
  seconds for what changes without a word: an upload completing, a member's lease running out) and handed over
  whole, so a scrape reads one consistent picture and never walks the daemon's own structures from its thread.

Series a counter may need are there from the start at 0 (every kind and result, every memcached server, in a
cluster every strategy and decision): an `increase()` cannot see a series that first appears already at 1.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .events import Event, Happening
from .inventory import ReleaseState
from .results import DeployKind, Outcome, StepResult
from .state import Damaged, read_json
from .tree import write_atomically

# Seconds. A lone server's window is a few milliseconds (bench: under 5 ms with Passenger's touch and a memcached
# flush); a restart that waits for the app to answer takes seconds (a Rails boot: 2 to 8 s); migrations in a hook,
# minutes; a cluster switch waits for every member up to prepare_timeout (900 s). Buckets from 5 ms to 30 min, about
# three per decade, place each of those in a bucket of its own, so a window that grows from 4 ms to 40 ms, or a
# deploy from 20 s to 3 min, shows in a quantile; more buckets would only multiply the series.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
FILE = "metrics.json"  # in state.dir
RESULTS = (StepResult.OK, StepResult.FAILED, StepResult.ROLLED_BACK)  # a deploy's own results


class Decision(StrEnum):
    """`maintd_cluster_switches_total{decision}`: how a switch this member was in ended."""

    COMMIT = "commit"
    ABORT = "abort"


class By(StrEnum):
    """`maintd_maintenance{by}`: whose maintenance is on."""

    DEPLOY = "deploy"  # a deploy's flags (in its window, or left up by maintenance.keep_on_failure)
    OPERATOR = "operator"  # `maintctl maintenance on`


# name (as exposed) -> its labels besides `app`
COUNTERS = {"maintd_deploys_total": ("kind", "result"), "maintd_memcached_flush_errors_total": ("server",),
            "maintd_cluster_switches_total": ("strategy", "decision")}
HISTOGRAMS = {"maintd_deploy_duration_seconds": ("kind",), "maintd_maintenance_window_seconds": (),
              "maintd_step_duration_seconds": ("step",)}
HELP = {
    "maintd_deploys_total": "Deploys, rollbacks and recoveries finished, by result",
    "maintd_memcached_flush_errors_total": "memcached servers a flush could not reach",
    "maintd_cluster_switches_total": "Cluster switches this member was in, by strategy and decision",
    "maintd_deploy_duration_seconds": "How long a deploy took, first step to outcome",
    "maintd_maintenance_window_seconds": "How long a deploy held its own maintenance: its flags raised to lowered",
    "maintd_step_duration_seconds": "How long each step of a deploy took",
}

Labels = tuple[str, ...]


@dataclass
class Histogram:
    """One series: the count in each bucket of `BUCKETS` and above the last (not cumulative), and the sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, bound in enumerate(BUCKETS) if value <= bound), len(BUCKETS))] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, buckets = 0, list[tuple[str, float]]()
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return buckets


@dataclass
class Tally:
    """What accumulates, by metric and labels (without `app`); as `metrics.json` holds it."""

    counters: dict[str, dict[Labels, float]] = field(default_factory=lambda: {name: {} for name in COUNTERS})
    histograms: dict[str, dict[Labels, Histogram]] = field(default_factory=lambda: {n: {} for n in HISTOGRAMS})
    last_deploy: dict[str, float] = field(default_factory=dict)  # result -> seconds since the epoch

    def as_json(self) -> dict[str, Any]:
        return {"buckets": BUCKETS, "last_deploy": self.last_deploy,
                "counters": {name: [[list(labels), value] for labels, value in series.items()]
                             for name, series in self.counters.items()},
                "histograms": {name: [[list(labels), h.counts, h.total] for labels, h in series.items()]
                               for name, series in self.histograms.items()}}

    @classmethod
    def from_json(cls, data: Any) -> Tally:
        """The file read back; ValueError or TypeError (read_json makes either `Damaged`) where it is not one."""
        try:
            return cls._from_json(data)
        except KeyError as exc:
            raise ValueError(f"no {exc}") from None

    @classmethod
    def _from_json(cls, data: Any) -> Tally:
        tally = cls(last_deploy={str(StepResult(r)): float(t) for r, t in dict(data["last_deploy"]).items()})
        for name, rows in dict(data["counters"]).items():
            for labels, value in rows:
                tally.counters[name][_labels(name, labels, COUNTERS)] = _count(value)
        if tuple(data["buckets"]) == BUCKETS:  # else buckets of another maintd: those histograms start again
            for name, rows in dict(data["histograms"]).items():
                for labels, counts, total in rows:
                    if len(counts) != len(BUCKETS) + 1:
                        raise ValueError(f"{name} has {len(counts)} buckets, not {len(BUCKETS) + 1}")
                    tally.histograms[name][_labels(name, labels, HISTOGRAMS)] = Histogram(
                        [int(_count(c)) for c in counts], _count(total))
        return tally


def _labels(name: str, labels: Any, known: dict[str, Labels]) -> Labels:
    if name not in known or not isinstance(labels, list) or len(labels) != len(known[name]):
        raise ValueError(f"{name} {labels!r} is no series maintd keeps")
    return tuple(str(label) for label in labels)


def _count(value: Any) -> float:
    """A count as kept: a finite number, 0 or more (JSON also takes 1e400 and a 400-digit integer, which are not)."""
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer past any float
        number = math.inf
    if not 0 <= number < math.inf:
        raise ValueError(f"a count must be a number from 0 to {sys.float_info.max:g}, not {str(value)[:40]}")
    return number


@dataclass(frozen=True)
class Gauges:
    """The daemon's state as the gauges show it, taken on its loop (monitoring.observe)."""

    maintenance: By | None = None
    live: str | None = None
    releases: tuple[tuple[ReleaseState, int], ...] = ()
    paused: bool = False
    members: tuple[tuple[str, bool], ...] = ()  # in a cluster: each member, and whether its lease is alive
    etcd_up: bool | None = None  # None: not in a cluster


class Metrics:
    """The tally and the gauges of one app, the listener that counts, and the collector a registry asks."""

    def __init__(self, app: str, strategy: str | None, directory: Path, report: Callable[[str], object]) -> None:
        self.app, self.strategy, self.path = app, strategy, directory / FILE  # strategy: None outside a cluster
        self.lock = threading.Lock()
        self.version = 0  # one more at every change: what an exposition was rendered from (monitoring.Running)
        self.gauges = Gauges()
        self.on_change: Callable[[bool], object] = lambda counted: None  # counted: the tally changed
        try:
            self.tally = read_json(self.path, "maintd's metrics", Tally.from_json) or Tally()
        except Damaged as exc:  # a torn or hand-edited file: said once, and it is overwritten at the next change
            report(f"{exc}; the counters start again from 0")
            self.tally = Tally()
        zeros: list[tuple[str, Labels]] = [("maintd_deploys_total", (str(k), str(r))) for k in DeployKind
                                           for r in RESULTS]
        if strategy is not None:
            zeros += [("maintd_cluster_switches_total", (s, str(d))) for s in ("together", "rolling") for d in Decision]
        self._zeros(zeros)

    def expect(self, servers: tuple[str, ...]) -> None:
        """memcached.servers, at start and after a reload: a series for each, from 0."""
        self._zeros([("maintd_memcached_flush_errors_total", (server,)) for server in servers])

    def _zeros(self, series: list[tuple[str, Labels]]) -> None:
        with self.lock:
            for name, labels in series:
                self.tally.counters[name].setdefault(labels, 0.0)

    # --- counting (any thread; in memory only) --------------------------------------------------------------------

    def hear(self, event: Event) -> None:
        """An events.py listener: counts what happened, and returns at once."""
        if event.event is Happening.DEPLOY_FINISHED and event.outcome:
            self._finished(event.outcome, event.timestamp)
        elif event.event is Happening.CACHE_NOT_FLUSHED:
            with self.lock:
                self._add("maintd_memcached_flush_errors_total", (event.server,))
                self.version += 1
        else:
            return
        self.on_change(True)

    def _finished(self, outcome: Outcome, at: float) -> None:
        kind = str(outcome.kind)
        with self.lock:
            self._add("maintd_deploys_total", (kind, str(outcome.result)))
            self._observe("maintd_deploy_duration_seconds", (kind,), outcome.duration_ms / 1000)
            if outcome.window_ms is not None:
                self._observe("maintd_maintenance_window_seconds", (), outcome.window_ms / 1000)
            for step in outcome.steps:
                if step.result is not StepResult.SKIPPED:  # a step that did nothing says nothing of its duration
                    self._observe("maintd_step_duration_seconds", (str(step.step),), step.duration_ms / 1000)
            self.tally.last_deploy[str(outcome.result)] = at
            self.version += 1
            if outcome.switch_id and self.strategy is not None:  # before go chose, the configured strategy
                decision = Decision.COMMIT if outcome.went_live else Decision.ABORT
                self._add("maintd_cluster_switches_total", (outcome.strategy or self.strategy, str(decision)))

    def _add(self, name: str, labels: Labels) -> None:
        series = self.tally.counters[name]
        series[labels] = series.get(labels, 0.0) + 1

    def _observe(self, name: str, labels: Labels, value: float) -> None:
        self.tally.histograms[name].setdefault(labels, Histogram()).observe(value)

    def show(self, gauges: Gauges) -> None:
        """The daemon's state now (from its loop); a change is news for the textfile, the same picture is not."""
        with self.lock:
            changed, self.gauges = gauges != self.gauges, gauges
            self.version += changed
        if changed:
            self.on_change(False)

    # --- reading (the endpoint's and the writers' threads) ---------------------------------------------------------

    def save(self) -> None:
        """The tally into state.dir, durably (the writer thread's job: never a deploy's)."""
        with self.lock:
            text = json.dumps(self.tally.as_json(), sort_keys=True)
        write_atomically(self.path, text, durable=True)

    def collect(self) -> Iterator[Metric]:
        """The prometheus-client collector protocol: every family, from one consistent reading."""
        with self.lock:
            yield from self._counters()
            yield from self._histograms()
            yield from self._state(self.gauges)

    def _counters(self) -> Iterator[Metric]:
        for name, label_names in COUNTERS.items():
            if name == "maintd_cluster_switches_total" and self.strategy is None:
                continue
            family = CounterMetricFamily(name, HELP[name], labels=("app", *label_names))
            for labels, value in sorted(self.tally.counters[name].items()):
                family.add_metric((self.app, *labels), value)
            yield family

    def _histograms(self) -> Iterator[Metric]:
        for name, label_names in HISTOGRAMS.items():
            family = HistogramMetricFamily(name, HELP[name], labels=("app", *label_names))
            for labels, histogram in sorted(self.tally.histograms[name].items()):
                family.add_metric((self.app, *labels), histogram.cumulative(), histogram.total)
            yield family

    def _state(self, now: Gauges) -> Iterator[Metric]:
        def gauge(name: str, help_text: str, labels: tuple[str, ...], values: list[tuple[Labels, float]]) -> Metric:
            family = GaugeMetricFamily(name, help_text, labels=("app", *labels))
            for label_values, value in values:
                family.add_metric((self.app, *label_values), value)
            return family

        counts = dict(now.releases)
        yield gauge("maintd_maintenance", "1 while maintenance is on, by whose", ("by",),
                    [((str(by),), float(now.maintenance is by)) for by in By])
        yield gauge("maintd_release_info", "1 for the live release", ("release",),
                    [((now.live,), 1.0)] if now.live else [])
        yield gauge("maintd_last_deploy_timestamp_seconds", "When the last deploy of each result finished",
                    ("result",), [((result,), at) for result, at in sorted(self.tally.last_deploy.items())])
        yield gauge("maintd_releases", "Releases in releases/, by their state in `maintctl releases`", ("state",),
                    [((str(state),), float(counts.get(state, 0))) for state in ReleaseState])
        yield gauge("maintd_paused", "1 while automatic deploys are paused", (), [((), float(now.paused))])
        if self.strategy is not None:
            yield gauge("maintd_cluster_member_up", "1 while a member's lease in etcd is alive", ("member",),
                        [((member,), float(up)) for member, up in now.members])
            yield gauge("maintd_cluster_etcd_up", "1 while etcd answers this member", (),
                        [((), float(bool(now.etcd_up)))])
