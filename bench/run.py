"""make bench: how fast maintd is, side by side with the plain alternative, on this machine.

Ten measures (medians over repeated runs, with min and max), printed as one table and written to
bench/results.json; the seventh, switches of a fleet, is bench/fleet.py. Timings live here and only here: the test
suite asserts behaviour, never speed. `bench/run.py webhooks` and `bench/run.py metrics` run the ninth and the
tenth alone (a minute or two) and put their numbers into results.json beside the others'.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # conftest's fixtures and the etcd cluster of the tests
sys.path.insert(0, str(HERE.parent))

from fleet import SIZES, fleet  # noqa: E402
from fleet import rows as fleet_rows  # noqa: E402

from conftest import App, Daemon, Memcached, free_port, make_source, wait_until  # noqa: E402
from maintd.config import Upload, load  # noqa: E402
from maintd.context import Context  # noqa: E402
from maintd.events import Events  # noqa: E402
from maintd.maintenance import Notice  # noqa: E402
from maintd.pipeline import Deploy  # noqa: E402
from maintd.state import Store  # noqa: E402
from maintd.tree import Tree  # noqa: E402
from maintd.webhooks import Webhooks  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "30"))
UPLOAD_SIZES = [int(n) for n in os.environ.get("BENCH_UPLOAD_FILES", "20000,100000").split(",")]
BIN = Path(sys.executable).parent


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": len(values)}


WORKDIRS: list[Path] = []  # removed at the end of the run


def workdir() -> App:
    base = Path(tempfile.mkdtemp(prefix="maintd-bench-"))
    WORKDIRS.append(base)
    return App(base, MEMCACHED.address)


# --- 1. the maintenance window -------------------------------------------------------------------------------------

BASELINE = r"""
set -e
root=$1 old=$2 new=$3 port=$4
touch "$root/releases/$old/tmp/maintenance.txt" "$root/releases/$new/tmp/maintenance.txt"
on=$EPOCHREALTIME
ln -s "releases/$new" "$root/current.tmp" && mv -T "$root/current.tmp" "$root/current"
touch "$root/releases/$new/tmp/restart.txt"
exec 3<>"/dev/tcp/127.0.0.1/$port"; printf 'flush_all\r\n' >&3; read -r reply <&3; exec 3>&-
rm -f "$root/releases/$new/tmp/maintenance.txt" "$root/releases/$old/tmp/maintenance.txt"
off=$EPOCHREALTIME
echo "$on $off $reply"
"""


def timed_deploys(app: App, events: Events | None = None) -> Callable[[str], tuple[float, str]]:
    """A function that deploys a release of `app` in process and returns its maintenance window in ms, from the
    live release's flag written (the last one raised) to its removal (the first one lowered), and what its restart
    step did. Its events go to `events`' listeners."""
    config = load(app.config)
    ctx = Context.build(config, Store(config.state_dir), events)
    marks: dict[str, float] = {}
    raise_in, lower_in = ctx.flags.raise_in, ctx.flags.lower_in

    def timed_raise(release: str, notice: Notice) -> None:
        raise_in(release, notice)
        marks["on"] = time.perf_counter()

    def timed_lower(release: str) -> None:
        lower_in(release)
        marks.setdefault("off", time.perf_counter())

    ctx.flags.raise_in, ctx.flags.lower_in = timed_raise, timed_lower  # type: ignore[method-assign]

    def deploy(release: str) -> tuple[float, str]:
        marks.clear()
        outcome = Deploy(ctx, release, "bench").run()
        assert outcome.result == "ok", outcome.error
        restart = next(record.message for record in outcome.steps if record.step == "restart")
        return (marks.get("off", 0) - marks.get("on", 0)) * 1000, restart

    return deploy


def maintenance_window() -> dict:
    """Flag visible -> flag gone: maintd's own steps (passenger touch, flush, fsynced swap) vs the seed's script."""
    app = workdir()
    app.write_config(top="keep_releases = 1000")
    for name in ("a", "b"):
        app.make_release(name)
        (app.releases / name / "tmp").mkdir(exist_ok=True)
    deploy = timed_deploys(app)
    ours, theirs = [], []
    for i in range(RUNS + 1):
        new, old = "ab"[i % 2], "ab"[(i + 1) % 2]
        ms, _ = deploy(new)
        if i:  # the first deploy has no live release to flag
            ours.append(ms)
        done = subprocess.run(["/bin/bash", "-c", BASELINE, "-", str(app.root), new, old, str(MEMCACHED.port)],
                              capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
        on, off, reply = done.stdout.split()
        assert reply.startswith("OK")
        theirs.append((float(off) - float(on)) * 1000)
        Tree(app.root).swap(new)  # back, so that maintd's next deploy swaps releases too
    return {"maintd_ms": summary(ours), "script_ms": summary(theirs),
            "ratio": round(statistics.median(ours) / statistics.median(theirs), 3)}


# --- 2. detection latency ------------------------------------------------------------------------------------------


def ts(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def detection() -> dict:
    app = workdir()
    quiet = 1.0
    app.write_config(quiet_period=quiet)
    daemon = Daemon(app).ready()
    marker, quiet_lat = [], []
    try:
        for i in range(max(5, RUNS // 3)):
            name = f"m{i:03d}"
            staging = app.releases / f".incoming-{name}"
            make_source(staging, 50, name)
            staging.rename(app.releases / name)
            (app.releases / name / ".maintd-ready").touch()
            written = time.time()
            on = daemon.wait_for(release=name, step="maintenance_on")
            marker.append((ts(on) - written) * 1000)
            daemon.deployed(name)
            name = f"q{i:03d}"
            make_source(app.releases / name, 50, name)
            last = time.time()
            started = daemon.wait_for(release=name,
                                      event=lambda e: e.startswith("deploy of release") and "started" in e)
            quiet_lat.append((ts(started) - last - quiet) * 1000)
            daemon.deployed(name)
    finally:
        daemon.stop()
    return {"marker_to_maintenance_ms": summary(marker), "quiet_overshoot_ms": summary(quiet_lat),
            "quiet_period_s": quiet}


# --- 3. the cost of an upload --------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def inotify_watches(pid: int) -> int:
    count = 0
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            count += sum(1 for line in fdinfo.read_text().splitlines() if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


def upload_cost(source: Path, files: int, require_marker: bool) -> dict:
    app = workdir()
    app.write_config(quiet_period=Upload.quiet_period)
    if require_marker:
        text = app.config.read_text().replace("[upload]\n", "[upload]\nrequire_marker = true\n")
        app.config.write_text(text)
    daemon = Daemon(app).ready()
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, inotify_watches(daemon.proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample)
    before_cpu = cpu_seconds(daemon.proc.pid)
    sampler.start()
    rsync = subprocess.Popen(["rsync", "-a", f"{source}/", f"{app.releases}/big/"])
    _, status, usage = os.wait4(rsync.pid, 0)  # rsync's own CPU, with the receiver and generator it reaped
    rsync.returncode = os.waitstatus_to_exitcode(status)
    assert rsync.returncode == 0
    during_cpu = cpu_seconds(daemon.proc.pid) - before_cpu
    if require_marker:
        (app.releases / "big" / ".maintd-ready").touch()
    daemon.deployed("big", timeout=600)
    done.set()
    sampler.join()
    through_deploy = cpu_seconds(daemon.proc.pid) - before_cpu
    daemon.stop()
    rsync_cpu = usage.ru_utime + usage.ru_stime
    shutil.rmtree(app.base, ignore_errors=True)
    return {"rsync_cpu_s": round(rsync_cpu, 3), "maintd_cpu_during_rsync_s": round(during_cpu, 3),
            "maintd_cpu_until_live_s": round(through_deploy, 3),
            "fraction_during_rsync": round(during_cpu / rsync_cpu, 4),
            "fraction_until_live": round(through_deploy / rsync_cpu, 4), "peak_inotify_watches": peak,
            "maintd_us_per_file": round(during_cpu / files * 1e6, 1), "files": files}


# --- 4. footprint --------------------------------------------------------------------------------------------------


def switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def footprint(seconds: float = 20.0, extra: str = "") -> dict:
    app = workdir()
    app.write_config(extra)
    app.make_release("r1")
    daemon = Daemon(app).ready()
    daemon.deployed("r1")
    time.sleep(2)  # let start-up settle before measuring idleness
    before = switches(daemon.proc.pid)
    time.sleep(seconds)
    wakeups = (switches(daemon.proc.pid) - before) * 60 / seconds
    rss = int(next(line for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS")).split()[1]) / 1024
    threads = len(list(Path(f"/proc/{daemon.proc.pid}/task").iterdir()))
    daemon.stop()
    return {"rss_mb": round(rss, 1), "wakeups_per_minute": round(wakeups), "threads": threads}


# --- 5. the control socket -----------------------------------------------------------------------------------------


def control_socket() -> dict:
    app = workdir()
    app.make_release("r1")
    daemon = Daemon(app).ready()
    daemon.deployed("r1")
    per_client, clients = 500, 4

    def ask() -> None:
        for _ in range(per_client):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(app.socket))
                sock.sendall(b'{"cmd": "status"}\n')
                assert b'"ok": true' in sock.makefile("rb").readline()

    threads = [threading.Thread(target=ask) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = per_client * clients / (time.perf_counter() - t0)

    def timed(argv: list[str]) -> float:
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        return (time.perf_counter() - t) * 1000

    maintctl = [timed([str(BIN / "maintctl"), "--socket", str(app.socket), "status"]) for _ in range(RUNS)]
    python = [timed([sys.executable, "-c", "pass"]) for _ in range(RUNS)]
    daemon.stop()
    return {"status_requests_per_s": round(rate), "maintctl_status_ms": summary(maintctl),
            "python_startup_ms": summary(python)}


# --- 6. scaling ----------------------------------------------------------------------------------------------------


def scaling() -> dict:
    result = {}
    for present in (10, 100, 1000):
        app = workdir()
        app.write_config(top="keep_releases = 5")
        for i in range(present):
            app.make_release(f"old{i:04d}", files=1)
        for name in ("a", "b"):
            app.make_release(name)
        config = load(app.config)
        ctx = Context.build(config, Store(config.state_dir))
        times = []
        for i in range(max(5, RUNS // 3)):
            outcome = Deploy(ctx, "ab"[i % 2], "bench").run()
            times.append(outcome.duration_ms)
        result[f"deploy_ms_with_{present}_releases"] = summary(times)
        shutil.rmtree(app.base, ignore_errors=True)
    app = workdir()
    app.write_config(top="keep_releases = 5")
    config = load(app.config)
    store = Store(config.state_dir)
    for i in range(105):
        app.make_release(f"old{i:04d}", files=20)
        store.record(f"old{i:04d}").went_live = 1_000_000 + i
    app.make_release("new")
    ctx = Context.build(config, store)
    Tree(app.root).swap("old0104")
    outcome = Deploy(ctx, "new", "bench").run()
    [cleanup] = [s for s in outcome.steps if s.step == "cleanup"]
    result["cleanup_ms_for_100_old_releases"] = cleanup.duration_ms
    result["cleanup_removed"] = cleanup.message.split(":")[0]
    shutil.rmtree(app.base, ignore_errors=True)
    return result


# --- 9. metrics ---------------------------------------------------------------------------------------------------


def metrics_on(app: App) -> str:
    """`[metrics]` with both outputs on: the endpoint on a free port, the textfile in the app's directory."""
    return f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\ntextfile = "{app.base / "shop.prom"}"\n'


GAP = 0.5  # seconds between two deploys of section 10


def dead_webhook() -> str:
    """`[notify]` with one webhook on a closed port: every event tried 4 times over 7 s, its queue full meanwhile."""
    return f'[notify]\nwebhooks = [{{ url = "http://127.0.0.1:{free_port()}/hook" }}]\n'


def metrics() -> dict:
    """The window of a real `maintd run` with metrics on (counted, the gauges shown, the textfile rewritten at each
    change, a scraper asking every `SCRAPE_EVERY` seconds meanwhile) and a dead webhook (issue 23: both on against
    both off; section 9 has the webhook alone) against neither, each deploy asked for with `maintctl deploy --wait`
    as an operator would, the window as the daemon measured it (its `window_ms` in history.jsonl: its flags raised
    to lowered); the idle RSS with metrics on and off; the time to scrape /metrics once the deploys filled the
    histograms."""
    windows, scrape_ms, size = {}, [], 0
    for mode in ("off", "on"):
        app = workdir()
        app.write_config(metrics_on(app) + dead_webhook() if mode == "on" else "", top="keep_releases = 1000")
        for name in ("a", "b"):
            app.make_release(name, marker=False)
        daemon = Daemon(app).ready()
        stop = threading.Event()
        if mode == "on":
            address = load(app.config).metrics.address
            scraper = threading.Thread(target=scrape_until, args=(address, stop), daemon=True)
            scraper.start()
        for i in range(2 * RUNS + 1):
            subprocess.run([str(BIN / "maintctl"), "--socket", str(app.socket), "deploy", "ab"[i % 2], "--wait"],
                           check=True, capture_output=True)
            # Deploys a few seconds apart at most, as operators make them, not back to back: what the metrics and
            # the webhook do after a deploy (the counters kept, the gauges looked at 0.25 s later, the textfile,
            # the retries) lands in the gap, as it does in life, not in the next deploy's window. Both modes alike.
            time.sleep(GAP)
        stop.set()
        windows[mode] = summary([entry["window_ms"] for entry in app.history()[1:]])
        if mode == "on":
            scraper.join()
            scrape_ms = [scrape(address) for _ in range(RUNS)]
            size = len(fetch(address))
        daemon.stop()
    return {"window_off_ms": windows["off"], "window_on_ms": windows["on"],
            "window_ratio": round(windows["on"]["median"] / windows["off"]["median"], 3),
            "scrape_ms": summary(scrape_ms), "scrape_bytes": size,
            "rss_off": footprint(10.0), "rss_on": footprint(10.0, metrics_on(workdir()))}


def fetch(address: tuple[str, int]) -> bytes:
    conn = http.client.HTTPConnection(*address, timeout=5)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read()
    conn.close()
    return body


def scrape(address: tuple[str, int]) -> float:
    t = time.perf_counter()
    fetch(address)
    return (time.perf_counter() - t) * 1000


SCRAPE_EVERY = 1.0  # seconds: Prometheus' shortest usual interval (its default is 60 s, 15 s is common)


def scrape_until(address: tuple[str, int], stop: threading.Event) -> None:
    while not stop.wait(SCRAPE_EVERY):
        fetch(address)


# --- the run -------------------------------------------------------------------------------------------------------


# --- 7. switches of a fleet: bench/fleet.py ---------------------------------------------------------------------


# --- 8. the window where Passenger serves the app ------------------------------------------------------------------


def passenger_window() -> dict:
    """Where Passenger serves the app, the window is the restart itself: maintd's window (default config, so
    `restart.method = "passenger"`) against `passenger-config restart-app` run alone on the same app, alternately.
    Each is followed by a request that waits for the app to answer again, so that every restart restarts a
    running app."""
    from test_web import ApachePassenger, get, rack_release

    app = workdir()
    app.base.chmod(0o755)  # Apache's and Passenger's workers read the tree
    app.write_config(top="keep_releases = 1000")
    for name in ("a", "b"):
        rack_release(app, name)
    Tree(app.root).swap("a")
    stack = ApachePassenger(app)
    saved = os.environ["PASSENGER_INSTANCE_REGISTRY_DIR"]  # conftest's empty one
    os.environ.update(stack.env)
    deploy = timed_deploys(app)
    ours, theirs = [], []

    def serving(release: str) -> None:
        wait_until(lambda: get(stack.port)[:2] == (200, f"release {release}\n"), 60, f"Passenger serving {release}")

    try:
        for i in range(max(5, RUNS // 3) + 1):
            old, new = "ab"[i % 2], "ab"[(i + 1) % 2]
            serving(old)
            ms, restart = deploy(new)
            assert "ran passenger-config restart-app" in restart, restart
            if i:
                ours.append(ms)
            serving(new)
            started = time.perf_counter()
            subprocess.run(["passenger-config", "restart-app", str(app.root)], check=True, capture_output=True)
            theirs.append((time.perf_counter() - started) * 1000)
    finally:
        stack.stop()
        os.environ["PASSENGER_INSTANCE_REGISTRY_DIR"] = saved
    return {"maintd_ms": summary(ours), "restart_app_alone_ms": summary(theirs),
            "ratio": round(statistics.median(ours) / statistics.median(theirs), 3)}


# --- 9. the window with dead webhooks ---------------------------------------------------------------------------


def webhook_window() -> dict:
    """The maintenance window with a webhook whose port is closed, and with one that accepts and never answers,
    against none (the default config), in turns. Each deploy's events are queued for a thread that retries them;
    what it would cost a window is that thread's work on the GIL (a refused connection, a timeout, a log line)."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=1024)  # accepts (the kernel does) and never answers
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    urls = {"none": None, "closed_port": f"http://127.0.0.1:{closed_port}/hook",
            "never_answers": f"http://127.0.0.1:{silent.getsockname()[1]}/hook"}
    deploys, hooks = {}, []
    for kind, url in urls.items():
        app = workdir()
        app.write_config("" if url is None else f'[notify]\ntimeout = 1.0\nwebhooks = [{{ url = "{url}" }}]\n',
                         top="keep_releases = 1000")
        for name in ("a", "b"):
            app.make_release(name)
            (app.releases / name / "tmp").mkdir(exist_ok=True)
        events = Events("shop")
        webhooks = Webhooks("shop")
        webhooks.configure(load(app.config).notify)
        events.listen(*webhooks.listeners())
        hooks.append(webhooks)
        deploys[kind] = timed_deploys(app, events)
    windows: dict[str, list[float]] = {kind: [] for kind in urls}
    try:
        for i in range(RUNS + 1):
            for kind, deploy in deploys.items():
                ms, _ = deploy("ab"[i % 2])
                if i:  # the first deploy has no live release to flag
                    windows[kind].append(ms)
    finally:
        for webhooks in hooks:
            webhooks.stop()
        silent.close()
    none = statistics.median(windows["none"])
    return {**{f"{kind}_ms": summary(ms) for kind, ms in windows.items()},
            **{f"ratio_{kind}": round(statistics.median(windows[kind]) / none, 3)
               for kind in ("closed_port", "never_answers")}}


def webhook_rows(ww: dict) -> list[tuple[str, str, str]]:
    return [("9 maintenance window, no webhook (default)", spread(ww["none_ms"]), ""),
            ("9 maintenance window, webhook on a closed port", spread(ww["closed_port_ms"]), ""),
            ("9 maintenance window, webhook that never answers", spread(ww["never_answers_ms"]), ""),
            ("9 ratio closed port / none, never answers / none",
             f"{ww['ratio_closed_port']}×, {ww['ratio_never_answers']}×", "≤ 1.1×")]


def spread(stat: dict) -> str:
    return f"{stat['median']} ms ({stat['min']}-{stat['max']})"


def share(mode: dict, when: str) -> str:
    return f"{mode[f'maintd_cpu_{when}_s']} s = {mode[f'fraction_{when}']:.1%}"


def metrics_rows(mt: dict) -> list[tuple[str, str, str]]:
    return [("10 maintenance window, metrics off", spread(mt["window_off_ms"]), ""),
            ("10 maintenance window, metrics on (listen + textfile, scraped every second) and a dead webhook",
             spread(mt["window_on_ms"]), ""),
            ("10 ratio on / off", f"{mt['window_ratio']}×", "≤ 1.1×"),
            ("10 idle RSS, metrics off", f"{mt['rss_off']['rss_mb']} MB", ""),
            ("10 idle RSS, metrics on", f"{mt['rss_on']['rss_mb']} MB", "< 40 MB"),
            ("10 idle wake-ups per minute, metrics off / on",
             f"{mt['rss_off']['wakeups_per_minute']} / {mt['rss_on']['wakeups_per_minute']}", ""),
            (f"10 scrape of /metrics ({mt['scrape_bytes']:,} bytes, 60 deploys counted)", spread(mt["scrape_ms"]),
             "< 5 ms")]


def table(results: dict) -> str:
    w, d, c, f, s, sc = (results[k] for k in ("maintenance_window", "detection", "upload_cost", "footprint",
                                               "control_socket", "scaling"))
    fl, pw = results.get("fleet"), results.get("passenger_window")
    ww, mt = results.get("webhook_window"), results.get("metrics")
    m = c["require_marker_mode"]
    rows = [
        ("1 maintenance window (maintd)", spread(w["maintd_ms"]), "≤ 0.5× script, < 5 ms"),
        ("1 maintenance window (shell script)", spread(w["script_ms"]), ""),
        ("1 ratio maintd / script", f"{w['ratio']}×", "≤ 0.5×"),
        ("2 marker written → maintenance_on", spread(d["marker_to_maintenance_ms"]), "< 100 ms"),
        ("2 last write → deploy start, beyond quiet period", spread(d["quiet_overshoot_ms"]), "< 200 ms"),
        *[row for files, q in c["quiet_period_mode"].items() for row in (
            (f"3 {int(files):,}-file rsync, quiet-period mode: rsync's CPU", f"{q['rsync_cpu_s']} s", ""),
            ("3 maintd CPU during it", share(q, "during_rsync"), "≤ 5%"),
            ("3 maintd CPU per file uploaded", f"{q['maintd_us_per_file']} µs", "≤ 5 µs"),
            ("3 maintd CPU until live (completion check and deploy included)", share(q, "until_live"), ""),
            ("3 peak inotify watches (one per directory)", str(q["peak_inotify_watches"]), ""))],
        (f"3 {int(m['files']):,}-file rsync, require_marker: rsync's CPU", f"{m['rsync_cpu_s']} s", ""),
        ("3 maintd CPU during it", share(m, "during_rsync"), "≤ 5%"),
        ("3 peak inotify watches", str(m["peak_inotify_watches"]), "2"),
        ("4 idle RSS", f"{f['rss_mb']} MB", "< 40 MB"),
        ("4 idle wake-ups per minute (all threads)", str(f["wakeups_per_minute"]), "no busy polling"),
        ("5 status requests/s (4 clients)", str(s["status_requests_per_s"]), ""),
        ("5 maintctl status end to end", f"{s['maintctl_status_ms']['median']} ms", "< 100 ms"),
        ("5 python -c pass (the floor)", f"{s['python_startup_ms']['median']} ms", ""),
        *[(f"6 deploy with {n} releases present", f"{sc[f'deploy_ms_with_{n}_releases']['median']} ms", "flat")
          for n in (10, 100, 1000)],
        ("6 cleanup of 100 old releases", f"{sc['cleanup_ms_for_100_old_releases']} ms", ""),
    ]
    if fl:
        rows += fleet_rows(fl)
    if pw:
        rows += [("8 window where Passenger serves the app (maintd)", spread(pw["maintd_ms"]), "the restart"),
                 ("8 passenger-config restart-app alone", spread(pw["restart_app_alone_ms"]), ""),
                 ("8 ratio maintd / restart-app alone", f"{pw['ratio']}×", "≈ 1×")]
    if ww:
        rows += webhook_rows(ww)
    if mt:
        rows += metrics_rows(mt)
    return markdown(rows)


def markdown(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'measure'.ljust(width)} | result | target |", f"|{'-' * (width + 2)}|---|---|"]
    lines += [f"| {name.ljust(width)} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines)


def every_section(results: dict) -> None:
    print("1/10 maintenance window", flush=True)
    os.sync()  # start from a disk with nothing pending: the swap's directory fsync would pay for earlier runs
    results["maintenance_window"] = maintenance_window()
    print("2/10 detection latency", flush=True)
    results["detection"] = detection()
    print(f"3/10 upload cost ({', '.join(f'{n:,}' for n in UPLOAD_SIZES)} files)", flush=True)
    source = Path(tempfile.mkdtemp(prefix="maintd-bench-src-"))
    WORKDIRS.append(source)
    sources = {files: make_source(source / str(files), files, "big") for files in UPLOAD_SIZES}
    results["upload_cost"] = {
        "quiet_period_mode": {str(files): upload_cost(tree, files, require_marker=False)
                              for files, tree in sources.items()},
        "require_marker_mode": upload_cost(sources[UPLOAD_SIZES[-1]], UPLOAD_SIZES[-1], require_marker=True)}
    shutil.rmtree(source, ignore_errors=True)
    later = [("footprint", "footprint", footprint), ("control socket", "control_socket", control_socket),
             ("scaling", "scaling", scaling),
             (f"switches of a fleet ({', '.join(map(str, SIZES))} members, 3 etcd)", "fleet",
              lambda: fleet(MEMCACHED.address)),
             ("the window where Passenger serves the app", "passenger_window", passenger_window),
             ("the window with dead webhooks", "webhook_window", webhook_window), ("metrics", "metrics", metrics)]
    for number, (what, key, section) in enumerate(later, start=4):
        print(f"{number}/10 {what}", flush=True)
        results[key] = section()


# The sections that run alone (`bench/run.py webhooks`), their numbers put into the last run's results.json with
# the date they were measured on: results key, section, its rows of the table
ALONE = {"webhooks": ("webhook_window", webhook_window, webhook_rows), "metrics": ("metrics", metrics, metrics_rows)}


def main(only: str = "") -> None:
    """Every section, or one of `ALONE` only (`bench/run.py metrics`)."""
    global MEMCACHED
    from maintd import log

    devnull = open(os.devnull, "w")  # noqa: SIM115 - for the whole run: in-process deploys log as the daemon does
    log.configure("json", stream=devnull)
    # The default configuration, passenger-config on the PATH (Debian's, installed by make test) and no Passenger
    # running (conftest points PASSENGER_INSTANCE_REGISTRY_DIR at an empty directory): the common case of a Puma
    # server with the package installed, which used to pay ~95 ms of Ruby in every window.
    MEMCACHED = Memcached()
    results: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                 "python": platform.python_version(),
                                 "date": datetime.now().isoformat(timespec="seconds"), "runs": RUNS}}
    try:
        if only:
            key, section, _ = ALONE[only]
            print(f"{key} alone", flush=True)
            results = {**json.loads((HERE / "results.json").read_text()),
                       key: {**section(), "date": results["machine"]["date"]}}
        else:
            every_section(results)
    finally:
        MEMCACHED.stop()
        for base in WORKDIRS:
            shutil.rmtree(base, ignore_errors=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(ALONE[only][2](results[ALONE[only][0]])) if only else table(results))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main(*sys.argv[1:2])
