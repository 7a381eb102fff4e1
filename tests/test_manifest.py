"""The manifest as GNU sha256sum writes it and `sha256sum --strict -c` reads it (coreutils 9.1, the one installed):
real releases holding the names Linux allows (a newline, a backslash, a carriage return, bytes that are not UTF-8),
their manifests made by the README's own recipe, and each verdict of maintd checked against sha256sum's."""

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from maintd import manifest
from maintd.config import load
from maintd.context import Context
from maintd.manifest import parse, verify
from maintd.state import Store
from maintd.tree import Tree

MANIFEST, MARKER = ".maintd-manifest", ".maintd-ready"
IGNORE = (MARKER, MANIFEST)
README = Path(__file__).parent.parent / "README.md"
# Names sha256sum must escape, or that only bytes can hold, or that look like the other fields of its lines.
ODD_NAMES = [b"new\nline.txt", b"back\\slash.txt", b"both\\and\nnewline\\", b"caf\xe9.txt", b" spaced out ",
             b"*star", b"carriage\rreturn", b"ends in\r", b"tab\tin", b"sub dir/na\xefve\n\\deep.rb", b"#hash",
             b"SHA256 (x) = y", b"paren) = 00", b"-", b"config/.maintd-manifest", b"REVISION"]


def recipe() -> str:
    """The README's manifest recipe, word for word."""
    lines = [line.strip() for line in README.read_text().splitlines() if "xargs -0 sha256sum" in line]
    assert len(lines) == 1 and lines[0].startswith("(cd build && "), lines
    return lines[0]


def build(base: Path, names: list[bytes]) -> Path:
    """`base/build` with a file of distinct content for each name, the marker at its top, and the README's manifest."""
    top = os.fsencode(base / "build")
    for number, name in enumerate(names):
        path = os.path.join(top, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path, b"file %d: " % number + name)
    write(os.path.join(top, os.fsencode(MARKER)), b"")
    subprocess.run(["sh", "-c", recipe()], cwd=base, check=True)
    return base / "build"


def upload(tree: Tree, source: Path, name: str) -> Path:
    """The release as `cp -a` puts it into releases/, bytes of names and all."""
    subprocess.run(["cp", "-a", f"{source}/.", str(tree.releases / name)], check=True)
    return tree.releases / name


def write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def run_in(release: Path, command: str) -> bytes:
    return subprocess.run(["sh", "-c", command], cwd=release, check=True, capture_output=True).stdout


def sha256sum_accepts(release: Path) -> bool:
    return subprocess.run(["sha256sum", "--strict", "-c", MANIFEST], cwd=release, capture_output=True).returncode == 0


def digest_of(tree: Tree, name: str, ignore: tuple[str, ...]) -> str:
    """The cluster's digest of a release, as `prepare` takes it."""
    with tree.open(name) as top:
        return manifest.digest(top, tree.uploaded(name, ignore))


def maintd_problem(tree: Tree, release: Path) -> str | None:
    with tree.open(release.name) as top:
        return verify(top, MANIFEST, tree.uploaded(release.name, IGNORE))


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    (tmp_path / "srv" / "releases").mkdir(parents=True)
    return Tree(tmp_path / "srv")


@pytest.fixture
def odd(tree: Tree, tmp_path: Path) -> Path:
    """A release holding every odd name, with the README's manifest."""
    return upload(tree, build(tmp_path, ODD_NAMES), "r1")


def test_the_readmes_manifest_of_odd_names_verifies_for_sha256sum_and_maintd(tree, odd):
    data = (odd / MANIFEST).read_bytes()
    assert data.count(b"\n") == len(ODD_NAMES)  # one line each, the marker and the manifest left out
    assert re.search(rb"(?m)^\\[0-9a-f]{64}  \./new\\nline\.txt$", data)  # what the test is about: escapes,
    assert re.search(rb"(?m)^[0-9a-f]{64}  \./caf\xe9\.txt$", data)  # and bytes that are not UTF-8
    assert b"./config/.maintd-manifest\n" in data and MARKER.encode() not in data
    assert sha256sum_accepts(odd)
    assert maintd_problem(tree, odd) is None
    os.unlink(odd / MARKER)  # quiet-period mode: the marker never comes, and the manifest does not want it
    assert sha256sum_accepts(odd) and maintd_problem(tree, odd) is None


@pytest.mark.parametrize("damage, problem, sha256sum_sees_it", [
    (lambda top: write(top + b"/new\nline.txt", b"tampered"),
     '"new\\nline.txt" does not match its sha256 in the manifest', True),
    (lambda top: write(top + b"/sub dir/na\xefve\n\\deep.rb", b"x"),
     '"sub dir/na\\xefve\\n\\\\deep.rb" does not match its sha256 in the manifest', True),
    (lambda top: os.unlink(top + b"/caf\xe9.txt"), '"caf\\xe9.txt" is listed in the manifest but missing', True),
    (lambda top: os.unlink(top + b"/ spaced out "), '" spaced out " is listed in the manifest but missing', True),
    (lambda top: write(top + b"/extra\\\xff\n", b"x"), '"extra\\\\\\xff\\n" is not listed in the manifest', False),
    (lambda top: write(top + b"/sub dir/plain.txt", b"x"), "sub dir/plain.txt is not listed in the manifest", False),
])
def test_a_damaged_release_with_odd_names_is_refused_naming_the_file(tree, odd, damage, problem, sha256sum_sees_it):
    damage(os.fsencode(odd))
    assert maintd_problem(tree, odd) == problem
    assert sha256sum_accepts(odd) is not sha256sum_sees_it  # an extra file is maintd's rule, not sha256sum's


FIND = "find . -type f ! -path ./.maintd-manifest ! -path ./.maintd-ready"
# Every way of writing a manifest that `sha256sum --strict -c` takes: its own modes, and edits people's tools make.
FORMS = {
    "tag": lambda r, data: run_in(r, f"{FIND} -print0 | xargs -0 sha256sum --tag"),
    "binary": lambda r, data: run_in(r, f"{FIND} -print0 | xargs -0 sha256sum -b"),
    # names without ./, so that ' spaced out ' and '*star' follow the mode at once (but `-`, see parse)
    "bare names": lambda r, data: re.sub(rb"(?m)^(\\?[0-9a-f]{64}) ([ *])\./(?!-$)", rb"\1 \2", data),
    "crlf": lambda r, data: data.replace(b"\n", b"\r\n"),
    "comments and empty lines": lambda r, data: b"# made by hand\n\n" + data.replace(b"\n", b"\n\n") + b"#end",
    "no final newline": lambda r, data: data.rstrip(b"\n"),
    "blanks before": lambda r, data: b"".join(b" \t" + line for line in data.splitlines(keepends=True)),
    "upper-case hex": lambda r, data: re.sub(rb"(?m)^(\\?)([0-9a-f]{64})", lambda m: m[1] + m[2].upper(), data),
    "tab after the hash": lambda r, data: re.sub(rb"(?m)^(\\?[0-9a-f]{64}) ", rb"\1\t", data),
    "bsd reversed": lambda r, data: re.sub(rb"(?m)^(\\?[0-9a-f]{64}) ", rb"\1", data),
    "listed twice": lambda r, data: data + data,
}


@pytest.mark.parametrize("form", FORMS)
def test_every_form_sha256sum_checks_is_taken(tree, odd, form):
    data = FORMS[form](odd, (odd / MANIFEST).read_bytes())
    (odd / MANIFEST).write_bytes(data)
    assert sha256sum_accepts(odd), data
    assert maintd_problem(tree, odd) is None


H = hashlib.sha256(b"x").hexdigest()
ZERO = "0" * 64
LINE = f"manifest {MANIFEST} line"


@pytest.fixture
def small(tree: Tree) -> Path:
    """A release of one file, `a`, and a directory, `sub`: its manifest is the test's."""
    release = tree.releases / "r1"
    (release / "sub").mkdir(parents=True)
    (release / "a").write_bytes(b"x")
    return release


@pytest.mark.parametrize("text, problem", [
    (f"{H}  a\n{H} a\n", f"{LINE} 2 is not sha256sum output: `HASH NAME` among `HASH  NAME` lines"),
    (f"\\{H}  a\\t\n", f"{LINE} 1 is not sha256sum output: an escaped name"),
    (f"\\{H}  a\\\n", f"{LINE} 1 is not sha256sum output: an escaped name"),
    (f"\\SHA256 (a\\q) = {H}\n", f"{LINE} 1 is not sha256sum output: an escaped name"),
    (f"{H}  a\n \n", f"{LINE} 2 is not sha256sum output"),
    (f"{H[:63]}  a\n", f"{LINE} 1 is not sha256sum output"),
    (f"# c\n\n{H}0  a\n", f"{LINE} 3 is not sha256sum output"),
    (f" # c\n{H}  a\n", f"{LINE} 1 is not sha256sum output"),
    (f"{H}\n", f"{LINE} 1 is not sha256sum output"),
    (f"{H} \n", f"{LINE} 1 is not sha256sum output"),
    (f"SHA256 (a) = {H} \n", f"{LINE} 1 is not sha256sum output"),
    (f"sha256 (a) = {H}\n", f"{LINE} 1 is not sha256sum output"),
    (f"SHA256  (a) = {H}\n", f"{LINE} 1 is not sha256sum output"),
    (f"SHA1 (a) = {H}\n", f"{LINE} 1 is not sha256sum output"),
    ("", f"manifest {MANIFEST} lists no file"),
    ("# nothing\n\n", f"manifest {MANIFEST} lists no file"),
    (f"{H}  a\r\r\n", '"a\\r" is listed in the manifest but missing'),  # a line end takes one CR, not two
    (f"{ZERO}  a\n{H}  ./a\n", "a does not match its sha256"),  # every line counts, not the last for a name
    (f"{H}  a\n{H}  nothere\n", "nothere is listed in the manifest but missing"),
    (f"{H}  a\n{H}  sub\n", "sub is listed in the manifest but is a directory"),
])
def test_what_sha256sum_refuses_is_refused_with_its_line(tree, small, text, problem):
    (small / MANIFEST).write_text(text)
    assert not sha256sum_accepts(small)
    assert maintd_problem(tree, small).startswith(problem)


@pytest.mark.parametrize("text, problem", [
    (f"{H}  ../r1/a\n", f"{LINE} 1 names a path outside the release"),
    (f"{H}  /etc/hostname\n", f"{LINE} 1 names a path outside the release"),
    (f"SHA256 (sub/../../r1/a) = {H}\n", f"{LINE} 1 names a path outside the release"),
    (f"{H}  ./a\n{H}  -\n", f"{LINE} 2 names `-`, standard input to sha256sum -c"),
    (f"{H}  a\0b\n", f"{LINE} 1 holds a NUL byte"),
])
def test_what_maintd_refuses_beyond_sha256sum(tree, small, text, problem):
    """A path out of the release (contract §1), and two lines `-c` reads as something else than a file of it."""
    (small / MANIFEST).write_text(text)
    assert maintd_problem(tree, small).startswith(problem)


def test_a_listed_file_that_cannot_be_read_is_refused_naming_it(tree, small):
    (small / "loop").symlink_to("loop")
    (small / MANIFEST).write_text(f"{H}  a\n{H}  loop\n")
    assert not sha256sum_accepts(small)
    assert maintd_problem(tree, small) == "loop is listed in the manifest but is a link"


file_names = st.lists(st.binary(min_size=1, max_size=12).filter(lambda n: b"\0" not in n and b"/" not in n
                                                           and n not in (b".", b"..", b"-")),
                 min_size=1, max_size=6, unique=True)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(file_names)
@example([b" lead", b"*star", b"**", b"trail ", b"x)", b"SHA256 (y) = 0", b"ends\r", b"\\", b"\n", b"\xff\xfe"])
def test_any_names_sha256sum_writes_are_read_back_as_it_reads_them(names):
    """Whatever bytes make a file name, each of sha256sum's output forms parses back to exactly that name."""
    with tempfile.TemporaryDirectory() as base:
        top = os.fsencode(base)
        for name in names:
            write(os.path.join(top, name), name)
        for flags in ([], ["-b"], ["--tag"]):
            data = subprocess.run(["sha256sum", *flags, "--", *names], cwd=base, check=True,
                                  capture_output=True).stdout
            assert [entry.name for entry in parse(data)] == names
            assert [entry.digest for entry in parse(data)] == [hashlib.sha256(n).hexdigest() for n in names]


def test_digest_of_odd_names_is_the_manifest_sha256sum_writes_and_stable(tree, tmp_path):
    """`manifest.digest` is a sha256 over the lines sha256sum writes for the release's files in byte order (contract
    section 7: "as section 1's manifest lists them"), whatever their names; the same files give the same digest."""
    names = [name for name in ODD_NAMES if name != b"-"]  # sha256sum reads standard input for a bare `-`
    odd = upload(tree, build(tmp_path, names), "r1")
    lines = run_in(odd, f"{FIND} -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum --")
    assert b"\\" in lines and b"\xe9" in lines
    digest = digest_of(tree, "r1", IGNORE)
    assert digest == hashlib.sha256(lines).hexdigest()
    assert digest_of(tree, "r1", IGNORE) == digest
    assert digest_of(tree, upload(tree, odd, "r2").name, IGNORE) == digest
    write(os.fsencode(odd) + b"/caf\xe9.txt", b"changed")
    assert digest_of(tree, "r1", IGNORE) != digest


def test_through_the_daemon_odd_names_go_live_and_a_tampered_copy_is_refused(app, start_daemon, tmp_path):
    """The whole way: uploads land as renamed staging directories with the marker, maintd checks their manifests."""
    daemon = start_daemon()
    source = build(tmp_path, ODD_NAMES)
    tree = Tree(app.root)
    upload(tree, source, ".incoming-r1").rename(app.releases / "r1")
    assert daemon.deployed("r1")["result"] == "ok"
    staging = upload(tree, source, ".incoming-r2")
    write(os.fsencode(staging) + b"/new\nline.txt", b"tampered")
    staging.rename(app.releases / "r2")
    refused = daemon.wait_for(release="r2", result="refused")
    assert refused["event"].endswith('manifest does not verify: "new\\nline.txt" does not match its sha256 in the '
                                     "manifest")
    assert app.live() == "r1"


def test_maintd_reads_no_listed_file_through_a_link_and_no_special_file(tree: Tree, tmp_path: Path):
    """maintd is root: a listed link (or a file behind a linked directory) to a file only root may read would tell
    an uploader whether a guess of its content is right, and a listed FIFO would block the check for good. Links
    the recipe leaves out (`find -type f`) need not be listed."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's own\n")
    secret.chmod(0o600)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "key").write_bytes(b"root's own\n")
    release = upload(tree, build(tmp_path, [b"app.rb"]), "r1")
    os.symlink("app.rb", release / "alias.rb")  # a link of the release's own, unlisted: fine
    assert maintd_problem(tree, release) is None
    digest = hashlib.sha256(b"root's own\n").hexdigest()
    for listed, make in ((b"secret", lambda: os.symlink(secret, release / "secret")),
                         (b"lib/key", lambda: os.symlink(tmp_path / "outside", release / "lib")),
                         (b"pipe", lambda: os.mkfifo(release / "pipe"))):
        make()
        with open(release / MANIFEST, "ab") as manifest:
            manifest.write(digest.encode() + b"  " + listed + b"\n")
        problem = maintd_problem(tree, release)
        assert problem and problem.startswith(listed.decode() + " is listed in the manifest but"), problem
        assert "does not match" not in problem and ("link" in problem or "regular" in problem)
        subprocess.run(["sed", "-i", "$d", MANIFEST], cwd=release, check=True)
        (release / listed.decode().split("/")[0]).unlink()


# The uploader's side of the race: swaps the names `a` and `b` of its release (a real directory, a link) as fast as
# it can, with renameat2(RENAME_EXCHANGE), which no Python call makes.
EXCHANGER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
os.chdir(sys.argv[1])
print("ready", flush=True)
while True:
    libc.renameat2(AT_FDCWD, b"a", AT_FDCWD, b"b", RENAME_EXCHANGE)
"""


def test_a_listed_file_is_never_read_through_a_link_swapped_in_after_the_check(app, tmp_path):
    """The uploader owns every directory of its release: it swaps a real directory `a` for a link `a -> outside` in a
    loop while maintd checks `a/shadow`. A check of the path first (realpath) and an open by path after it let root
    hash the file outside, whose sha256 the manifest gives: the oracle (does the hash of /etc/shadow equal a guess?)
    that reading no file through a link closes. Real processes racing, through the check every release passes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_text("root-only secret\n")
    release = app.releases / "r1"
    (release / "a").mkdir(parents=True)
    (release / "a" / "shadow").write_text("the uploader's own file\n")
    (release / "b").symlink_to(outside)
    (release / MANIFEST).write_text(hashlib.sha256(b"root-only secret\n").hexdigest() + "  a/shadow\n")
    ctx = Context.build(load(app.write_config()), Store(app.state))
    racer = subprocess.Popen([sys.executable, "-c", EXCHANGER, str(release)], stdout=subprocess.PIPE, text=True)
    try:
        assert racer.stdout and racer.stdout.readline() == "ready\n"
        verdicts = Counter(ctx.release_problem("r1") for _ in range(5000))
    finally:
        racer.kill()
        racer.wait()
    said = "manifest does not verify: a/shadow "
    assert {problem: n for problem, n in verdicts.items() if not (problem or "").startswith(said)} == {}, \
        "root hashed the file outside the release"
    assert {said + "does not match its sha256 in the manifest",
            said + "is listed in the manifest but lies behind a link"} <= set(verdicts), verdicts  # both sides seen


def test_a_fifo_in_a_release_does_not_block_its_digest(tree: Tree, tmp_path: Path):
    release = upload(tree, build(tmp_path, [b"app.rb"]), "r1")
    before = digest_of(tree, "r1", IGNORE)
    os.mkfifo(release / "pipe")
    assert digest_of(tree, "r1", IGNORE) not in (before, digest_of(tree, "r1", (*IGNORE, "pipe")))


def test_an_rsync_temporary_of_a_name_with_a_newline_is_one():
    from maintd.tree import is_rsync_temp

    assert is_rsync_temp(".new\nline.txt.Ab12Cd")


def test_a_manifest_that_cannot_be_read_for_want_of_descriptors_is_no_verdict(tree: Tree, tmp_path: Path, monkeypatch):
    """EMFILE while checking says nothing about the release: it propagates (intake reads the upload again later,
    the validate step fails as the server's fault) instead of refusing the upload. The fault is a named fake: the
    manifest module's os.open fails as a process out of descriptors does."""
    import errno

    from maintd import manifest

    release = upload(tree, build(tmp_path, [b"app.rb"]), "r1")

    def out_of_descriptors(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(manifest.os, "open", out_of_descriptors)
    with pytest.raises(OSError) as raised:
        maintd_problem(tree, release)
    assert raised.value.errno == errno.EMFILE
