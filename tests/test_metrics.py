"""Contract §11's metrics: a real Prometheus scraping a real `maintd run`, promtool on what it exports and on the
shipped rules, the counters across a restart, the endpoint's answers, `[metrics]` in `maintd check` and `reload`,
and a scraper or textfile directory that hangs costing a deploy nothing."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from prometheus import PROMTOOL, Prometheus

from conftest import App, free_port, maintctl, maintd_check, port_open, wait_until

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "etc" / "prometheus" / "maintd.rules.yml"
DASHBOARD = REPO / "etc" / "grafana" / "maintd.json"
# Fails a release that carries the file named: before the swap (failed) or after it (rolled_back).
HOOKS = '[hooks]\nbefore_swap = [["sh", "-c", "test ! -e FAIL"]]\nafter_swap = [["sh", "-c", "test ! -e BREAK"]]\n'


def metrics_config(app: App, listen: str = "", textfile: Path | str = "", extra: str = HOOKS) -> None:
    app.write_config(f'{extra}\n[metrics]\nlisten = "{listen}"\ntextfile = "{textfile}"\n')


def scrape(port: int, method: str = "GET", path: str = "/metrics") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path)
    answer = conn.getresponse()
    answer.body = answer.read()  # type: ignore[attr-defined]
    conn.close()
    return answer


def promtool_check_metrics(text: bytes) -> None:
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr


def samples(text: str) -> dict[str, float]:
    """The exposition's samples: `name{labels}` -> value."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_prometheus_scrapes_deploys_a_failure_a_rollback_and_maintenance(app: App, start_daemon, tmp_path: Path):
    port = free_port()
    textfile = tmp_path / "maintd-shop.prom"
    metrics_config(app, f"127.0.0.1:{port}", textfile)
    daemon = start_daemon()
    prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"], RULES)
    try:
        app.make_release("r1")
        daemon.deployed("r1")
        prometheus.wait_for('maintd_release_info{app="shop"}', {"__name__=maintd_release_info,app=shop,release=r1": 1})
        app.make_release("r2")
        daemon.deployed("r2")
        # the old release's series is gone from the scrape, not left at 1 beside the new one
        prometheus.wait_for('maintd_release_info{app="shop"}', {"__name__=maintd_release_info,app=shop,release=r2": 1})
        (app.make_release("r3", marker=False) / "FAIL").touch()
        (app.releases / "r3" / ".maintd-ready").touch()
        daemon.wait_for(release="r3", result="failed", event=lambda e: e.startswith("deploy of"))
        (app.make_release("r4", marker=False) / "BREAK").touch()
        (app.releases / "r4" / ".maintd-ready").touch()
        daemon.wait_for(release="r4", result="rolled_back", event=lambda e: e.startswith("deploy of"))
        maintctl(app, "rollback", "--wait", check_rc=0)  # to r1, the previous release
        prometheus.wait_for('maintd_deploys_total{app="shop"} > 0', {
            "__name__=maintd_deploys_total,app=shop,kind=deploy,result=ok": 2,
            "__name__=maintd_deploys_total,app=shop,kind=deploy,result=failed": 1,
            "__name__=maintd_deploys_total,app=shop,kind=deploy,result=rolled_back": 1,
            "__name__=maintd_deploys_total,app=shop,kind=rollback,result=ok": 1})
        prometheus.wait_for('maintd_release_info{app="shop"}', {"__name__=maintd_release_info,app=shop,release=r1": 1})
        # Each of the five deploys held its own window (r3's until its abort, r4's until its way back).
        prometheus.wait_for("maintd_maintenance_window_seconds_count",
                            {"__name__=maintd_maintenance_window_seconds_count,app=shop": 5})
        steps = "__name__=maintd_step_duration_seconds_count,app=shop,step="
        prometheus.wait_for('maintd_step_duration_seconds_count{step=~"hooks_before|rollback|abort"}', {
            f"{steps}hooks_before": 5, f"{steps}rollback": 1, f"{steps}abort": 1})
        prometheus.wait_for('maintd_releases{state=~"live|previous|bad"}', {
            "__name__=maintd_releases,app=shop,state=live": 1, "__name__=maintd_releases,app=shop,state=previous": 1,
            "__name__=maintd_releases,app=shop,state=bad": 2})
        last = "__name__=maintd_last_deploy_timestamp_seconds,app=shop,result="
        assert set(prometheus.values("maintd_last_deploy_timestamp_seconds")) == {
            f"{last}{r}" for r in ("ok", "failed", "rolled_back")}
        # The failed-deploy alert fires on what maintd exported.
        prometheus.wait_for('ALERTS{alertname="MaintdDeployFailed",alertstate="firing"}', {
            f"__name__=ALERTS,alertname=MaintdDeployFailed,alertstate=firing,app=shop,kind=deploy,result={r},"
            "severity=warning": 1 for r in ("failed", "rolled_back")})

        maintd = 'maintd_maintenance{app="shop"}'
        prometheus.wait_for(maintd, {"__name__=maintd_maintenance,app=shop,by=deploy": 0,
                                     "__name__=maintd_maintenance,app=shop,by=operator": 0})
        maintctl(app, "maintenance", "on", "--reason", "db upgrade", check_rc=0)
        prometheus.wait_for(maintd, {"__name__=maintd_maintenance,app=shop,by=deploy": 0,
                                     "__name__=maintd_maintenance,app=shop,by=operator": 1})
        maintctl(app, "pause", check_rc=0)
        prometheus.wait_for("maintd_paused", {"__name__=maintd_paused,app=shop": 1})
        maintctl(app, "maintenance", "off", check_rc=0)
        prometheus.wait_for(maintd, {"__name__=maintd_maintenance,app=shop,by=deploy": 0,
                                     "__name__=maintd_maintenance,app=shop,by=operator": 0})
        prometheus.wait_for('up{job="maintd"}', {"__name__=up": 1})
    finally:
        prometheus.stop()
    # what Prometheus scraped, and the textfile node_exporter would read, pass promtool's lint
    promtool_check_metrics(scrape(port).body)  # type: ignore[attr-defined]
    wait_until(lambda: b"maintd_paused{app=\"shop\"} 1.0" in textfile.read_bytes(), what="the textfile rewritten")
    promtool_check_metrics(textfile.read_bytes())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".maintd-shop.prom")] == []  # no temporary left


def test_counters_survive_a_restart_and_a_damaged_file_starts_them_again(app: App, start_daemon, tmp_path: Path):
    textfile = tmp_path / "shop.prom"
    metrics_config(app, textfile=textfile)
    daemon = start_daemon()
    app.make_release("r1")
    daemon.deployed("r1")
    counted = 'maintd_deploys_total{app="shop",kind="deploy",result="ok"}'
    wait_until(lambda: samples(textfile.read_text()).get(counted) == 1, what="r1 counted")
    wait_until(lambda: (app.state / "metrics.json").exists(), what="the counters kept")
    daemon.stop()
    daemon = start_daemon()
    app.make_release("r2")
    daemon.deployed("r2")
    wait_until(lambda: samples(textfile.read_text()).get(counted) == 2, what="r2 counted after r1, across the restart")
    window = 'maintd_maintenance_window_seconds_count{app="shop"}'
    assert samples(textfile.read_text())[window] == 2
    daemon.stop()

    (app.state / "metrics.json").write_text('{"counters": ')  # torn
    daemon = start_daemon()
    daemon.wait_for(level="error", event=lambda e: "metrics.json is not JSON" in e and "start again from 0" in e)
    app.make_release("r3")
    daemon.deployed("r3")
    wait_until(lambda: samples(textfile.read_text()).get(counted) == 1, what="counting from 0 again")
    wait_until(lambda: (app.state / "metrics.json").read_text().startswith('{"buckets"'), what="written whole again")
    assert json.loads((app.state / "metrics.json").read_text())["counters"]["maintd_deploys_total"]
    assert sum("metrics.json" in e["event"] for e in daemon.events if e.get("level") == "error") == 1


@pytest.mark.parametrize("kept", [
    '{"buckets": [], "last_deploy": {}, "histograms": {}, "counters": {"maintd_deploys_total": '
    '[[["deploy", "ok"], 1' + "0" * 400 + ']]}}',
    '{"buckets": [], "last_deploy": {}, "histograms": {}, "counters": {"maintd_deploys_total": '
    '[[["deploy", "ok"], 1e400]]}}',
])
def test_a_count_too_large_for_a_float_starts_the_counters_again(app: App, start_daemon, kept: str):
    """A hand-edited metrics.json whose count is a number JSON takes and a float cannot hold: said once like any
    damaged file, and the daemon starts (it is a metric, not a reason to stop deploying)."""
    metrics_config(app, textfile="/nonexistent/shop.prom")
    app.state.mkdir(parents=True, exist_ok=True)
    (app.state / "metrics.json").write_text(kept)
    daemon = start_daemon()
    daemon.wait_for(level="error", event=lambda e: "metrics.json does not hold" in e and "start again from 0" in e)


def test_the_endpoint_answers_get_of_metrics_only(app: App, start_daemon):
    """Contract §11: GET only; anything else 405 (HEAD too, and without a body, as any answer to HEAD), another
    path 404."""
    port = free_port()
    metrics_config(app, f"127.0.0.1:{port}")
    start_daemon()
    got = scrape(port)
    assert got.status == 200 and got.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    assert b'maintd_paused{app="shop"} 0.0' in got.body  # type: ignore[attr-defined]
    head = scrape(port, "HEAD")
    assert (head.status, head.getheader("Allow"), head.body) == (405, "GET", b"")  # type: ignore[attr-defined]
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"):
        refused = scrape(port, method)
        assert (refused.status, refused.getheader("Allow")) == (405, "GET"), method
    for path in ("/", "/metrics/", "/other", "/metricsx"):
        assert scrape(port, "GET", path).status == 404, path


@pytest.mark.parametrize(("table", "key", "problem"), [
    ('listen = "localhost:9464"', "metrics.listen", "ADDRESS:PORT"),
    ('listen = "127.0.0.1:70000"', "metrics.listen", "ADDRESS:PORT"),
    ('listen = "::1:9464"', "metrics.listen", "ADDRESS:PORT"),
    ("listen = 9464", "metrics.listen", "must be a string"),
    ('textfile = "maintd.prom"', "metrics.textfile", "absolute path"),
    ('textfile = "/var/lib/prometheus/node-exporter/maintd.txt"', "metrics.textfile", "ending in .prom"),
    ('port = 9464', "metrics.port", "is not a known key"),
])
def test_config_errors_name_the_key_and_its_line(app: App, table: str, key: str, problem: str):
    app.write_config(f"[metrics]\n\n{table}\n")
    line = app.config.read_text().splitlines().index(table) + 1
    done = maintd_check(app)
    assert done.returncode == 1
    assert f"{app.config}:{line}: {key}" in done.stderr and problem in done.stderr, done.stderr


@pytest.mark.parametrize(("port", "warned"), [(80, True), (1023, True), (9464, False)])
def test_check_warns_of_a_port_the_unit_cannot_listen_on(app: App, port: int, warned: bool):
    """Root may bind port 80 by hand, but the unit gives maintd no CAP_NET_BIND_SERVICE: under systemd the metrics
    would never be served there, with only a log line at start to say so."""
    app.write_config(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    done = maintd_check(app)
    assert done.returncode == 0, done.stderr
    said = f"maintd: warning: metrics.listen 127.0.0.1:{port}: port {port} is below 1024" in done.stderr
    assert said == warned, done.stderr


def test_reload_moves_the_listener_and_the_textfile_and_refuses_a_taken_port(app: App, start_daemon, tmp_path: Path):
    first, second = free_port(), free_port()
    old_file, new_file = tmp_path / "a.prom", tmp_path / "b.prom"
    metrics_config(app, f"127.0.0.1:{first}", old_file)
    daemon = start_daemon()
    assert scrape(first).status == 200
    wait_until(old_file.exists, what="the textfile written")
    metrics_config(app, f"127.0.0.1:{second}", new_file)
    daemon.reload()
    assert scrape(second).status == 200 and not port_open(first)
    wait_until(new_file.exists, what="the new textfile")
    wait_until(lambda: not old_file.exists(), what="the old textfile removed")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_config(app, f"127.0.0.1:{taken.getsockname()[1]}", new_file)
        mark = daemon.mark()
        daemon.proc.send_signal(1)
        refused = daemon.wait_for(since=mark, event=lambda e: e.startswith("reload refused"))
        assert f"{app.config}:" in refused["event"] and "metrics.listen" in refused["event"]
    assert scrape(second).status == 200  # still where it was

    metrics_config(app)  # off: nothing listens, no file is left for node_exporter to export for ever
    daemon.reload()
    assert not port_open(second)
    wait_until(lambda: not new_file.exists(), what="the textfile removed")


def test_a_scraper_and_a_textfile_directory_that_hang_cost_a_deploy_nothing(app: App, start_daemon, tmp_path: Path):
    """Real hangs: a scraper that connects and never sends its request, and a textfile whose temporary file is a
    FIFO nobody reads (open(2) for writing blocks until a reader comes: the writer thread hangs there as it would
    on a dead NFS server)."""
    port = free_port()
    textfile = tmp_path / "shop.prom"
    metrics_config(app, f"127.0.0.1:{port}", textfile)
    daemon = start_daemon()
    os.mkfifo(tmp_path / f".shop.prom.{daemon.proc.pid}.tmp")
    with socket.create_connection(("127.0.0.1", port)):  # the scraper that says nothing
        for name in ("r1", "r2"):
            app.make_release(name)
            event = daemon.deployed(name)
            assert event["result"] == "ok"
        assert samples(scrape(port).body.decode())[  # type: ignore[attr-defined]
            'maintd_deploys_total{app="shop",kind="deploy",result="ok"}'] == 2
    # the writer hangs in its open(2): the file holds at most what was written before the FIFO was there
    assert not textfile.exists() or samples(textfile.read_text()).get(
        'maintd_deploys_total{app="shop",kind="deploy",result="ok"}') == 0
    assert daemon.stop() == 0  # and the daemon stops all the same


def test_shipped_rules_pass_promtool_and_their_tests():
    for argv in (["check", "rules", str(RULES)], ["test", "rules", str(REPO / "tests" / "maintd.rules.test.yml")]):
        done = subprocess.run([PROMTOOL, *argv], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_and_rules_use_only_metrics_maintd_exports(tmp_path: Path):
    """Every metric name in the dashboard's and the rules' expressions is in an exposition of maintd's own
    collector in cluster mode (all its families), or is Prometheus' own (`up`, `ALERTS`)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from maintd.metrics import Gauges, Metrics

    metrics = Metrics("shop", "together", tmp_path, print)
    metrics.show(Gauges(members=(("app1", True),), etcd_up=True))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", generate_latest(registry).decode(), re.M))
    names = {name for name, _ in exported}
    names |= {f"{name}_{suffix}" for name, kind in exported if kind == "histogram"
              for suffix in ("bucket", "count", "sum")}
    names |= {f"{name}_total" for name, kind in exported if kind == "counter"}

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = re.findall(r"^\s+expr: (.+)$", RULES.read_text(), re.M)
    assert len(rules) == RULES.read_text().count("- alert:") == 5  # every rule's expression, each on one line
    used = {name for expr in exprs + rules for name in re.findall(r"\b(maintd_\w+|up|ALERTS)\b", expr)}
    assert {n for n in used if n.startswith("maintd_")}, exprs
    assert used - names - {"up"} == set()
    # and the dashboard takes its data source as a variable, so it imports into any Grafana
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {"${datasource}"}


def test_many_slow_scrapers_cannot_take_the_descriptors_a_deploy_needs(app: App, start_daemon):
    """Slowloris: real connections that each trickle their request line, a byte a second, which restarts
    http.server's per-read timeout every time, so none of them ever times out. The daemon's descriptors are limited
    (prlimit on the real process) to what it holds idle plus 100; 200 such scrapers must not take them: the deploy
    that follows needs descriptors of its own (its walk, its hooks' pipes, its state files), and the endpoint must
    still answer a real scrape once the scrapers are gone."""
    port = free_port()
    metrics_config(app, f"127.0.0.1:{port}")
    daemon = start_daemon()
    pid = daemon.proc.pid
    room = len(os.listdir(f"/proc/{pid}/fd")) + 100
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={room}:{room}"], check=True)
    scrapers: list[socket.socket] = []

    def out_of_descriptors() -> bool:
        return len(os.listdir(f"/proc/{pid}/fd")) >= room

    # in fours, each four taken off the listen queue (of 5) before the next, so that none is lost to it; until the
    # daemon has no descriptor left (then nothing accepts them any more)
    while len(scrapers) < 200 and not out_of_descriptors():
        for _ in range(4):
            scrapers.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            scrapers[-1].send(b"G")
        wait_until(lambda: accept_queue(port) == 0 or out_of_descriptors(), 10,
                   "the scrapers accepted, or the daemon out of descriptors")
    done = threading.Event()

    def trickle() -> None:
        while not done.wait(1.0):
            for scraper in scrapers:
                try:
                    scraper.send(b"G")
                except OSError:  # closed by the daemon
                    pass

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        app.make_release("r1")
        assert daemon.deployed("r1")["result"] == "ok"
    finally:
        done.set()
        trickler.join()
        for scraper in scrapers:
            scraper.close()
    wait_until(lambda: _answers(port), 30, "a scrape answered once the slow scrapers are gone")


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel for the listener on 127.0.0.1:`port` to accept them (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # LISTEN: rx_queue is the accept queue
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _answers(port: int) -> bool:
    try:
        return scrape(port).status == 200
    except OSError:
        return False
