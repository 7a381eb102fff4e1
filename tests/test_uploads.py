"""Uploads the way people make them, into a real `maintd run`: rsync, scp over a real sshd, slow writers, cut
transfers, bad names. What must never go live is watched for over a window longer than the quiet period, while a
later, good upload proves the daemon kept working."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Sshd, make_source, rsync, wait_until

QUIET = 0.5
# For transfers throttled with --bwlimit / -l: rsync and scp pause between bursts for longer than half a second, and
# a pause longer than the quiet period *is* "nothing changed" by the contract's rule. Real deployments use 5 s.
SLOW_QUIET = 2.0


def test_rsync_of_thousands_of_files_goes_live_on_its_marker(app, start_daemon, tmp_path):
    app.write_config(quiet_period=60)  # only the marker can complete it within the test's patience
    daemon = start_daemon()
    src = make_source(tmp_path / "src", 3000, "r1")
    rsync(src, app.releases / "r1")
    (tmp_path / "marker" / ".maintd-ready").parent.mkdir()
    (tmp_path / "marker" / ".maintd-ready").touch()
    rsync(tmp_path / "marker", app.releases / "r1")
    done = daemon.deployed("r1", timeout=30)
    assert done["result"] == "ok" and app.live() == "r1"
    steps = [e["step"] for e in daemon.steps(done["deploy_id"])]
    assert steps[:11] == ["validate", "link_shared", "maintenance_on", "hooks_before", "swap", "restart", "flush",
                          "health", "hooks_after", "maintenance_off", "cleanup"]
    assert {e["actor"] for e in daemon.steps(done["deploy_id"])} == {"upload"}


def test_rsync_without_marker_goes_live_after_the_quiet_period(app, start_daemon, tmp_path):
    daemon = start_daemon()
    rsync(make_source(tmp_path / "src", 500, "r1"), app.releases / "r1")
    assert daemon.deployed("r1")["result"] == "ok"
    assert (app.current / "REVISION").read_text() == "r1\n"


def test_rsync_with_delay_updates_goes_live_after_the_quiet_period(app, start_daemon, tmp_path):
    """rsync removes its staging directory `.~tmp~` at the end of a transfer that went well: no break-off."""
    daemon = start_daemon()
    rsync(make_source(tmp_path / "src", 300, "r1"), app.releases / "r1", "--delay-updates")
    assert daemon.deployed("r1")["result"] == "ok"


def test_a_slow_writer_is_not_deployed_before_it_finishes(app, start_daemon):
    app.write_config(quiet_period=1.0)
    daemon = start_daemon()
    release = app.releases / "r1"
    release.mkdir()
    for i in range(8):  # the writer's own pace: pauses shorter than the quiet period
        if i:
            time.sleep(0.3)
        (release / f"part{i}.txt").write_text("x" * 1000)
    last_write = time.time()
    complete = daemon.wait_for(event="upload of release r1 is complete (8 files)")
    assert daemon.deployed("r1")["result"] == "ok"
    # ordering, not speed: completion came a full quiet period after the last write (less ctime's tick)
    assert _epoch(complete["timestamp"]) >= last_write + 1.0 - 0.02


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def slow_rsync(src: Path, dest: Path) -> subprocess.Popen:
    return subprocess.Popen(["rsync", "-a", "--bwlimit=300", f"{src}/", f"{dest}/"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def big_source(path: Path, name: str) -> Path:
    make_source(path, 20, name)
    for i in range(6):
        (path / "app" / f"blob{i}.bin").write_bytes(os.urandom(200_000))
    return path


def assert_never_live(app, daemon, name: str, tmp_path: Path) -> None:
    """Watch for well past the quiet period; then a good upload goes live, proving the daemon was awake."""
    time.sleep(SLOW_QUIET * 2.5)  # the window in which the cut upload must not go live: nothing to await but time
    app.make_release("good")
    assert daemon.deployed("good")["result"] == "ok"
    assert not [e for e in daemon.events if e.get("release") == name and e.get("step") == "swap"]
    assert app.live() == "good"


def cut_rsync_client(app, daemon, src: Path, name: str) -> None:
    """An rsync whose client alone is killed half-way: its receiver deletes the temporary file it was writing, and
    what is left looks quiet and tidy. Returns once maintd has said that the upload broke off."""
    rsync_proc = slow_rsync(src, app.releases / name)
    wait_until(lambda: list((app.releases / name).rglob(".blob*")), 20, "rsync writing a blob")
    # A break before maintd's watch reaches the directory being written cannot be seen (inotify has no past).
    wait_until(lambda: daemon.watches(app.releases / name / "app"), 20, "maintd watching the upload")
    os.kill(rsync_proc.pid, signal.SIGKILL)  # the client alone: its receiver cleans up after it
    rsync_proc.wait()
    daemon.wait_for(release=name, event=lambda e: "broke off" in e)


def test_rsync_client_killed_alone_is_never_deployed(app, start_daemon, tmp_path):
    """The deletion of the temporary file is the only clue."""
    app.write_config(quiet_period=SLOW_QUIET)
    daemon = start_daemon()
    cut_rsync_client(app, daemon, big_source(tmp_path / "src", "cut"), "cut")
    wait_until(lambda: not list((app.releases / "cut").rglob(".blob*")), 10, "the receiver's clean-up")
    assert_never_live(app, daemon, "cut", tmp_path)


def test_a_reload_to_quiet_period_mode_watches_for_breaks_from_then_on(app, start_daemon, tmp_path):
    """Started with require_marker = true (no deep watches), reloaded to false: a cut rsync must be seen as cut."""
    app.write_config(quiet_period=SLOW_QUIET, upload="require_marker = true")
    daemon = start_daemon()
    app.write_config(quiet_period=SLOW_QUIET, upload="require_marker = false")
    daemon.reload()
    cut_rsync_client(app, daemon, big_source(tmp_path / "src", "cut"), "cut")
    assert_never_live(app, daemon, "cut", tmp_path)


def test_a_reload_to_another_marker_is_followed_by_the_watcher(app, start_daemon, tmp_path):
    """An upload under way at the reload, and one after it, both complete by the new marker alone."""
    app.write_config(upload="require_marker = true")
    daemon = start_daemon()
    app.make_release("r1", marker=False)
    wait_until(lambda: daemon.watches(app.releases / "r1"), 20, "maintd watching the upload")
    app.write_config(upload='require_marker = true\nmarker = ".go-live"')
    daemon.reload()
    (app.releases / "r1" / ".go-live").touch()
    assert daemon.deployed("r1")["result"] == "ok"
    app.make_release("r2", marker=False)
    (app.releases / "r2" / ".go-live").touch()
    assert daemon.deployed("r2")["result"] == "ok"
    assert app.live() == "r2"


def test_a_broken_rsync_resumed_to_the_end_goes_live(app, start_daemon, tmp_path):
    """Written to again deep in the tree (the blobs are in app/), then quiet: the break is over."""
    app.write_config(quiet_period=SLOW_QUIET)
    daemon = start_daemon()
    src = big_source(tmp_path / "src", "resumed")
    rsync_proc = slow_rsync(src, app.releases / "resumed")
    wait_until(lambda: list((app.releases / "resumed").rglob(".blob*")), 20, "rsync writing a blob")
    wait_until(lambda: daemon.watches(app.releases / "resumed" / "app"), 20, "maintd watching the upload")
    os.kill(rsync_proc.pid, signal.SIGKILL)
    rsync_proc.wait()
    broke = daemon.wait_for(release="resumed", event=lambda e: "broke off" in e)
    rsync(src, app.releases / "resumed")
    done = daemon.deployed("resumed")
    assert done["result"] == "ok" and app.live() == "resumed"
    assert daemon.events.index(broke) < daemon.events.index(done)
    assert sorted(p.name for p in (app.current / "app").glob("blob*")) == [f"blob{i}.bin" for i in range(6)]


def test_whole_rsync_killed_leaves_a_temporary_and_is_never_deployed(app, start_daemon, tmp_path):
    app.write_config(quiet_period=SLOW_QUIET)
    daemon = start_daemon()
    rsync_proc = slow_rsync(big_source(tmp_path / "src", "cut"), app.releases / "cut")
    wait_until(lambda: list((app.releases / "cut").rglob(".blob*")), 20, "rsync writing a blob")
    os.killpg(rsync_proc.pid, signal.SIGKILL)
    rsync_proc.wait()
    daemon.wait_for(release="cut", event=lambda e: "temporary file left" in e or "broke off" in e)
    assert_never_live(app, daemon, "cut", tmp_path)


def test_manifest_that_does_not_verify_is_refused_and_left_in_place(app, start_daemon):
    daemon = start_daemon()
    staging = app.releases / ".incoming-r1"
    make_source(staging, 10, "r1")
    (staging / ".maintd-manifest").write_text(f"{'0' * 64}  ./REVISION\n")
    (staging / ".maintd-ready").touch()
    staging.rename(app.releases / "r1")
    refused = daemon.wait_for(release="r1", result="refused")
    assert "REVISION does not match" in refused["event"]
    assert (app.releases / "r1" / "REVISION").exists() and app.live() is None


def test_bad_entries_are_refused_and_nothing_else_is_touched(app, start_daemon, tmp_path):
    app.make_release("r1")
    daemon = start_daemon()
    daemon.deployed("r1")
    before = sorted(p.name for p in (app.releases / "r1").rglob("*"))
    app.make_release("a b")
    (app.releases / "notes.txt").write_text("not a release")
    (tmp_path / "elsewhere").mkdir()
    (app.releases / "link").symlink_to(tmp_path / "elsewhere")
    app.make_release(".hidden")
    for name in ("a b", "notes.txt", "link"):
        assert daemon.wait_for(release=name, result="refused")
    app.make_release("r2")
    assert daemon.deployed("r2")["result"] == "ok"
    assert not [e for e in daemon.events if e.get("release") == ".hidden"]
    assert sorted(p.name for p in (app.releases / "r1").rglob("*")) == before
    assert (app.releases / "a b").is_dir() and (app.releases / "notes.txt").is_file()


def test_startup_deploys_only_marked_newer_never_live_releases(app, start_daemon):
    app.make_release("r2")
    daemon = start_daemon()
    daemon.deployed("r2")
    daemon.stop()
    app.make_release("r1")  # older by name than live
    app.make_release("r3", marker=False)  # may have been cut off while maintd was down
    app.make_release("r4")  # marked and newer: goes live
    daemon = start_daemon()
    assert daemon.deployed("r4")["result"] == "ok"
    assert not [e for e in daemon.events if e.get("step") == "swap" and e.get("release") in ("r1", "r3")]


def test_newest_of_several_complete_uploads_wins_others_left_alone(app, start_daemon):
    app.write_config(f'[hooks]\nbefore_swap = [{app.gate.hook()}]\n')
    daemon = start_daemon()
    app.make_release("r1")
    app.gate.wait_entered()
    for name in ("r2", "r4", "r3"):  # arrive while r1 deploys
        app.make_release(name)
        daemon.wait_for(release=name, event=lambda e, name=name: e.startswith(f"upload of release {name} is complete"))
    app.gate.open()
    assert daemon.deployed("r1")["result"] == "ok"
    assert daemon.deployed("r4")["result"] == "ok"
    for name in ("r2", "r3"):
        assert daemon.wait_for(release=name, event=lambda e: "left alone" in e)
    assert app.live() == "r4"


# --- over ssh ---------------------------------------------------------------------------------------------------


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()


def test_rsync_over_ssh_goes_live(app, start_daemon, sshd, tmp_path):
    daemon = start_daemon()
    src = make_source(tmp_path / "src", 300, "r1")
    (src / ".maintd-ready").touch()
    ssh = " ".join(["ssh", "-p", str(sshd.port), *sshd.ssh])
    subprocess.run(["rsync", "-a", "-e", ssh, f"{src}/", f"root@127.0.0.1:{app.releases}/r1/"], check=True)
    assert daemon.deployed("r1")["result"] == "ok"


def test_scp_r_goes_live(app, start_daemon, sshd, tmp_path):
    daemon = start_daemon()
    src = make_source(tmp_path / "r1", 200, "r1")
    sshd.scp("-r", str(src), f"root@127.0.0.1:{app.releases}/")
    assert daemon.deployed("r1")["result"] == "ok"


def test_scp_cut_half_way_with_manifest_first_is_never_deployed(app, start_daemon, sshd, tmp_path):
    """scp writes in place and leaves no trace of a cut; the manifest sent first is what catches it."""
    app.write_config(quiet_period=SLOW_QUIET)
    daemon = start_daemon()
    src = big_source(tmp_path / "src", "cut")
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    manifest = subprocess.run(["sha256sum", *names], cwd=src, check=True, capture_output=True).stdout
    sshd.run(f"mkdir -p {app.releases}/cut")
    (tmp_path / ".maintd-manifest").write_bytes(manifest)
    sshd.scp(str(tmp_path / ".maintd-manifest"), f"root@127.0.0.1:{app.releases}/cut/")
    cut = sshd.scp("-l", "2000", "-r", *(str(p) for p in src.iterdir()), f"root@127.0.0.1:{app.releases}/cut/",
                   wait=False)
    wait_until(lambda: (app.releases / "cut" / "app" / "blob1.bin").exists(), 30, "scp half-way")
    cut.kill()
    cut.wait()
    refused = daemon.wait_for(release="cut", result="refused")
    assert "manifest does not verify" in refused["event"]
    assert_never_live(app, daemon, "cut", tmp_path)
