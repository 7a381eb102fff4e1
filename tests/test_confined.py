"""maintd writes as root into release trees an unprivileged uploader controls (issue #20): nothing it makes may land,
be written or be chowned outside the app's tree, whatever symlinks the upload holds, and what it makes in a release
is the release owner's. Real trees owned by a real user, the real pipeline run in-process as root."""

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import App, make_source, public_dir, run_deploy
from maintd.confined import Confined, PathRefused
from maintd.maintenance import Notice
from maintd.tree import Tree

FLAG = "tmp/flags/maintenance.txt"
SHARED = '[shared]\nfiles = ["config/deep/database.yml"]\ndirs = ["log"]\n'
CONFIG = f'[maintenance]\nfile = "{FLAG}"\n{SHARED}'
NO_MAINTENANCE = f'[maintenance]\nfile = "{FLAG}"\nwhen = "never"\n{SHARED}'


def snapshot(top: Path) -> dict[str, tuple]:
    """Everything under `top` (itself included) as lstat and content see it: equal before and after means that
    nothing was created, written, removed or chowned there."""
    seen = {}
    for path in [top, *sorted(top.rglob("*"))]:
        info = os.lstat(path)
        body = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else b""
        seen[str(path.relative_to(top))] = (info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns, body)
    return seen


def upload(app: App, owner, name: str, plant: Callable[[Path], None] = lambda release: None) -> Path:
    """A release as its uploader leaves it (staged, owned by them, renamed into place), with `plant` done to it."""
    staging = app.releases / f".incoming-{name}"
    make_source(staging, 3, name)
    (staging / "tmp").mkdir()
    plant(staging)
    subprocess.run(["chown", "-hR", f"{owner.pw_uid}:{owner.pw_gid}", str(staging)], check=True)
    staging.rename(app.releases / name)
    return app.releases / name


def shared_files(app: App, owner) -> None:
    for rel, text in (("config/deep/database.yml", "production: {}\n"), ("log/app.log", "")):
        (app.shared / rel).parent.mkdir(parents=True, exist_ok=True)
        (app.shared / rel).write_text(text)
    subprocess.run(["chown", "-R", f"{owner.pw_uid}:{owner.pw_gid}", str(app.shared)], check=True)


@pytest.fixture(params=["another-apps-tree", "home"])
def outside(request, deploy_user):
    """Where an uploader's symlink points: another app's tree (root's here), or the uploader's own home."""
    if request.param == "home":
        top = Path(deploy_user.pw_dir)
    else:
        top = public_dir("maintd-other-app-")
        (top / "releases" / "x" / "tmp").mkdir(parents=True)
    (top / "victim.txt").write_text("someone else's\n")
    (top / "tmp").mkdir()
    yield top
    for made in (top, ) if request.param != "home" else (top / "victim.txt", top / "tmp", top / "r1"):
        subprocess.run(["rm", "-rf", str(made)], check=True)


def link(release: Path, rel: str, target: Path, relative: bool = False) -> None:
    """Make `rel` in the release a symlink to `target` as given (relative=True: computed, climbing out with `..`)."""
    path = release / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    path.symlink_to(os.path.relpath(target, path.parent) if relative else target)


def temp_name(rel: str) -> str:
    """The temporary name write_atomically used beside `rel`: `.<name>.<pid>.tmp`, predictable by anyone."""
    head, name = os.path.split(rel)
    return f"{head}/.{name}.{os.getpid()}.tmp"


# (what the uploader plants, the config, the step that must refuse it or None when the release goes live)
CASES = {
    "tmp-dir": (lambda r, o: link(r, "tmp", o / "tmp"), CONFIG, "maintenance_on"),
    "tmp-dir-climbing-out": (lambda r, o: link(r, "tmp", o / "tmp", relative=True), CONFIG, "maintenance_on"),
    "flag-dir": (lambda r, o: link(r, "tmp/flags", o / "tmp"), CONFIG, "maintenance_on"),
    "flag-file": (lambda r, o: link(r, FLAG, o / "victim.txt"), CONFIG, None),
    "page-file": (lambda r, o: link(r, "tmp/flags/maintenance.html", o / "victim.txt"), CONFIG, None),
    "flag-temp-name": (lambda r, o: link(r, temp_name(FLAG), o / "victim.txt"), CONFIG, None),
    "page-temp-name": (lambda r, o: link(r, temp_name("tmp/flags/maintenance.html"), o / "victim.txt"), CONFIG, None),
    "restart-file": (lambda r, o: link(r, "tmp/restart.txt", o / "victim.txt"), CONFIG, None),
    "restart-dir": (lambda r, o: link(r, "tmp", o / "tmp"), NO_MAINTENANCE, "restart"),
    "shared-link-parent": (lambda r, o: link(r, "config", o / "tmp"), CONFIG, "link_shared"),
    "shared-link-file": (lambda r, o: link(r, "config/deep/database.yml", o / "victim.txt"), CONFIG, None),
    "shared-link-dir": (lambda r, o: link(r, "log", o / "tmp"), CONFIG, None),
}


@pytest.mark.parametrize("case", CASES)
def test_no_symlink_in_an_upload_gets_root_to_write_outside_the_tree(deploy_app, deploy_user, outside, case):
    plant, config, refused_at = CASES[case]
    app = deploy_app
    shared_files(app, deploy_user)
    upload(app, deploy_user, "r1")
    assert run_deploy(app, "r1", CONFIG)[0].result == "ok"
    live_before = snapshot(app.releases / "r1")
    release = upload(app, deploy_user, "r2", lambda r: plant(r, outside))
    before = snapshot(outside)

    outcome, _, ctx = run_deploy(app, "r2", config)

    assert snapshot(outside) == before
    if refused_at is None:
        assert outcome.result == "ok" and app.live() == "r2"
        for rel in (FLAG, "tmp/flags/maintenance.html", "tmp/restart.txt"):
            if rel != FLAG:  # the flag is gone again after the deploy
                assert stat.S_ISREG(os.lstat(release / rel).st_mode), rel
        assert (release / "config/deep/database.yml").read_text() == "production: {}\n"
        return
    failed = next(r for r in outcome.steps if r.result == "failed")
    assert failed.step == refused_at and "leads out of" in failed.message
    assert outcome.fault == "release" and ctx.store.memory.releases["r2"].bad  # the release's own doing
    assert str(release) in failed.message  # names the path
    assert app.live() == "r1" and not (app.releases / "r1" / FLAG).exists()
    if refused_at != "restart":  # a refused restart comes after the swap: the rollback restarts r1, as it must
        assert snapshot(app.releases / "r1") == live_before


def owned_by(path: Path, user) -> bool:
    info = os.lstat(path)
    return (info.st_uid, info.st_gid) == (user.pw_uid, user.pw_gid)


def test_what_maintd_makes_in_a_release_is_the_release_owners(deploy_app, deploy_user):
    """Directories, the flag, the page, restart.txt and the shared links: the app's user must be able to replace
    them (its own `touch tmp/restart.txt`, a cleanup of tmp/), and root owning them there helps nobody."""
    app = deploy_app
    shared_files(app, deploy_user)
    for name in ("r1", "r2"):
        release = upload(app, deploy_user, name)
        (release / "tmp").rmdir()  # maintd makes it
        outcome, _, ctx = run_deploy(app, name, CONFIG)
        assert outcome.result == "ok"
    ctx.flags.raise_in(app.releases / "r2", Notice("checking", "now", "alice"))
    made = [FLAG, "tmp/flags/maintenance.html", "tmp/flags", "tmp", "config/deep/database.yml", "config/deep",
            "log"]
    for rel in [f"r2/{rel}" for rel in made] + ["r1/tmp/flags/maintenance.html", "r1/tmp/restart.txt",
                                                "r2/tmp/restart.txt"]:
        assert owned_by(app.releases / rel, deploy_user), rel
    assert (app.releases / "r2" / "log").is_symlink() and (app.releases / "r2" / "config/deep").is_dir()


def test_links_inside_the_tree_are_followed_and_what_is_made_there_is_the_owners(deploy_app, deploy_user):
    """`tmp` linked into shared/ (relative, or absolute as Capistrano links) stays inside the tree: the flag goes
    there; a link looping on itself is refused rather than followed forever."""
    app = deploy_app
    (app.shared / "tmp").mkdir()
    os.chown(app.shared / "tmp", deploy_user.pw_uid, deploy_user.pw_gid)
    for name, target in (("r1", "../../shared/tmp"), ("r2", str(app.shared / "tmp"))):
        upload(app, deploy_user, name, lambda r, t=target: link(r, "tmp", Path(t)))
        with Confined.open(app.root, app.releases / name) as top, top.dir("tmp/flags", create=True) as flags:
            flags.write("maintenance.txt", name)
            assert flags.names == ["shared", "tmp", "flags"]
        assert (app.shared / "tmp/flags/maintenance.txt").read_text() == name
    assert owned_by(app.shared / "tmp/flags", deploy_user) and owned_by(app.shared / "tmp/flags/maintenance.txt",
                                                                        deploy_user)
    upload(app, deploy_user, "r3", lambda r: link(r, "tmp", Path("tmp")))
    with pytest.raises(PathRefused, match="too many symlinks"), Confined.open(app.root, app.releases / "r3") as top:
        top.dir("tmp/flags", create=True)


def test_revisions_log_is_never_appended_through_a_link(deploy_app, deploy_user, outside):
    """`<root>` is the uploader's: revisions.log may be their symlink or hard link to a file root must not touch."""
    app = deploy_app
    tree = Tree(app.root)
    victim = outside / "victim.txt"
    os.chown(victim, deploy_user.pw_uid, deploy_user.pw_gid)  # a hard link needs a file its maker owns
    before = snapshot(outside)
    tree.revisions.symlink_to(victim)
    assert "could not append" in tree.append_revision("Branch main deployed as release r1 by alice")
    tree.revisions.unlink()
    os.link(victim, tree.revisions)
    assert "not a plain file of its own" in tree.append_revision("Branch main deployed as release r1 by alice")
    tree.revisions.unlink()
    os.mkfifo(tree.revisions)  # nobody reads it: an append must not hang the daemon
    assert "could not append" in tree.append_revision("Branch main deployed as release r1 by alice")
    tree.revisions.unlink()
    assert snapshot(outside) == before
    assert tree.append_revision("Branch main deployed as release r1 by alice") is None
    assert tree.revisions.read_text() == "Branch main deployed as release r1 by alice\n"


def test_cleanup_never_removes_through_a_releases_link(deploy_app, outside):
    """An uploader who owns `<root>` points `releases` elsewhere just before the cleanup removes a release."""
    app = deploy_app
    tree = Tree(app.root)
    (outside / "r1").mkdir()
    (outside / "r1" / "keep").write_text("keep\n")
    before = snapshot(outside)
    app.releases.rmdir()
    app.releases.symlink_to(outside)
    with pytest.raises(PathRefused, match="not a real directory"):
        tree.remove("r1")
    assert snapshot(outside) == before


# A walk with the process out of descriptors (the starvation of issue #20, which the daemon outlives), in a child
# with a low limit: every descriptor taken but `free`, so that the walk's first copies are made and a later one fails.
WALK_OUT_OF_DESCRIPTORS = """
import errno, os, resource, sys
from pathlib import Path
from maintd.confined import Confined

root, walk, free = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
top = Confined.open(root, root / "releases" / "r1")  # a chain of three descriptors
before = len(os.listdir("/proc/self/fd"))
fillers = []
try:
    while True:
        fillers.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    assert exc.errno == errno.EMFILE
for _ in range(free):
    os.close(fillers.pop())
failed = ""
try:
    top.dir("tmp").close() if walk == "dir" else top.files()
except OSError as exc:
    failed = os.strerror(exc.errno)
for fd in fillers:
    os.close(fd)
print(failed, len(os.listdir("/proc/self/fd")) - before)
"""


@pytest.mark.parametrize("walk, free", [("dir", 2), ("files", 1)])
def test_a_walk_cut_short_by_emfile_leaks_no_descriptor(app, walk, free):
    """Every walk (the flag, restart.txt, the manifest's files, a rescan's `Tree.uploaded`) first copies the
    descriptors it starts from: `dir` its chain of three (two copies made here, the third refused), `files` its top
    (made, then its listing refused). The copies made before the refusal used to stay open, so that a shortage of
    descriptors outlived its cause, one walk at a time. A real EMFILE: the walk fails with it and holds nothing."""
    (app.releases / "r1" / "tmp").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", WALK_OUT_OF_DESCRIPTORS, str(app.root), walk, str(free)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    failed, leaked = done.stdout.strip().rsplit(" ", 1)
    assert failed == os.strerror(errno.EMFILE), f"the walk did not meet EMFILE ({failed!r}): no shortage reproduced"
    assert int(leaked) == 0, f"{leaked} descriptor(s) still open after a walk that failed with {failed}"
