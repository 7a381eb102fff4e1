"""What a browser sees, on the two real stacks: nginx + Puma and Apache + Passenger, serving a tiny Rack app from a
Capistrano tree that maintd deploys. Users (requests from 127.0.0.2) see the app or the maintenance page, never an
error; the health check (from 127.0.0.1) reaches the app through maintenance."""

import http.client
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ETC, App, Daemon, free_port, port_open, wait_until
from maintd.restart import HEALTH_HEADER
from maintd.tree import Tree

USER_ADDRESS = "127.0.0.2"  # a visitor; 127.0.0.1 is "this host", let through for health checks
CONFIG_RU = """release = File.read(File.expand_path("REVISION", __dir__)).strip
run lambda { |env| [200, {"content-type" => "text/plain", "cache-control" => "no-store"}, ["release #{release}\\n"]] }
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
    if marker:
        (staging / ".maintd-ready").touch()
    owner = app.releases.stat()
    subprocess.run(["chown", "-R", f"{owner.st_uid}:{owner.st_gid}", str(staging)], check=True)
    staging.rename(app.releases / name)
    return app.releases / name


def get(port: int, path: str = "/", source: str = USER_ADDRESS,
        headers: dict[str, str] | None = None) -> tuple[int | str, str, dict[str, str]]:
    """One request with a fresh connection: (status or 'error: …', body, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
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

    def __init__(self, base: Path, port: int, server: str) -> None:
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
    proxy_temp_path {base}/proxy;
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
        self.nginx = Nginx(self.base, self.port, f"""
        root {app.current}/public;
        include {ETC}/nginx/maintd.conf;
        location / {{
            include {ETC}/nginx/maintd-location.conf;
            try_files $uri @app;
        }}
        location @app {{
            proxy_pass http://127.0.0.1:{self.puma_port};
        }}""")
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
    MODULES = ("mpm_event", "authz_core", "mime", "dir", "rewrite", "headers", "alias", "env", "passenger")

    def __init__(self, app: App, user: str = "www-data", env: dict[str, str] | None = None) -> None:
        """Passenger runs the app as `user`, with `env` added to its environment (SetEnv, as the README shows)."""
        self.base = app.base / "apache"
        (self.base / "run").mkdir(parents=True)
        self.registry = self.base / "passenger"
        self.registry.mkdir()
        self.registry.chmod(0o755)
        self.port = free_port()
        modules = "\n".join(f"LoadModule {m}_module /usr/lib/apache2/modules/mod_{m}.so" for m in self.MODULES)
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
{"".join(f"    SetEnv {name} {value}{chr(10)}" for name, value in (env or {}).items())}
    <Directory {app.root}/current/public>
        Require all granted
        Options -MultiViews
    </Directory>
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
