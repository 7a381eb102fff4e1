"""Writing as root into a tree an uploader controls, without being led out of it.

maintd runs as root (CAP_DAC_OVERRIDE, CAP_CHOWN) and writes into releases an unprivileged user uploaded: the
maintenance flag and its page, `tmp/restart.txt`, the links to `shared/`. Any directory on those paths may be a
symlink the uploader made, or be swapped for one while maintd works, so a path checked first and used afterwards
proves nothing. Below the trusted top no path is handed to the kernel whole: a `Confined` directory is a file
descriptor reached one component at a time with O_NOFOLLOW, each relative to the descriptor before it. A symlink met
on the way is followed by hand, and only while it stays inside the bound (the app's tree: `tmp -> ../../shared/tmp`
is fine); one that leads out, absolutely or by `..`, refuses the operation before anything is made.

What maintd makes there (directories, files, links) is made in a staging directory of its own that only root can
write, given to the top's owner while there, and renamed into place. So an uploader can neither plant a name that
maintd then writes through (a symlink at its temporary file's name) nor swap something in between the making and the
chown (a hard link to a file of someone else's); and a reader of the final name sees the old entry or the new. A
kill -9 between the making and the rename leaves the staging directory behind: the next start removes it
(`remove_leftovers`).

What maintd reads there as root (the manifest and the files it lists, REVISION, the migrations it compares) is read
the same way, and more strictly: every directory on the way a real one (`dir(follow=False)`), the file itself a
regular file opened without following it and without blocking (`open_file`). A link to /etc/shadow would otherwise
hand an uploader its first line (REVISION into revisions.log) or tell whether a guess of it is right (a hash
compared), and a FIFO would block the reading thread for good.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO opens at once, and reads say EAGAIN
_MAX_STEPS = 256  # components walked, links spliced in included: a link loop ends here
_STAGE_PREFIX = ".maintd-stage-"


class PathRefused(OSError):
    """A path maintd will not write through, with the sentence an operator reads; nothing was made or changed.
    An OSError, so that every caller that reports a failed file operation reports this one too."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ELOOP, message)

    def __str__(self) -> str:
        return str(self.strerror)


class NotARegularFile(OSError):
    """An entry maintd does not read as root: a link (whatever it points at) or a FIFO, socket or device. Its text is
    what the entry is ("is a link"), for the caller's sentence; the path is in `filename`."""

    def __init__(self, what: str, path: Path) -> None:
        super().__init__(errno.EINVAL, what, str(path))

    def __str__(self) -> str:
        return str(self.strerror)


class Confined:
    """An open directory at or below a trusted bound; whatever is made in it belongs to `owner`."""

    def __init__(self, bound: Path, chain: list[int], names: list[str], owner: tuple[int, int] | None) -> None:
        self.bound = bound
        self._chain = chain  # open descriptors from the bound down to this directory: `..` goes back along them
        self.names = names  # the real directories from the bound down to this one
        self.owner = owner  # (uid, gid); None when maintd is not root and cannot give anything away

    @classmethod
    def open(cls, bound: Path, top: Path) -> Confined:
        """`top`, a real directory at or below `bound` (the app's root, a path from the config and so trusted),
        reached without following any symlink below `bound`. What is made below it will be its owner's."""
        chain = [os.open(bound, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        names: list[str] = []
        try:
            for part in top.relative_to(bound).parts:
                try:
                    chain.append(os.open(part, _DIR, dir_fd=chain[-1]))
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise PathRefused(f"{bound.joinpath(*names, part)} is not a real directory (a symlink or a "
                                          "file): maintd will not write below it") from None
                    raise _named(exc, bound.joinpath(*names, part)) from None
                names.append(part)
        except BaseException:
            _close(chain)
            raise
        info = os.fstat(chain[-1])
        return cls(bound, chain, names, (info.st_uid, info.st_gid) if os.geteuid() == 0 else None)

    @property
    def path(self) -> Path:
        """Where this directory really is (for messages): no symlink lies on this path below the bound."""
        return self.bound.joinpath(*self.names)

    def close(self) -> None:
        _close(self._chain)
        self._chain = []

    def __enter__(self) -> Confined:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- walking down ---------------------------------------------------------------------------------------------

    def dir(self, rel: str, create: bool = False, follow: bool = True) -> Confined:
        """The directory `rel` below this one; with `create`, what is missing is made, owned by `owner`. A symlink
        on the way is followed only as far as it stays inside the bound; one that leads out raises PathRefused, and
        so does any symlink without `follow` (for reading: nothing an uploader links to is read as theirs)."""
        chain: list[int] = []
        names = list(self.names)
        pending = list(reversed(rel.split("/")))
        via = ""  # the last link followed, for the message when a `..` after it climbs out
        steps = 0
        try:
            for fd in self._chain:  # copied one at a time inside the try: one refused (EMFILE) leaves no other open
                chain.append(os.dup(fd))
            while pending:
                part = pending.pop()
                steps += 1
                if steps > _MAX_STEPS:
                    raise PathRefused(f"{self.path / rel}: too many symlinks on the way (a loop?)")
                if part in ("", "."):
                    continue
                if part == "..":
                    if len(chain) == 1:
                        raise PathRefused(f"{self.path / rel} leads out of {self.bound}{via}: maintd will not "
                                          "write there")
                    os.close(chain.pop())
                    names.pop()
                    continue
                try:
                    chain.append(os.open(part, _DIR, dir_fd=chain[-1]))
                    names.append(part)
                    continue
                except FileNotFoundError:
                    if not create:
                        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                                str(self.bound.joinpath(*names, part))) from None
                    _make_dir(chain[-1], part, self.owner)
                    pending.append(part)  # open whatever stands there now, by the same rules
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise _named(exc, self.bound.joinpath(*names, part)) from None
                link = self.bound.joinpath(*names, part)
                target = _readlink(chain[-1], part, link)
                if not follow:
                    raise PathRefused(f"{link} is a symlink: maintd reads nothing through it")
                via = f" (through {link} -> {target})"
                if target.startswith("/"):
                    rest = self._below_bound(target)
                    if rest is None:
                        raise PathRefused(f"{self.path / rel} leads out of {self.bound}{via}: maintd will not "
                                          "write there")
                    _close(chain[1:])
                    del chain[1:], names[:]
                    target = rest
                pending.extend(reversed(target.split("/")))
        except BaseException:
            _close(chain)
            raise
        return Confined(self.bound, chain, names, self.owner)

    def _below_bound(self, target: str) -> str | None:
        """What an absolute link target (as Capistrano makes them) names below the bound, or None outside it."""
        for base in (str(self.bound), os.path.realpath(self.bound)):
            if target == base or target.startswith(base.rstrip("/") + "/"):
                return target[len(base):]
        return None

    # --- what is in it --------------------------------------------------------------------------------------------

    def entry(self, name: str) -> os.stat_result | None:
        """The status of entry `name` itself, never following it; None when there is none."""
        try:
            return os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def status(self) -> os.stat_result:
        """This directory's own status: of the directory held open, whatever its path names by now."""
        return os.fstat(self._fd)

    def kind(self, name: str) -> int | None:
        """The file type bits (`stat.S_IFMT`) of entry `name`, never following it; None when there is none."""
        return stat.S_IFMT(found.st_mode) if (found := self.entry(name)) else None

    def link_target(self, name: str) -> str | None:
        """Where entry `name` points, when it is a symlink."""
        return os.readlink(name, dir_fd=self._fd) if self.kind(name) == stat.S_IFLNK else None

    def open_file(self, name: str) -> io.FileIO:
        """Entry `name` open for reading, if it is a regular file: never through a link, and never a FIFO or a device,
        whose open or read could block for good (NotARegularFile; a directory: IsADirectoryError)."""
        try:
            fd = os.open(name, _FILE, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotARegularFile("is a link", self.path / name) from None
            raise _named(exc, self.path / name) from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(self.path / name))
            if not stat.S_ISREG(mode):
                raise NotARegularFile("is not a regular file", self.path / name)
            return io.FileIO(fd, "rb")  # unbuffered: a caller reads in chunks of its own, mostly one
        except BaseException:
            os.close(fd)
            raise

    def read(self, name: str, limit: int) -> bytes:
        """What the regular file `name` holds (see open_file), refused (EFBIG) past `limit` bytes: a small file of
        the uploader's (REVISION), never theirs to make maintd hold gigabytes."""
        with self.open_file(name) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(self.path / name))
        return data

    def files(self) -> list[bytes]:
        """Every entry below this directory but directories (links to them included, never followed), relative to it,
        in bytes as Linux keeps names."""
        return _files_below(self._fd, self.path)

    def remove_leftovers(self) -> list[Path]:
        """maintd's own staging directories that a kill -9 left here (see `_place`), with what they hold. A directory
        of that name that is not root's alone is the uploader's, and stays."""
        removed = []
        for name, is_dir in _listing(self._fd):
            if not is_dir or not name.startswith(_STAGE_PREFIX.encode()):
                continue
            try:
                if _ours(os.stat(name, dir_fd=self._fd, follow_symlinks=False)):
                    self.remove_tree(os.fsdecode(name))
                    removed.append(self.path / os.fsdecode(name))
            except FileNotFoundError:
                continue
        return removed

    # --- changing it ----------------------------------------------------------------------------------------------

    def write(self, name: str, text: str, mtime_ns: int | None = None) -> None:
        """Replace entry `name` (a file or a link, never followed) with a new file holding `text`, owned by `owner`
        (and modified at `mtime_ns`, when given) before it appears there."""

        def make(stage: int, entry: str) -> None:
            fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=stage)
            with open(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))

        _place(self._fd, name, self.owner, make)

    def symlink(self, name: str, target: str) -> None:
        """Replace entry `name` (a file or a link) with a symlink to `target`, owned by `owner`."""
        _place(self._fd, name, self.owner, lambda stage, entry: os.symlink(target, entry, dir_fd=stage))

    def unlink(self, name: str) -> None:
        """Remove entry `name` (a link itself, never what it points at); a missing one is fine."""
        try:
            os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            pass

    def remove_tree(self, name: str) -> None:
        """Remove the real directory `name` and everything below it. shutil.rmtree walks by descriptors and refuses
        a symlink at the top, so no link inside leads it anywhere else."""
        shutil.rmtree(name, dir_fd=self._fd)

    @property
    def _fd(self) -> int:
        return self._chain[-1]


def _make_dir(parent: int, name: str, owner: tuple[int, int] | None) -> None:
    """Make directory `name` in `parent`, unless something got there first (the caller then looks at that)."""
    try:
        _place(parent, name, owner, lambda stage, entry: os.mkdir(entry, 0o755, dir_fd=stage))
    except OSError as exc:
        # Renaming a directory over a non-empty one, a file or a link fails; over an empty one it wins, harmlessly.
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise


def _place(parent: int, name: str, owner: tuple[int, int] | None, make: Callable[[int, str], None]) -> None:
    """Make an entry with `make(stage_fd, name)` in a fresh staging directory only root can write, give it to
    `owner` there, and rename it to `name` in `parent`, over a file or link of that name."""
    stage_name = _STAGE_PREFIX + secrets.token_hex(8)
    os.mkdir(stage_name, 0o700, dir_fd=parent)
    try:
        stage = os.open(stage_name, _DIR, dir_fd=parent)
        try:
            # The uploader owns `parent` and may have put a directory of its own at that name in between.
            if not _ours(os.fstat(stage)):
                raise PathRefused(f"maintd's staging directory {stage_name} was replaced while it worked")
            try:
                make(stage, name)
                if owner:
                    os.chown(name, *owner, dir_fd=stage, follow_symlinks=False)
                os.rename(name, name, src_dir_fd=stage, dst_dir_fd=parent)
            except BaseException:
                _discard(stage, name)
                raise
        finally:
            os.close(stage)
    finally:
        try:
            os.rmdir(stage_name, dir_fd=parent)
        except OSError:
            pass  # renamed away by the uploader: empty, and theirs to remove


def _files_below(top: int, path: Path) -> list[bytes]:
    """Confined.files: walked by descriptors, so a directory swapped for a link meanwhile leads nowhere; no deeper
    than _MAX_STEPS directories (PathRefused), one descriptor open for each level."""
    found: list[bytes] = []
    levels: list[tuple[int, bytes, list[tuple[bytes, bool]]]] = []
    try:
        levels.append((os.dup(top), b"", []))  # each level held before it is listed: the finally closes it
        levels[-1][2].extend(_listing(top))
        while levels:
            fd, prefix, pending = levels[-1]
            if not pending:
                os.close(levels.pop()[0])
                continue
            name, is_dir = pending.pop()
            if not is_dir:
                found.append(prefix + name)
                continue
            if len(levels) > _MAX_STEPS:
                raise PathRefused(f"{path / os.fsdecode(prefix + name)}: more than {_MAX_STEPS} directories deep")
            try:
                sub = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link or a file: one of those
                    raise
                found.append(prefix + name)
                continue
            levels.append((sub, prefix + name + b"/", []))
            levels[-1][2].extend(_listing(sub))
    finally:
        _close([fd for fd, _, _ in levels])
    return found


def _ours(info: os.stat_result) -> bool:
    """Whether a staging directory is still the one maintd made: root's, and nobody else's to write or enter."""
    return info.st_uid == os.geteuid() and not stat.S_IMODE(info.st_mode) & 0o077


def _listing(directory: int) -> list[tuple[bytes, bool]]:
    """The entries of an open directory, each with whether it is a directory itself (a link is not)."""
    with os.scandir(directory) as entries:
        return [(os.fsencode(entry.name), entry.is_dir(follow_symlinks=False)) for entry in entries]


def _discard(directory: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=directory)
    except IsADirectoryError:
        os.rmdir(name, dir_fd=directory)
    except FileNotFoundError:
        pass


def _readlink(directory: int, name: str, path: Path) -> str:
    """The target of the symlink `name`; anything else that is not a directory is refused as one."""
    try:
        return os.readlink(name, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a link: a file where a directory must be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
        raise _named(exc, path) from None


def _named(exc: OSError, path: Path) -> OSError:
    """The same error naming the whole path: a call relative to a descriptor knows only the last component."""
    return type(exc)(exc.errno, exc.strerror, str(path))


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
