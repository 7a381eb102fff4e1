"""The Capistrano plugin (contract §8) with the real `cap` (Debian's capistrano 3.17): a project whose Capfile imports
`etc/capistrano/maintd.rake` as a user's would, a bare git repository as `repo_url`, a real sshd on loopback that
Capistrano logs into as the deploy user, and maintd running on the tree. Capistrano builds; maintd switches."""

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from etcd_cluster import ETCD, EtcdCluster

from conftest import (
    DEPLOY_USER,
    ETC,
    App,
    Daemon,
    Sshd,
    deploy_owned_app,
    have,
    maintctl_json,
    public_dir,
    public_maintctl,
)

pytestmark = pytest.mark.skipif(not have("cap"), reason="`cap` is missing (`make test` installs capistrano)")

CONFIG_RU = 'run ->(env) { [200, {"content-type" => "text/plain"}, [File.read("REVISION")]] }\n'


class Project:
    """The app's repository and its Capistrano project, on the machine `cap` runs on (here: the same one). It
    deploys as the deploy user to one server per sshd port, where the tree is at `root` and maintd's socket at
    `socket`; `apps` and `daemons` are the servers' trees and maintd, as seen from here."""

    def __init__(self, base: Path, root: Path, socket: Path, ports: list[int], key: Path) -> None:
        self.base = base
        self.repo = base / "repo.git"
        self.work = base / "work"
        self.cap = base / "cap"
        self.apps: list[App] = []
        self.daemons: list[Daemon] = []
        maintctl = base / "maintctl"  # what the deploy user runs on the servers: the checkout may be in /root
        maintctl.write_text(f'#!/bin/sh\nexec {shlex.join(public_maintctl())} "$@"\n')
        maintctl.chmod(0o755)
        subprocess.run(["git", "init", "-q", "--bare", str(self.repo)], check=True)
        subprocess.run(["git", "init", "-q", "-b", "main", str(self.work)], check=True)
        (self.work / "public").mkdir()
        (self.work / "config.ru").write_text(CONFIG_RU)
        self.commit("first")
        subprocess.run(["chown", "-R", DEPLOY_USER, str(self.repo)], check=True)  # git reads it as the deploy user
        (self.cap / "config" / "deploy").mkdir(parents=True)
        (self.cap / "lib" / "capistrano" / "tasks").mkdir(parents=True)
        shutil.copy(ETC / "capistrano" / "maintd.rake", self.cap / "lib" / "capistrano" / "tasks")
        (self.cap / "Capfile").write_text("""require "capistrano/setup"
require "capistrano/deploy"
require "capistrano/scm/git"
install_plugin Capistrano::SCM::Git
Dir.glob("lib/capistrano/tasks/*.rake").each { |r| import r }
""")
        (self.cap / "config" / "deploy.rb").write_text(f"""set :application, "shop"
set :repo_url, "{self.repo}"
set :branch, "main"
set :deploy_to, "{root}"
set :maintctl, "{maintctl}"
set :maintd_socket, "{socket}"
set :format_options, color: false, truncate: false, log_file: "{base}/capistrano.log"
set :ssh_options, keys: ["{key}"], auth_methods: ["publickey"], verify_host_key: :never
""")
        (self.cap / "config" / "deploy" / "production.rb").write_text("".join(
            f'server "127.0.0.1", port: {port}, user: "{DEPLOY_USER}", roles: %w[app web]\n' for port in ports))

    @property
    def app(self) -> App:
        return self.apps[0]

    @property
    def daemon(self) -> Daemon:
        return self.daemons[0]

    def commit(self, message: str) -> None:
        (self.work / "public" / "index.html").write_text(f"<h1>{message}</h1>\n")
        git = ["git", "-C", str(self.work), "-c", "user.name=t", "-c", "user.email=t@example.org"]
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", message], check=True)
        # The bare repository is the deploy user's (git refuses another user's); root's push says it trusts it
        # in a global config of its own, which the receiving git reads too (a `-c` would not reach it).
        trust = self.base / "gitconfig"
        trust.write_text("[safe]\n\tdirectory = *\n")
        subprocess.run([*git, "push", "-q", "-f", str(self.repo), "main"], check=True, capture_output=True,
                       env={**os.environ, "GIT_CONFIG_GLOBAL": str(trust)})

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["cap", "production", *args], cwd=self.cap, capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=120)

    def deploy(self) -> str:
        done = self.run("deploy")
        assert done.returncode == 0, done.stdout + done.stderr
        return self.app.live() or ""

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


MAINTD_FOR_CAP = {"upload": "require_marker = true", "control": f'group = "{DEPLOY_USER}"', "hooks_user": None}


@pytest.fixture
def project(deploy_app):
    """maintd on a deploy-owned tree (require_marker, the deploy user's group may change things), an sshd, and the
    Capistrano project that deploys to it as the deploy user."""
    base = public_dir("maintd-cap-")
    sshd = Sshd(base / "sshd")
    deploy_app.write_config(**MAINTD_FOR_CAP)
    project = Project(base, deploy_app.root, deploy_app.socket, [sshd.port], sshd.key)
    project.apps, project.daemons = [deploy_app], [Daemon(deploy_app).ready()]
    yield project
    project.stop()
    sshd.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_cap_deploy_goes_live_through_maintd_twice(project):
    cap = project
    done = cap.run("deploy")
    assert done.returncode == 0, done.stdout + done.stderr
    first = cap.app.live()
    assert first and (cap.app.current / "REVISION").exists()
    for step in ("validate", "maintenance_on", "swap", "restart", "flush", "maintenance_off"):
        assert step in done.stdout  # maintd's deploy, followed step by step in cap's output
    assert "ln -s" not in done.stdout and "revisions.log" not in done.stdout  # not Capistrano's switch or log
    [entry] = [e for e in maintctl_json(cap.app, "history") if e["release"] == first]
    assert entry["result"] == "ok" and entry["kind"] == "deploy"

    cap.commit("second")
    second = cap.deploy()
    assert second != first and "second" in (cap.app.current / "public" / "index.html").read_text()
    assert maintctl_json(cap.app, "status")["previous"] == first
    lines = (cap.app.root / "revisions.log").read_text().splitlines()
    assert len(lines) == 2 and second in lines[-1]  # maintd's revision log, one line per deploy


@pytest.mark.parametrize("config, says", [
    ({"upload": 'require_marker = true\nrequired = ["Gemfile.lock"]'}, "refused: required path missing: Gemfile.lock"),
    ({"extra": '[hooks]\nbefore_swap = [["sh", "-c", "exit 3"]]\n'}, "failed: hooks_before: hook sh exited"),
], ids=["refused", "rolled-back"])
def test_a_release_maintd_refuses_or_fails_fails_cap_with_server_step_and_reason(project, config, says):
    cap = project
    first = cap.deploy()
    cap.app.write_config(**{**MAINTD_FOR_CAP, **config})
    cap.daemon.reload()
    cap.commit("second")
    done = cap.run("deploy")
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "maintd on 127.0.0.1: " in out and says in out, out
    assert cap.app.live() == first


def test_deploy_rollback_goes_through_maintd(project):
    cap = project
    first = cap.deploy()
    cap.commit("second")
    second = cap.deploy()
    done = cap.run("deploy:rollback")
    assert done.returncode == 0, done.stdout + done.stderr
    assert cap.app.live() == first
    assert (cap.app.releases / second).is_dir()  # not archived and removed, as Capistrano's own rollback does
    assert maintctl_json(cap.app, "history")[-1]["kind"] == "rollback"
    done = cap.run("deploy:rollback", env={"ROLLBACK_RELEASE": second})
    assert done.returncode == 0, done.stdout + done.stderr
    assert cap.app.live() == second


def test_lock_unlock_flush_status_restart(project, memcached):
    cap = project
    live = cap.deploy()
    reason = "database upgrade; touch /tmp/maintd-cap-injected"  # quoted through SSHKit, never run
    done = cap.run("maintd:lock", env={"REASON": reason, "UNTIL": "10:30 UTC"})
    assert done.returncode == 0, done.stdout + done.stderr
    status = maintctl_json(cap.app, "status")
    assert status["maintenance"]["on"] and status["maintenance"]["reason"] == reason
    assert status["maintenance"]["until"] == "10:30 UTC" and status["maintenance"]["by"] == DEPLOY_USER
    assert not Path("/tmp/maintd-cap-injected").exists()
    shown = cap.run("maintd:status")
    assert shown.returncode == 0 and reason in shown.stdout and live in shown.stdout
    assert cap.run("maintd:unlock").returncode == 0
    assert not maintctl_json(cap.app, "status")["maintenance"]["on"]

    memcached.client().set("k", "v")
    assert cap.run("maintd:flush").returncode == 0
    assert memcached.client().get("k") is None
    restart_file = cap.app.current / "tmp" / "restart.txt"
    before = restart_file.stat().st_mtime_ns
    assert cap.run("maintd:restart").returncode == 0
    assert restart_file.stat().st_mtime_ns > before


def test_a_server_whose_maintd_does_not_wait_for_the_marker_is_named(project):
    cap = project
    cap.app.write_config(**{**MAINTD_FOR_CAP, "upload": ""}, quiet_period=60)
    cap.daemon.reload()
    done = cap.run("deploy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "require_marker = false" in done.stdout + done.stderr


def test_maintd_down_stops_cap_before_it_builds(project):
    cap = project
    cap.daemon.stop()
    done = cap.run("deploy")
    assert done.returncode != 0 and "maintd on 127.0.0.1" in done.stdout + done.stderr
    assert not any(cap.app.releases.iterdir())  # nothing built: the check comes before the code is fetched


# --- two servers in cluster mode ----------------------------------------------------------------------------------


def mounted_at(tree: Path, where: Path) -> tuple[str, ...]:
    """What an sshd is started through so that its sessions see `tree` at `where`: a mount namespace of its own.
    Capistrano deploys every server to the one `deploy_to`; here two servers are one machine."""
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && '
            'exec "$@"', "sh", str(tree), str(where))


@pytest.fixture
def cluster_project(memcached, deploy_user):
    """Two app servers in cluster mode (one etcd), each with its maintd, its tree and its sshd, which shows that
    server's tree at the same path; one Capistrano project deploys to both."""
    if not Path(ETCD).exists():
        pytest.skip("etcd is missing (`make test` unpacks Debian's into .deps/)")
    base = public_dir("maintd-cap-")
    common = public_dir("maintd-cap-server-")
    etcd = EtcdCluster(base / "etcd", size=1)
    apps = [deploy_owned_app(memcached, deploy_user) for _ in range(2)]
    sshds = [Sshd(base / f"sshd{i}", wrap=mounted_at(app.base, common)) for i, app in enumerate(apps)]
    (sshds[1].key.parent / "authorized_keys").write_text(Path(f"{sshds[0].key}.pub").read_text())
    project = Project(base, common / "srv", common / "maintd.sock", [sshd.port for sshd in sshds], sshds[0].key)
    for name, app in zip(("m1", "m2"), apps, strict=True):
        app.write_config(**MAINTD_FOR_CAP, extra=f"""
[cluster]
members = ["m1", "m2"]
member = "{name}"
etcd = {json.dumps(etcd.endpoints)}
prefix = "/maintd/cap-{base.name}"
lease_ttl = 1.0
""")
    project.apps = apps
    try:
        project.daemons = [Daemon(app).ready() for app in apps]
        yield project
    finally:
        project.stop()
        for sshd in sshds:
            sshd.stop()
        etcd.stop_all()
        for path in (base, common, *(app.base for app in apps)):
            shutil.rmtree(path, ignore_errors=True)


def test_one_cap_deploy_switches_two_cluster_members_together(cluster_project):
    cap = cluster_project
    for round_ in ("first", "second"):
        if round_ == "second":
            cap.commit(round_)
        done = cap.run("deploy")
        assert done.returncode == 0, done.stdout + done.stderr
        live = {app.live() for app in cap.apps}
        assert len(live) == 1 and None not in live, live
        assert done.stdout.count(" commit ") == 2  # each server's side of the switch, followed in cap's output
        switches = set()
        for app, daemon in zip(cap.apps, cap.daemons, strict=True):
            last = maintctl_json(app, "history", "-n", "1")[-1]
            assert last["release"] in live and last["result"] == "ok"
            switches |= {e.get("switch_id") for e in daemon.steps(last["deploy_id"]) if e.get("step") == "commit"}
        assert len(switches) == 1 and None not in switches  # one switch, both members in it
    first = maintctl_json(cap.app, "status")["previous"]
    done = cap.run("deploy:rollback")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [app.live() for app in cap.apps] == [first, first]
    assert [maintctl_json(app, "history", "-n", "1")[-1]["kind"] for app in cap.apps] == ["rollback", "rollback"]
