"""The seed's own app for real (contract §9): a Rails 6.1 app on Debian's gems, its cache under maintd's namespace
key (etc/rails/maintd_cache.rb), its migrations as a before-swap hook run as the deploy user, and its boot inside the
maintenance window, served by Apache + Passenger and by nginx + Puma from a tree the deploy user owns."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rails_app
from test_web import ApachePassenger, NginxPuma, get, went_live

from conftest import App, Daemon, Memcached, deploy_owned_app, free_port, maintd_check, port_open, wait_until
from maintd.tree import Tree

pytestmark = pytest.mark.skipif(not rails_app.installed(),
                                reason="Debian's Rails is missing (`make test` installs it)")

KEY = "shop:cache-version"


@pytest.fixture(scope="session")
def rails_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rails_app.template(tmp_path_factory.mktemp("rails"))


def as_user(user: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]


def app_env(app: App, key: str = KEY) -> dict[str, str]:
    """What the app's processes get from the web server (SetEnv, Puma's environment) and hooks from hooks.env."""
    return {"RAILS_ENV": "production", "DATABASE_PATH": str(app.shared / "db" / "production.sqlite3"),
            "MEMCACHE_SERVERS": app.memcached, "MAINTD_CACHE_KEY": key}


def rails_tree(app: App, source: Path, user: pwd.struct_passwd, key: str = KEY) -> dict[str, str]:
    """Release A live, its database migrated as the deploy user; returns the app's environment."""
    rails_app.release(app, source, "A")
    Tree(app.root).swap("A")
    (app.shared / "db").mkdir()
    os.chown(app.shared / "db", user.pw_uid, user.pw_gid)
    env = app_env(app, key)
    subprocess.run([*as_user(user), "bin/rails", "db:migrate"], cwd=app.current, env={**os.environ, **env},
                   check=True, capture_output=True)
    return env


def rails_runner(app: App, user: pwd.struct_passwd, code: str, **env: str) -> str:
    done = subprocess.run([*as_user(user), "bin/rails", "runner", code], cwd=app.current, capture_output=True,
                          text=True, env={**os.environ, **app_env(app), **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def page(port: int) -> dict[str, str]:
    """The app's page as {"release": …, "cache": …, "booted": …}."""
    status, body, _ = get(port)
    assert status == 200, (status, body[:300])
    return dict(line.split(" ", 1) for line in body.strip().splitlines())


def memcached_gets(memcached: Memcached) -> int:
    return int(memcached.client().stats()[b"cmd_get"])


def daemon_on(app: App, restart: str, env: dict[str, str], extra: str = "", flush: str = "namespace",
              daemon_env: dict[str, str] | None = None) -> Daemon:
    env_lines = "".join(f'{name} = "{value}"\n' for name, value in env.items())
    app.write_config(hooks_user=None, memcached=f'flush = "{flush}"\nnamespace_key = "{KEY}"',
                     extra=f"{restart}\n{extra}\n[hooks.env]\n{env_lines}")
    return Daemon(app, env=daemon_env).ready()


class Visitor:
    """Requests one after another from a visitor's address, each noted with the wall-clock time it was sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, int | str, str]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            sent = time.time()
            status, body, _ = get(self.port)
            self.seen.append((sent, status, body))

    def stop(self) -> list[tuple[float, int | str, str]]:
        self.done.set()
        self.thread.join(60)
        return self.seen

    def phases(self) -> list[str]:
        """What visitors saw, run-length collapsed: "release A", "503", …; anything else raises."""
        phases: list[str] = []
        for _, status, body in self.seen:
            assert status in (200, 503), (status, body[:300])
            phase = "503" if status == 503 else body.splitlines()[0]
            if not phases or phases[-1] != phase:
                phases.append(phase)
        return phases


def deploy_seen_by_a_visitor(daemon: Daemon, app: App, source: Path, port: int, name: str,
                             migrations: dict[str, str] | None = None) -> Visitor:
    """Upload `name` while a visitor keeps asking, until the deploy is over and ten more answers came."""
    visitor = Visitor(port)
    wait_until(lambda: len(visitor.seen) >= 5, 30, "the visitor's first answers")
    rails_app.release(app, source, name, migrations)
    wait_until(lambda: daemon.deployed(name), 120, f"the deploy of {name} to end")
    count = len(visitor.seen)
    wait_until(lambda: len(visitor.seen) >= count + 10, 60, "ten answers after the deploy")
    visitor.stop()
    return visitor


# --- the cache: this app's entries only --------------------------------------------------------------------------


class Puma:
    """Puma alone serving a Rails tree as the deploy user, started in `current` (USR2 then reloads what it points
    to), with the app's environment."""

    def __init__(self, app: App, user: pwd.struct_passwd, env: dict[str, str]) -> None:
        self.port = free_port()
        self.pidfile = app.shared / "puma.pid"
        self.log = app.base / "puma.log"  # the app's own log too (Rails logs to stderr): read it when a test fails
        self.proc = subprocess.Popen([*as_user(user), "puma", "--dir", str(app.current), "-b",
                                      f"tcp://127.0.0.1:{self.port}", "--pidfile", str(self.pidfile),
                                      "-e", "production", "-t", "1:4"],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("w"), start_new_session=True,
                                     env={**os.environ, **env})
        wait_until(lambda: port_open(self.port), 60, "puma")
        self.restart = (f'[restart]\nmethod = "command"\n'
                        f'command = ["/bin/sh", "-c", "kill -USR2 $(cat {self.pidfile})"]')

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait(30)


@pytest.fixture
def blog(memcached: Memcached, deploy_user: pwd.struct_passwd, rails_source: Path) -> Iterator[Puma]:
    """A second Rails app on the same memcached, with its own namespace key, that maintd does not deploy."""
    other = deploy_owned_app(memcached, deploy_user)
    env = rails_tree(other, rails_source, deploy_user, key="blog:cache-version")
    server = Puma(other, deploy_user, env)
    yield server
    server.stop()
    shutil.rmtree(other.base, ignore_errors=True)


@pytest.mark.parametrize("flush", ["namespace", "all"])
def test_a_deploy_clears_this_apps_cache_and_with_namespace_no_other_apps(deploy_app, deploy_user, rails_source,
                                                                          memcached, blog, flush):
    env = rails_tree(deploy_app, rails_source, deploy_user)
    shop = Puma(deploy_app, deploy_user, env)
    try:
        cached, other = page(shop.port)["cache"], page(blog.port)["cache"]
        assert page(shop.port)["cache"] == cached and page(blog.port)["cache"] == other  # both cache for real
        before = memcached_gets(memcached)
        for _ in range(5):
            page(shop.port)
        # the page reads three entries: with the version read once per request, four gets, not six
        assert memcached_gets(memcached) - before == 5 * 4
        daemon = daemon_on(deploy_app, shop.restart, env, flush=flush)
        try:
            rails_app.release(deploy_app, rails_source, "B")
            wait_until(went_live(daemon, "B"), 120, "B live")
        finally:
            daemon.stop()
        after = page(shop.port)
        assert after["release"] == "B" and after["cache"] != cached  # recomputed under the new version
        assert (page(blog.port)["cache"] == other) is (flush == "namespace")
    finally:
        shop.stop()


def test_rails_cache_clear_clears_this_apps_entries_only(deploy_app, deploy_user, rails_source, blog):
    env = rails_tree(deploy_app, rails_source, deploy_user)
    shop = Puma(deploy_app, deploy_user, env)
    try:
        cached, other = page(shop.port)["cache"], page(blog.port)["cache"]
        rails_runner(deploy_app, deploy_user, "Rails.cache.clear")
        assert page(shop.port)["cache"] != cached
        assert page(blog.port)["cache"] == other
    finally:
        shop.stop()


@pytest.fixture
def two_memcached() -> Iterator[list[Memcached]]:
    servers = [Memcached(), Memcached()]
    yield servers
    for server in servers:
        server.stop()


def test_rails_cache_clear_bumps_the_key_on_every_server(deploy_app, deploy_user, rails_source, two_memcached):
    """Dalli reads the key from another server when the one it hashes to is down: there too it must have moved on,
    or the entries Rails.cache.clear cleared come back (maintd's flush bumps every server too)."""
    servers = ",".join(server.address for server in two_memcached)
    rails_tree(deploy_app, rails_source, deploy_user)
    write = ('20.times { |i| Rails.cache.write("entry#{i}", "cached before") }; '
             f'puts Rails.cache.instance_variable_get(:@data).send(:ring).server_for_key("{KEY}").name')
    stale = 'puts 20.times.count { |i| Rails.cache.read("entry#{i}") }'
    holder = rails_runner(deploy_app, deploy_user, f"{write}; Rails.cache.clear", MEMCACHE_SERVERS=servers).strip()
    assert rails_runner(deploy_app, deploy_user, stale, MEMCACHE_SERVERS=servers).strip() == "0"
    next(server for server in two_memcached if server.address == holder).stop()
    assert rails_runner(deploy_app, deploy_user, stale, MEMCACHE_SERVERS=servers).strip() == "0"


def test_the_version_is_read_per_console_command_and_odd_values_are_zero(deploy_app, deploy_user, rails_source,
                                                                         memcached):
    rails_tree(deploy_app, rails_source, deploy_user)
    client = memcached.client()
    client.set(KEY, b"not a number")
    # between two console commands, maintd's flush (here: the same key set from outside, in memcached's own words:
    # the console runs as deploy, who may not reach this clone's venv under /root)
    bump = (f'require "socket"; TCPSocket.open("127.0.0.1", {memcached.port}) '
            f'{{ |s| s.write("set {KEY} 0 0 1\\r\\n7\\r\\n"); s.gets }}')
    key = 'puts Rails.cache.send(:normalize_key, "k", nil)'
    commands = f"{key}\n{bump}\n{key}\n"
    done = subprocess.run([*as_user(deploy_user), "bin/rails", "console"], input=commands, cwd=deploy_app.current,
                          capture_output=True, text=True, env={**os.environ, **app_env(deploy_app)}, timeout=60)
    keys = [line for line in done.stdout.splitlines() if line.startswith(f"{KEY}:")]
    assert keys == [f"{KEY}:0:k", f"{KEY}:7:k"], done.stdout + done.stderr


def test_with_memcached_down_the_app_runs_uncached(deploy_app, deploy_user, rails_source):
    rails_tree(deploy_app, rails_source, deploy_user)
    down = f"127.0.0.1:{free_port()}"
    out = rails_runner(deploy_app, deploy_user, 'puts Rails.cache.fetch("x") { "computed" }; '
                       'puts Rails.cache.fetch("x") { "computed again" }', MEMCACHE_SERVERS=down)
    assert out.splitlines() == ["computed", "computed again"]


# --- migrations, and the boot inside the window ------------------------------------------------------------------


@pytest.fixture
def rails_passenger(deploy_app, deploy_user, rails_source) -> Iterator[tuple[ApachePassenger, dict[str, str]]]:
    if not Path("/usr/lib/apache2/modules/mod_passenger.so").exists():
        pytest.skip("Apache's Passenger module is missing")
    env = rails_tree(deploy_app, rails_source, deploy_user)
    # Passenger looks at tmp/restart.txt at every request, not at most every 10 s (the default): a restart.txt that
    # looked new after maintd's restart-app would restart the app again at the first visitor's request, visibly.
    stack = ApachePassenger(deploy_app, user=deploy_user.pw_name, env=env, vhost="PassengerStatThrottleRate 0")
    wait_until(lambda: get(stack.port)[0] == 200, 120, "Passenger serving release A")
    yield stack, env
    stack.stop()


@pytest.fixture
def rails_nginx_puma(deploy_app, deploy_user, rails_source) -> Iterator[tuple[NginxPuma, dict[str, str]]]:
    env = rails_tree(deploy_app, rails_source, deploy_user)
    stack = NginxPuma(deploy_app, env=env)
    wait_until(lambda: get(stack.port)[0] == 200, 120, "Puma serving release A")
    yield stack, env
    stack.stop()


def test_migrations_run_once_as_deploy_before_the_swap_and_only_they_bring_maintenance(
        deploy_app, deploy_user, rails_source, rails_passenger):
    stack, env = rails_passenger
    migrate = '[maintenance]\nwhen = "migrations"\n[hooks]\nbefore_swap = [["bin/rails", "db:migrate"]]'
    daemon = daemon_on(deploy_app, stack.restart, env, migrate, daemon_env=stack.env)
    try:
        added = {"20260201000000": ""}
        with_migration = deploy_seen_by_a_visitor(daemon, deploy_app, rails_source, stack.port, "B", added)
        assert with_migration.phases() == ["release A", "503", "release B"]
        # C keeps B's migrations and adds none: db/migrate/ as live, so no maintenance at all
        without = deploy_seen_by_a_visitor(daemon, deploy_app, rails_source, stack.port, "C", added)
        assert without.phases() == ["release B", "release C"]
        failing = deploy_seen_by_a_visitor(daemon, deploy_app, rails_source, stack.port, "D",
                                           {**added, "20260301000000": 'raise "the migration fails"'})
        assert failing.phases() == ["release C", "503", "release C"]
        assert daemon.deployed("D")["result"] != "ok" and deploy_app.live() == "C"
    finally:
        daemon.stop()
    runs = rails_runner(deploy_app, deploy_user,
                        'ActiveRecord::Base.connection.select_rows("SELECT version, uid, current FROM migration_runs")'
                        '.each { |row| puts row.join(" ") }')
    # B's migration ran once, as the deploy user, while `current` still pointed at A; D's rolled back with it
    assert runs.splitlines() == [f"20260201000000 {deploy_user.pw_uid} releases/A"]


@pytest.mark.parametrize("health", [False, True], ids=["no-health-url", "health-url"])
@pytest.mark.parametrize("server", ["rails_passenger", "rails_nginx_puma"])
def test_the_first_answer_after_maintenance_is_the_new_release_already_booted(request, deploy_app, rails_source,
                                                                              server, health):
    """Maintenance ends only once the new release answers: the first visitor after the page meets a process that
    had finished booting before the visitor asked, with or without restart.health_url."""
    stack, env = request.getfixturevalue(server)
    check = (f'health_url = "http://127.0.0.1:{stack.port}/"\nhealth_expect = "release {{release}}"'
             if health else "")
    daemon = daemon_on(deploy_app, f"{stack.restart}\n{check}", env, daemon_env=stack.env)
    done = maintd_check(deploy_app)
    assert done.returncode == 0, done.stderr
    said = done.stdout
    # `maintd check` says what the deploy will wait for, as it finds it
    waits = ("until Passenger lists a process of the new release" if server == "rails_passenger" else
             f"where it listens now: 127.0.0.1:{stack.puma_port} (pid ")
    assert waits in said and ("health: GET" if health else "health: not checked") in said, said
    try:
        visitor = deploy_seen_by_a_visitor(daemon, deploy_app, rails_source, stack.port, "B")
    finally:
        daemon.stop()
    assert visitor.phases() == ["release A", "503", "release B"]
    last_page = max(i for i, (_, status, _) in enumerate(visitor.seen) if status == 503)
    sent, _, body = visitor.seen[last_page + 1]
    booted = float(body.split("booted ")[1].split()[0])
    restarted = [e["event"] for e in daemon.events if e.get("step") == "restart"]
    assert booted < sent, f"the first visitor after maintenance waited for the new release to boot: {restarted}"


def test_a_rails_release_that_cannot_boot_fails_the_restart_and_the_old_release_answers(
        deploy_app, deploy_user, rails_source, rails_passenger):
    """B raises while Rails boots: Passenger's spawn fails and Passenger tries again only at a request, so the
    restart step fails at once (not at restart.health_timeout), the deploy goes back, and A answers, booted."""
    stack, env = rails_passenger
    daemon = daemon_on(deploy_app, stack.restart, env, daemon_env=stack.env)
    try:
        rails_app.release(deploy_app, rails_source, "B",
                          files={"config/initializers/broken.rb": 'raise "this release cannot boot"\n'})
        done = daemon.deployed("B", 120)
        [restart] = [e for e in daemon.steps(done["deploy_id"]) if e["step"] == "restart"]
    finally:
        daemon.stop()
    assert done["result"] == "rolled_back" and deploy_app.live() == "A"
    assert "could not start" in restart["event"] and "spawn failed" in restart["event"], restart
    assert page(stack.port)["release"] == "A"


# --- the README's Rack app with Dalli -----------------------------------------------------------------------------


def readme_rack_app() -> str:
    """The `config.ru` the README shows for a Rack app with Dalli, as written there."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    return text.split("**A Rack app with Dalli**", 1)[1].split("```ruby\n", 1)[1].split("```", 1)[0]


def rack_answers(base: Path, servers: str) -> Iterator[str]:
    """Puma serving the README's app from `base` (with memcached at `servers`): each next() is one answer."""
    (base / "config.ru").write_text(readme_rack_app())
    port = free_port()
    env = {**os.environ, "MEMCACHE_SERVERS": servers, "MAINTD_CACHE_KEY": "rack:cache-version"}
    puma = subprocess.Popen(["puma", "--dir", str(base), "-b", f"tcp://127.0.0.1:{port}", "-e", "production"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        wait_until(lambda: port_open(port), 60, "puma")
        while True:
            status, body, _ = get(port)
            assert status == 200, (status, body)
            yield body
    finally:
        os.killpg(puma.pid, 15)
        puma.wait(30)


def test_the_readmes_rack_app_keeps_its_entries_until_maintd_bumps_the_key(tmp_path, memcached):
    from maintd.cache import flush
    from maintd.config import FlushMode

    answers = rack_answers(tmp_path, memcached.address)
    try:
        first = next(answers)
        assert next(answers) == first
        flush((memcached.address,), FlushMode.NAMESPACE, "rack:cache-version", 2.0)
        after = next(answers)
        assert after != first and next(answers) == after
    finally:
        answers.close()


def test_the_readmes_rack_app_runs_uncached_with_memcached_down(tmp_path):
    answers = rack_answers(tmp_path, f"127.0.0.1:{free_port()}")
    try:
        assert next(answers) != next(answers)  # computed each time, and no error
    finally:
        answers.close()
