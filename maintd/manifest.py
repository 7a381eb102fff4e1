"""The upload manifest (contract §1): `sha256sum` output, read the way `sha256sum --strict -c` reads it, and checked
against a release.

The manifest is whatever GNU coreutils 9.1's sha256sum writes for the files of a release, and maintd accepts exactly
the lines `sha256sum --strict -c` accepts, so an uploader can check a manifest with the same tool that made it:
`HASH  NAME` (text mode) and `HASH *NAME` (binary mode), the BSD `--tag` form `SHA256 (NAME) = HASH`, BSD's reversed
`HASH NAME` (as `-c` takes it: only while no `HASH  NAME` line came before, and then for the rest of the file), a
leading backslash that marks a name escaped (`\\\\`, `\\n`, `\\r`: how sha256sum writes a name holding a backslash,
a newline or a carriage return), `#` comments, empty lines, CRLF line ends, blanks before the hash, upper-case hex.
Names are bytes from the file to the open(2): Linux names are bytes, and a name that is not UTF-8 is as real as any.

Two things `-c` takes that maintd refuses: a NUL in a line (`-c` would check the name cut short at it, never what
the line says) and the name `-` (standard input to `-c`, not a file of the release); sha256sum never writes either
for a file. And on top of the format, the rules of §1: a listed path may not leave the release, every listed file
must match, and no other file may be there but what `ignore` names (the marker, the manifest, what maintd writes).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .confined import Confined, NotARegularFile, PathRefused

# The BSD `--tag` form: the name runs to the last ')' of the line, as coreutils reads it.
_TAGGED = re.compile(rb"[ \t]*(\\?)SHA256 ?\((.*)\)[ \t]*=[ \t]*([0-9A-Fa-f]{64})", re.DOTALL)
# The GNU form: the hash, one blank, then the rest, which `_name` splits (its first byte may be the mode).
_PLAIN = re.compile(rb"[ \t]*(\\?)([0-9A-Fa-f]{64})[ \t](.+)", re.DOTALL)
_ESCAPED_NAME = re.compile(rb"(?:[^\\]|\\[\\nr])*", re.DOTALL)
_ESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}
_CHUNK = 1 << 16  # bytes read at a time for a hash


class ManifestError(Exception):
    """A line `sha256sum --strict -c` would not take (or maintd does not, see the module), naming it."""


class _Form(enum.Enum):
    """Which plain form the file uses. Like `-c`, the first plain line decides, and the two never mix: an attacker's
    file named ` x` must not let `HASH  x` be read as BSD's `HASH NAME` for ` x` in the middle of GNU lines."""

    UNDECIDED = enum.auto()
    GNU = enum.auto()  # HASH, a blank, the mode (' ' or '*'), NAME
    REVERSED = enum.auto()  # HASH, a blank, NAME


@dataclass(frozen=True)
class Entry:
    number: int  # line number in the manifest, from 1
    digest: str  # lower-case hex
    name: bytes  # as sha256sum was given it, escapes undone


def parse(data: bytes) -> list[Entry]:
    """Every file a manifest lists, in its order (a name listed twice is checked twice, as by `-c`)."""
    entries = []
    form = _Form.UNDECIDED
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.startswith(b"#"):
            continue
        line = line.removesuffix(b"\r")
        if not line:
            continue
        if b"\0" in line:
            raise ManifestError(f"line {number} holds a NUL byte, which no file name can")
        if tagged := _TAGGED.fullmatch(line):
            escaped, name, digest = tagged.groups()
        elif plain := _PLAIN.fullmatch(line):
            escaped, digest, rest = plain.groups()
            form, name = _name(rest, form, number)
        else:
            raise ManifestError(f"line {number} is not sha256sum output")
        if escaped:
            if not _ESCAPED_NAME.fullmatch(name):
                raise ManifestError(f"line {number} is not sha256sum output: an escaped name (the line starts with "
                                    "a backslash) holds only \\\\, \\n and \\r after a backslash")
            name = re.sub(rb"\\(.)", lambda escape: _ESCAPES[escape.group(1)], name)
        if name == b"-":
            raise ManifestError(f"line {number} names `-`, standard input to sha256sum -c; list the file as ./-")
        if not name:
            raise ManifestError(f"line {number} names no file")
        entries.append(Entry(number, digest.decode().lower(), name))
    if not entries:
        raise ManifestError("lists no file (sha256sum -c: no properly formatted checksum lines)")
    return entries


def _name(rest: bytes, form: _Form, number: int) -> tuple[_Form, bytes]:
    """Split what follows a plain line's hash and blank into the mode and the name, as coreutils' split_3 does."""
    if len(rest) == 1 or rest[:1] not in (b" ", b"*"):
        if form is _Form.GNU:
            raise ManifestError(f"line {number} is not sha256sum output: `HASH NAME` among `HASH  NAME` lines")
        return _Form.REVERSED, rest
    if form is _Form.REVERSED:
        return form, rest
    return _Form.GNU, rest[1:]


def line(field: bytes, name: bytes) -> bytes:
    """One line as `sha256sum` writes it in text mode, escapes and all (`Tree.digest` writes a link's target in the
    hash's place)."""
    escaped = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return (b"\\" if escaped != name else b"") + field + b"  " + escaped + b"\n"


def shown(name: bytes) -> str:
    """A file name for an operator's message: printable as it stands, otherwise quoted with its odd bytes written
    out (`\\n`, `\\xe9`), so a message never holds a raw newline or a byte that is not UTF-8."""
    text = name.decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text and text == text.strip():
        return text
    out = []
    for char in text:
        if "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char == "\\" or not char.isprintable():
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return '"' + "".join(out).replace('"', '\\"') + '"'


# What a read fails with when the machine is short of something (descriptors, memory, a sound disk), whatever the
# release holds: never a reason to refuse it.
MACHINE_FAULTS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.ENOSPC, errno.EAGAIN,
                            errno.EINTR, errno.ENOBUFS})


def verify(top: Confined, manifest: str, uploaded: Iterable[bytes]) -> str | None:
    """Check the manifest at the top of the release `top` against it; None when it verifies, else the first problem.

    `uploaded` is every file of the release but those the manifest need not list (Tree.uploaded), so a cut scp
    cannot pass as complete.
    """
    try:
        with top.open_file(manifest) as handle:
            entries = parse(handle.read())
    except (ManifestError, NotARegularFile) as exc:
        return f"manifest {manifest} {exc}"
    except IsADirectoryError:
        return f"manifest {manifest} is a directory"
    paths = [(entry, os.path.normpath(entry.name)) for entry in entries]
    for entry, rel in paths:
        if rel == b".." or rel.startswith(b"../") or os.path.isabs(rel):
            return f"manifest {manifest} line {entry.number} names a path outside the release"
    with _Dirs(top) as dirs:
        for entry, rel in paths:
            try:
                actual = file_sha256(dirs, rel)
            except (FileNotFoundError, NotADirectoryError):
                return f"{shown(rel)} is listed in the manifest but missing"
            except IsADirectoryError:
                return f"{shown(rel)} is listed in the manifest but is a directory"
            except NotARegularFile as exc:
                return f"{shown(rel)} is listed in the manifest but {exc}"
            except OSError as exc:
                if exc.errno in MACHINE_FAULTS:  # the machine's, not the release's: not a verdict on it
                    raise
                return f"{shown(rel)} is listed in the manifest but cannot be read: {exc.strerror}"
            if actual != entry.digest:
                return f"{shown(rel)} does not match its sha256 in the manifest"
        listed = {rel for _, rel in paths}
        for rel in uploaded:
            if rel not in listed and dirs.kind(rel) != stat.S_IFLNK:
                return f"{shown(rel)} is not listed in the manifest"
    return None


def file_sha256(dirs: _Dirs, rel: bytes) -> str:
    """The sha256 of the regular file `rel` of the release. Never through a link (maintd is root: a listed link to
    /etc/shadow would tell an uploader whether a guess of its content is right), nor behind one, however late it is
    swapped in (see confined.py), and never a FIFO or a device, whose open or read would block the check for good.
    Links are what `find -type f` leaves out of the README's recipe, so they need not be listed; a link's target is
    part of the cluster's digest instead."""
    where, name = dirs.parent(rel)
    total = hashlib.sha256()
    with where.open_file(name) as handle:
        # Not hashlib.file_digest: its 256 KiB buffer, made afresh for each file, cost more than the hash of a
        # typical source file.
        while chunk := handle.read(_CHUNK):
            total.update(chunk)
    return total.hexdigest()


def digest(top: Confined, uploaded: Iterable[bytes]) -> str:
    """A sha256 over a release as uploaded (`uploaded`: Tree.uploaded, less the marker, the manifest and what maintd
    itself puts there, shared links included, so that per-server shared files may differ): every file's path and
    content (a link's target), in the lines sha256sum would write for them. Equal on two servers means the same
    release (the cluster's `prepare`); equal for two releases' db/migrate, the same migrations."""
    total = hashlib.sha256()
    with _Dirs(top) as dirs:
        for rel in uploaded:
            try:
                content = file_sha256(dirs, rel).encode()
            except NotARegularFile:
                content = _unread(*dirs.parent(rel))
            total.update(line(content, rel))
    return total.hexdigest()


def _unread(where: Confined, name: str) -> bytes:
    """What stands in the digest for an entry it does not read: a link's target, a FIFO's or a device's kind (0 for
    one gone meanwhile). All two servers can compare, and all maintd may look at."""
    target = where.link_target(name)
    return b"link " + os.fsencode(target) if target is not None else b"special %o" % (where.kind(name) or 0)


class _Dirs:
    """The directories of a release that names lie in, each reached from its top through no link (Confined, without
    `follow`): a name behind a link is NotARegularFile("lies behind a link"). The last one is kept open for the next
    name, since a manifest lists a directory's files together: one walk per directory, not per file."""

    def __init__(self, top: Confined) -> None:
        self.top = top
        self._head: str | None = None
        self._last: Confined | None = None

    def parent(self, rel: bytes) -> tuple[Confined, str]:
        """The open directory `rel` lies in, and its last component."""
        head, name = os.path.split(os.fsdecode(rel))
        if head != self._head:
            self.close()
            try:
                self._last = self.top.dir(head, follow=False)
            except PathRefused:
                raise NotARegularFile("lies behind a link", self.top.path / head) from None
            self._head = head
        assert self._last
        return self._last, name

    def kind(self, rel: bytes) -> int | None:
        """The file type bits of `rel`, never following it; None when it is not there to be seen."""
        try:
            where, name = self.parent(rel)
        except (NotARegularFile, FileNotFoundError, NotADirectoryError):
            return None
        return where.kind(name)

    def close(self) -> None:
        if self._last:
            self._last.close()
        self._head = self._last = None

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
