"""Hooks and restart commands run as the app's user, never as root by default (contract §3): a foreground daemon
running as root, a tree owned by a real deploy user, and a probe shipped inside the release as `bin/migrate` would
be. (The same under the shipped unit and a real systemd is `tests/test_systemd.py::test_hooks_under_a_real_systemd`.)
"""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, App, maintd_check, make_source, public_maintctl

PROBE = """#!/bin/sh
# What a hook sees: who it is, its environment, and whether it may write where the app's tooling writes.
out="$MAINTD_ROOT/shared/probe-$1"
{
  echo "user=$(id -un)"
  echo "groups=$(id -Gn)"
  echo "home=$HOME"; echo "USER=$USER"; echo "LOGNAME=$LOGNAME"; echo "SHELL=$SHELL"
  echo "greeting=$GREETING"
  echo "release=$MAINTD_RELEASE"
  echo "notify_socket=${NOTIFY_SOCKET:-none}"
  mkdir -p tmp/cache && touch tmp/cache/compiled && echo "tmp_cache=ok"
  @MAINTCTL@ --socket @SOCKET@ maintenance on --reason "from a hook" >/dev/null 2>&1; echo "maintctl_maintenance_on=$?"
} > "$out" 2>&1
"""


def upload(app: App, owner, name: str, probe: str = "") -> Path:
    """A release as its uploader leaves it: written under a staging name, owned by them, renamed into place."""
    staging = app.releases / f".incoming-{name}"
    make_source(staging, 3, name)
    if probe:
        (staging / "bin").mkdir()
        (staging / "bin" / "probe").write_text(probe)
        (staging / "bin" / "probe").chmod(0o755)
    (staging / ".maintd-ready").touch()
    subprocess.run(["chown", "-R", f"{owner.pw_uid}:{owner.pw_gid}", str(staging)], check=True)
    staging.rename(app.releases / name)
    return app.releases / name


def probe_text(app: App) -> str:
    maintctl = " ".join(f"'{part}'" for part in public_maintctl())
    return PROBE.replace("@MAINTCTL@", maintctl).replace("@SOCKET@", str(app.socket))


def read_probe(app: App, when: str) -> dict[str, str]:
    text = (app.shared / f"probe-{when}").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_hooks_and_restart_command_run_as_the_owner_of_releases(deploy_app, deploy_user, start_daemon):
    app = deploy_app
    app.write_config('[restart]\nmethod = "command"\ncommand = ["sh", "-c", "id -un > ../../shared/restarted-by"]\n'
                     '[hooks]\nbefore_swap = [["bin/probe", "before"]]\nafter_swap = [["bin/probe", "after"]]\n'
                     'env = { GREETING = "hello from hooks.env" }\n', hooks_user=None)
    daemon = start_daemon(on=app)
    upload(app, deploy_user, "r1", probe_text(app))
    assert daemon.deployed("r1")["result"] == "ok"
    for when in ("before", "after"):
        seen = read_probe(app, when)
        assert seen["user"] == deploy_user.pw_name and seen["home"] == deploy_user.pw_dir
        assert (seen["USER"], seen["LOGNAME"], seen["SHELL"]) == (deploy_user.pw_name, deploy_user.pw_name,
                                                                    deploy_user.pw_shell)
        assert seen["greeting"] == "hello from hooks.env" and seen["release"] == "r1"
        assert seen["notify_socket"] == "none"  # nothing of the daemon's own environment
        assert seen["tmp_cache"] == "ok"  # the tmp/ maintd made for its flag is the app's to write
        assert seen["maintctl_maintenance_on"] == "1"  # a hook is a peer like any other: not in control.group
    assert (app.shared / "restarted-by").read_text().strip() == deploy_user.pw_name
    assert os.stat(app.releases / "r1" / "tmp").st_uid == deploy_user.pw_uid
    assert not (app.current / "tmp" / "maintenance.txt").exists()


def test_hooks_on_a_root_owned_tree_need_hooks_user_said(app, start_daemon):
    app.write_config('[hooks]\nbefore_swap = [["true"]]\n', hooks_user=None)
    check = maintd_check(app)
    assert check.returncode == 1
    assert "hooks.user is not set and root owns" in check.stderr and 'hooks.user = "root"' in check.stderr
    run = subprocess.run([str(BIN / "maintd"), "run", "--config", str(app.config), "--log-format", "json"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "hooks and restart.command would run as root" in run.stderr
    app.write_config('[hooks]\nbefore_swap = [["sh", "-c", "id -u > ../../shared/uid"]]\n', hooks_user="root")
    daemon = start_daemon()
    app.make_release("r1")
    assert daemon.deployed("r1")["result"] == "ok"
    assert (app.shared / "uid").read_text().strip() == "0"  # root, because the config says so


def test_a_reload_that_would_run_hooks_as_root_unsaid_is_refused(app, start_daemon):
    daemon = start_daemon()
    app.write_config('[hooks]\nafter_swap = [["true"]]\n', hooks_user=None)
    mark = daemon.mark()
    daemon.proc.send_signal(1)
    refused = daemon.wait_for(since=mark, event=lambda e: e.startswith("reload refused"))
    assert "hooks.user is not set and root owns" in refused["event"]


def test_a_release_whose_tmp_leads_out_of_the_tree_gets_nothing_written_there(deploy_app, deploy_user,
                                                                               start_daemon, tmp_path):
    """maintd runs as root: following an uploader's symlink would let it write wherever root may."""
    app = deploy_app
    elsewhere = tmp_path / "another-apps-tree"
    elsewhere.mkdir()
    app.write_config(hooks_user=None)
    daemon = start_daemon(on=app)
    upload(app, deploy_user, "r1")
    assert daemon.deployed("r1")["result"] == "ok"
    staging = app.releases / ".incoming-r3"
    make_source(staging, 3, "r3")
    (staging / "tmp").symlink_to(elsewhere)
    (staging / ".maintd-ready").touch()
    staging.rename(app.releases / "r3")
    failed = daemon.deployed("r3")
    assert failed["result"] == "failed" and "leads out of" in failed["event"]
    assert list(elsewhere.iterdir()) == [] and app.live() == "r1"


@pytest.mark.parametrize("user", ["nobody-such-user"])
def test_hooks_user_that_does_not_exist_is_named(app, user):
    app.write_config('[hooks]\nbefore_swap = [["true"]]\n', hooks_user=user)
    check = maintd_check(app)
    assert check.returncode == 1 and f"hooks.user names no user on this machine: '{user}'" in check.stderr


FAILING = """#!/bin/sh
# A migration that fails as they do: a page of output, the reason at the end, on stderr, with a terminal colour code.
seq 1 50
echo "== 20261123 AddIndexToOrders: migrating" >&2
echo "rake aborted!" >&2
printf '\\033[31mPG::UndefinedTable: relation "orders" does not exist\\033[0m\\n' >&2
exit 1
"""


@pytest.mark.parametrize("config, step", [
    ('[hooks]\nbefore_swap = [["bin/probe"]]\n', "hooks_before"),
    ('[restart]\nmethod = "command"\ncommand = ["bin/probe"]\n', "restart"),
])
def test_a_failing_command_says_why_in_the_message_an_operator_reads(deploy_app, deploy_user, start_daemon, config,
                                                                     step):
    """`journalctl -u maintd@shop` shows MESSAGE only: "exited with status 1" alone sends the operator hunting for
    `-o verbose`. The message quotes the last lines, bounded and with control characters escaped; the whole output
    stays in its own field (MAINTD_OUTPUT)."""
    app = deploy_app
    app.write_config(config, hooks_user=None)
    daemon = start_daemon(on=app)
    upload(app, deploy_user, "r1", FAILING)
    daemon.deployed("r1")
    failed = next(e for e in daemon.events if e.get("step") == step and e.get("result") == "failed")
    said = failed["event"].partition("bin/probe exited with status 1: ")[2]
    assert said == ('== 20261123 AddIndexToOrders: migrating | rake aborted! | '
                    '\\x1b[31mPG::UndefinedTable: relation "orders" does not exist\\x1b[0m'), failed["event"]
    assert failed["output"].startswith("1\n2\n") and "\x1b[31mPG::" in failed["output"]  # kept whole, as it was


def test_the_quoted_output_is_bounded():
    from maintd.proc import TAIL_CHARS, Ran

    said = Ran(("bin/noisy",), 2, "first\n" + "x" * 5000 + "\rlast\n").describe()
    assert said.startswith("bin/noisy exited with status 2: …x") and said.endswith("x | last")
    assert len(said) == len("bin/noisy exited with status 2: ") + TAIL_CHARS


def test_maintd_check_says_what_a_deploy_would_trip_on(deploy_app, deploy_user):
    """Who hooks run as (even before there are any), the releases there and the live one, and each shared path a
    deploy would fail to link: warnings (exit 0), for the tree may still be made ready; the config is fine."""
    app = deploy_app
    app.write_config('[shared]\nfiles = ["config/database.yml"]\ndirs = ["log", "public/uploads"]\n', hooks_user=None)
    (app.shared / "log").mkdir()
    for name in ("20261120090000", "20261123090000"):
        upload(app, deploy_user, name)
    (app.releases / ".incoming-20261124090000").mkdir()  # an upload under way is no release
    (app.root / "current").symlink_to("releases/20261120090000")
    done = maintd_check(app)
    assert done.returncode == 0, done.stderr
    user = f"{deploy_user.pw_name} (uid {deploy_user.pw_uid}, the owner of {app.releases})"
    assert f"hooks and restart.command: none configured; they would run as {user}\n" in done.stdout
    assert (f"releases in {app.releases}: 20261120090000, 20261123090000; live: 20261120090000\n"
            in done.stdout), done.stdout
    assert done.stderr.splitlines() == [
        f"maintd: warning: shared.{rel}: missing from {app.shared}/, so every deploy fails at link_shared; "
        "create it there" for rel in ("dirs public/uploads", "files config/database.yml")]
    app.write_config('[hooks]\nbefore_swap = [["bin/migrate"]]\n', hooks_user=None)
    assert f"hooks and restart.command run as {user}\n" in maintd_check(app).stdout


def test_maintd_check_on_a_root_owned_tree_without_hooks_says_what_adding_one_needs(app):
    app.write_config(hooks_user=None)
    done = maintd_check(app)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (f"hooks and restart.command: none configured; root owns {app.releases}, so adding one needs hooks.user"
            in done.stdout)
    assert f"releases in {app.releases}: none yet; live: none" in done.stdout
