"""What a browser sees, on the two real stacks: nginx + Puma and Apache + Passenger, serving a tiny Rack app from a
Capistrano tree that maintd deploys. Users (requests from 127.0.0.2) see the app or the maintenance page, never an
error; the health check (from 127.0.0.1) reaches the app through maintenance."""

import http.client
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from conftest import BIN, ETC, App, Daemon, free_port, maintctl, port_open, readme_block, wait_until
from maintd.maintenance import expected_end
from maintd.restart import HEALTH_HEADER
from maintd.tree import Tree

USER_ADDRESS = "127.0.0.2"  # a visitor; 127.0.0.1 is "this host", let through for health checks
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # forms, JSON APIs and CORS preflights too
# The app answers its release, or, on /unavailable, a 503 of its own (as an app whose database is away would).
CONFIG_RU = """release = File.read(File.expand_path("REVISION", __dir__)).strip
run lambda { |env|
  if env["PATH_INFO"] == "/unavailable"
    [503, {"content-type" => "text/plain"}, ["the app is unavailable\\n"]]
  else
    [200, {"content-type" => "text/plain", "cache-control" => "no-store"}, ["release #{release}\\n"]]
  end
}
"""


def rack_release(app: App, name: str, marker: bool = True) -> Path:
    """A release of the tiny Rack app, written under a staging name and renamed into place (as uploaders do), owned
    by the owner of releases/ (the uploader)."""
    staging = app.releases / f".incoming-{name}"
    (staging / "public").mkdir(parents=True)
    (staging / "tmp").mkdir()
    (staging / "REVISION").write_text(f"{name}\n")
    (staging / "config.ru").write_text(CONFIG_RU)
    (staging / "public" / "app.css").write_text("body { color: #333 }\n")
    return app.upload(staging, name, marker)


def get(port: int, path: str = "/", source: str = USER_ADDRESS,
        headers: dict[str, str] | None = None) -> tuple[int | str, str, dict[str, str]]:
    """A GET, as `send` makes it."""
    return send(port, "GET", path, source, headers)


def send(port: int, method: str, path: str = "/", source: str = USER_ADDRESS,
         headers: dict[str, str] | None = None) -> tuple[int | str, str, dict[str, str]]:
    """One request with a fresh connection, the path sent as written: (status or 'error: …', body, headers). A
    method that carries a body sends a form, as a browser's POST does."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    body = "order=1" if method in ("POST", "PUT", "PATCH") else None
    headers = {**({"Content-Type": "application/x-www-form-urlencoded"} if body else {}), **(headers or {})}
    try:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read().decode(errors="replace"), {k.lower(): v for k, v in answer.getheaders()}
    except (OSError, http.client.HTTPException) as exc:
        return f"error: {exc!r}", "", {}
    finally:
        conn.close()


def sample_through(port: int, deploy_done, release_when, limit: int = 30000) -> list[tuple]:
    """Requests one after another (a bounded count) until the deploy is over and 50 more have been answered.
    `release_when(samples)` says when the deploy, held at its before-swap hook, may go on."""
    seen: list[tuple] = []
    after = 0
    released = False
    while len(seen) < limit and after < 50:
        seen.append(get(port))
        released = released or release_when(seen)
        after = after + 1 if deploy_done() else 0
    return seen


def assert_users_never_saw_an_error(samples: list[tuple], old: str, new: str, maintenance: bool) -> None:
    statuses = [s for s, _, _ in samples]
    assert all(s in (200, 503) for s in statuses), sorted({str(s) for s in statuses if s not in (200, 503)})
    phases = []
    for status, body, headers in samples:
        if status == 503:
            assert headers.get("retry-after") and "right back" in body, (headers, body[:200])
            phase = "503"
        else:
            phase = body.strip()
            assert phase in (f"release {old}", f"release {new}"), body
        if not phases or phases[-1] != phase:
            phases.append(phase)
    if maintenance:
        assert phases == [f"release {old}", "503", f"release {new}"], phases
    else:
        assert phases == [f"release {old}", f"release {new}"], phases


@pytest.fixture
def web_app(deploy_app):
    """A deploy tree the deploy user owns (so Passenger runs the app as deploy, and Puma is started as deploy),
    in a directory the web servers' unprivileged workers can read."""
    return deploy_app


def go_live_by_hand(app: App, name: str) -> None:
    rack_release(app, name)
    Tree(app.root).swap(name)


# --- nginx + Puma -----------------------------------------------------------------------------------------------


class Nginx:
    """An nginx of the test's own: `server` is the body of its one server block, on 127.0.0.1:`port`."""

    def __init__(self, base: Path, port: int, server: str, http: str = "") -> None:
        self.base = base
        conf = base / "nginx.conf"
        conf.write_text(f"""
daemon on;
pid {base}/nginx.pid;
error_log {base}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;{http}
    server {{
        listen 127.0.0.1:{port};{server}
    }}
}}
""")
        subprocess.run(["nginx", "-c", str(conf)], check=True)
        wait_until(lambda: port_open(port), 10, "nginx")

    def stop(self) -> None:
        os.kill(int((self.base / "nginx.pid").read_text().strip()), signal.SIGTERM)


class NginxPuma:
    def __init__(self, app: App, env: dict[str, str] | None = None) -> None:
        """`env`: the app's environment, added to Puma's."""
        self.base = app.base / "web"
        self.base.mkdir()
        self.puma_port, self.port = free_port(), free_port()
        self.pidfile = app.shared / "puma.pid"  # written by Puma, which runs as the app's user
        # Puma runs in `current`, not in the release it resolves to: USR2 re-executes it there, so it loads the
        # release `current` points at after the swap (started in a resolved path, it would reload the old one).
        owner = app.releases.stat()
        as_owner = ["setpriv", f"--reuid={owner.st_uid}", f"--regid={owner.st_gid}", "--init-groups"]
        self.puma = subprocess.Popen([*as_owner, "puma", "--dir", str(app.current), "-b", f"tcp://127.0.0.1:{self.puma_port}",
                                      "--pidfile", str(self.pidfile), "-e", "production", "-t", "1:4"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        wait_until(lambda: port_open(self.puma_port), 30, "puma")
        # nginx's own 503: limit_req lets one request a minute through /limited and rejects the others
        self.own_503 = "/limited"
        self.nginx = Nginx(self.base, self.port, f"""
        root {app.current}/public;
        include {ETC}/nginx/maintd.conf;
        location / {{
            include {ETC}/nginx/maintd-location.conf;
            try_files $uri @app;
        }}
        location /limited {{
            include {ETC}/nginx/maintd-location.conf;
            limit_req zone=maintd_test;
            try_files $uri @app;
        }}
        location @app {{
            proxy_pass http://127.0.0.1:{self.puma_port};
        }}""", http="\n    limit_req_zone all zone=maintd_test:1m rate=1r/m;")  # one key ("all") for every request
        self.restart = f'[restart]\nmethod = "command"\ncommand = ["/bin/sh", "-c", "kill -USR2 $(cat {self.pidfile})"]'
        self.env: dict[str, str] = {}

    def stop(self) -> None:
        self.nginx.stop()
        os.killpg(self.puma.pid, signal.SIGTERM)
        self.puma.wait(20)


@pytest.fixture
def nginx_puma(web_app):
    for program in ("nginx", "puma"):
        if not shutil.which(program):
            pytest.skip(f"{program} is missing (`make test` installs it)")
    go_live_by_hand(web_app, "A")
    stack = NginxPuma(web_app)
    yield stack
    stack.stop()


def start(app: App, port: int, extra: str, env: dict | None = None, hold: bool = False) -> Daemon:
    """maintd on the web app; with `hold`, deploys wait at their before-swap hook until `app.gate` opens."""
    app.write_config(hooks_user=None, extra=f"""{extra}
health_url = "http://127.0.0.1:{port}/"
health_expect = "release {{release}}"
health_timeout = 20
[hooks]
before_swap = [{app.gate.hook()}]
""")
    if not hold:
        app.gate.open()
    return Daemon(app, env=env).ready()


# --- Apache + Passenger -----------------------------------------------------------------------------------------


class ApachePassenger:
    MODULES = ("mpm_event", "authz_core", "mime", "dir", "rewrite", "headers", "alias", "env", "proxy",
               "proxy_http", "passenger")

    def __init__(self, app: App, user: str = "www-data", env: dict[str, str] | None = None, vhost: str = "",
                 directory: str = "apache", registry: Path | None = None) -> None:
        """Passenger runs the app as `user`, with `env` added to its environment (SetEnv, as the README shows) and
        `vhost`'s directives in the VirtualHost; `directory`: its own under the app's base (a second server needs
        another), `registry`: a Passenger instance registry to share with another server."""
        self.base = app.base / directory
        (self.base / "run").mkdir(parents=True)
        if registry is None:
            registry = self.base / "passenger"
            registry.mkdir()
            registry.chmod(0o755)
        self.registry = registry
        self.port = free_port()
        # Apache's own 503: mod_proxy's answer for a backend that is down (nothing listens on a free port)
        self.own_503 = "/backend/checkout"
        modules = "\n".join(f"LoadModule {m}_module /usr/lib/apache2/modules/mod_{m}.so" for m in self.MODULES)
        directives = [*vhost.splitlines(), *(f"SetEnv {name} {value}" for name, value in (env or {}).items())]
        inside = "".join(f"    {line}\n" for line in directives)
        self.conf = self.base / "apache2.conf"
        self.conf.write_text(f"""
ServerRoot {self.base}
ServerName localhost
Listen 127.0.0.1:{self.port}
PidFile {self.base}/apache.pid
ErrorLog {self.base}/error.log
Mutex file:{self.base}/run
DefaultRuntimeDir {self.base}/run
User www-data
Group www-data
{modules}
TypesConfig /etc/mime.types
PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini
PassengerDefaultRuby /usr/bin/ruby
PassengerInstanceRegistryDir {self.registry}
PassengerDisableSecurityUpdateCheck on
PassengerDisableAnonymousTelemetry on
<VirtualHost 127.0.0.1:{self.port}>
    Define MAINTD_ROOT {app.root}
    DocumentRoot {app.root}/current/public
    PassengerUser {user}
    PassengerAppEnv production
{inside}
    <Directory {app.root}/current/public>
        Require all granted
        Options -MultiViews
    </Directory>
    ProxyPass /backend http://127.0.0.1:{free_port()}
    Include {ETC}/apache2/maintd.conf
</VirtualHost>
""")
        subprocess.run(["apache2", "-f", str(self.conf), "-k", "start"], check=True, capture_output=True,
                       env={**os.environ, "APACHE_RUN_DIR": str(self.base / "run")})
        wait_until(lambda: port_open(self.port), 30, "apache")
        self.env = {"PASSENGER_INSTANCE_REGISTRY_DIR": str(self.registry)}
        self.restart = '[restart]\nmethod = "passenger"'

    def stop(self) -> None:
        pid = int((self.base / "apache.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "apache to stop")


@pytest.fixture
def apache_passenger(web_app):
    if not Path("/usr/lib/apache2/modules/mod_passenger.so").exists():
        pytest.skip("Apache's Passenger module is missing (`make test` installs libapache2-mod-passenger)")
    go_live_by_hand(web_app, "A")
    stack = ApachePassenger(web_app)
    # the first request boots the app; before maintd is involved, the stack must serve release A
    wait_until(lambda: get(stack.port)[:2] == (200, "release A\n"), 60, "Passenger serving release A")
    yield stack
    stack.stop()


def test_passenger_config_restarts_the_app_only_as_root(web_app, apache_passenger, deploy_user):
    """Why maintd runs `passenger-config restart-app` itself, as root, and not as hooks.user: Passenger's admin
    password is root's. As the app's user it refuses, and still exits 0 (measured), so maintd could not even tell."""
    argv = ["passenger-config", "restart-app", str(web_app.root), "--ignore-app-not-running"]
    env = {**os.environ, **apache_passenger.env}
    as_user = subprocess.run(["setpriv", f"--reuid={deploy_user.pw_uid}", f"--regid={deploy_user.pw_gid}",
                              "--init-groups", *argv], capture_output=True, text=True, env=env, timeout=60)
    assert "not authorized" in as_user.stdout + as_user.stderr
    as_root = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert as_root.returncode == 0 and "Restarting" in as_root.stdout


def operator_maintenance_checks(app: App, port: int) -> None:
    """Operator maintenance as users, the health check and a bookmark of the page see it."""
    maintctl = [str(BIN / "maintctl"), "--socket", str(app.socket)]
    subprocess.run([*maintctl, "maintenance", "on", "--reason", "database upgrade", "--until", "22:00"], check=True,
                   capture_output=True)
    status, body, headers = get(port)
    assert status == 503 and "database upgrade" in body and "22:00" in body and headers["retry-after"]
    assert get(port, "/app.css")[:2] == (200, "body { color: #333 }\n")  # the page's own assets
    health = {HEALTH_HEADER: "1"}
    assert get(port, "/", source="127.0.0.1", headers=health)[0] == 200  # maintd's health check, from this host
    assert get(port, "/", source="127.0.0.1")[0] == 503  # a visitor behind a proxy on this host comes from loopback
    assert get(port, "/", headers=health)[0] == 503  # the header from elsewhere lets nobody through
    assert get(port, "/maintenance.html")[0] == 503
    subprocess.run([*maintctl, "maintenance", "off"], check=True, capture_output=True)
    assert get(port)[0] == 200
    status, _, headers = get(port, "/maintenance.html")
    assert status == 302 and headers["location"].endswith("/")  # a stale bookmark goes back to the site


# --- the same on both ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["nginx_puma", "apache_passenger"])
def stack(request):
    return request.getfixturevalue(request.param)


def went_live(daemon: Daemon, release: str):
    return lambda: any(e.get("release") == release and "went live" in e.get("event", "") for e in list(daemon.events))


@pytest.mark.parametrize("when", ["always", "never"])
def test_a_deploy_under_load_shows_old_then_page_then_new_and_never_an_error(web_app, stack, when):
    """With maintenance ("always"): A, then the page, then B. Zero downtime ("never"): A, then B, no 503 at all."""
    daemon = start(web_app, stack.port, f'[maintenance]\nwhen = "{when}"\n' + stack.restart, env=stack.env,
                   hold=True)
    try:
        assert get(stack.port)[:2] == (200, "release A\n")
        rack_release(web_app, "B")

        def release_when(samples: list[tuple]) -> bool:
            """The deploy goes on once visitors have met the page (with maintenance) or it is at its hook."""
            if samples[-1][0] == 503 or (when == "never" and web_app.gate.entered.exists()):
                web_app.gate.open()
                return True
            return False

        samples = sample_through(stack.port, went_live(daemon, "B"), release_when)
        assert daemon.deployed("B")["result"] == "ok"
        assert_users_never_saw_an_error(samples, "A", "B", maintenance=when == "always")
    finally:
        daemon.stop()


def test_page_assets_loopback_and_reason(web_app, stack):
    daemon = start(web_app, stack.port, stack.restart, env=stack.env)
    try:
        operator_maintenance_checks(web_app, stack.port)
    finally:
        daemon.stop()


class FrontProxy:
    """A plain proxy on this host in front of the stack, as a TLS terminator or cache would be: every visitor's
    request reaches the stack from 127.0.0.1. It strips X-Maintd-Health, as the README says a front proxy must."""

    def __init__(self, base: Path, backend: int) -> None:
        (base / "front").mkdir()
        self.port = free_port()
        self.nginx = Nginx(base / "front", self.port, f"""
        location / {{
            proxy_pass http://127.0.0.1:{backend};
            proxy_set_header X-Maintd-Health "";
        }}""")

    def stop(self) -> None:
        self.nginx.stop()


def test_behind_a_front_proxy_on_this_host_visitors_get_the_page_and_the_health_check_the_app(web_app, stack):
    """Operator maintenance: a visitor through the proxy gets the page, even sending the header; maintd's own
    health check (from this host, with the header) still reaches the app, so a deploy through it goes live."""
    daemon = start(web_app, stack.port, stack.restart, env=stack.env)
    front = FrontProxy(web_app.base, stack.port)
    try:
        assert get(front.port)[:2] == (200, "release A\n")
        subprocess.run([str(BIN / "maintctl"), "--socket", str(web_app.socket), "maintenance", "on"], check=True,
                       capture_output=True)
        assert get(front.port)[0] == 503
        assert get(front.port, headers={HEALTH_HEADER: "1"})[0] == 503
        rack_release(web_app, "B")
        done = daemon.deployed("B")
        assert done["result"] == "ok"  # its health check answered through maintenance
        [health] = [e for e in daemon.steps(done["deploy_id"]) if e["step"] == "health"]
        assert health["result"] == "ok"
        assert get(front.port)[0] == 503  # the operator's maintenance stays
    finally:
        front.stop()
        daemon.stop()


def test_passenger_is_restarted_at_once_not_on_its_next_stat(web_app, apache_passenger):
    """The touch alone would leave Passenger serving the old code until its stat throttle allowed a look."""
    daemon = start(web_app, apache_passenger.port, apache_passenger.restart, env=apache_passenger.env)
    try:
        rack_release(web_app, "B")
        deploy_id = daemon.deployed("B")["deploy_id"]
        [restart] = [e for e in daemon.steps(deploy_id) if e["step"] == "restart"]
        assert "ran passenger-config restart-app" in restart["event"]
        assert get(apache_passenger.port)[:2] == (200, "release B\n")
    finally:
        daemon.stop()


# --- every request a visitor sends (issue #21) ------------------------------------------------------------------

REASON = "database upgrade"


def maintenance(app: App, *args: str) -> None:
    maintctl(app, "maintenance", *args, check_rc=0)


def assert_the_page(answer: tuple, method: str, path: str) -> None:
    """The 503 page of this maintenance, as every visitor's request must get it."""
    status, body, headers = answer
    assert status == 503, (method, path, status, body[:200])
    assert headers.get("retry-after") and headers.get("cache-control") == "no-store", (method, path, headers)
    if method != "HEAD":
        assert "right back" in body and REASON in body, (method, path, body[:200])


@pytest.fixture
def on_stack(web_app, stack):
    """maintd running on the stack, as an operator would use it."""
    daemon = start(web_app, stack.port, stack.restart, env=stack.env)
    yield stack
    daemon.stop()


def test_every_method_gets_the_page_during_maintenance(web_app, on_stack):
    """A form posted, a JSON call or a CORS preflight sent during maintenance gets the 503 page as a GET does (nginx
    answered them its own 405: a named location keeps the method, and nginx serves no static file to a POST)."""
    maintenance(web_app, "on", "--reason", REASON)
    for path in ("/", "/checkout", "/api/orders?page=2"):
        for method in METHODS:
            assert_the_page(send(on_stack.port, method, path), method, path)


ASSET_LOOKING = ("/orders.json.css", "/users/1.png", "/missing.css", "/rails/active_storage/blobs/redirect/x/photo.JPG",
                 "/app.css/more")


def test_during_maintenance_only_files_that_exist_under_public_pass(web_app, on_stack):
    """Whatever a URL ends like, it reaches neither the app (Apache let `POST /orders.json.css` through) nor a 404
    (nginx's, cacheable): it gets the page. A file that exists under public/ is read as always; anything but reading
    it gets the page too. maintd's health check still reaches the app, with any method."""
    maintenance(web_app, "on", "--reason", REASON)
    for path in ASSET_LOOKING:
        for method in METHODS:
            assert_the_page(send(on_stack.port, method, path), method, path)
    for method in METHODS:
        answer = send(on_stack.port, method, "/app.css")
        if method in ("GET", "HEAD"):
            assert answer[:2] == (200, "" if method == "HEAD" else "body { color: #333 }\n"), (method, answer)
        else:
            assert_the_page(answer, method, "/app.css")
    for method in METHODS:
        status, body, _ = send(on_stack.port, method, "/orders.json.css", source="127.0.0.1",
                               headers={HEALTH_HEADER: "1"})
        assert (status, body) == (200, "" if method == "HEAD" else "release A\n"), method


def test_the_apps_own_503_reaches_the_visitor_as_it_is(web_app, on_stack):
    """Outside maintenance an app's 503 is the app's: no page, no redirect, no Retry-After added (Apache added one to
    every 503)."""
    maintenance(web_app, "on", "--reason", REASON)
    maintenance(web_app, "off")
    for method in METHODS:
        status, body, headers = send(on_stack.port, method, "/unavailable")
        assert status == 503 and body == ("" if method == "HEAD" else "the app is unavailable\n"), (method, body)
        assert "retry-after" not in headers and "location" not in headers, (method, headers)


def test_the_servers_own_503_is_not_the_maintenance_page(web_app, on_stack):
    """After maintenance, a 503 the web server makes itself reaches the visitor as the server made it: nginx's
    limit_req rejection showed the old page with its old reason; Apache's 503 for a backend that is down became a
    302 to / (a redirect loop for `curl -L`, a lost form for a POST)."""
    maintenance(web_app, "on", "--reason", REASON, "--until", "22:00")
    maintenance(web_app, "off")
    send(on_stack.port, "GET", on_stack.own_503)  # nginx's limit_req lets the first request of the minute through
    for method in METHODS:
        status, body, headers = send(on_stack.port, method, on_stack.own_503)
        assert status == 503 and "location" not in headers, (method, status, headers)
        assert REASON not in body and "right back" not in body and "retry-after" not in headers, (method, body[:200])


def test_retry_after_is_the_end_until_names(web_app, on_stack):
    """`--until 22:00` is the next 22:00 on this host's clock, sent as an HTTP date (right however long the page is
    cached or the maintenance lasts); an ISO date and time is itself; without an end the page says 120 seconds."""
    end = (datetime.now().astimezone() + timedelta(hours=3)).replace(second=0, microsecond=0)
    for until, expected in ((end.strftime("%H:%M"), format_datetime(end.astimezone(UTC), usegmt=True)),
                            ("2030-01-02T03:04:05+00:00", "Wed, 02 Jan 2030 03:04:05 GMT"),
                            ("", "120"), ("after lunch", "120")):
        maintenance(web_app, "on", "--reason", REASON, *(["--until", until] if until else []))
        for method in METHODS:
            answer = send(on_stack.port, method, "/checkout")
            assert_the_page(answer, method, "/checkout")
            assert answer[2]["retry-after"] == expected, (until, method, answer[2])


def test_the_page_asked_for_after_maintenance_sends_back_to_the_site_by_a_relative_url(web_app, on_stack):
    """The redirect names no host or port: behind a proxy the backend's own port would lead visitors nowhere."""
    front = FrontProxy(web_app.base, on_stack.port)
    try:
        maintenance(web_app, "on", "--reason", REASON)
        maintenance(web_app, "off")
        for port in (on_stack.port, front.port):
            for method in METHODS:
                status, _, headers = send(port, method, "/maintenance.html")
                assert (status, headers.get("location")) == (302, "/"), (port, method, headers)
    finally:
        front.stop()


@pytest.mark.parametrize(("until", "since", "end"), [
    ("22:00", "2026-11-26T20:00:00+01:00", "2026-11-26T22:00:00+01:00"),
    ("22:00", "2026-11-26T22:00:00+01:00", "2026-11-27T22:00:00+01:00"),  # the next 22:00, not this instant
    ("07:30:15", "2026-11-26T23:00:00+00:00", "2026-11-27T07:30:15+00:00"),
    ("2026-12-24 18:00", "2026-11-26T20:00:00+01:00", "2026-12-24T18:00:00+01:00"),  # in since's time zone
    ("2026-12-24T18:00Z", "2026-11-26T20:00:00+01:00", "2026-12-24T18:00:00+00:00"),
    ("after lunch", "2026-11-26T20:00:00+01:00", None), ("25:00", "2026-11-26T20:00:00+01:00", None),
    ("06:00Z", "2026-11-26T20:00:00+01:00", "2026-11-27T06:00:00+00:00"),
])
def test_the_end_until_names(until, since, end):
    named = expected_end(until, datetime.fromisoformat(since))
    assert named == (datetime.fromisoformat(end) if end else None)


# Every method on pages and on an asset-looking URL; an asset is read (anything else sent to it is a 405 outside
# maintenance, on both servers).
LOOP = [(method, path) for path in ("/", "/checkout", "/orders.json.css") for method in METHODS] + \
    [("GET", "/app.css"), ("HEAD", "/app.css")]
# Ways to ask for what lies beside public/: dot segments, encoded, with encoded slashes, behind the page's own URL.
TRAVERSALS = ("/../tmp/maintenance.txt", "/%2e%2e/tmp/maintenance.txt", "/%2E%2E/tmp/secret.txt",
              "/x/%2e%2e/%2e%2e/tmp/secret.txt", "/.%2e/tmp/secret.txt", "//../tmp/secret.txt",
              "/..%2ftmp/secret.txt", "/x/..%2F..%2Ftmp%2Fsecret.txt", "/../tmp/maintenance.html",
              "/maintd-maintenance.html/../../tmp/secret.txt", "/maintd-maintenance.html/../secret.txt",
              "/..;/tmp/secret.txt", "/%252e%252e/tmp/secret.txt")


def assert_nothing_from_tmp(port: int) -> None:
    """No way of asking serves what lies in tmp/: the flag's body, another file, or the page other than as a 503."""
    for path in TRAVERSALS:
        for method in METHODS:
            status, body, _ = send(port, method, path)
            assert "not for visitors" not in body and "reason:" not in body, (method, path, status)
            assert status == 503 or "right back" not in body, (method, path, status)


def test_switching_maintenance_under_a_request_loop_never_errs_nor_shows_tmp(web_app, on_stack):
    """40 times on and off under a loop of every method on pages, an asset and an asset-looking URL: each answer is
    the app, the asset or the page, never a 404, 500, 502 or a reset; and nothing in tmp/ is ever served."""
    (web_app.current / "tmp" / "secret.txt").write_text("not for visitors\n")
    seen: list[tuple[str, str, tuple]] = []
    stop = threading.Event()

    def loop() -> None:
        for method, path in itertools.cycle(LOOP):
            if stop.is_set():
                return
            seen.append((method, path, send(on_stack.port, method, path)))

    def answered(status: int, since: int) -> Callable[[], bool]:
        return lambda: any(answer[0] == status for _, _, answer in seen[since:])

    looping = threading.Thread(target=loop)
    looping.start()
    try:
        for round_ in range(40):
            maintenance(web_app, "on", "--reason", REASON)
            wait_until(answered(503, len(seen)), 30, "a visitor to meet the page")
            if round_ == 0:
                assert_nothing_from_tmp(on_stack.port)
            maintenance(web_app, "off")
            wait_until(answered(200, len(seen)), 30, "a visitor to meet the site")
    finally:
        stop.set()
        looping.join(60)
    assert_nothing_from_tmp(on_stack.port)
    for method, path, (status, body, headers) in seen:
        if status == 503:
            assert_the_page((status, body, headers), method, path)
        else:
            assert status == 200, (method, path, status, body[:200])
            expected = "body { color: #333 }\n" if path == "/app.css" else "release A\n"
            assert body == ("" if method == "HEAD" else expected), (method, path, body[:200])
    assert {s for _, _, (s, _, _) in seen} == {200, 503}


DEBIAN_DEFAULT_SITE = Path("/etc/nginx/sites-available/default")


def test_the_readmes_nginx_site_wins_over_debians_default_site(web_app, tmp_path):
    """Debian's nginx answers port 80 with its own default site (`Welcome to nginx!`): the README's server block,
    beside it as the README says to install it, is the one that serves the site's name."""
    if not shutil.which("nginx") or not DEBIAN_DEFAULT_SITE.exists():
        pytest.skip("Debian's nginx is missing (`make test` installs nginx-light)")
    go_live_by_hand(web_app, "A")
    (web_app.current / "public" / "index.html").write_text("the shop, release A\n")
    port = free_port()
    sites = tmp_path / "sites-enabled"
    sites.mkdir()
    on_port = re.compile(r"listen\s+(\[::\]:)?80\b")
    (sites / "default").write_text("\n".join(  # Debian's own, on this test's port (IPv4 only)
        on_port.sub(f"listen 127.0.0.1:{port}", line) for line in DEBIAN_DEFAULT_SITE.read_text().splitlines()
        if "[::]:80" not in line))
    (sites / "shop").write_text(on_port.sub(f"listen 127.0.0.1:{port}", readme_block("nginx", "server {"))
                                .replace("/etc/maintd/web/", f"{ETC}/").replace("/srv/shop", str(web_app.root)))
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"daemon on;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
                    f"http {{\n    access_log off;\n    include {sites}/*;\n}}\n")
    subprocess.run(["nginx", "-c", str(conf)], check=True)
    try:
        wait_until(lambda: port_open(port), 10, "nginx")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/index.html", headers={"Host": "shop.example.org"})
        answer = conn.getresponse()
        assert (answer.status, answer.read().decode()) == (200, "the shop, release A\n")
    finally:
        os.kill(int((tmp_path / "nginx.pid").read_text().strip()), signal.SIGTERM)
