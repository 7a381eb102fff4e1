"""contract §3: every default as written, and errors that name the key and the line."""

from pathlib import Path

import pytest

from conftest import maintd_check
from maintd.config import ConfigError, FlushMode, MaintenanceWhen, RestartMethod, Strategy, load, parse

MINIMAL = 'app = "shop"\nroot = "/srv/shop"\n'


def test_defaults_are_the_contracts():
    config = parse(MINIMAL)
    assert config.keep_releases == 5
    upload = config.upload
    assert (upload.marker, upload.require_marker, upload.quiet_period) == (".maintd-ready", False, 5.0)
    assert (config.upload.manifest, config.upload.required) == (".maintd-manifest", ())
    assert (config.maintenance.file, config.maintenance.when) == ("tmp/maintenance.txt", "always")
    assert config.maintenance.keep_on_failure is False
    assert (config.restart.method, config.restart.health_url, config.restart.health_timeout) == ("passenger", "", 30.0)
    assert config.memcached.servers == ("127.0.0.1:11211",)
    assert (config.memcached.flush, config.memcached.namespace_key) == ("all", "shop:cache-version")
    assert config.memcached.timeout == 2.0
    assert (config.hooks.before_swap, config.hooks.after_swap, config.hooks.timeout) == ((), (), 600.0)
    assert (config.control.socket, config.control.mode, config.control.group) == ("/run/maintd/shop.sock", "0666", "")
    assert config.state.dir == "/var/lib/maintd/shop"
    assert config.socket_mode == 0o666


def test_cluster_defaults_are_the_contracts():
    import socket

    host = socket.gethostname().split(".")[0]
    config = parse(MINIMAL + f'[cluster]\nmembers = ["{host}", "other"]\n')
    cluster = config.cluster
    assert cluster and (cluster.member, cluster.primary, cluster.prefix) == (host, host, "/maintd/shop")
    assert (cluster.etcd, cluster.lease_ttl, cluster.prepare_timeout, cluster.switch_timeout) == (
        ("http://127.0.0.1:2379",), 10.0, 900.0, 300.0)
    assert (cluster.strategy, str(cluster.batch), cluster.canary, cluster.batch_wait) == (Strategy.TOGETHER, "1", "",
                                                                                           0.0)
    assert cluster.batches == ((host,), ("other",))  # the first member alone, then one at a time
    assert parse(MINIMAL).cluster is None


FIVE = MINIMAL + '[cluster]\nmembers = ["a", "b", "c", "d", "e"]\nmember = "a"\n'


@pytest.mark.parametrize("keys, batches", [
    ("", (("a",), ("b",), ("c",), ("d",), ("e",))),
    ("batch = 2", (("a",), ("b", "c"), ("d", "e"))),
    ('canary = "c"\nbatch = 3', (("c",), ("a", "b", "d"), ("e",))),  # the canary alone, whatever batch says
    ('batch = "40%"', (("a",), ("b", "c"), ("d", "e"))),  # 40% of 5 members: 2 a batch
    ('batch = "30%"', (("a",), ("b", "c"), ("d", "e"))),  # rounded up: 1.5 is 2
    ('batch = "1%"', (("a",), ("b",), ("c",), ("d",), ("e",))),  # at least one
    ('batch = "100%"\ncanary = "e"', (("e",), ("a", "b", "c", "d"))),
    ("batch = 9", (("a",), ("b", "c", "d", "e"))),
])
def test_a_rolling_switch_goes_from_the_canary_in_members_order_batch_by_batch(keys, batches):
    cluster = parse(FIVE + 'strategy = "rolling"\n' + keys + "\n").cluster
    assert cluster and cluster.strategy is Strategy.ROLLING and cluster.batches == batches


EXAMPLE = Path(__file__).parent.parent / "etc" / "maintd" / "example.toml"
COMMENTED_OUT = r"(?m)^#(\[[a-z]+\]|[a-z_]+ = )"  # `#[table]` or `#key = value`: a setting, not prose


def test_the_example_sets_only_what_is_required():
    """Copied as the README says, it is a starting point: every example value commented out, so a first upload is
    neither refused for an example's `upload.required` nor failed at `link_shared` on example paths."""
    import tomllib

    assert tomllib.loads(EXAMPLE.read_text()) == {"app": "shop", "root": "/srv/shop"}
    assert load(EXAMPLE).warnings == ()


def test_the_examples_commented_settings_parse_once_uncommented():
    import re

    config = parse(re.sub(COMMENTED_OUT, r"\1", EXAMPLE.read_text()))
    assert config.upload.required == ("config.ru",) and config.shared.dirs == ("log", "public/uploads")
    assert config.hooks.before_swap == (("bin/rails", "db:migrate"),) and config.cluster


def test_a_copy_of_the_example_deploys_its_first_upload(app, start_daemon):
    """The operator's first day: the example copied, `root` pointed at the tree, a release without config.ru (not a
    Rack app) and an empty shared/: it goes live. Only where this test's daemon may write is added."""
    app.config.write_text(EXAMPLE.read_text().replace('root = "/srv/shop"', f'root = "{app.root}"') +
                          f'[control]\nsocket = "{app.socket}"\n[state]\ndir = "{app.state}"\n'
                          f'[memcached]\nservers = ["{app.memcached}"]\n')
    done = maintd_check(app)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    daemon = start_daemon()
    release = app.releases / "r1"
    (release / "public").mkdir(parents=True)
    (release / "public" / "index.html").write_text("<h1>r1</h1>\n")
    (release / ".maintd-ready").touch()
    assert daemon.deployed("r1")["result"] == "ok", daemon.events[-5:]
    assert app.live() == "r1"


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + "[upload]\nquiet_period = -1\n", ":4: upload.quiet_period must be greater than 0"),
    (MINIMAL + "[upload]\nmarker = 3\n", ":4: upload.marker must be a string"),
    (MINIMAL + "\n[restart]\nmethod = \"unicorn\"\n", ":5: restart.method must be one of"),
    (MINIMAL + "[memcached]\nservers = [\"localhost\"]\n", ":4: memcached.servers must list servers as HOST:PORT"),
    (MINIMAL + "[hooks]\nbefore_swap = [\"bin/migrate\"]\n", ":4: hooks.before_swap must be a list"),
    (MINIMAL + "[shared]\nfiles = [\"../etc/passwd\"]\n", ":4: shared.files must be a path inside the release"),
    (MINIMAL + "keep_releases = 0\n", ":3: keep_releases must be at least 1"),
    (MINIMAL + "colour = \"blue\"\n", ":3: colour is not a known key"),
    (MINIMAL + "[upload]\nquiet = 1\n", ":4: upload.quiet is not a known key"),
    (MINIMAL + "[uploads]\nmarker = \"x\"\n", ":3: uploads is not a known key"),
    (MINIMAL + "[control]\nmode = \"rw\"\n", ":4: control.mode must be an octal file mode"),
    (MINIMAL + "[control]\ngroup = \"no-such-group-here\"\n", ":4: control.group names no group"),
    (MINIMAL + "[restart]\nmethod = \"command\"\n", ":4: restart.command must be set"),
    ('root = "/srv/x"\n', "app is required"),
    ('app = "shop"\nroot = "relative"\n', ":2: root must be an absolute path"),
    (MINIMAL + "[upload\n", "line 3"),
    (MINIMAL + "[hooks]\nenv = { 1PATH = \"x\" }\n", ":4: hooks.env names an impossible environment variable"),
    (MINIMAL + "[hooks]\nenv = { PATH = 1 }\n", ":4: hooks.env PATH must be a string"),
    (MINIMAL + "[cluster]\nmember = \"a\"\n", "cluster needs members"),
    (MINIMAL + "[cluster]\nmembers = [\"a\", \"a\"]\n", ":4: cluster.members names a member twice"),
    (MINIMAL + "[cluster]\nmembers = [\"a\", \"b\"]\nmember = \"c\"\n", ":5: cluster.member 'c' is not one of"),
    (MINIMAL + "[cluster]\nmembers = [\"a\"]\nmember = \"a\"\nprimary = \"z\"\n", ":6: cluster.primary 'z'"),
    (MINIMAL + "[cluster]\nmembers = [\"a\"]\netcd = [\"127.0.0.1:2379\"]\n", ":5: cluster.etcd must list URLs"),
    (MINIMAL + "[cluster]\nmembers = [\"a\"]\nprefix = \"x/\"\n", ":5: cluster.prefix must start with /"),
    (FIVE + 'strategy = "canary"\n', ":6: cluster.strategy must be one of 'together', 'rolling', 'auto'"),
    (FIVE + "batch = 0\n", ':6: cluster.batch must be a number of members (1 or more) or a percentage of them'),
    (FIVE + 'batch = "0%"\n', ":6: cluster.batch must be a number of members"),
    (FIVE + 'batch = "101%"\n', ":6: cluster.batch must be a number of members"),
    (FIVE + 'batch = "2"\n', ":6: cluster.batch must be a number of members"),
    (FIVE + "batch = 1.5\n", ":6: cluster.batch must be a number of members"),
    (FIVE + 'canary = "z"\n', ":6: cluster.canary 'z' is not one of members (a, b, c, d, e)"),
    (FIVE + "batch_wait = -1\n", ":6: cluster.batch_wait must be a finite number, 0 or more"),
    (FIVE + "batch_wait = inf\n", ":6: cluster.batch_wait must be a finite number, 0 or more"),
])
def test_errors_name_key_and_line(text, expected):
    with pytest.raises(ConfigError) as caught:
        parse(text, Path("/etc/maintd/shop.toml"))
    assert str(caught.value).startswith("/etc/maintd/shop.toml")
    assert expected in str(caught.value)


LONG_SOCKET = "/run/maintd/" + "s" * 100 + ".sock"


# Values the checks let through before (issue #20, item 10), each of which fails only later, mid-deploy or never.
@pytest.mark.parametrize("text, expected", [
    # the health check speaks HTTP to a host: anything else fails every deploy's health step
    (MINIMAL + '[restart]\nhealth_url = "ftp://x"\n', ":4: restart.health_url must be an http:// or https:// URL"),
    (MINIMAL + '[restart]\nhealth_url = "http:///up"\n', ":4: restart.health_url must be an http://"),
    (MINIMAL + '[restart]\nhealth_url = "http://127.0.0.1:99999/up"\n', ":4: restart.health_url must be"),
    (MINIMAL + '[restart]\nhealth_url = "127.0.0.1/up"\n', ":4: restart.health_url must be"),
    # the marker and the manifest are looked for at the top of the release, by name
    (MINIMAL + '[upload]\nmarker = "../x"\n', ":4: upload.marker must be a file name at the top of the release"),
    (MINIMAL + '[upload]\nmanifest = "meta/SHA256SUMS"\n', ":4: upload.manifest must be a file name at the top"),
    (MINIMAL + '[upload]\nmanifest = ".maintd-ready"\n', ":4: upload.manifest must differ from upload.marker"),
    (MINIMAL + '[upload]\nmarker = "READY"\nmanifest = "READY"\n', ":5: upload.manifest must differ from"),
    # the flag is a file, and not the page or the Retry-After written beside it
    (MINIMAL + '[maintenance]\nfile = "tmp/"\n', ":4: maintenance.file must name a file, not a directory"),
    (MINIMAL + '[maintenance]\nfile = "."\n', ":4: maintenance.file must be a path inside the release"),
    (MINIMAL + '[maintenance]\nfile = "tmp/maintenance.html"\n', ":4: maintenance.file must not be named"),
    (MINIMAL + '[maintenance]\nfile = "tmp/maintenance.retry-after"\n', ":4: maintenance.file must not be named"),
    # a shared "." would replace the whole release with a link
    (MINIMAL + '[shared]\ndirs = ["."]\n', ":4: shared.dirs must be a path inside the release"),
    # no system call takes a NUL: the hook, the environment or the path would fail mid-deploy
    (MINIMAL + '[hooks]\nenv = { PATH = "/bin\\u0000x" }\n', ":4: hooks.env PATH must not hold a NUL character"),
    (MINIMAL + '[hooks]\nafter_swap = [["bin/x\\u0000"]]\n', ":4: hooks.after_swap must not hold a NUL"),
    (MINIMAL + '[state]\ndir = "/var/lib/x\\u0000"\n', ":4: state.dir must not hold a NUL"),
    # TOML's nan and inf: a deadline that never comes
    (MINIMAL + "[restart]\nhealth_timeout = nan\n", ":4: restart.health_timeout must be a finite number"),
    (MINIMAL + "[upload]\nquiet_period = inf\n", ":4: upload.quiet_period must be a finite number"),
    (MINIMAL + "[hooks]\ntimeout = inf\n", ":4: hooks.timeout must be a finite number"),
    # memcached refuses such a key: every flush would be a warning, never a flush
    (MINIMAL + '[memcached]\nnamespace_key = "shop cache"\n', ":4: memcached.namespace_key must be a memcached key"),
    (MINIMAL + f'[control]\nsocket = "{LONG_SOCKET}"\n', ":4: control.socket /run/maintd/sss"),
    ('app = "' + "a" * 100 + '"\nroot = "/srv/shop"\n', "control.socket /run/maintd/aaa"),
    # a rolling switch that must wait longer between its batches than it may take in all can never commit
    (FIVE + 'strategy = "auto"\nbatch_wait = 75.0\n', ":7: cluster.batch_wait 75s after each of the first 4 of 5 "
                                                       "batches leaves no time to commit within switch_timeout (300s)"),
])
def test_values_that_cannot_work_name_key_and_line(text, expected):
    with pytest.raises(ConfigError) as caught:
        parse(text, Path("/etc/maintd/shop.toml"))
    assert str(caught.value).startswith("/etc/maintd/shop.toml")
    assert expected in str(caught.value)


# Values maintd took before issue #20 that work, though not as the operator may think: a warning each, never a
# refusal, or a daemon upgraded in place would not start on the config it ran with.
@pytest.mark.parametrize("text, expected", [
    (MINIMAL + '[maintenance]\ntemplate = "etc/page.html"\n',
     ":4: maintenance.template 'etc/page.html' is relative: it is read as /etc/page.html, from / as systemd runs"),
    (MINIMAL + '[restart]\ncommand = ["kill", "-USR2", "1"]\n',
     ':4: restart.command is never run: restart.method is "passenger", whose restart is used'),
    (MINIMAL + '[memcached]\nservers = []\n',
     ':4: memcached.servers is empty, so memcached.flush = "all" flushes nothing: the flush step is skipped'),
    (MINIMAL + '[memcached]\nflush = "namespace"\nservers = []\n',
     ':5: memcached.servers is empty, so memcached.flush = "namespace" flushes nothing'),
])
def test_values_an_earlier_maintd_took_are_warnings_naming_key_and_line(text, expected):
    [warning] = parse(text, Path("/etc/maintd/shop.toml")).warnings
    assert warning.startswith("/etc/maintd/shop.toml:") and expected in warning


def test_a_relative_template_is_read_from_the_root_directory():
    """As the systemd unit, whose working directory is /, always read it; `maintd check`, run anywhere, agrees."""
    assert parse(MINIMAL + '[maintenance]\ntemplate = "etc/page.html"\n').maintenance.template == "/etc/page.html"
    assert parse(MINIMAL + '[maintenance]\ntemplate = "/etc/page.html"\n').warnings == ()


def test_check_and_run_take_them_saying_so_once_and_doing_what_each_warning_says(app, start_daemon, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<p>from the relative template: {{reason}}</p>\n")
    seen, ran = tmp_path / "seen.html", tmp_path / "restart-command-ran"
    app.write_config(f'[maintenance]\ntemplate = "{str(page).removeprefix("/")}"\n'
                     f'[restart]\ncommand = ["touch", "{ran}"]\n'
                     f'[hooks]\nbefore_swap = [["cp", "tmp/maintenance.html", "{seen}"]]\n')
    app.config.write_text(app.config.read_text().replace(f'servers = ["{app.memcached}"]', "servers = []"))
    warnings = load(app.config).warnings
    assert [w.split(": ", 2)[1].split()[0] for w in warnings] == [
        "maintenance.template", "restart.command", "memcached.servers"]
    done = maintd_check(app)
    assert done.returncode == 0, done.stderr  # warnings only
    assert [f"maintd: warning: {w}" for w in warnings] == done.stderr.splitlines()
    assert f"{app.config}: ok" in done.stdout

    daemon = start_daemon()
    for name in ("r1", "r2"):
        app.make_release(name)
        steps = {e["step"]: e for e in daemon.steps(daemon.deployed(name)["deploy_id"])}
        assert steps["restart"]["result"] == "ok" and not ran.exists()  # Passenger's restart, not the command
        assert (app.releases / name / "tmp" / "restart.txt").exists()
        assert (steps["flush"]["result"], steps["flush"]["event"]) == ("skipped", "flush: memcached.servers is empty")
        assert seen.read_text() == f"<p>from the relative template: deploying release {name}</p>\n"
    for warning in warnings:  # at start, once: not again with each deploy
        assert [e["level"] for e in daemon.events if e["event"] == warning] == ["warning"]
    since = daemon.events.index(daemon.reload())  # and once more with the configuration read again
    daemon.wait_for(since=since, event=warnings[-1])
    assert [e["event"] for e in daemon.events[since:] if e["level"] == "warning"] == list(warnings)


def test_values_near_the_impossible_ones_still_parse():
    config = parse(MINIMAL + '[upload]\nmarker = "READY"\nmanifest = "SHA256SUMS"\n'
                   '[restart]\nhealth_url = "https://shop.example:8443/up?from=maintd"\n'
                   '[memcached]\nservers = []\nflush = "none"\n[maintenance]\nfile = "public/system/maintenance"\n')
    assert (config.upload.marker, config.upload.manifest) == ("READY", "SHA256SUMS")
    assert config.restart.health_url == "https://shop.example:8443/up?from=maintd"
    assert config.memcached.servers == ()
    assert config.warnings == ()


def test_choices_are_parsed_into_enum_members():
    """Each choice is read once, here: everything else compares members, so a typo there fails mypy, not a deploy."""
    config = parse(MINIMAL + '[maintenance]\nwhen = "migrations"\n[restart]\nmethod = "command"\ncommand = ["true"]\n'
                   '[memcached]\nflush = "namespace"\n')
    assert config.maintenance.when is MaintenanceWhen.MIGRATIONS
    assert config.restart.method is RestartMethod.COMMAND
    assert config.memcached.flush is FlushMode.NAMESPACE
    defaults = parse(MINIMAL)
    assert (defaults.maintenance.when, defaults.restart.method, defaults.memcached.flush) == (
        MaintenanceWhen.ALWAYS, RestartMethod.PASSENGER, FlushMode.ALL)
    assert defaults.memcached.flush is FlushMode.ALL


def test_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")


def test_maintd_check_says_how_a_cluster_switches(app):
    """Without an etcd: a warning, not a failure, and the way this member's switches go."""
    app.write_config('[cluster]\nmembers = ["a", "b", "c"]\nmember = "b"\netcd = ["http://127.0.0.1:9"]\n'
                     'strategy = "auto"\ncanary = "c"\nbatch = "50%"\nbatch_wait = 30.0\n')
    done = maintd_check(app)
    assert done.returncode == 0 and "warning: etcd does not answer" in done.stderr, done.stderr
    assert ("cluster: member b of a, b, c (primary a), keys under /maintd/shop; switches together when db/migrate "
            "differs on any member, else rolling, without maintenance, in batches c | a, b (30s apart)") in done.stdout


def test_the_examples_cluster_table_parses_once_uncommented():
    import re

    cluster = parse(re.sub(COMMENTED_OUT, r"\1", EXAMPLE.read_text())).cluster
    assert cluster and cluster.members == ("app1", "app2", "app3") and cluster.member == "app1"
    assert (cluster.strategy, cluster.canary, cluster.batch_wait) == (Strategy.TOGETHER, "", 0.0)
