"""What maintd made that nobody needs any more, where a crash or a failure left it: found and removed.

- Staging directories (confined.py) that a kill -9 left between the making and the rename: at start.
- Maintenance flags in releases `current` does not point at. Nobody serves them there, and nothing lowers them
  (`maintenance off` lowers the flag where `current` points), so one would be served as a 503 with no maintenance
  recorded the day its release goes live again (`rollback`, `maintctl deploy NAME`). A kill -9 inside
  `Context.move_current` leaves one (the operator's, between the swap and its lowering in the release left), so do
  a lowering that failed (a failing disk) and an operator's `maintenance on` during a deploy that then fails before
  its swap. Lowered by a failed deploy's undo (the releases it touched), and at start once no deploy is in flight
  (every release but the live one: recovery.py). The live release's flag stays: an operator's maintenance, or a
  failed deploy's kept on (`maintenance.keep_on_failure`), until `maintctl maintenance off`.
  maintd owns `maintenance.file` in every release (contract §2: it makes it; a manifest cannot list it): a flag an
  uploader shipped is lowered by the same rule, where nobody serves it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .confined import Confined, PathRefused
from .context import Context, describe
from .tree import ReleaseError, name_problem


def remove_staging(ctx: Context) -> list[Path]:
    """At start, the staging directories a kill -9 left where maintd makes things (confined.py): in `<root>` and, in
    every release, in each directory on the way to what maintd puts there, as its writes reach them."""
    tree, ways = ctx.tree, {""}
    for rel in ctx.written_by_maintd():
        parts = Path(rel).parent.parts
        ways.update("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    with Confined.open(tree.root, tree.root) as root:
        removed = root.remove_leftovers()
    for name in tree.entries():
        try:
            release = tree.open(name)
        except (ReleaseError, FileNotFoundError, PathRefused):
            continue  # not a release (an upload's staging area), or gone meanwhile
        with release:
            for way in sorted(ways):
                try:
                    with release.dir(way) as where:
                        removed += where.remove_leftovers()
                except (FileNotFoundError, NotADirectoryError, PathRefused):
                    continue  # nothing made there, or nothing maintd would make there
    return removed


def lower_unserved_flags(ctx: Context, names: Iterable[str | None]) -> tuple[list[str], list[str]]:
    """The maintenance flag lowered in each release of `names` that `current` does not point at, each whatever
    became of the others. Returns the releases where one was up and is down now, and, in words, where one could not
    be lowered and why."""
    live, lowered, problems = ctx.tree.live(), [], []
    for name in dict.fromkeys(names):
        if not name or name == live or name_problem(name):
            continue  # the live release, or no release at all (an upload's staging area)
        path = ctx.tree.path(name)
        try:
            if ctx.flags.is_up(path):
                ctx.flags.lower_in(path)
                lowered.append(name)
        except Exception as exc:
            problems.append(f"the maintenance flag in releases/{name}, which nobody serves, could not be lowered: "
                            f"{describe(exc)}")
    return lowered, problems
