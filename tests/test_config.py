"""contract §3: every default as written, and errors that name the key and the line."""

from pathlib import Path

import pytest

from maintd.config import ConfigError, load, parse

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
    assert parse(MINIMAL).cluster is None


def test_full_example_parses():
    example = Path(__file__).parent.parent / "etc" / "maintd" / "example.toml"
    config = load(example)
    assert config.app and config.root.is_absolute()


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
])
def test_errors_name_key_and_line(text, expected):
    with pytest.raises(ConfigError) as caught:
        parse(text, Path("/etc/maintd/shop.toml"))
    assert str(caught.value).startswith("/etc/maintd/shop.toml")
    assert expected in str(caught.value)


def test_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
