"""The deploy tree: names, the atomic swap, shared links, manifests and what a probe sees."""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from maintd.manifest import verify
from maintd.tree import ReleaseError, Tree, is_rsync_temp, name_key, name_problem


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    (tmp_path / "releases").mkdir()
    (tmp_path / "shared").mkdir()
    return Tree(tmp_path)


def release(tree: Tree, name: str, files: dict[str, str] | None = None) -> Path:
    path = tree.releases / name
    for rel, text in (files or {"REVISION": name + "\n"}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


@pytest.mark.parametrize("name", [".hidden", "a b", "", "-x", "x" * 129, "a/b", "..", "é"])
def test_bad_names_are_refused(tree, name):
    assert name_problem(name)
    with pytest.raises(ReleaseError):
        tree.path(name)


@pytest.mark.parametrize("name", ["20261123080000", "v1.2.3", "a", "R_1-x", "x" * 128])
def test_good_names(name):
    assert name_problem(name) is None


def test_names_sort_as_people_read_them():
    assert sorted(["v10", "v9", "v1"], key=name_key) == ["v1", "v9", "v10"]
    assert sorted(["20261123", "20251201"], key=name_key) == ["20251201", "20261123"]


@pytest.mark.parametrize("name, temp", [(".foo.rb.Ab12xZ", True), (".x.000001", True), (".~tmp~", True),
                                        (".x.abcdef", True), (".env.sample", True), (".gitignore", False),
                                        (".x.abcde", False), ("foo.rb", False)])
def test_rsync_temporary_names(name, temp):
    assert is_rsync_temp(name) is temp


def test_swap_is_a_relative_link_and_refuses_non_releases(tree):
    release(tree, "r1")
    tree.swap("r1")
    assert os.readlink(tree.current) == "releases/r1" and tree.live() == "r1"
    (tree.releases / "plain").write_text("not a dir")
    os.symlink("/etc", tree.releases / "elsewhere")
    for bad in ("plain", "elsewhere", "missing", "../r1"):
        with pytest.raises(ReleaseError):
            tree.swap(bad)
    assert tree.live() == "r1"


def test_swap_is_atomic_for_a_reader_in_another_process(tree):
    """A separate process resolves current/REVISION in a tight loop while 200 swaps happen: never missing."""
    release(tree, "a")
    release(tree, "b")
    tree.swap("a")
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        seen, misses = set(), 0
        for line in sys.stdin:
            if line.strip() == "stop":
                break
            for _ in range(200):
                try:
                    seen.add(open("{tree.current}/REVISION").read().strip())
                except OSError:
                    misses += 1
        print(misses, " ".join(sorted(seen)))
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for i in range(200):
        tree.swap("b" if i % 2 == 0 else "a")
        reader.stdin.write("go\n")
        reader.stdin.flush()
    out, _ = reader.communicate("stop\n", timeout=60)
    misses, seen = out.split(" ", 1)
    assert misses == "0"
    assert set(seen.split()) == {"a", "b"}
    assert os.readlink(tree.current) == "releases/a"


def test_stale_temporary_links_are_cleaned(tree):
    release(tree, "r1")
    os.symlink("releases/r1", tree.root / ".current.tmp-4242")
    assert tree.remove_stale_links() == [".current.tmp-4242"]
    assert not (tree.root / ".current.tmp-4242").is_symlink()


def test_link_shared_replaces_uploaded_copies(tree):
    (tree.shared / "config").mkdir()
    (tree.shared / "config" / "database.yml").write_text("production: {}\n")
    (tree.shared / "log").mkdir()
    path = release(tree, "r1", {"config/database.yml": "uploaded by mistake", "log/old.log": "x"})
    assert tree.link_shared("r1", ("config/database.yml",), ("log",)) == ["log", "config/database.yml"]
    assert (path / "config/database.yml").read_text() == "production: {}\n"
    assert os.readlink(path / "log") == "../../shared/log"
    assert tree.link_shared("r1", ("config/database.yml",), ("log",)) == []  # idempotent


def test_link_shared_refuses_a_missing_shared_path(tree):
    release(tree, "r1")
    with pytest.raises(ReleaseError, match="missing"):
        tree.link_shared("r1", ("config/master.key",), ())


def problem_of(tree: Tree, name: str, ignore: tuple[str, ...]) -> str | None:
    with tree.open(name) as top:
        return verify(top, ".maintd-manifest", tree.uploaded(name, ignore))


def manifest_for(path: Path, names: list[str]) -> str:
    return "".join(f"{hashlib.sha256((path / n).read_bytes()).hexdigest()}  ./{n}\n" for n in names)


def test_manifest_verifies(tree):
    path = release(tree, "r1", {"a.txt": "a", "sub/b.txt": "b"})
    (path / ".maintd-manifest").write_text(manifest_for(path, ["a.txt", "sub/b.txt"]))
    (path / ".maintd-ready").touch()
    assert problem_of(tree, "r1", (".maintd-ready", ".maintd-manifest")) is None


@pytest.mark.parametrize("damage, problem", [
    (lambda p: (p / "sub/b.txt").write_text("changed"), "sub/b.txt does not match"),
    (lambda p: (p / "sub/b.txt").unlink(), "sub/b.txt is listed in the manifest but missing"),
    (lambda p: (p / "extra.txt").write_text("x"), "extra.txt is not listed"),
    (lambda p: (p / ".maintd-manifest").write_text("garbage\n"), "line 1 is not sha256sum output"),
])
def test_manifest_failures_name_the_file(tree, damage, problem):
    path = release(tree, "r1", {"a.txt": "a", "sub/b.txt": "b"})
    (path / ".maintd-manifest").write_text(manifest_for(path, ["a.txt", "sub/b.txt"]))
    damage(path)
    assert problem in problem_of(tree, "r1", (".maintd-manifest",))


def test_probe_sees_deep_changes_and_temporaries(tree):
    path = release(tree, "r1", {"a/b/c/deep.txt": "x"})
    first = tree.probe("r1")
    temp = path / "a/b/c/.big.bin.Qx7Zp2"
    temp.write_text("partial")
    second = tree.probe("r1")
    assert second.last_change == max(os.lstat(temp).st_ctime, os.lstat(temp.parent).st_ctime, first.last_change)
    assert second.temp_files == ("a/b/c/.big.bin.Qx7Zp2",)
    assert (second.files, second.size) == (2, 8)
