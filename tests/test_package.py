"""The Debian package (contract §10) in a fresh Debian 12 under a real systemd: `make deb` twice (this tree, and the
same one version up), then one boot of a minimal debootstrapped root that follows the README's install section line
by line, deploys, lives through an upgrade dpkg aborts, upgrades while a deploy waits in its hook (past the unit's
stop timeout), removes and purges (tests/nspawn/package.sh), and the assertions on what it recorded.

The root is made once by debootstrap and cached outside the clone (CACHE; rebuilt only when ROOT_PACKAGES change);
each boot mounts it read-only under a tmpfs (--volatile=overlay), so the cache stays clean. It holds Debian's own
dependencies of the package (python3, libsystemd0, and rsync, which it recommends and the README's upload needs),
so the container boots with --private-network: the install proves that nothing is fetched.
"""

import fcntl
import json
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from container import boot, read

from conftest import readme_block

TREE = Path(__file__).parent.parent
CHECK = Path(__file__).parent / "nspawn"
CACHE = Path(os.environ.get("MAINTD_TEST_CACHE", "/var/cache/maintd-test"))
ROOT_PACKAGES = "systemd,systemd-sysv,dbus,man-db,bash-completion,python3,libsystemd0,rsync"
ROOT = CACHE / "bookworm"
VERSION = tomllib.loads((TREE / "pyproject.toml").read_text())["project"]["version"]
NEWER = f"{VERSION}.1"  # higher for Debian (dpkg --compare-versions) and for Python (PEP 440) alike

pytestmark = [
    pytest.mark.skipif(not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"),
                       reason="systemd-nspawn and debootstrap are needed (`make test` installs them)"),
    # two package builds and a boot take 1.5 min with warm caches; the first run also debootstraps (1-3 min)
    pytest.mark.timeout(1800),
]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One debootstrap at a time, across concurrent test runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def debian_root() -> Path:
    """A minimal Debian 12 with systemd, made once (about 60-90 s and 250 MB, from deb.debian.org) and reused."""
    stamp = ROOT / ".maintd-root"
    with locked(CACHE / ".lock"):
        if not stamp.exists() or stamp.read_text() != ROOT_PACKAGES:
            building = CACHE / "bookworm.tmp"
            shutil.rmtree(building, ignore_errors=True)
            done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={ROOT_PACKAGES}", "bookworm",
                                   str(building), "http://deb.debian.org/debian"],
                                  capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            (building / ".maintd-root").write_text(ROOT_PACKAGES)
            shutil.rmtree(ROOT, ignore_errors=True)
            building.rename(ROOT)
    return ROOT


def build(tmp: Path, version: str) -> Path:
    """`make deb` in a copy of this tree (its files as they are, committed or not) at `version`."""
    source = tmp / f"src-{version}"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=TREE,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (TREE / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TREE / name, source / name)
    pyproject = source / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(f'version = "{VERSION}"', f'version = "{version}"', 1))
    subprocess.run(["git", "init", "-q"], cwd=source, check=True)
    subprocess.run(["git", "add", "-A"], cwd=source, check=True)
    done = subprocess.run(["make", "-s", "deb"], cwd=source, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [deb] = (source / "dist").glob(f"maintd_{version}_*.deb")
    target = tmp / ("old" if version == VERSION else "new")
    target.mkdir()
    shutil.move(deb, target / deb.name)
    shutil.rmtree(source)
    return target


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> Path:
    """old/ and new/, each holding one build. MAINTD_TEST_DEBS names a directory laid out so (a previous run's, kept
    by pytest under its basetemp) to test the package again without building it twice more."""
    if given := os.environ.get("MAINTD_TEST_DEBS"):
        return Path(given)
    tmp = tmp_path_factory.mktemp("debs")
    build(tmp, VERSION)
    build(tmp, NEWER)
    return tmp


def readme_lines() -> list[str]:
    """The README's install section for the package, a command per line: the first, `make deb`, is what build()
    runs; the container runs the rest as they are (tests/nspawn/package.sh)."""
    return readme_block("sh", "make deb").splitlines()


@pytest.fixture(scope="module")
def booted(debian_root, debs, tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    results = tmp_path_factory.mktemp("results")
    (results / "readme-lines").write_text("\n".join(readme_lines()[1:]) + "\n")
    options = ["--volatile=overlay", "--private-network", f"--bind-ro={debs}:/debs",
               f"--bind-ro={debs / 'old'}:/root/maintd/dist", f"--bind-ro={CHECK}:/check", f"--bind={results}:/results",
               f"--bind-ro={CHECK / 'package.service'}:/etc/systemd/system/maintd-package.service"]
    steps, context = boot(str(debian_root), results, "maintd-package.service", options, timeout=900)
    assert steps.get("done") == "yes", context
    return results, steps, context
def test_every_line_of_the_readmes_install_section_works(booted):
    results, steps, context = booted
    lines = readme_lines()
    assert lines[0].startswith("make deb ") and lines[1].startswith("apt install ./dist/maintd_*.deb "), lines
    for number, line in enumerate(lines[1:], start=1):
        assert steps[f"readme:{number}"] == "0", f"{line}\n{read(results / f'readme-{number}.log')}" + context
    manuals = read(results / f"readme-{next(n for n, line in enumerate(lines) if line.startswith('man '))}.log")
    assert all(title in manuals for title in ("MAINTD(8)", "MAINTD.TOML(5)", "MAINTCTL(1)")), manuals[:500]
    assert steps["edited"] == "2", context  # the test's $EDITOR uncommented the example's [hooks] and before_swap


def test_install_lays_out_everything_and_starts_nothing(booted):
    results, steps, context = booted
    assert steps["version"] == steps["maintctl_version"] == f"maintd {VERSION}", context
    missing = [k for k, v in steps.items() if k.startswith("exists:") and v != "yes"]
    assert not missing, context
    assert set(steps["conffiles"].split()) >= {"/etc/maintd/example.toml", "/etc/maintd/web/nginx/maintd.conf",
                                               "/etc/maintd/web/apache2/maintd.conf"}, context
    for page, section in (("maintd", 8), ("maintctl", 1), ("maintd.toml", 5)):
        assert steps[f"man:{page}.{section}"] == f"/usr/share/man/man{section}/{page}.{section}.gz", context
    assert int(read(results / "man_keep_releases")) == 1, context
    assert steps["complete_sta"] == "status", context  # bash-completion found and loaded the installed script
    assert set(steps["complete_maintenance"].split()) == {"on", "off"}, context
    assert steps["units_running"] == "0" and steps["units_enabled"] == "0", context
    assert steps["doc"].replace('"', "") == ("man:maintd(8) man:maintd.toml(5) man:maintctl(1) "
                                             "file:///usr/share/doc/maintd/README.md"), context
    # the same build again is an upgrade with no instance to stop: nothing started, nothing said about it
    upgrade = read(results / "reinstall.log")
    assert steps["reinstall"] == "0" and "maintd:" not in upgrade, upgrade + context
    assert steps["units_running_after_reinstall"] == "0", context


def test_an_upload_goes_live_under_the_packaged_units(booted):
    results, steps, context = booted
    assert steps["live_r1"] == "0", context
    status = read(results / "status_r1.txt")
    assert steps["status_as_deploy"] == "0" and "current      r1" in status, status + context
    assert f"app          shop (maintd {VERSION})" in status, status + context


def test_an_upgrade_dpkg_aborts_starts_the_instances_it_stopped_again(booted):
    results, steps, context = booted
    aborted = read(results / "aborted.log")
    assert steps["aborted"] != "0" and "trying to overwrite '/usr/share/doc/bash/copyright'" in aborted, aborted
    assert "maintd: stopping maintd@shop.service maintd@shop.socket" in aborted, aborted  # prerm stopped them
    assert steps["active_after_abort"] == "active active", aborted + context  # postinst abort-upgrade
    assert steps["version_after_abort"] == f"{VERSION} maintd {VERSION}" and steps["current_after_abort"] == "r1"


def test_an_upgrade_waits_for_the_deploy_in_progress_and_keeps_the_state(booted):
    results, steps, context = booted
    assert steps["r2_held"] == "0" and steps["stopping"] == "0", context
    # while the daemon stops, the deploy holds it, apt waits and the old files are still the installed ones
    assert steps["apt_waits"] == "0" and steps["version_during_stop"] == f"maintd {VERSION}", context
    assert steps["during_stop"] == "deactivating releases/r1", context
    # twice the (shortened) TimeoutStopSec later the deploy still holds the stop: maintd extends it while it runs
    assert steps["stop_timeout"] == "3s" and steps["held_past_timeout"] == "deactivating", context
    assert steps["upgrade"] == "0", read(results / "upgrade.log") + context
    status = json.loads(read(results / "status_after.json"))
    assert status["version"] == NEWER and status["current"] == "r2", context
    assert steps["new_pid_differs"] == "yes" and steps["active_after"] == "active active", context
    assert steps["version_after"] == f"maintd {NEWER}", context
    history = json.loads(read(results / "history.json"))
    assert [(h["release"], h["result"]) for h in history] == [("r1", "ok"), ("r2", "ok")], context
    # every state file of the idle daemon outlives the upgrade; the deploy journal of the held deploy was there
    # through the stop, and the deploy it journals finished (above) rather than being recovered or lost
    before, after = read(results / "state_before").split(), read(results / "state_after").split()
    assert {"history.jsonl", "state.json"} <= set(before) <= set(after), context
    assert steps.get("journal_during_hold") == "yes", context
    history_before = read(results / "history_before.jsonl")
    assert history_before and read(results / "history_after.jsonl").startswith(history_before), context


def test_remove_keeps_config_state_and_trees_purge_removes_config_and_state_only(booted):
    results, steps, context = booted
    assert steps["running_before_remove"] == "1", context
    assert steps["remove"] == "0" and steps["running_after_remove"] == "0", read(results / "remove.log") + context
    assert steps["after_remove:/usr/bin/maintd"] == "no", context
    for kept in ("/etc/maintd/shop.toml", "/etc/maintd/example.toml", "/var/lib/maintd/shop", "/srv/shop/releases/r2"):
        assert steps[f"after_remove:{kept}"] == "yes", kept + context
    assert steps["purge"] == "0", read(results / "purge.log") + context
    assert steps["after_purge:/etc/maintd"] == steps["after_purge:/var/lib/maintd"] == "no", context
    for kept in ("/srv/shop/releases/r1", "/srv/shop/releases/r2", "/srv/shop/current"):
        assert steps[f"after_purge:{kept}"] == "yes", kept + context
    assert steps["enabled_after_purge"] == "0", context
