"""The deploy tree on disk: release names, the `current` link, shared links, what a release holds and upload probes.

Pure file-system logic with no threads and no clock of its own, so every rule here is testable by making files.
The one promise that matters most lives here: `current` is only ever replaced by rename(2) of a fresh symlink,
so at no instant does it not exist or point anywhere but the old or the new release.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from . import manifest
from .config import RELEASE_NAME
from .confined import Confined

TEMP_LINK_PREFIX = ".current.tmp-"
# rsync's temporary file: "." + name + "." + six characters of mkstemp (see is_rsync_temp).
_RSYNC_TEMP = re.compile(r"\..+\.[A-Za-z0-9]{6}", re.DOTALL)  # a name may hold a newline
_DELAY_UPDATES_DIR = ".~tmp~"


class ReleaseError(Exception):
    """A release that cannot be used, with the reason an operator reads."""


def name_problem(name: str) -> str | None:
    """Why `name` can never be a release (None when it can)."""
    if name.startswith("."):
        return "hidden names are staging areas, never releases"
    if not RELEASE_NAME.fullmatch(name):
        return "release names are 1-128 of letters, digits, '.', '_' and '-', starting with a letter or digit"
    return None


def name_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders release names as people read them: v9 before v10, timestamps by time."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def is_rsync_temp(name: str) -> bool:
    """Whether a file name is one rsync writes to before renaming it into place (contract §1: `.<name>.<6 chars>`).

    Taken to the letter: a file that only looks like one (`.env.sample`) holds the quiet-period rule, with that reason
    shown by `maintctl releases`, until the marker comes; the other way round, a real temporary passed over would
    let a cut upload go live.
    """
    return name == _DELAY_UPDATES_DIR or _RSYNC_TEMP.fullmatch(name) is not None


@dataclass(frozen=True)
class Probe:
    """What one walk of a release found: the last change anywhere under it and what is still being written."""

    last_change: float  # newest ctime under the release, seconds since the epoch; ctime cannot be set by uploaders
    temp_files: tuple[str, ...]  # rsync temporary files, relative to the release
    files: int
    size: int


class Tree:
    """One app's `<root>`: `releases/`, `current`, `shared/` and `revisions.log`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.current = root / "current"
        self.shared = root / "shared"
        self.revisions = root / "revisions.log"

    # --- names and paths ------------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The directory of release `name`; refuses names that could leave `releases/`."""
        if problem := name_problem(name):
            raise ReleaseError(f"bad release name {name!r}: {problem}")
        return self.releases / name

    def release_dir(self, name: str) -> Path:
        """The directory of an existing release, refusing anything that is not a real directory."""
        path = self.path(name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise ReleaseError(f"no release {name!r} in {self.releases}") from None
        if stat.S_ISLNK(mode):
            raise ReleaseError(f"release {name!r} is a symlink; releases must be real directories")
        if not stat.S_ISDIR(mode):
            raise ReleaseError(f"release {name!r} is not a directory")
        return path

    def entry_problem(self, name: str) -> str | None:
        """Why entry `name` of releases/ can never be a release (None when it can be one)."""
        try:
            self.release_dir(name)
        except ReleaseError as exc:
            return str(exc)
        return None

    def entries(self) -> list[str]:
        """Every entry of `releases/` (valid or not), for the watcher's rescans."""
        try:
            return sorted(os.listdir(self.releases))
        except FileNotFoundError:
            return []

    def live(self) -> str | None:
        """The release `current` points at, or None when it is missing or points outside `releases/`."""
        try:
            target = os.readlink(self.current)
        except (FileNotFoundError, OSError):
            return None
        head, _, name = target.rstrip("/").rpartition("/")
        if Path(head) not in (Path("releases"), self.releases) or name_problem(name):
            return None
        return name

    def current_problem(self) -> tuple[str, bool] | None:
        """What is wrong with `current`, if anything, and whether it is fatal (a real directory cannot be swapped).
        A missing or dangling link is reported, never guessed at: `maintctl deploy NAME` repairs it."""
        if not self.current.is_symlink():
            if self.current.exists():
                return f"{self.current} is a real directory or file; it must be a symlink into releases/", True
            if self.entries():
                return f"{self.current} is missing; `maintctl deploy NAME` repairs it", False
            return None
        live = self.live()
        if not live or not (self.releases / live).is_dir():
            return (f"{self.current} points at no release ({os.readlink(self.current)}); "
                    "`maintctl deploy NAME` repairs it"), False
        return None

    # --- the swap -------------------------------------------------------------------------------------------------

    def swap(self, name: str) -> None:
        """Point `current` at release `name` atomically and durably.

        A fresh relative symlink under a temporary name is renamed over `current` (rename(2) replaces a symlink
        atomically), then the root directory is fsynced so the new link survives a power cut.
        """
        self.release_dir(name)
        temp = self.root / f"{TEMP_LINK_PREFIX}{os.getpid()}"
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        os.symlink(f"releases/{name}", temp)
        try:
            os.replace(temp, self.current)
        except OSError:
            os.unlink(temp)
            raise
        fsync_dir(self.root)

    def remove_stale_links(self) -> list[str]:
        """Temporary links a crash left between symlink() and rename(); they are never `current` itself."""
        removed = []
        for entry in os.listdir(self.root):
            if entry.startswith(TEMP_LINK_PREFIX):
                os.unlink(self.root / entry)
                removed.append(entry)
        return removed

    # --- shared files ---------------------------------------------------------------------------------------------

    def link_shared(self, name: str, files: tuple[str, ...], dirs: tuple[str, ...]) -> list[str]:
        """Link each shared path into the release, replacing what the upload put there (as Capistrano does).

        Links are relative, so the tree can be moved or mounted elsewhere. A shared path missing from `shared/`
        is an error: a release linked to nothing would start without its database.yml. The release is the
        uploader's, so every directory on the way is walked confined (see confined.py) and what is made is theirs.
        """
        linked = []
        if missing := self.missing_shared((*dirs, *files)):
            raise ReleaseError(f"shared path {missing[0]!r} is missing from {self.shared}")
        with self.open(name) as release:
            for rel in (*dirs, *files):
                head, entry = os.path.split(os.path.normpath(rel))
                with release.dir(head, create=True) as parent:
                    source = Path("shared", rel)
                    if Path(*parent.names, entry) == source:
                        continue  # a link on the way already leads into shared/: this is the shared path itself
                    wanted = os.path.relpath(source, Path(*parent.names))
                    if parent.link_target(entry) == wanted:
                        continue
                    if parent.kind(entry) == stat.S_IFDIR:
                        parent.remove_tree(entry)
                    parent.symlink(entry, wanted)
                linked.append(rel)
        return linked

    def missing_shared(self, paths: tuple[str, ...]) -> list[str]:
        """Those of `paths` that `shared/` lacks (a dangling link there too): each fails `link_shared`."""
        return [rel for rel in paths if not (self.shared / rel).exists()]

    # --- what is in a release -------------------------------------------------------------------------------------

    def probe(self, name: str) -> Probe:
        """Walk a release once: newest ctime, rsync temporaries left, file count and size."""
        root = self.release_dir(name)
        newest = os.lstat(root).st_ctime
        temps: list[str] = []
        files = size = 0
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                newest = max(newest, info.st_ctime)
                if is_rsync_temp(entry.name):
                    temps.append(os.path.relpath(entry.path, root))
                if stat.S_ISDIR(info.st_mode):
                    stack.append(Path(entry.path))
                else:
                    files += 1
                    size += info.st_size
        return Probe(last_change=newest, temp_files=tuple(sorted(temps)), files=files, size=size)

    def missing(self, name: str, required: tuple[str, ...]) -> list[str]:
        """Required paths the release lacks."""
        release = self.release_dir(name)
        return [rel for rel in required if not os.path.lexists(release / rel)]

    def uploaded(self, name: str, ignore: tuple[str, ...]) -> list[bytes]:
        """Every file of a release as uploaded, in byte order: its non-directories (links included) but `ignore`
        and what lies under it. Names are bytes, as Linux keeps them (not all are UTF-8)."""
        skips = [os.fsencode(skip) for skip in ignore]
        with self.open(name) as top:
            return sorted(rel for rel in top.files()
                          if not any(rel == skip or rel.startswith(skip + b"/") for skip in skips))

    def open(self, name: str) -> Confined:
        """Release `name` opened from `<root>` down through no symlink (see confined.py), for what root reads or
        writes there: `releases/` and the release are the uploader's, and either may be swapped for a link."""
        return Confined.open(self.root, self.release_dir(name))

    def remove(self, name: str) -> None:
        """Remove a release, reaching it through a `releases/` that is no symlink (an uploader who owns `<root>`
        could otherwise point it at `/` just before the cleanup removes a release named `etc`)."""
        self.release_dir(name)
        with Confined.open(self.root, self.releases) as releases:
            releases.remove_tree(name)

    # --- revisions.log --------------------------------------------------------------------------------------------

    def append_revision(self, line: str) -> str | None:
        """Append one line to revisions.log; returns why it could not be (the deploy itself stands).

        `<root>` may be the uploader's, and so may this name: never through a symlink, and never into a file with
        another name elsewhere (a hard link to /etc/passwd) or into a FIFO, which would hang the daemon."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.revisions, flags, 0o644)
        except OSError as exc:
            return f"could not append to {self.revisions}: {exc.strerror}"
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                return f"did not append to {self.revisions}: it is not a plain file of its own (a hard link?)"
            os.write(fd, (line.rstrip("\n") + "\n").encode())
        except OSError as exc:
            return f"could not append to {self.revisions}: {exc.strerror}"
        finally:
            os.close(fd)
        return None

    def make_releases(self) -> None:
        """Make `releases/` when it is missing, the tree's owner's like `<root>` (the uploads go there)."""
        with Confined.open(self.root, self.root) as root:
            root.dir("releases", create=True).close()


def machine_fault(exc: OSError) -> bool:
    """Whether a failed read of a release says something about the machine rather than the release."""
    return exc.errno in manifest.MACHINE_FAULTS


def write_atomically(path: Path, text: str, durable: bool) -> None:
    """Replace `path` whole (temporary file, rename), so a reader or a crash sees the old text or the new, and a full
    disk leaves no half-written temporary behind; `durable` adds the fsyncs that make it survive a power cut."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
