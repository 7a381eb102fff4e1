"""make bench, section 7: switches of a fleet on loopback, through a real 3-member etcd, at 1, 3, 5 and 9 members.

For each size and strategy: the time from the last member's marker to every member live, each member's window (the
maintenance window of a together switch; swap to healthy in a rolling one), a lone maintd's window and marker to
live measured the same way in the same run, and what one switch costs etcd, from etcd's own /metrics summed over its
members. Every member and etcd share this machine's cores, so the larger fleets also measure the machine: read the
coordination's cost at 3 members, and the growth across sizes. Run alone: `python bench/fleet.py` (BENCH_RUNS,
BENCH_CLUSTER_SIZES="1,3,5,9").
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from etcd_cluster import EtcdCluster  # noqa: E402

from conftest import App, Daemon, Event, Memcached  # noqa: E402
from maintd.config import ConfigError, load  # noqa: E402

SIZES = [int(n) for n in os.environ.get("BENCH_CLUSTER_SIZES", "1,3,5,9").split(",")]
SWITCHES = max(5, int(os.environ.get("BENCH_RUNS", "30")) // 3)
SAME = '[restart]\nmethod = "command"\ncommand = ["true"]\n'  # every tree alike, lone or member: no app to boot
ROLLING = 'strategy = "rolling"\nbatch = 1\nbatch_wait = 0.0\n'  # contract §7a, once this maintd has it


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": len(values)}


def ts(event: Event) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def etcd_counters(etcd: EtcdCluster) -> dict[str, float]:
    """What etcd counts of its clients' work, summed over its members: KV requests (range, txn, put, delete; a
    member's reading is one txn), range operations (every prefix read, and every comparison of a transaction, on
    each etcd member that applies it), bytes sent to clients (readings and watch events) and watch events sent."""
    totals = dict.fromkeys(("kv_requests", "range_ops", "sent_bytes", "watch_events"), 0.0)
    for endpoint in etcd.endpoints:
        for line in urllib.request.urlopen(f"{endpoint}/metrics", timeout=10).read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("grpc_server_handled_total{") and 'grpc_service="etcdserverpb.KV"' in name:
                totals["kv_requests"] += float(value)
            elif name == "etcd_mvcc_range_total":
                totals["range_ops"] += float(value)
            elif name == "etcd_network_client_grpc_sent_bytes_total":
                totals["sent_bytes"] += float(value)
            elif name == "etcd_debugging_mvcc_events_total":
                totals["watch_events"] += float(value)
    return totals


def cluster_table(members: list[str], endpoints: list[str], extra: str) -> str:
    return f"""[cluster]
members = {json.dumps(members)}
member = "{{member}}"
etcd = {json.dumps(endpoints)}
prefix = "/maintd/bench"
lease_ttl = 2.0
{extra}"""


def rolling_accepted(base: Path) -> bool:
    """Whether this maintd takes `strategy = "rolling"` (contract §7a): the rolling rows are measured only then."""
    app = App(base / "probe", "127.0.0.1:11211")
    app.write_config(SAME + cluster_table(["m1"], ["http://127.0.0.1:2379"], ROLLING).replace("{member}", "m1"))
    try:
        load(app.config)
    except ConfigError:
        return False
    return True


def window(steps: dict[str, Event]) -> float:
    """ms: the maintenance window where there is one; else (rolling) from the swap to healthy."""
    if steps["maintenance_on"]["result"] == "ok":
        return (ts(steps["maintenance_off"]) - ts(steps["maintenance_on"])) * 1000
    return (ts(steps["health"]) - ts(steps["swap"]) + steps["swap"]["duration_ms"] / 1000) * 1000


def waiting(steps: dict[str, Event]) -> float:
    """ms of the window spent waiting on the others: every member in maintenance (the primary's hooks), and every
    member healthy (the commit); the rest of the window is the member's own steps."""
    return sum(steps[step]["duration_ms"] for step in ("hooks_before", "commit"))


def live_at(steps: dict[str, Event]) -> float:
    """When the member serves the release: out of maintenance, or (rolling) healthy."""
    return ts(steps["maintenance_off"] if steps["maintenance_on"]["result"] == "ok" else steps["health"])


def fleet_run(size: int, strategy: str, memcached: str) -> dict:
    """`SWITCHES` switches (and one before them, not counted: no live release to flag) of `size` members, and a lone
    maintd's deploys of the same releases in the same run, one after the other."""
    base = Path(tempfile.mkdtemp(prefix="maintd-bench-fleet-"))
    etcd = EtcdCluster(base / "etcd")
    members = [f"m{i}" for i in range(1, size + 1)]
    lone = App(base / "lone", memcached)
    lone.write_config(SAME)
    apps = [App(base / name, memcached) for name in members]
    table = cluster_table(members, etcd.endpoints, ROLLING if strategy == "rolling" else "")
    for name, app in zip(members, apps, strict=True):
        app.write_config(SAME + table.replace("{member}", name))
    daemons: list[Daemon] = []
    lone_window, lone_live, all_live = [], [], []
    windows: dict[str, list[float]] = {name: [] for name in members}
    waits: dict[str, list[float]] = {name: [] for name in members}
    costs: dict[str, list[float]] = {}
    try:
        daemons = [Daemon(app).ready() for app in (lone, *apps)]
        for i in range(SWITCHES + 1):
            release = f"r{i:03d}"
            marks = [daemon.mark() for daemon in daemons]
            lone.make_release(release)
            marked = time.time()
            done = daemons[0].deployed(release, timeout=60, since=marks[0])
            steps = {e["step"]: e for e in daemons[0].steps(done["deploy_id"])}
            if i:
                lone_window.append(window(steps))
                lone_live.append((live_at(steps) - marked) * 1000)
            before = etcd_counters(etcd)
            for app in apps:
                app.make_release(release)
            marked = time.time()
            outcomes = [daemon.deployed(release, timeout=120, since=mark)
                        for daemon, mark in zip(daemons[1:], marks[1:], strict=True)]
            after = etcd_counters(etcd)
            assert all(o["result"] == "ok" for o in outcomes), outcomes
            if not i:
                continue
            every = [{e["step"]: e for e in daemon.steps(o["deploy_id"])}
                     for daemon, o in zip(daemons[1:], outcomes, strict=True)]
            for name, steps in zip(members, every, strict=True):
                windows[name].append(window(steps))
                waits[name].append(waiting(steps))
            all_live.append((max(live_at(steps) for steps in every) - marked) * 1000)
            for counter, value in after.items():
                costs.setdefault(counter, []).append(value - before[counter])
    finally:
        for daemon in daemons:
            daemon.stop()
        etcd.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    worst = max(windows, key=lambda name: statistics.median(windows[name]))
    worst_window = statistics.median(windows[worst])
    return {"members": size, "strategy": strategy, "lone_window_ms": summary(lone_window),
            "lone_marker_to_live_ms": summary(lone_live),
            "window_ms": {name: summary(values) for name, values in windows.items()},
            "waiting_ms": {name: summary(values) for name, values in waits.items()},
            "worst_window_ms": round(worst_window, 3), "worst_waiting_ms": round(statistics.median(waits[worst]), 3),
            "added_ms": round(worst_window - statistics.median(lone_window), 3),
            "marker_to_all_live_ms": summary(all_live),
            "etcd_per_switch": {counter: round(statistics.median(values)) for counter, values in costs.items()}}


def fleet(memcached: str) -> dict:
    """Every size together, and rolling (batch 1, batch_wait 0) where this maintd has it."""
    base = Path(tempfile.mkdtemp(prefix="maintd-bench-probe-"))
    rolling = rolling_accepted(base)
    shutil.rmtree(base, ignore_errors=True)
    runs = [fleet_run(size, strategy, memcached) for strategy in ("together", "rolling")[:1 + rolling]
            for size in SIZES]
    return {"runs": runs, "switches": SWITCHES,
            **({} if rolling else {"rolling": "not measured: this maintd does not take [cluster] strategy yet"})}


def rows(results: dict) -> list[tuple[str, str, str]]:
    """The table's rows for section 7."""
    goals = {3: "≤ 20 ms", 9: "≤ 50 ms"}
    out = []
    for run in results["runs"]:
        n, strategy, cost = run["members"], run["strategy"], run["etcd_per_switch"]
        head = f"7 {strategy}, {n} member{'s' if n > 1 else ''}:"  # per switch, medians
        spread = run["marker_to_all_live_ms"]
        out += [(f"{head} worst window (lone maintd)",
                 f"{run['worst_window_ms']} ms ({run['lone_window_ms']['median']} ms)", ""),
                (f"{head} of it, waiting on the others", f"{run['worst_waiting_ms']} ms", ""),
                (f"{head} marker → all live (lone maintd)",
                 f"{spread['median']} ms ({run['lone_marker_to_live_ms']['median']} ms)", "")]
        if strategy == "together":
            out += [(f"{head} added by the coordination", f"{run['added_ms']} ms", goals.get(n, ""))]
        out += [(f"{head} etcd: requests, range ops, KB, events",
                 f"{cost['kv_requests']}, {cost['range_ops']}, {cost['sent_bytes'] / 1000:.0f}, "
                 f"{cost['watch_events']}", "requests, range ops ∝ members")]
    if note := results.get("rolling"):
        out += [("7 rolling (batch 1, batch_wait 0)", note, "")]
    return out


if __name__ == "__main__":
    from maintd import log

    log.configure("json", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the whole run
    server = Memcached()
    try:
        measured = fleet(server.address)
    finally:
        server.stop()
    print(json.dumps(measured, indent=1))
    for row in rows(measured):
        print(" | ".join(row))
