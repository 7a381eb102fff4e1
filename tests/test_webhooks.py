"""Notifications (contract §11): a real `maintd run` POSTs each event to real HTTP servers on loopback ports, and
endpoints that hang or are closed cost a deploy nothing: each event is retried and dropped with one log line."""

from __future__ import annotations

import base64
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from etcd_cluster import ETCD, EtcdCluster
from structlog.testing import capture_logs
from test_cluster import Cluster, assert_abandoned, go_live

from conftest import App, free_port, maintctl, maintctl_json, maintd_check, wait_until
from maintd.config import Notify, Webhook
from maintd.events import Event, Happening
from maintd.webhooks import BACKOFF, QUEUE_SIZE, Endpoint, Webhooks, post

ATTEMPTS = 1 + len(BACKOFF)


class Receiver:
    """A real HTTP server on a free loopback port: every POST's path, headers and JSON body, in order."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.cond:
                    receiver.posts.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    receiver.cond.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.cond:
            return [p["body"] for p in self.posts if p["path"] == path]

    def wait_for(self, path: str, **fields: Any) -> dict[str, Any]:
        """The first body POSTed to `path` with `fields`."""
        def found() -> dict[str, Any] | None:
            return next((b for b in self.bodies(path) if all(b.get(k) == v for k, v in fields.items())), None)

        with self.cond:
            if not self.cond.wait_for(found, 60):
                raise AssertionError(f"no POST to {path} with {fields}; got {self.bodies(path)}")
        return found() or {}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Silent:
    """A server that accepts every connection and never answers (a hung endpoint): it counts the connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self.sock.accept()[0])
            except OSError:
                return

    def stop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Receiver:
    request.addfinalizer((server := Receiver()).stop)
    return server


@pytest.fixture
def silent(request: pytest.FixtureRequest) -> Silent:
    request.addfinalizer((server := Silent()).stop)
    return server


def notify(*hooks: tuple[str, str], timeout: float = 5.0) -> str:
    """A [notify] table of (url, format) pairs, one entry a line."""
    entries = "".join(f'  {{ url = "{url}", format = "{form}" }},\n' for url, form in hooks)
    return f"\n[notify]\ntimeout = {timeout}\nwebhooks = [\n{entries}]\n"


HOOKS = """
[hooks]
before_swap = [["sh", "-c", "test \\"$MAINTD_RELEASE\\" != r2"]]
after_swap = [["sh", "-c", "test \\"$MAINTD_RELEASE\\" != r3"]]
"""


def test_each_event_reaches_the_webhooks_with_its_fields(app: App, start_daemon, receiver):
    with_password = receiver.url("/json").replace("://", "://hook:s%40cret@")  # user:password@ is Basic auth
    app.write_config(HOOKS + notify((with_password, "json"), (receiver.url("/slack"), "slack")))
    daemon = start_daemon()
    app.make_release("r1")
    r1 = daemon.deployed("r1")
    started = receiver.wait_for("/json", event="deploy_started", release="r1")
    assert {k: v for k, v in started.items() if k != "timestamp"} == {
        "event": "deploy_started", "app": "shop", "release": "r1", "deploy_id": r1["deploy_id"], "result": "",
        "step": "", "error": "", "actor": "upload", "switch_id": ""}
    assert isinstance(started["timestamp"], float)
    finished = receiver.wait_for("/json", event="deploy_finished", release="r1")
    assert (finished["result"], finished["step"], finished["error"], finished["deploy_id"]) == ("ok", "", "",
                                                                                                r1["deploy_id"])

    app.make_release("r2")
    assert daemon.deployed("r2")["result"] == "failed"
    failed = receiver.wait_for("/json", event="deploy_finished", release="r2")
    assert (failed["result"], failed["step"], failed["error"]) == ("failed", "hooks_before",
                                                                   "hooks_before: hook sh exited with status 1")
    app.make_release("r3")
    assert daemon.deployed("r3")["result"] == "rolled_back"
    back = receiver.wait_for("/json", event="deploy_finished", release="r3")
    assert back["result"] == "rolled_back" and back["step"] == "hooks_after" and back["error"]

    maintctl(app, "maintenance", "on", "--reason", "db upgrade", check_rc=0)
    maintctl(app, "maintenance", "off", check_rc=0)
    (app.releases / "notes.txt").write_text("not a release")
    refused = receiver.wait_for("/json", event="upload_refused", release="notes.txt")
    assert refused["actor"] == "upload" and refused["error"]

    said = [(b["event"], b["release"], b["actor"], b["error"] if b["event"] == "maintenance_on" else "")
            for b in receiver.bodies("/json")]
    assert said == [("deploy_started", "r1", "upload", ""), ("deploy_finished", "r1", "upload", ""),
                    ("deploy_started", "r2", "upload", ""), ("deploy_finished", "r2", "upload", ""),
                    ("deploy_started", "r3", "upload", ""), ("deploy_finished", "r3", "upload", ""),
                    ("maintenance_on", "r1", "root", "db upgrade"), ("maintenance_off", "r1", "root", ""),
                    ("upload_refused", "notes.txt", "upload", "")]
    wait_until(lambda: len(receiver.bodies("/slack")) == len(said), 30, "every event in the slack format")
    lines = [b["text"] for b in receiver.bodies("/slack")]
    assert lines[:3] == ["shop: deploy of r1 by upload started", "shop: deploy of r1 by upload went live",
                         "shop: deploy of r2 by upload started"]
    assert lines[3] == f"shop: deploy of r2 by upload failed at {failed['error']}"  # "hooks_before: ..."
    assert lines[5].startswith("shop: deploy of r3 by upload rolled back at hooks_after: ")
    assert lines[6:8] == ["shop: maintenance on by root: db upgrade", "shop: maintenance off by root"]
    assert lines[8].startswith("shop: upload notes.txt refused: ")
    assert all(p["headers"]["Content-Type"] == "application/json" for p in receiver.posts)
    auth = {p["path"]: p["headers"].get("Authorization") for p in receiver.posts}
    assert auth == {"/json": "Basic " + base64.b64encode(b"hook:s@cret").decode(), "/slack": None}


def dropped_lines(daemon, since: int = 0) -> list[dict[str, Any]]:
    with daemon.cond:
        return [e for e in daemon.events[since:] if "event dropped after" in str(e.get("event"))]


def test_endpoints_that_hang_or_are_closed_cost_a_deploy_nothing(app: App, start_daemon, silent):
    """Each event is tried 1 + 3 times at each endpoint, then dropped with one line; secrets are never shown."""
    closed = free_port()  # nothing listens there
    hung_url = f"http://alice:pa55word@127.0.0.1:{silent.port}/T0/B0/slacktoken?key=querysecret"
    app.write_config(notify((hung_url, "slack"), (f"http://127.0.0.1:{closed}/hooks/pathsecret", "json"),
                            timeout=0.3))
    daemon = start_daemon()
    app.make_release("r1")
    assert daemon.deployed("r1")["result"] == "ok" and app.live() == "r1"
    wait_until(lambda: len(dropped_lines(daemon)) == 4, 90, "2 events dropped at each of 2 endpoints")
    lines = dropped_lines(daemon)
    hung, refused = f"http://127.0.0.1:{silent.port}/…", f"http://127.0.0.1:{closed}/…"
    assert sorted(e["event"] for e in lines) == sorted(
        f"webhook {number} ({url}): {event} event dropped after {ATTEMPTS} attempts: {why}"
        for number, url, why in ((1, hung, "no answer within the timeout"), (2, refused, "Connection refused"))
        for event in ("deploy_started", "deploy_finished"))
    assert {e["webhook"] for e in lines} == {hung, refused}
    wait_until(lambda: len(silent.connections) >= 2 * ATTEMPTS, 10, "the attempts accepted")
    assert len(silent.connections) == 2 * ATTEMPTS  # every attempt reached the hung endpoint, and no more
    status = maintctl_json(app, "status")
    assert [(w["url"], w["format"], w["sent"], w["dropped"], w["last_failure"]["event"]) for w in status["webhooks"]] \
        == [(hung, "slack", 0, 2, "deploy_finished"), (refused, "json", 0, 2, "deploy_finished")]
    assert status["current"] == "r1" and status["last_deploy"]["result"] == "ok"  # the contract's fields as they were
    shown = maintctl(app, "status").stdout
    assert f"webhook      {hung} (slack): 0 sent, 2 dropped; last failure " in shown
    assert ": no answer within the timeout" in shown
    assert daemon.stop() == 0
    said = json.dumps(daemon.events) + json.dumps(status) + shown
    for secret in ("alice", "pa55word", "slacktoken", "querysecret", "pathsecret", "T0/B0"):
        assert secret not in said


def test_a_full_queue_drops_new_events_with_one_line_per_burst(silent):
    """An endpoint that hangs holds its queue: past QUEUE_SIZE events waiting, the rest are dropped, said once."""
    with capture_logs() as logs:
        endpoint = Endpoint(Webhook(f"http://127.0.0.1:{silent.port}/secret"), 1, 60.0, "shop")
        for number in range(QUEUE_SIZE + 50):
            endpoint.offer(Event(Happening.MAINTENANCE_ON, f"r{number}", app="shop"))
        endpoint.close(0.0)
    said = [e["event"] for e in logs if "dropping" in e["event"]]
    assert said == [f"webhook 1 (http://127.0.0.1:{silent.port}/…): {QUEUE_SIZE} events wait already; dropping new "
                    "ones until it takes them (the first: maintenance_on)"]
    assert endpoint.dropped == 50 and endpoint.pending == QUEUE_SIZE


def test_a_post_that_fails_in_an_unforeseen_way_is_dropped_with_one_line_and_the_endpoint_goes_on():
    """A host name with an empty label: the real lookup refuses it before any packet, with a UnicodeError (IDNA),
    which is neither an OSError nor an HTTPException. The event is still tried, dropped and said once, and the
    endpoint's thread lives on for the next event."""
    with capture_logs() as logs:
        endpoint = Endpoint(Webhook("http://hooks..example/T0/secret"), 1, 1.0, "shop")
        endpoint.offer(Event(Happening.MAINTENANCE_ON, "r1", app="shop"))
        wait_until(lambda: endpoint.dropped == 1, 60, "the event dropped")
        alive = endpoint.thread.is_alive()
        endpoint.close(0.0)
    said = [e["event"] for e in logs if "dropped after" in e["event"]]
    assert said == [f"webhook 1 (http://hooks..example/…): maintenance_on event dropped after {ATTEMPTS} attempts: "
                    "not a host name a lookup takes"]
    assert alive and endpoint.pending == 0


def test_what_only_the_metrics_count_is_never_sent(silent):
    """A flush that missed a memcached server is counted by the metrics, and is not one of contract §11's webhook
    events: nothing is queued for it."""
    hooks = Webhooks("shop")
    hooks.configure(Notify((Webhook(f"http://127.0.0.1:{silent.port}/secret"),)))
    hooks(Event(Happening.CACHE_NOT_FLUSHED, "r1", server="127.0.0.1:9", app="shop"))
    hooks(Event(Happening.MAINTENANCE_ON, "r1", app="shop"))
    assert [e.pending for e in hooks.endpoints.values()] == [1]
    hooks.stop()


def line_of(text: str, start: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if line.startswith(start))


@pytest.mark.parametrize("entries, key, problem", [
    ('[{ url = "ftp://bob:hunter2@hooks.example/T0/secret" }]', "notify.webhooks",
     "entry 1: url must be an http:// or https:// URL with a host (ASCII, no spaces), not ftp://hooks.example/…"),
    ('[{ url = "https://hooks.example/a" }, { url = "https://hooks.example/b", format = "teams" }]',
     "notify.webhooks", "entry 2: format must be one of 'json', 'slack', not 'teams'"),
    ('[{ url = "https://hooks.example/a", token = "x" }]', "notify.webhooks",
     "entry 1: token is not a known key (known: url, format)"),
    ('[{ url = "https://hooks..example/T0/secret" }]', "notify.webhooks",
     "entry 1: url must be an http:// or https:// URL with a host (ASCII, no spaces), not https://hooks..example/…"),
])
def test_maintd_check_names_the_key_and_line_of_a_bad_webhook(app: App, entries, key, problem):
    app.write_config(f"\n[notify]\ntimeout = 2.0\nwebhooks = {entries}\n")
    done = maintd_check(app)
    text = app.config.read_text()
    assert done.returncode == 1
    assert done.stderr.strip() == f"maintd: {app.config}:{line_of(text, 'webhooks =')}: {key} {problem}"
    assert "hunter2" not in done.stderr and "secret" not in done.stderr


def test_maintd_check_refuses_a_timeout_that_is_not_positive(app: App):
    app.write_config('\n[notify]\nwebhooks = [{ url = "https://hooks.example/x" }]\ntimeout = -1.5\n')
    done = maintd_check(app)
    line = line_of(app.config.read_text(), "timeout = -1.5")
    assert done.returncode == 1
    assert done.stderr.strip() == f"maintd: {app.config}:{line}: notify.timeout must be greater than 0, not -1.5"


def test_a_reload_applies_the_webhooks_and_refuses_bad_ones_whole(app: App, start_daemon, receiver):
    app.write_config(notify((receiver.url("/a"), "json")))
    daemon = start_daemon()
    app.make_release("r1")
    daemon.deployed("r1")
    receiver.wait_for("/a", event="deploy_finished", release="r1")

    app.write_config(notify((receiver.url("/a/hidden-token"), "teams")))
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    refused = daemon.wait_for(since=mark, event=lambda e: e.startswith("reload refused"))
    assert "notify.webhooks entry 1: format must be one of" in refused["event"]
    assert "hidden-token" not in refused["event"]

    app.write_config(notify((receiver.url("/b"), "slack")))
    daemon.reload()
    app.make_release("r2")
    daemon.deployed("r2")
    receiver.wait_for("/b", text="shop: deploy of r2 by upload went live")
    assert [b["release"] for b in receiver.bodies("/a")] == ["r1", "r1"]  # started and finished; none since
    assert [w["url"] for w in maintctl_json(app, "status")["webhooks"]] == [f"http://127.0.0.1:{receiver.port}/…"]


@pytest.fixture
def cluster(tmp_path: Path, memcached, etcd: EtcdCluster) -> Iterator[Cluster]:
    made = Cluster(tmp_path, memcached.address, etcd)
    yield made
    made.stop()


@pytest.mark.skipif(not Path(ETCD).exists(), reason="etcd is missing (`make test` unpacks Debian's into .deps/)")
def test_an_aborted_cluster_switch_is_said_once_across_the_members(cluster, receiver):
    """m2's restart fails after the swap: its transaction aborts the switch, and it alone says so."""
    go_live(cluster, **{m: notify((receiver.url(f"/{m}"), "json")) for m in cluster.names})
    m2 = cluster.members[1]
    m2.app.config.write_text(m2.app.config.read_text().replace('command = ["true"]', 'command = ["false"]'))
    m2.daemon.reload()
    cluster.upload("r1")
    assert_abandoned(cluster, because="restart")
    ends = {m: receiver.wait_for(f"/{m}", event="deploy_finished", release="r1") for m in cluster.names}
    # a member says an abort before its own deploy ends, and its endpoint gets its events in order: all are in
    aborted = [(m, b) for m in cluster.names for b in receiver.bodies(f"/{m}") if b["event"] == "switch_aborted"]
    assert len(aborted) == 1, aborted
    member, said = aborted[0]
    assert (member, said["actor"], said["release"], said["result"]) == ("m2", "m2", "r1", "abort")
    assert said["switch_id"] == ends["m2"]["switch_id"] != "" and "restart" in said["error"]


def test_maintd_check_shows_the_webhooks_without_their_secrets(app: App):
    app.write_config(notify(("https://hooks.example/services/T0/B0/token", "slack"),
                            ("http://u:p@[::1]:8080/x", "json"), timeout=2.5))
    done = maintd_check(app)
    assert done.returncode == 0, done.stderr
    assert "notify: webhook 1 https://hooks.example/… (slack), timeout 2.5s\n" in done.stdout
    assert "notify: webhook 2 http://[::1]:8080/… (json), timeout 2.5s\n" in done.stdout
    assert "token" not in done.stdout and "u:p" not in done.stdout


def test_an_answer_trickled_a_byte_at_a_time_is_cut_off_at_the_timeout():
    """http.client's timeout bounds each read, not the answer: an endpoint sending its head a byte every 50 ms (4 s
    in all) would hold a POST with a timeout of 0.5 s for the whole 4 s, and then count as delivered."""
    server = socket.create_server(("127.0.0.1", 0))
    head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 60 + b"\r\nContent-Length: 0\r\n\r\n"

    def trickle() -> None:
        connection = server.accept()[0]
        connection.recv(65536)
        try:
            for byte in head:
                connection.send(bytes([byte]))
                time.sleep(0.05)  # the fault is time itself: each byte well within the timeout
        except OSError:
            pass  # cut off
        connection.close()

    trickling = threading.Thread(target=trickle, daemon=True)
    trickling.start()
    try:
        with pytest.raises(TimeoutError, match="no answer within the timeout"):
            post(f"http://127.0.0.1:{server.getsockname()[1]}/hook", b"{}", 0.5)
    finally:
        trickling.join(10)
        server.close()
