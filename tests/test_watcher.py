"""The watcher without its thread: real inotify, real rsync, real files; `read_batch` called by the test, so nothing
waits on timing. What it must tell the daemon: releases appearing and going, the marker, activity (once in a while),
a broken-off rsync, and lost events."""

import os
import select
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import make_source, rsync, wait_until
from maintd.watcher import Change, ChangeKind, ReleaseWatcher

MARKER = ".maintd-ready"


@pytest.fixture
def releases(tmp_path):
    path = tmp_path / "releases"
    path.mkdir()
    return path


@pytest.fixture
def watcher(releases):
    watcher = ReleaseWatcher(releases, MARKER, recursive_uploads=True, deliver=lambda change: None,
                             on_error=lambda exc: None)
    yield watcher
    watcher.stop()


def kernel_watches(watcher: ReleaseWatcher) -> set[str]:
    """The inodes the kernel watches for this instance, in hex, from /proc."""
    info = Path(f"/proc/self/fdinfo/{watcher._fd}").read_text()
    return {field.split(":")[1] for line in info.splitlines() if line.startswith("inotify")
            for field in line.split() if field.startswith("ino:")}


def inode(path: Path) -> str:
    return f"{os.stat(path).st_ino:x}"


def drain(watcher: ReleaseWatcher) -> list[Change]:
    """Everything queued, read as the thread would (a batch of rate-limited activity can be empty)."""
    changes = []
    while select.select([watcher._fd], [], [], 0)[0]:
        changes += watcher.read_batch()
    return changes


def new_release(watcher: ReleaseWatcher, path: Path) -> None:
    """A release directory, made and followed as the daemon would: its appearance read first."""
    path.mkdir()
    assert drain(watcher) == [Change(ChangeKind.APPEARED, path.name)]
    watcher.watch(path.name)


def test_releases_appearing_and_going(watcher, releases):
    (releases / ".incoming-r1").mkdir()
    (releases / ".incoming-r1").rename(releases / "r1")
    (releases / "r2").mkdir()
    (releases / "r2").rmdir()
    (releases / "stray.txt").write_text("x")
    assert drain(watcher) == [Change(ChangeKind.APPEARED, ".incoming-r1"), Change(ChangeKind.GONE, ".incoming-r1"),
                              Change(ChangeKind.APPEARED, "r1"), Change(ChangeKind.APPEARED, "r2"),
                              Change(ChangeKind.GONE, "r2"), Change(ChangeKind.APPEARED, "stray.txt")]


def test_an_rsync_upload_is_followed_into_every_directory_and_is_activity_once(watcher, releases, tmp_path):
    src = make_source(tmp_path / "src", 600, "r1")
    new_release(watcher, releases / "r1")
    rsync(src, releases / "r1")
    changes = drain(watcher)
    assert changes == [Change(ChangeKind.ACTIVITY, "r1")]  # 600 files: within ACTIVITY_EVERY, passed on once
    dirs = {inode(Path(d)) for d, _, _ in os.walk(releases / "r1")}
    assert dirs | {inode(releases)} == kernel_watches(watcher)


def test_marker_written_or_renamed_into_place(watcher, releases):
    for name in ("r1", "r2"):
        new_release(watcher, releases / name)
    (releases / "r1" / MARKER).touch()
    (releases / "r2" / ".staged").touch()
    (releases / "r2" / ".staged").rename(releases / "r2" / MARKER)
    changes = drain(watcher)
    assert Change(ChangeKind.MARKER, "r1") in changes and Change(ChangeKind.MARKER, "r2") in changes
    (releases / "r1" / "sub").mkdir()
    (releases / "r1" / "sub" / MARKER).touch()  # not at the top: not the marker
    assert ChangeKind.MARKER not in {c.kind for c in drain(watcher)}


def test_a_deleted_rsync_temporary_deep_in_a_new_directory_is_a_break(watcher, releases):
    new_release(watcher, releases / "r1")
    deep = releases / "r1" / "app" / "models"
    deep.mkdir(parents=True)  # made before the watcher read anything: found by its walk of app/
    drain(watcher)
    temp = deep / ".user.rb.Ab12xZ"
    temp.write_text("half")
    temp.unlink()
    changes = drain(watcher)
    assert changes[-1] == Change(ChangeKind.TEMP_DELETED, "r1")
    (deep / "user.rb").write_text("again")  # the upload resumed: passed on at once, after the break
    assert drain(watcher) == [Change(ChangeKind.ACTIVITY, "r1")]


def test_a_client_killed_rsync_is_a_break(watcher, releases, tmp_path):
    src = make_source(tmp_path / "src", 20, "r1")
    (src / "big.bin").write_bytes(os.urandom(64 << 20))
    new_release(watcher, releases / "r1")
    rsync_client = subprocess.Popen(["rsync", "-a", "--bwlimit=4000", f"{src}/", f"{releases}/r1/"])
    wait_until(lambda: any(p.name.startswith(".big.bin.") for p in (releases / "r1").iterdir()))
    rsync_client.send_signal(signal.SIGKILL)
    rsync_client.wait()
    wait_until(lambda: not any(p.name.startswith(".big.bin.") for p in (releases / "r1").iterdir()))
    assert Change(ChangeKind.TEMP_DELETED, "r1") in drain(watcher)


def test_rsync_delay_updates_that_finished_is_no_break(watcher, releases, tmp_path):
    """Its `.~tmp~` staging directory is removed, empty, when the transfer went well."""
    src = make_source(tmp_path / "src", 50, "r1")
    new_release(watcher, releases / "r1")
    rsync(src, releases / "r1", "--delay-updates")
    changes = drain(watcher)
    assert changes and {c.kind for c in changes} == {ChangeKind.ACTIVITY}


def test_a_release_in_marker_mode_is_watched_at_its_top_only(releases, tmp_path):
    watcher = ReleaseWatcher(releases, MARKER, recursive_uploads=False, deliver=lambda change: None,
                             on_error=lambda exc: None)
    try:
        new_release(watcher, releases / "r1")
        rsync(make_source(tmp_path / "src", 100, "r1"), releases / "r1")
        assert kernel_watches(watcher) == {inode(releases), inode(releases / "r1")}
        (releases / "r1" / MARKER).touch()
        assert drain(watcher)[-1] == Change(ChangeKind.MARKER, "r1")
    finally:
        watcher.stop()


def test_unwatch_leaves_only_releases_watched(watcher, releases, tmp_path):
    new_release(watcher, releases / "r1")
    rsync(make_source(tmp_path / "src", 100, "r1"), releases / "r1")
    drain(watcher)
    watcher.unwatch("r1")
    assert kernel_watches(watcher) == {inode(releases)}
    (releases / "r1" / "more.txt").write_text("x")
    assert drain(watcher) == []


def test_lost_events_are_an_overflow(watcher, releases):
    """A real overflow: more events queued than the kernel keeps, because nobody read them."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    new_release(watcher, releases / "r1")
    for i in range(limit + 10):
        (releases / "r1" / f"f{i}").touch()
    assert Change(ChangeKind.OVERFLOW) in drain(watcher)


def test_the_thread_delivers_and_stops(releases):
    delivered: list[Change] = []
    watcher = ReleaseWatcher(releases, MARKER, recursive_uploads=True, deliver=delivered.append,
                             on_error=lambda exc: None)
    watcher.start()
    (releases / "r1").mkdir()
    wait_until(lambda: Change(ChangeKind.APPEARED, "r1") in delivered)
    assert watcher.is_alive()
    watcher.stop()
    assert not watcher.is_alive()
